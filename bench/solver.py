"""Fewer steps: DPM-Solver++ (2M) at 15–30 steps against DDIM at 50 (and 20, as a control), for
MultiDiffusion and every MSD gradient mode, on the analytic horizon prior (coherent fraction; distance to
the sampling ODE's solution) and on the tiny SD model (cross-scale discrepancy along the trajectory).

    .venv/bin/python bench/solver.py --quick    # 12 seeds, 64×64 only, no exact gradient   (≈ 6 min)
    .venv/bin/python bench/solver.py            # 24 seeds, 64×64 and 64×128 wrap          (≈ 25 min on 2 cores)
    .venv/bin/python bench/solver.py --only omega    # one part: horizon, ode, omega (the ω sweep) or tiny

Writes bench/results/solver.json (--quick: solver-quick.json; --only PART: solver-PART.json).
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

from msd_core.sampling.sampler import cross_scale_discrepancy
from msd_core.settings import GenerationSettings

SOLVERS = (("ddim", 50), ("ddim", 20), ("dpmpp-2m", 15), ("dpmpp-2m", 20), ("dpmpp-2m", 25), ("dpmpp-2m", 30))
# Stand in for the exact solution of the sampling ODE. DPM++ runs from t = 999 to σ = 0; DDIM starts later
# (981 for 50 steps) and stops at ᾱ_0 < 1, so each solver is measured against both.
REFERENCES = (("dpmpp-2m", 500), ("ddim", 500))
GRADIENTS = ("exact", "refresh", "fast")
SHAPES = ((64, 64, False), (64, 128, True))


def print_header(scheduler: str, steps: int) -> None:
    print(f"\n{scheduler}, {steps} steps\n" + "\n".join(markdown_table([], COLUMNS).splitlines()[:2]))


def horizon_part(quick: bool) -> list[dict]:
    seeds = list(range(12 if quick else 24))
    prior = HorizonPrior(horizons=WIDE_PRIOR)
    gradients = ("refresh", "fast") if quick else GRADIENTS
    rows = []
    print(f"\nhorizon prior: {len(seeds)} seeds, window 16, stride 4, ω = 10 (projection)")
    for height, width, wrap in SHAPES[:1] if quick else SHAPES:
        for scheduler, steps in SOLVERS:
            print_header(scheduler, steps)
            run = dict(wrap=wrap, scheduler=scheduler)
            rows.append(run_config(prior, "wide", height, width, seeds, steps, **run))
            for gradient in gradients:
                rows.append(run_config(prior, "wide", height, width, seeds, steps, omega=10.0, gradient=gradient, **run))
    return rows


def omega_sweep(quick: bool) -> list[dict]:
    """Does ω's cosine decay need retuning for fewer steps? ω_t depends on t only, but the number of
    guidance steps per unit of t grows with the step count: sweep ω for both solvers."""
    seeds, prior, rows = list(range(12 if quick else 24)), HorizonPrior(horizons=WIDE_PRIOR), []
    for scheduler, steps in (SOLVERS[0], SOLVERS[3]):
        print_header(scheduler, steps)
        for omega in (2.5, 5.0, 10.0):
            rows.append(run_config(prior, "wide", 64, 128, seeds, steps, wrap=True, omega=omega, gradient="refresh",
                                   scheduler=scheduler))
    return rows


def ode_error_part(quick: bool) -> list[dict]:
    """MultiDiffusion (ω = 0) is a deterministic ODE with the merged denoiser, so a solver's accuracy is its
    distance to that ODE's solution from the same noise: RMS over pixels against each of ``REFERENCES``."""
    seeds = list(range(12 if quick else 24))
    prior = HorizonPrior(horizons=WIDE_PRIOR)

    def sample(scheduler, steps):
        return sample_panoramas(prior, 64, 64, seeds, scheduler=scheduler, steps=steps)[0]

    references = {f"{scheduler} {steps}": sample(scheduler, steps) for scheduler, steps in REFERENCES}
    rows = []
    for scheduler, steps in (*SOLVERS, *REFERENCES):
        images = sample(scheduler, steps)
        row = {"scheduler": scheduler, "steps": steps, "seeds": len(seeds), **{
            f"rms_error_vs_{name}": float((images - reference).pow(2).mean().sqrt()) for name, reference in references.items()
        }}
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


PARTS = {"horizon": horizon_part, "ode": ode_error_part, "omega": omega_sweep, "tiny": tiny_model_part}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and configurations (a few minutes)")
    parser.add_argument("--only", choices=PARTS, help="run one part (written to solver-PART.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small float64 tensors: one thread is fastest and fair to a busy machine
    results = {"environment": environment()}
    for name in [args.only] if args.only else ("horizon", "ode", "tiny"):
        results[name] = PARTS[name](args.quick)
    write_json(f"solver-{args.only}" if args.only else "solver-quick" if args.quick else "solver", results)


if __name__ == "__main__":
    main()
