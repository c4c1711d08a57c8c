"""Screened after v0.9 (docs/layout.md 6.15): the pull's correction spread bilinearly instead of evenly over each block.

A window is pulled by dsᵀ of its cross-scale residual, every pixel of a block moved by the same amount, so a strong
pull shows the level above's blocks (the block-edge ratio; section 6.10 stopped ω at 14 for it). ``bilinear_spread()``
replaces dsᵀ by a bilinear upsample (scaled as dsᵀ) in the fast and refresh gradients' closed form and in the exact
gradient's backward pass through ds; the loss, its value, the merge and everything else are unchanged. A block's mean
moves as before at low frequencies, less at the level above's finest ([1/8, 3/4, 1/8] per axis), and nothing is
moved block-wise. It is a knob the sampler does not have: a context manager puts it in ``msd_core``'s sampler for a run.

    .venv/bin/python bench/pull_spread.py [--seeds 72] [--omegas 16 18 20] [--detail-seeds 24] [--trained-seeds 16]

writes ``bench/results/layout-pull-spread.json``: the 16-cell layout table (Standard and Draft, the presets as they
are and bilinear at each ω), the 1/f² Gaussian prior's bands and block edges and the trained CNN's.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import torch
import torch.nn.functional as F
from common import environment, write_json

from msd_core.sampling import sampler
from msd_core.sampling.windows import HALF
from msd_core.settings import QUALITY


def bilinear_transpose(coarse: torch.Tensor, factor=HALF) -> torch.Tensor:
    """In place of dsᵀ: each coarse value spread by bilinear interpolation, scaled by 1/(fh·fw) as dsᵀ is."""
    return F.interpolate(coarse, scale_factor=tuple(factor), mode="bilinear", align_corners=False) / math.prod(factor)


class _BlockMeanBilinearBackward(torch.autograd.Function):
    """ds (the block mean) forwards; ``bilinear_transpose`` of the incoming gradient backwards."""

    @staticmethod
    def forward(ctx, latents, factor):
        ctx.factor = factor
        return F.avg_pool2d(latents, factor)

    @staticmethod
    def backward(ctx, grad):
        return bilinear_transpose(grad, ctx.factor), None


def downsample(latents, factor=HALF):
    """``windows.downsample`` (the block mean) with ``bilinear_transpose`` as its backward pass."""
    return _BlockMeanBilinearBackward.apply(latents, tuple(factor))


@contextlib.contextmanager
def bilinear_spread():
    """The sampler's pull spread bilinearly while the block runs (its module globals swapped, then put back). Its
    ds keeps its values everywhere; only the exact gradient differentiates through it."""
    saved = sampler.downsample, sampler.downsample_transpose
    sampler.downsample, sampler.downsample_transpose = downsample, bilinear_transpose
    try:
        yield
    finally:
        sampler.downsample, sampler.downsample_transpose = saved


def settings_for(omegas: list[float]) -> dict[str, tuple[dict, bool]]:
    """name: (GenerationSettings changes, bilinear spread)."""
    result = {}
    for quality in ("standard", "draft"):
        preset = QUALITY[quality][0]
        result[f"{quality.title()} (block, ω {preset['omega']:g})"] = (preset, False)
        for omega in omegas:
            result[f"{quality.title()}, bilinear, ω {omega:g}"] = ({**preset, "omega": omega}, True)
    return result


def layout_rows(settings: dict[str, tuple[dict, bool]], seeds: int) -> list[dict]:
    import layout

    rows = []
    for bilinear in (False, True):
        names = [name for name, (_, spread) in settings.items() if spread == bilinear]
        layout.ALL_SETTINGS.update({name: settings[name][0] for name in names})
        with bilinear_spread() if bilinear else contextlib.nullcontext():
            part, _ = layout.aspects_part(False, seeds, names)
        rows += [row for row in part if not (bilinear and row["setting"] == "prior's own draws")]
    print("\n" + layout.start_table(rows, tuple(settings)))
    return rows


def gaussian_rows(settings: dict[str, tuple[dict, bool]], seeds: int) -> list[dict]:
    import layout

    rows = []
    for name, (changes, bilinear) in settings.items():
        if name.startswith("Standard"):
            layout.ALL_SETTINGS[name] = changes
            with bilinear_spread() if bilinear else contextlib.nullcontext():
                rows += layout.detail_part(seeds, [name])
    return rows


def trained_rows(settings: dict[str, tuple[dict, bool]], seeds: int) -> list[dict]:
    """``trained_prior.detail`` (each band over the data's and over v0.9's, paired; the 2×2 block edges) on Standard."""
    import trained_prior

    standard = {name: value for name, value in settings.items() if name.startswith("Standard")}
    return trained_prior.detail(seeds, {name: changes for name, (changes, _) in standard.items()},
                                lambda name: bilinear_spread() if standard[name][1] else contextlib.nullcontext())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=72, help="layout seeds per cell")
    parser.add_argument("--omegas", type=float, nargs="+", default=[16.0, 18.0, 20.0])
    parser.add_argument("--detail-seeds", type=int, default=24, help="the Gaussian prior's seeds")
    parser.add_argument("--trained-seeds", type=int, default=16, help="the trained CNN's seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = settings_for(args.omegas)
    write_json("layout-pull-spread", {"environment": environment(),
                                      "aspects": layout_rows(settings, args.seeds),
                                      "gaussian": gaussian_rows(settings, args.detail_seeds),
                                      "trained": trained_rows(settings, args.trained_seeds)})


if __name__ == "__main__":
    main()
