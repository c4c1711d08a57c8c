"""The finest level's steps within its own 2×2 blocks, deterministic (v0.10) or stochastic (``--fine-steps``,
docs/layout.md 6.17), side by side on one preset.

    .venv/bin/python bench/fine_steps.py [--preset standard] [--seeds 72] [--first-seed 0] [--large] [--detail]

writes ``bench/results/layout-fine-steps-<preset>[-large].json``: the 16-cell layout table (``--large``: the horizon,
river and skyline at the 8192×4096 world and the 16384×4096 strip instead) and, with ``--detail``, the 1/f² Gaussian
prior's bands and block edges and the trained CNN's (each ring over the data's and, paired, over deterministic steps').
"""

from __future__ import annotations

import argparse

import torch
from common import environment, write_json

from msd_core.settings import QUALITY


def settings_for(preset: str) -> dict[str, dict]:
    """name: GenerationSettings changes, deterministic steps first."""
    changes = QUALITY[preset][0]
    return {f"{preset.title()}, {steps} finest steps": {**changes, "fine_steps": steps}
            for steps in ("deterministic", "stochastic")}


def main() -> None:
    import layout
    import trained_prior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(QUALITY), default="standard")
    parser.add_argument("--seeds", type=int, default=72, help="layout seeds per cell")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--large", action="store_true", help="the large shapes (horizon, river, skyline) instead")
    parser.add_argument("--detail", action="store_true", help="also the Gaussian prior's and the trained CNN's detail")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = settings_for(args.preset)
    layout.ALL_SETTINGS.update(settings)
    shapes, priors = (layout.LARGE_ASPECTS, ["horizon", "river", "skyline"]) if args.large else (None, None)
    aspects, _ = layout.aspects_part(False, args.seeds, list(settings), priors=priors, first_seed=args.first_seed,
                                     shapes=shapes)
    print("\n" + layout.start_table(aspects, tuple(settings)))
    result = {"environment": environment(), "seeds": [args.first_seed, args.first_seed + args.seeds], "aspects": aspects}
    if args.detail:
        result["gaussian"] = layout.detail_part(24, list(settings))
        result["trained"] = trained_prior.detail(16, settings)
    write_json(f"layout-fine-steps-{args.preset}{'-large' if args.large else ''}", result)


if __name__ == "__main__":
    main()
