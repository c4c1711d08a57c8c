"""Screened after v0.11 (docs/layout.md 6.18): the finest level's x₀ mixed with its dilated views', DemoFusion's dilated
sampling (Du et al., CVPR 2024).

Every k-th pixel of the finest latent z_t makes a view of the whole panorama, k times smaller (``dilated_grids``; k as
large as leaves a window across the shorter side). Its tiles are denoised at the step's own t, and each pixel takes its
view's x₀ estimate (``dilated_x0``). After the step, the finest level's x₀ moves the fraction w·cos-decay(t) towards it
and z_{t−1} by as much as the step's slope says (``mix_dilated``), on the steps with the preset's own gradient. A view
sees a one-pixel speck at full contrast beside the whole panorama, where the coarser levels' block means barely see it.
``shrink`` > 0 moves only the part of the change beyond that many times its rms (a veto on outliers, not on texture).
The sampler does not have the knob: a context manager puts it into the bench's sampling loop for a run.

    .venv/bin/python bench/dilated_views.py [--seeds 72] [--first-seed 0] [--large] [--detail]

writes ``bench/results/layout-dilated-views[-large][-from-S].json``: the 16-cell layout table (Standard and Draft as
they are, with the views at w 0.5, and with w 1 shrunk by 3 rms), the UNet work the views add, and with ``--detail``
the 1/f² Gaussian prior's bands and block edges and the trained CNN's.
"""

from __future__ import annotations

import argparse
import contextlib
import math

import horizon
import torch
from common import environment, write_json

from msd_core.sampling.plan import forward_equivalents
from msd_core.sampling.sampler import (BatchMap, SolverStep, alphas_cumprod, cosine_decay, predicted_x0, run_batches,
                                       x0_weight)
from msd_core.sampling.windows import StackedGrids, WindowGrid
from msd_core.settings import QUALITY

# What the views added in the last runs, in window forwards (a view's tile is one forward, no backward).
WORK = {"forwards": 0}


def dilation_stride(height: int, width: int, window: int) -> int:
    """The largest k whose views still hold a window across the latent's shorter side (1: no view skips pixels)."""
    return max(1, min(height, width) // window)


def dilated_grids(height: int, width: int, stride: int, window: int, wrap: bool) -> list[tuple[int, int, WindowGrid]]:
    """(a, b, tiles of the view ``latents[..., a::stride, b::stride]``) for every phase, row by row. A view wraps round
    a 360° latent when its columns do: when ``stride`` divides the width."""
    if stride < 2:
        raise ValueError(f"a dilated view skips pixels: its stride must be ≥ 2 (got {stride})")
    return [(a, b, WindowGrid(len(range(a, height, stride)), len(range(b, width, stride)), window, window,
                              wrap and width % stride == 0))
            for a in range(stride) for b in range(stride)]


def dilated_x0(latents: torch.Tensor, stride: int, window: int, wrap: bool, step: SolverStep, denoise,
               prediction_type: str = "epsilon", view_batch: int = 8, map_batches: BatchMap = run_batches) -> torch.Tensor:
    """The model's x₀ estimate of z_t (B, C, H, W) read through its dilated views: each view's tiles denoised at t and
    merged, every pixel its view's estimate."""
    alpha_bar = alphas_cumprod(step)[0]
    views = [(a, b, StackedGrids((grid,) * latents.shape[0]))
             for a, b, grid in dilated_grids(latents.shape[2], latents.shape[3], stride, window, wrap)]
    windows = torch.cat([grids.crop(latents[..., a::stride, b::stride]) for a, b, grids in views])
    WORK["forwards"] += windows.shape[0] // latents.shape[0]

    def run_batch(batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = predicted_x0(windows[batch], denoise(windows[batch], step.t), math.sqrt(alpha_bar),
                          math.sqrt(1 - alpha_bar), prediction_type)
        return x0, x0

    x0_windows, _ = map_batches(windows, view_batch, run_batch)
    x0 = torch.empty_like(latents)
    for (a, b, grids), part in zip(views, x0_windows.split([len(grids) for _, _, grids in views])):
        x0[..., a::stride, b::stride] = grids.merge(part)
    return x0


def mix_dilated(prev: torch.Tensor, x0: torch.Tensor, x0_dilated: torch.Tensor, weight: float, step: SolverStep,
                prediction_type: str = "epsilon", memory: bool = False, shrink: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_{t−1}, x₀) with x₀ moved ``weight`` of the way to ``x0_dilated`` (with ``shrink``, only the change beyond
    ``shrink`` times its rms per panorama and channel) and z_{t−1} by the step's slope in x₀ times that (``x0_weight``;
    ``memory``: whether the step read a solver memory)."""
    change = x0_dilated - x0
    if shrink:
        rms = change.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        change = change.sign() * (change.abs() - shrink * rms).clamp_min(0)
    change = weight * change
    return prev + x0_weight(step, prediction_type, memory) * change, x0 + change


@contextlib.contextmanager
def dilated_views(weight: float, gradient: str, shrink: float = 0.0, num_train_timesteps: int = horizon.TRAIN_STEPS):
    """The bench's sampling loop (``horizon.sample_with_settings``) with the views mixed into every step that guides
    with ``gradient`` and runs every level; put back afterwards."""
    step_function = horizon.msd_step

    def msd_step(latents, grids, step, denoise, omega, **options):
        history = options["x0_history"]
        memory = history[-1] is not None
        prev = step_function(latents, grids, step, denoise, omega, **options)
        levels_run = options.get("levels_run") or len(grids)
        finest = grids[-1]
        stride = dilation_stride(finest.height, finest.width, finest.window)
        if omega == 0 or options.get("gradient") != gradient or levels_run < len(grids) or len(grids) < 2 or stride < 2:
            return prev
        prediction_type = options.get("prediction_type", "epsilon")
        x0_whole = dilated_x0(latents, stride, finest.window, finest.wrap, step, denoise, prediction_type,
                              options.get("view_batch", 8))
        prev, history[-1] = mix_dilated(prev, history[-1], x0_whole, weight * cosine_decay(step.t, num_train_timesteps),
                                        step, prediction_type, memory, shrink)
        return prev

    horizon.msd_step = msd_step
    try:
        yield
    finally:
        horizon.msd_step = step_function


def settings_for() -> dict[str, tuple[dict, float, float]]:
    """name: (GenerationSettings changes, the views' weight, their shrink); each preset as it is first."""
    result = {}
    for quality in ("standard", "draft"):
        preset, name = QUALITY[quality][0], quality.title()
        result[name] = (preset, 0.0, 0.0)
        result[f"{name}, dilated views w 0.5"] = (preset, 0.5, 0.0)
        if quality == "standard":
            result[f"{name}, dilated views w 1 beyond 3 rms"] = (preset, 1.0, 3.0)
    return result


def around(settings: dict[str, tuple[dict, float, float]]):
    """A context per setting name: its views, or none."""
    def views(name: str):
        changes, weight, shrink = settings[name]
        return dilated_views(weight, changes["gradient"], shrink) if weight else contextlib.nullcontext()

    return views


def layout_rows(settings: dict[str, tuple[dict, float, float]], seeds: int, first_seed: int, large: bool) -> list[dict]:
    """``layout.aspects_part`` per setting, each row with the views' forwards and their share of the plan's work."""
    import layout

    rows, views = [], around(settings)
    for name, (changes, _, _) in settings.items():
        layout.ALL_SETTINGS[name] = changes
        run_aspect = layout.run_aspect

        def counted(*args, **kwargs):
            before = WORK["forwards"]
            row = run_aspect(*args, **kwargs)
            row["dilated_forwards"] = WORK["forwards"] - before
            plan_work = forward_equivalents({"forwards": row["unet_forwards"], "backwards": row["unet_backwards"],
                                             "wide_extra": row.get("unet_wide_extra", 0.0)})
            row["dilated_share"] = row["dilated_forwards"] / plan_work
            return row

        layout.run_aspect = counted
        try:
            with views(name):
                part, _ = layout.aspects_part(False, seeds, [name], first_seed=first_seed,
                                              shapes=layout.LARGE_ASPECTS if large else None)
        finally:
            layout.run_aspect = run_aspect
        rows += [row for row in part if not (rows and row["setting"] == "prior's own draws")]
    print("\n" + layout.start_table(rows, tuple(settings)))
    for row in rows:
        if row.get("dilated_forwards"):
            print(f"{row['prior']:>8} {row['panorama']:<13} {row['setting']:<40} views' forwards {row['dilated_forwards']}"
                  f" (+{100 * row['dilated_share']:.1f} % of the plan's work)")
    return rows


def main() -> None:
    import layout
    import trained_prior

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=72, help="layout seeds per cell")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--large", action="store_true", help="the large shapes (LARGE_ASPECTS) instead")
    parser.add_argument("--detail", action="store_true", help="also the Gaussian prior's and the trained CNN's detail")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = settings_for()
    if args.large:  # Standard only: the large shapes take long
        settings = {name: value for name, value in settings.items() if name.startswith("Standard")}
    result = {"environment": environment(), "seeds": [args.first_seed, args.first_seed + args.seeds],
              "aspects": layout_rows(settings, args.seeds, args.first_seed, args.large)}
    if args.detail:
        standard = {name: value for name, value in settings.items() if name.startswith("Standard")}
        views, result["gaussian"] = around(standard), []
        for name, (changes, _, _) in standard.items():
            layout.ALL_SETTINGS[name] = changes
            with views(name):
                result["gaussian"] += layout.detail_part(24, [name])
        print(layout.detail_table(result["gaussian"]))
        result["trained"] = trained_prior.detail(16, {name: changes for name, (changes, _, _) in standard.items()},
                                                 views)
    suffix = ("-large" if args.large else "") + (f"-from-{args.first_seed}" if args.first_seed else "")
    write_json(f"layout-dilated-views{suffix}", result)


if __name__ == "__main__":
    main()
