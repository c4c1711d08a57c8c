"""Fewer steps: DPM-Solver++ (2M) at 15–30 steps against DDIM at 50 (and 20, as a control), for
MultiDiffusion and every MSD gradient mode, on the analytic horizon prior (coherent fraction; distance to
the sampling ODE's solution) and on the tiny SD model (cross-scale discrepancy along the trajectory).

    .venv/bin/python bench/solver.py --quick    # 12 seeds, 64×64 only, no exact gradient   (≈ 3 min)
    .venv/bin/python bench/solver.py            # 24 seeds, 64×64 and 64×128 wrap          (≈ 25 min on 2 cores)

Writes bench/results/solver.json (--quick: solver-quick.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from common import environment, markdown_table, write_json
from horizon import HorizonPrior, sample_panoramas
from layout import COLUMNS, WIDE_PRIOR, run_config

from msd_core.sampler import cross_scale_discrepancy
from msd_core.settings import GenerationSettings

SOLVERS = (("ddim", 50), ("ddim", 20), ("dpmpp-2m", 15), ("dpmpp-2m", 20), ("dpmpp-2m", 25), ("dpmpp-2m", 30))
REFERENCE = ("ddim", 500)  # stands in for the exact solution of the sampling ODE
GRADIENTS = ("exact", "refresh", "fast")
SHAPES = ((64, 64, False), (64, 128, True))


def horizon_part(quick: bool) -> list[dict]:
    seeds = list(range(12 if quick else 24))
    prior = HorizonPrior(horizons=WIDE_PRIOR)
    gradients = ("refresh", "fast") if quick else GRADIENTS
    rows = []
    print(f"\nhorizon prior: {len(seeds)} seeds, window 16, stride 4, ω = 10 (projection)")
    for height, width, wrap in SHAPES[:1] if quick else SHAPES:
        for scheduler, steps in SOLVERS:
            print(f"\n{scheduler}, {steps} steps\n" + "\n".join(markdown_table([], COLUMNS).splitlines()[:2]))
            run = dict(wrap=wrap, scheduler=scheduler)
            rows.append(run_config(prior, "wide", height, width, seeds, steps, **run))
            for gradient in gradients:
                rows.append(run_config(prior, "wide", height, width, seeds, steps, omega=10.0, gradient=gradient, **run))
    return rows


def ode_error_part(quick: bool) -> list[dict]:
    """MultiDiffusion (ω = 0) is a deterministic ODE with the merged denoiser, so a solver's accuracy is its
    distance to that ODE's solution from the same noise: RMS over pixels against DDIM with 500 steps."""
    seeds = list(range(12 if quick else 24))
    prior = HorizonPrior(horizons=WIDE_PRIOR)
    reference, _ = sample_panoramas(prior, 64, 64, seeds, scheduler=REFERENCE[0], steps=REFERENCE[1])
    rows = []
    for scheduler, steps in SOLVERS:
        images, _ = sample_panoramas(prior, 64, 64, seeds, scheduler=scheduler, steps=steps)
        row = {"scheduler": scheduler, "steps": steps, "seeds": len(seeds), "reference": f"{REFERENCE[0]} {REFERENCE[1]}",
               "rms_error": float((images - reference).pow(2).mean().sqrt())}
        rows.append(row)
        print(row, flush=True)
    return rows


def tiny_model_part(quick: bool) -> list[dict]:
    """Mean cross-scale discrepancy (over steps and level pairs) of the tiny SD model, per solver."""
    from msd_core.pipeline import MSDPanoramaPipeline

    base = GenerationSettings(
        prompt="a misty alpine valley", model="tiny", device="cpu", width=256 if quick else 512,
        height=128 if quick else 256, view_batch=16, seed=3, gradient="fast",
    )
    pipe = MSDPanoramaPipeline.from_settings(base)
    rows = []
    print(f"\ntiny SD model: {base.width}×{base.height} px")
    for scheduler, steps in (SOLVERS[0], SOLVERS[3]) if quick else SOLVERS:  # quick: DDIM 50, DPM++ 20
        for omega in (0.0, 10.0):
            settings = dataclasses.replace(base, scheduler=scheduler, steps=steps, omega=omega)
            per_step: dict[int, dict[int, torch.Tensor]] = {}

            def record(info, per_step=per_step):
                per_step.setdefault(info.step, {})[info.level] = info.latents

            started = time.perf_counter()
            result = pipe(settings, callback=record, decode=False)
            gaps = [cross_scale_discrepancy(levels[level], levels[level - 1])
                    for levels in per_step.values() for level in sorted(levels) if level > 1]
            row = {"scheduler": scheduler, "steps": steps, "method": "MD (ω=0)" if omega == 0 else "MSD fast",
                   "omega": omega, "levels": result.plan.levels, "discrepancy": statistics.mean(gaps),
                   "final_discrepancy": statistics.mean(gaps[-(result.plan.levels - 1):]),
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and configurations (a few minutes)")
    parser.add_argument("--skip-tiny", action="store_true", help="only the horizon prior")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small float64 tensors: one thread is fastest and fair to a busy machine
    env = environment()
    horizon_rows = horizon_part(args.quick)
    print("\n" + markdown_table(horizon_rows, ["scheduler", "steps", *COLUMNS]))
    ode_rows = ode_error_part(args.quick)
    tiny_rows = [] if args.skip_tiny else tiny_model_part(args.quick)
    write_json("solver-quick" if args.quick else "solver",
               {"environment": env, "horizon": horizon_rows, "ode_error": ode_rows, "tiny_model": tiny_rows})


if __name__ == "__main__":
    main()
