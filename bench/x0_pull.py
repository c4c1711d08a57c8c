"""The exact pull taken through the model's x₀ estimate (``--pull-through x0``, docs/layout.md 6.16) against the
paper's, through the solver step, on the Standard and Draft presets.

    .venv/bin/python bench/x0_pull.py [--seeds 72] [--omegas 14] [--detail-seeds 24] [--trained-seeds 16]

writes ``bench/results/layout-x0-pull.json``: the 16-cell layout table (each preset as it is and through x̂₀ at each
ω), the 1/f² Gaussian prior's bands and block edges and the trained CNN's (Standard; each ring over the data's and,
paired on the same seeds, over the preset's own).
"""

from __future__ import annotations

import argparse

import torch
from common import environment, write_json

from msd_core.settings import QUALITY


def settings_for(omegas: list[float]) -> dict[str, dict]:
    """name: GenerationSettings changes; each preset as it is first."""
    result = {}
    for quality in ("standard", "draft"):
        preset = QUALITY[quality][0]
        result[f"{quality.title()} (through the step, ω {preset['omega']:g})"] = preset
        for omega in omegas:
            result[f"{quality.title()}, through x̂₀, ω {omega:g}"] = {**preset, "omega": omega, "pull_through": "x0"}
    return result


def main() -> None:
    import layout
    import trained_prior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=72, help="layout seeds per cell")
    parser.add_argument("--omegas", type=float, nargs="+", default=[14.0])
    parser.add_argument("--detail-seeds", type=int, default=24, help="the Gaussian prior's seeds")
    parser.add_argument("--trained-seeds", type=int, default=16, help="the trained CNN's seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = settings_for(args.omegas)
    layout.ALL_SETTINGS.update(settings)
    aspects, _ = layout.aspects_part(False, args.seeds, list(settings))
    print("\n" + layout.start_table(aspects, tuple(settings)))
    standard = {name: changes for name, changes in settings.items() if name.startswith("Standard")}
    write_json("layout-x0-pull", {"environment": environment(), "aspects": aspects,
                                  "gaussian": layout.detail_part(args.detail_seeds, list(standard)),
                                  "trained": trained_prior.detail(args.trained_seeds, standard)})


if __name__ == "__main__":
    main()
