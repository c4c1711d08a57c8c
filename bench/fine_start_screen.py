"""Issue 20 item 2: the screen of candidates for the finest level's extra suns and broken rivers (docs/layout.md 6.6).

Samples the analytic priors as ``horizon.sample_with_settings`` does (drawn start, pole caps, the preset's solver
and gradients; checked to give the same panoramas to the last bit for the landed setting with v0.6's deterministic
join, ``--fine-join deterministic``), with two knobs the sampler does not have, to compare candidates before one is
landed:
- ``fine_start`` / ``staged``: the finest level (staged: every level below the top two, at evenly spaced shares;
  "together": all of them at once) joins after that share of the steps, held meanwhile as the level above's state plus its own noise
  (``sampler.held_latents``); staged is what ``--fine-start`` does;
- ``kappa`` (until the share ``kappa_until`` of the steps): ω times κ at the finest level only.
Prints, per cell, coherent (collapsed; each coarser level's coherent count at the last step that ran them all).

    .venv/bin/python bench/fine_start_screen.py '{"paper": {}, "start 0.6": {"fine_start": 0.6}}' [SEEDS] [SETTING] [all]
"""

import dataclasses
import json
import math
import sys
import time

import torch
from horizon import PRIOR_FACTOR, TRAIN_STEPS, VIEW_BATCH
from layout import ALL_SETTINGS, ASPECTS, aspect_priors

from msd_core.models.loading import sd_ddim_scheduler
from msd_core.sampling.plan import make_plan
from msd_core.sampling.sampler import (LevelResult, alphas_cumprod, build_pyramid, cosine_decay, drawn_start,
                                       held_latents, level_denoiser, level_gradient, level_steps, msd_level_step,
                                       multidiffusion_step, solver_schedule, start_schedule)
from msd_core.sampling.sphere import CapProjection, pole_cap_step
from msd_core.sampling.windows import level_factor
from msd_core.settings import GenerationSettings

# The failing cells (docs/layout.md 6.3) and two controls.
SCREEN = [("sun", ASPECTS[0]), ("sun", ASPECTS[2]), ("river", ASPECTS[3]), ("horizon", ASPECTS[1]), ("skyline", ASPECTS[0])]


def step_levels(latents, grids, step, denoise, omega, settings, history, train_alphas, gradient, levels_run, kappa):
    """``msd_step`` with ω × ``kappa`` at the finest level and only ``levels_run`` levels denoised."""
    factors = [level_factor(fine, coarse) for coarse, fine in zip(grids, grids[1:])]
    pyramid = build_pyramid(latents, len(grids), factors)
    steps = level_steps(step, factors, settings.coarse_noise, train_alphas)
    prev, x0 = multidiffusion_step(pyramid[0], grids[0], steps[0], level_denoiser(denoise, steps[0]),
                                   view_batch=VIEW_BATCH, previous_x0=history[0])
    history[0], results = x0, [LevelResult(1, prev, x0)]
    for level in range(1, levels_run):
        level_omega = omega * (kappa if level == len(grids) - 1 else 1.0)
        mode = level_gradient(level, len(grids), gradient, settings.coarse_gradient)
        prev, x0 = msd_level_step(pyramid[level], prev, grids[level], steps[level], level_denoiser(denoise, steps[level]),
                                  level_omega, gradient=mode, omega_loss=settings.omega_loss, view_batch=VIEW_BATCH,
                                  previous_x0=history[level], factor=factors[level - 1])
        history[level] = x0
        results.append(LevelResult(level + 1, prev, x0))
    if levels_run < len(grids):
        rest = factors[levels_run - 1:]
        prev = held_latents(latents, prev, math.prod(f[0] for f in rest), math.prod(f[1] for f in rest), step)
        for level in range(levels_run, len(grids)):
            history[level] = torch.nn.functional.interpolate(history[level - 1], scale_factor=factors[level - 1])
    return prev, results


def sample(prior, settings, seeds, *, fine_start=0.0, staged=False, kappa=1.0, kappa_until=1.0, record=None):
    plan = make_plan(settings, PRIOR_FACTOR, prior.window * PRIOR_FACTOR)
    scheduler = sd_ddim_scheduler()
    schedule = solver_schedule(settings.scheduler, scheduler, plan.steps)
    history = [None] * plan.levels
    latents = torch.stack([torch.randn(plan.height, plan.width, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64) for seed in seeds])[None]
    denoise = prior.denoiser()
    if plan.start_steps:
        start = start_schedule(settings.scheduler, alphas_cumprod(schedule[0])[0], math.prod(plan.coarsest_factor),
                               plan.start_steps, scheduler.alphas_cumprod)
        latents = drawn_start(latents, plan.start_grids(), plan.coarsest_factor, start, denoise, view_batch=VIEW_BATCH)
    caps = CapProjection(plan.height, plan.width, plan.caps) if plan.caps else None
    cap_views = None
    starts = [0] * plan.levels
    starts[-1] = math.floor(fine_start * plan.steps + 1e-9)
    if staged and plan.levels > 2:  # "together": every level below the top two joins with the finest
        starts = [0, 0] + [math.floor(fine_start * plan.steps * (1 if staged == "together" else (level - 1) / (plan.levels - 2))
                                      + 1e-9) for level in range(2, plan.levels)]
    for index, step in enumerate(schedule):
        gradient = plan.gradient_at(index)
        omega_t = settings.omega * cosine_decay(step.t, TRAIN_STEPS) if gradient else 0.0
        before, x0_before = latents, history[-1]
        if omega_t == 0:
            latents, history[-1] = multidiffusion_step(latents, plan.grids_at(index)[-1], step, denoise,
                                                       view_batch=VIEW_BATCH, previous_x0=history[-1])
            levels_out = [LevelResult(plan.levels, latents, history[-1])]
        else:
            latents, levels_out = step_levels(
                latents, plan.grids_at(index), step, denoise, omega_t, settings, history, scheduler.alphas_cumprod,
                gradient, sum(start <= index for start in starts), kappa if index < kappa_until * plan.steps else 1.0)
        if record is not None and len(levels_out) == plan.levels:
            record[:] = levels_out
        if caps is not None and plan.caps_at(index):
            coarse = levels_out[-2].latents if gradient and len(levels_out) > 1 else None
            cap_views = pole_cap_step(before, x0_before, latents, history[-1], caps, plan.cap_grid_at(index), step,
                                      denoise, caps=cap_views, view_batch=VIEW_BATCH, coarse=coarse, omega=omega_t,
                                      omega_loss=settings.omega_loss)
    if cap_views is not None:
        latents = caps.blend(latents, None, cap_views, alphas_cumprod(schedule[-1])[1])[0]
    return latents[0].detach(), plan


def cell(prior_name, shape, setting, seeds, **variant) -> str:
    prior = aspect_priors()[prior_name]
    scale = 16 // prior.window
    height, width, wrap = shape[0] // scale, shape[1] // scale, shape[2]
    settings = dataclasses.replace(GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                      height=height * PRIOR_FACTOR, wrap=wrap), **ALL_SETTINGS[setting])
    record = []
    images, _ = sample(prior, settings, seeds, record=record, **variant)
    scores = [prior.score(image, wrap) for image in images]
    levels = "/".join(str(sum(prior.score(image, wrap)["coherent"] for image in result.pred_x0[0]))
                      for result in record[:-1])
    name = f"{prior_name} {shape[0]}×{shape[1]}{' wrap' if wrap else ''}"
    return f"{name}: {sum(s['coherent'] for s in scores)} ({sum(s['collapsed'] for s in scores)}; {levels})"


def main() -> None:
    torch.set_num_threads(1)
    variants = json.loads(sys.argv[1])
    seeds = list(range(int(sys.argv[2]) if len(sys.argv) > 2 else 16))
    setting = sys.argv[3] if len(sys.argv) > 3 else "Standard, drawn"
    cells = ([(prior, shape) for prior in aspect_priors() for shape in ASPECTS]
             if len(sys.argv) > 4 and sys.argv[4] == "all" else SCREEN)
    for name, variant in variants.items():
        started = time.perf_counter()
        row = [cell(prior, shape, setting, seeds, **variant) for prior, shape in cells]
        print(f"{name:24s} " + " | ".join(row) + f"  [{time.perf_counter() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
