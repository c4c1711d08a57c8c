"""Does MSD keep the layout coherent where MultiDiffusion does not? Tested without pretrained weights.

Part 1 samples panoramas from an analytic horizon prior (bench/horizon.py: an exact posterior-mean
denoiser of window-sized sky-above-ground images) with msd_core's own sampler, and counts how many
panoramas have one horizon across every column. Part 2 runs the tiny SD model through the real
pipeline and records the cross-scale discrepancy and the 360° seam.

    .venv/bin/python bench/layout.py            # full: 24 seeds, 50 steps   (≈ 15 min on 2 cores)
    .venv/bin/python bench/layout.py --quick    # 8 seeds, 20 steps           (≈ 3 min)
    .venv/bin/python bench/layout.py --aspects [--quick]   # only part 3: every prior × aspect × pyramid
    .venv/bin/python bench/layout.py --start [--quick | --large | --modes] [--seeds N]   # issue 20's table
    .venv/bin/python bench/layout.py --gaussian    # large-scale mode variance of a linear prior, g = 8, 32, 128
    .venv/bin/python bench/layout.py --move [--large | --tiny] [--seeds N]   # the global level fixed or rolled
    .venv/bin/python bench/layout.py --detail [--tiny] [--seeds N]   # detail: --fine-start 0 / 0.3 / 0.6

Writes bench/results/layout.json, docs/bench-layout.png and docs/bench-horizon-examples.png (--quick:
bench/results/layout-quick.json and the figures as bench-*-quick.png beside it). Part 3 (``--aspects``,
docs/layout.md) samples four analytic priors (horizon, sun, river, skyline: bench/priors.py) at four aspects
with the paper's halving pyramid and with the global level, and writes layout-aspects.json and
docs/bench-layout-aspects.png. ``--start`` (issue 20) compares v0.4's presets with the coarse start as it was
and drawn, adds MultiDiffusion, the variance of the coarsest level's large-scale modes against the prior's and
the table of docs/layout.md section 6 (layout-start[-large|-modes|-quick].json; ``--large``: the 8192×4096
world and the 16384×4096 strip; ``--quick``: MD and Standard before/after, 8 seeds, steps ÷ 5, 64×64, 64×128 wrap
and the large world). ``--move`` compares the global level of a wrapped world fixed (v0.5) and rolled every step
(docs/layout.md section 7: the wrapped shapes, Standard and Draft, with the 0/360° seam plain, within class and the
global level's own; ``--large``: the 8192×4096 world; ``--tiny``: the tiny SD model's seam; layout-move*.json;
``--move --settings "Standard, pair" …``: PAIR_SETTINGS, the global level as two windows half a turn apart, bench only).
Seeds are channels of one latent, so one run samples them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch
from common import (environment, figure_path, markdown_table, pyplot, seam_multiple, window_seam_ratio, wrap_seam_ratio,
                    write_json)
from horizon import (PRIOR_FACTOR, SD_COARSE_NUMEL, HorizonPrior, sample_panoramas, sample_with_settings,
                     score_layout, seam_ratio)
from priors import GaussianPrior, RiverPrior, SkylinePrior, SunPrior
from spectrum import band_power, block_edge_ratio, standard_error

from msd_core.sampling.sampler import cross_scale_discrepancy
from msd_core.sampling.plan import has_poles, make_plan
from msd_core.sampling.windows import level_factor
from msd_core.settings import QUALITY, GenerationSettings

WIDE_PRIOR = range(-4, 21)  # 40 % of the components are all sky or all ground
NARROW_PRIOR = range(-1, 18)  # 21 %
OMEGAS = (0.0, 2.0, 5.0, 10.0, 20.0)
COLUMNS = ["panorama", "prior", "method", "omega", "loss", "noise", "coherent", "uniform", "transitions",
           "spread", "discrepancy", "seam", "seconds"]


def run_config(prior, prior_name, height, width, seeds, steps, *, wrap=False, omega=0.0, gradient="fast",
               loss="projection", noise="literal", keep=None, scheduler="ddim"):
    """Sample one panorama per seed and summarise the layouts (``keep``: list to store images in)."""
    mean_numel = SD_COARSE_NUMEL if loss == "mean-sd" else None
    started = time.perf_counter()
    images, trajectory = sample_panoramas(
        prior, height, width, seeds, omega=omega, gradient=gradient,
        omega_loss="mean" if loss.startswith("mean") else loss, mean_numel=mean_numel,
        noise=noise, steps=steps, wrap=wrap, scheduler=scheduler,
    )
    seconds = time.perf_counter() - started
    layouts = [score_layout(image) for image in images]
    spreads = [layout.horizon_spread for layout in layouts if layout.coherent]
    coherent = sum(layout.coherent for layout in layouts)
    row = {
        "panorama": f"{height}×{width}{' wrap' if wrap else ''}",
        "height": height, "width": width, "wrap": wrap, "prior": prior_name,
        "method": "MD" if omega == 0 else f"MSD {gradient}", "gradient": gradient, "omega": omega,
        "loss": loss if omega else "", "noise": noise, "seeds": len(seeds), "scheduler": scheduler, "steps": steps,
        "coherent": coherent / len(seeds), "coherent_count": coherent,
        "uniform": sum(layout.uniform for layout in layouts) / len(seeds),
        "transitions": statistics.mean(layout.transitions for layout in layouts),
        "spread": statistics.mean(spreads) if spreads else None,
        "discrepancy": statistics.mean(trajectory.discrepancy) if trajectory.discrepancy else None,
        "seam": statistics.mean(seam_ratio(image) for image in images),
        "seconds": seconds,
    }
    if keep is not None:
        keep.append((row, images[:4].clone()))
    print(markdown_table([row], COLUMNS).splitlines()[-1], flush=True)
    return row


def horizon_part(quick: bool) -> tuple[list[dict], list]:
    seeds = list(range(8 if quick else 24))
    steps = 20 if quick else 50
    wide, narrow = HorizonPrior(horizons=WIDE_PRIOR), HorizonPrior(horizons=NARROW_PRIOR)
    rows, examples = [], []
    print(f"\nhorizon prior: {len(seeds)} seeds, {steps} DDIM steps, window 16, stride 4")
    print("\n".join(markdown_table([], COLUMNS).splitlines()[:2]))

    # 1. The ω sweep for every loss normalisation and gradient mode, 64×64 (3 levels).
    rows.append(run_config(wide, "wide", 64, 64, seeds, steps))
    gradients = ("fast",) if quick else ("fast", "exact")
    for gradient in gradients:
        for loss in ("projection", "mean", "mean-sd", "sum"):
            for omega in OMEGAS[1:]:
                rows.append(run_config(wide, "wide", 64, 64, seeds, steps, omega=omega, gradient=gradient, loss=loss))
    if quick:  # the exact gradient at the default only
        rows.append(run_config(wide, "wide", 64, 64, seeds, steps, omega=10.0, gradient="exact"))

    # 2. Other shapes, with and without wrap-around.
    shapes = [(32, 64, False), (64, 128, False), (64, 128, True)] + ([] if quick else [(32, 64, True), (64, 64, True)])
    for height, width, wrap in shapes:
        keep = examples if (height, width, wrap) == (64, 128, False) else None
        rows.append(run_config(wide, "wide", height, width, seeds, steps, wrap=wrap, keep=keep))
        for gradient in gradients:
            rows.append(run_config(wide, "wide", height, width, seeds, steps, wrap=wrap, omega=10.0,
                                   gradient=gradient, keep=keep))

    # Where does "exact" gain over "fast": the gradient through the model, or the second model call at x̂?
    for gradient in ("exact-1f", "fast-2f"):
        for height, width in ((64, 64), (64, 128)):
            rows.append(run_config(wide, "wide", height, width, seeds, steps, omega=10.0, gradient=gradient))
    for gradient in ("exact", "exact-1f", "fast-2f"):
        rows.append(run_config(narrow, "narrow", 64, 64, seeds, steps, omega=10.0, gradient=gradient))

    # 3. A prior with fewer uniform windows.
    rows.append(run_config(narrow, "narrow", 64, 64, seeds, steps))
    for omega in OMEGAS[1:]:
        rows.append(run_config(narrow, "narrow", 64, 64, seeds, steps, omega=omega))

    # 4. How the coarse levels treat the noise that ds averaged away.
    for noise in ("fresh", "snr"):
        for omega in OMEGAS[1:]:
            rows.append(run_config(wide, "wide", 64, 64, seeds, steps, omega=omega, noise=noise))
        rows.append(run_config(narrow, "narrow", 64, 64, seeds, steps, omega=10.0, noise=noise))
    return rows, examples


def tiny_model_part(quick: bool) -> list[dict]:
    """Cross-scale discrepancy (mean over steps and level pairs) and the 360° seam on the tiny SD model."""
    from msd_core.pipeline import MSDPanoramaPipeline
    from msd_core.models.vae import decode_latents

    base = GenerationSettings(
        prompt="a misty alpine valley", model="tiny", device="cpu", width=256 if quick else 512,
        height=128 if quick else 256, steps=10 if quick else 20, view_batch=16, seed=3, gradient="fast",
        windows="dense",  # the dense grid its README figures were measured with
    )
    pipe = MSDPanoramaPipeline.from_settings(base)
    rows = []
    print(f"\ntiny SD model: {base.width}×{base.height} px, {base.steps} steps")

    def run(**changes):
        settings = dataclasses.replace(base, **changes)
        per_step: dict[int, dict[int, torch.Tensor]] = {}

        def callback(info):
            per_step.setdefault(info.step, {})[info.level] = info.latents

        result = pipe(settings, callback=callback, decode=False)
        gaps = [
            cross_scale_discrepancy(levels[level], levels[level - 1])
            for levels in per_step.values() for level in sorted(levels) if level > 1
        ]
        image = decode_latents(pipe.vae, result.latents, wrap=settings.wrap, tile=64)
        return result, (statistics.mean(gaps) if gaps else None), image

    omegas = (0.0, 2.0, 10.0, 20.0)
    for gradient in ("fast", "exact"):
        for omega in omegas:
            if omega == 0 and gradient == "exact":
                continue
            started = time.perf_counter()
            result, gap, _ = run(omega=omega, gradient=gradient)
            row = {"part": "discrepancy", "method": "MD (ω=0)" if omega == 0 else f"MSD {gradient}", "omega": omega,
                   "levels": result.plan.levels, "discrepancy": gap, "seconds": time.perf_counter() - started}
            rows.append(row)
            print(row, flush=True)
    for wrap in (True, False):
        result, _, image = run(wrap=wrap)
        row = {"part": "seam", "wrap": wrap, "latent_seam": seam_ratio(result.latents[0]),
               "image_seam": seam_ratio(image[0])}
        rows.append(row)
        print(row, flush=True)
    return rows


def tiny_move_part(seeds: int) -> list[dict]:
    """The 0/360° seam of the tiny SD model's 360° world (512×256, the defaults: Standard, global level, drawn
    start, pole caps) with the global level fixed and rolled: the finished latent's and image's, and the global
    level's own at the last step that ran it (``--move --tiny``)."""
    from msd_core.pipeline import MSDPanoramaPipeline

    base = GenerationSettings(prompt="a misty alpine valley", model="tiny", device="cpu", width=512, height=256)
    pipe = MSDPanoramaPipeline.from_settings(base)
    rows = []
    for move in ("fixed", "roll"):
        for seed in range(seeds):
            top = {}
            result = pipe(dataclasses.replace(base, seed=seed, global_move=move),
                          callback=lambda info: top.update(latents=info.latents) if info.level == 1 else None)
            image = torch.tensor(list(result.image.getdata()), dtype=torch.float64).view(256, 512, 3).permute(2, 0, 1)
            rows.append({"part": "tiny seam", "global_move": move, "seed": seed, "latent_seam": seam_ratio(result.latents[0]),
                         "image_seam": seam_ratio(image), "global_level_seam": seam_ratio(top["latents"][0])})
            print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], examples: list, quick: bool) -> None:
    plt = pyplot()
    if plt is None:
        return
    sweep = [r for r in rows if r["panorama"] == "64×64" and r["prior"] == "wide" and r["noise"] == "literal"]
    md = next(r for r in sweep if r["omega"] == 0)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"projection": "-", "mean": ":", "mean-sd": (0, (1, 3)), "sum": "--"}
    for gradient, marker in (("fast", "o"), ("exact", "s")):
        for loss, style in styles.items():
            line = sorted((r for r in sweep if r["gradient"] == gradient and r["loss"] == loss), key=lambda r: r["omega"])
            if not line:
                continue
            omegas = [0.0] + [r["omega"] for r in line]
            label = f"{gradient}, {loss}"
            axes[0].plot(omegas, [md["coherent"]] + [r["coherent"] for r in line], linestyle=style, marker=marker, label=label)
            axes[1].plot(omegas, [md["transitions"]] + [r["transitions"] for r in line], linestyle=style, marker=marker, label=label)
    for noise, color in (("fresh", "red"), ("snr", "green")):
        line = sorted((r for r in rows if r["noise"] == noise and r["prior"] == "wide"), key=lambda r: r["omega"])
        axes[0].plot([r["omega"] for r in line], [r["coherent"] for r in line], color=color, marker="^",
                     label=f"fast, projection, coarse noise {noise}")
    axes[0].set(xlabel="ω", ylabel="coherent fraction", title=f"horizon prior 64×64, {md['seeds']} seeds", ylim=(-0.03, 1.03))
    axes[1].set(xlabel="ω", ylabel="sky→ground transitions per column", title="(1 = one horizon)")
    axes[1].axhline(1, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(figure_path("layout", quick), dpi=110)
    plt.close(figure)

    if examples:
        figure, axes = plt.subplots(len(examples), 4, figsize=(12, 1.0 + 0.9 * len(examples)))
        for row_axes, (row, images) in zip(axes, examples):
            for column, (axis, image) in enumerate(zip(row_axes, images)):
                axis.imshow(image.numpy(), cmap="Blues_r", vmin=-1.5, vmax=1.5)
                axis.set_xticks([])
                axis.set_yticks([])
                if column == 0:
                    axis.set_ylabel(f"{row['method']}\nω={row['omega']:g}", fontsize=8)
                score = score_layout(image)
                axis.set_title("coherent" if score.coherent else f"{score.transitions:.2f} transitions/col", fontsize=7)
        figure.suptitle("horizon prior 64×128 (sky light, ground dark), seeds 0–3", fontsize=9)
        figure.tight_layout()
        figure.savefig(figure_path("horizon-examples", quick), dpi=110)
        plt.close(figure)


ASPECTS = ((64, 64, False), (32, 64, True), (64, 128, True), (32, 128, False))  # in 16-px windows: 4×4 … 2×8
# In SD-2-base's 512 px windows: an 8192×4096 world (16×8 windows) and a 16384×4096 strip (32×8): their global
# levels average g = 128 and 256 latent pixels (--large).
LARGE_ASPECTS = ((128, 256, True), (128, 512, False))
MODE_ASPECTS = ((32, 64, True), (64, 128, True), (128, 256, True))  # global levels of g = 8, 32, 128 (--modes)
# Up to v0.7 every preset pulled with ω = 10 and started the finer levels' tiles on the 2×2 grid; the rows measured
# then keep those values (v0.8's presets: ω 14, tiles anywhere; docs/layout.md 6.10).
V07 = {"omega": 10.0, "tile_starts": "even"}
# v0.3's Standard preset (shifted tiles, exact gradient at every step, DDIM 50), the base of the rows below
# that name no preset: they were measured against it (docs/layout.md).
V03_STANDARD = {"windows": "shifted", "gradient": "exact", "steps": 50, "scheduler": "ddim", "guided_fraction": 1.0,
                "late_gradient": "none", "global_move": "fixed", **V07}
# name: GenerationSettings changes (ω = 10 projection), sampled as the pipeline would (horizon.sample_with_settings).
ASPECT_SETTINGS = {
    "MD": {**V03_STANDARD, "method": "multidiffusion"},
    "paper pyramid": {**V03_STANDARD, "pyramid": "halving", "coarse_noise": "literal"},  # the default up to v0.2
    "global, literal": {**V03_STANDARD, "pyramid": "global", "coarse_noise": "literal"},
    "halving, matched": {**V03_STANDARD, "pyramid": "halving", "coarse_noise": "matched"},
    "v0.3 Standard": V03_STANDARD,  # global level, coarse levels at their matched noise level
    "v0.3 Draft": {**V03_STANDARD, "steps": 25},
    "v0.3, DPM++ 20": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20},
    "default": {},  # today's Standard preset
    "default, Draft": QUALITY["draft"][0],
}
# The presets as v0.7 had them: the base of the rows below, measured then.
STANDARD, DRAFT = {**QUALITY["standard"][0], **V07}, {**QUALITY["draft"][0], **V07}
ASPECT_SETTINGS |= {"v0.7 Standard": STANDARD, "v0.7 Draft": DRAFT}
# v0.8's presets: the second level from the top took the exact gradient too (v0.9: refresh; docs/layout.md 6.13).
V08 = {"coarse_gradient": "exact"}
ASPECT_SETTINGS |= {"v0.8 Standard": {**QUALITY["standard"][0], **V08}, "v0.8 Draft": {**QUALITY["draft"][0], **V08}}
# Screened after v0.9, not taken yet (docs/layout.md 6.14): the refresh gradient at every level, no backward at all.
ASPECT_SETTINGS |= {"Standard, refresh everywhere": {**QUALITY["standard"][0], "gradient": "refresh"},
                    "Draft, refresh everywhere": {**QUALITY["draft"][0], "gradient": "refresh"}}
# Issue 20: v0.4's presets with the coarse levels' starting state as it was (noise) and drawn (--start).
START_SETTINGS = {
    "MD": {**STANDARD, "method": "multidiffusion"},
    "v0.4 Standard": {**STANDARD, "coarse_noise": "matched", "global_move": "fixed"},
    "v0.4 Draft": {**DRAFT, "coarse_noise": "matched", "global_move": "fixed"},
    "Standard, drawn": {**STANDARD, "coarse_noise": "drawn", "global_move": "fixed"},
    "Draft, drawn": {**DRAFT, "coarse_noise": "drawn", "global_move": "fixed"},
}
# The global level of a wrapped world fixed (v0.5) or rolled every step (--move; docs/layout.md section 7).
MOVE_SETTINGS = {  # MultiDiffusion has no global level: the same either way
    "Standard, fixed": {**STANDARD, "global_move": "fixed"},
    "Standard, roll": {**STANDARD, "global_move": "roll"},
    "Draft, fixed": {**DRAFT, "global_move": "fixed"},
    "Draft, roll": {**DRAFT, "global_move": "roll"},
}
# The global level of a wrapped world as two windows half a turn apart (--move --settings …; docs/layout.md section 7):
# "pair": bench only (horizon.PairedPlan): merged with feathered or uniform weights or each window's middle half, at the
# first "steps" steps only (the rest roll), or with the pair's first window fixed at 0/360° ("roll": False).
PAIR_SETTINGS = {
    "Standard, pair": {**STANDARD, "pair": {"weights": "feathered"}},
    "Standard, pair, uniform": {**STANDARD, "pair": {"weights": "uniform"}},
    "Standard, pair, middle halves": {**STANDARD, "pair": {"weights": "middle"}},
    "Standard, pair, not rolled": {**STANDARD, "pair": {"weights": "feathered", "roll": False}},
    "Standard, pair 8 steps": {**STANDARD, "pair": {"weights": "feathered", "steps": 8}},
    "Draft, pair": {**DRAFT, "pair": {"weights": "feathered"}},
    "Draft, pair, uniform": {**DRAFT, "pair": {"weights": "uniform"}},
}
# Cheaper settings measured for the speed issue (docs/speed.md), run with --settings NAME … .
SPEED_SETTINGS = {
    "guided 0.5": {**V03_STANDARD, "guided_fraction": 0.5},
    "guided 0.3": {**V03_STANDARD, "guided_fraction": 0.3},
    "guided 0.2": {**V03_STANDARD, "guided_fraction": 0.2},
    "fast": {**V03_STANDARD, "gradient": "fast"},
    "fast, guided 0.5": {**V03_STANDARD, "gradient": "fast", "guided_fraction": 0.5},
    "DDIM 25, fast": {**V03_STANDARD, "gradient": "fast", "steps": 25},
    "DPM++ 20, fast": {**V03_STANDARD, "gradient": "fast", "scheduler": "dpmpp-2m", "steps": 20},
    "DPM++ 20, guided 0.5": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.5},
    "DPM++ 25, guided 0.5": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 25, "guided_fraction": 0.5},
    "DPM++ 30, guided 0.5": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 30, "guided_fraction": 0.5},
    "DPM++ 20, guided 0.3": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.3},
    "DPM++ 25, exact 0.5 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 25, "guided_fraction": 0.5,
        "late_gradient": "fast"},
    "DPM++ 25, exact 0.7 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 25, "guided_fraction": 0.7,
        "late_gradient": "fast"},
    "DPM++ 20, exact 0.5 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.5,
        "late_gradient": "fast"},
    "DPM++ 20, exact 0.3 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.3,
        "late_gradient": "fast"},
    "DPM++ 15, exact 0.5 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 15, "guided_fraction": 0.5,
                                      "late_gradient": "fast"},
    # Draft's schedules within 500 FE (issue 18, second pass): k exact steps of n, the fast gradient after
    **{f"DPM++ {steps}, exact {exact} of {steps} then fast": {
        **V03_STANDARD, "scheduler": "dpmpp-2m", "steps": steps, "guided_fraction": exact / steps, "late_gradient": "fast"}
       for steps, exact in ((14, 8), (17, 7), (18, 7))},
    "DPM++ 16, exact 0.5 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 16, "guided_fraction": 0.5,
                                      "late_gradient": "fast"},
    "DPM++ 16, exact 0.4 then fast": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 16, "guided_fraction": 0.4,
                                      "late_gradient": "fast"},
    "DPM++ 15, guided 0.5": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 15, "guided_fraction": 0.5},
    "DPM++ 20, guided 0.4": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.4},
}
# The global level as one window of the world's aspect (issue 16, docs/sdxl.md), run with --settings NAME … .
# The prior denoising it knows that aspect and, in a wrapping world, that objects may cross the 0/360° edge
# (a 360° LoRA); "flat" (a bench-only key): a prior that knows the aspect only.
WIDE_SETTINGS = {
    "default, wide": {"global_window": "wide"},
    "default, wide, flat prior": {"global_window": "wide", "circular_prior": False},
}
# The poles (docs/poles.md): the presets with and without the pole caps (2:1 wrapping shapes only differ).
POLE_SETTINGS = {
    "Standard, flat poles": {"poles": "flat"},
    "Standard, sphere poles": {"poles": "sphere"},
    "Draft, flat poles": {**QUALITY["draft"][0], "poles": "flat"},
    "Draft, sphere poles": {**QUALITY["draft"][0], "poles": "sphere"},
}
# Issue 20 item 2 (docs/layout.md 6.6): the finest level joins after 60 % of the steps (--fine-start), the levels
# between at evenly spaced shares of that.
FINE_START_SETTINGS = {
    "Standard, fine start 0.6": {**STANDARD, "fine_start": 0.6},
    "Draft, fine start 0.6": {**DRAFT, "fine_start": 0.6},
    "Standard, fine start 0.3": {**STANDARD, "fine_start": 0.3},  # detail kept, less layout gained (docs/layout.md 6.7)
    "Draft, fine start 0.3": {**DRAFT, "fine_start": 0.3},
    # v0.6's join (docs/layout.md 6.8): the late level steps deterministically, as every other level.
    "Standard, fine start 0.6, deterministic join": {**STANDARD, "fine_start": 0.6, "fine_join": "deterministic"},
    "Draft, fine start 0.6, deterministic join": {**DRAFT, "fine_start": 0.6, "fine_join": "deterministic"},
    "Standard, fine start 0.3, deterministic join": {**STANDARD, "fine_start": 0.3, "fine_join": "deterministic"},
    "Draft, fine start 0.3, deterministic join": {**DRAFT, "fine_start": 0.3, "fine_join": "deterministic"},
}
# --tile-starts any (docs/layout.md 6.9): the finer levels' shifted tiles start on any pixel, not only on the level
# above's 2×2 grid.
TILE_SETTINGS = {
    "Standard, any tile starts": {**STANDARD, "tile_starts": "any"},
    "Draft, any tile starts": {**DRAFT, "tile_starts": "any"},
}
# A stronger pull towards the coarser level (docs/layout.md 6.10): ω above 10 overshoots the gap at the first steps;
# with tiles starting anywhere, v0.8's presets.
OMEGA_SETTINGS = {f"{preset}, ω {omega}": {**changes, "omega": omega}
                  for preset, changes in (("Standard", STANDARD), ("Draft", DRAFT)) for omega in (12, 14, 16)}
OMEGA_SETTINGS |= {f"{preset}, ω 14, any tile starts": {**changes, "omega": 14, "tile_starts": "any"}
                   for preset, changes in (("Standard", STANDARD), ("Draft", DRAFT))}
ALL_SETTINGS = (ASPECT_SETTINGS | SPEED_SETTINGS | START_SETTINGS | MOVE_SETTINGS | PAIR_SETTINGS | WIDE_SETTINGS
                | POLE_SETTINGS | FINE_START_SETTINGS | TILE_SETTINGS | OMEGA_SETTINGS)
EXAMPLE_SETTINGS = ("paper pyramid", "v0.3 Standard", "v0.4 Standard", "Standard, drawn")
# seams: window rows / columns, the same within each class (texture) rows / columns, 0/360° (plain, within class,
# the coarsest level's own)
ASPECT_COLUMNS = ["prior", "panorama", "setting", "levels", "coherent", "collapsed", "coarsest coherent", "count",
                  "work", "seams", "modes", "seconds"]
PRIOR_DRAWS = 4000


def aspect_priors() -> dict:
    return {"horizon": HorizonPrior(horizons=WIDE_PRIOR), "sun": SunPrior(), "river": RiverPrior(),
            "skyline": SkylinePrior()}


def prior_draws_row(prior, seeds: int, wrap: bool = False) -> dict:
    """The prior's own exact draws, one window each, scored like a panorama and expressed per ``seeds``
    panoramas: what a sampler faithful to the model at its coarsest level (one window) inherits. For a
    ``widened`` prior (window × width), scored as a wrapping world when ``wrap``."""
    scores = [prior.score(image, wrap) for image in prior.sample(PRIOR_DRAWS, torch.Generator().manual_seed(0))]
    coherent, collapsed = (sum(s[key] for s in scores) / PRIOR_DRAWS for key in ("coherent", "collapsed"))
    shape = "" if prior.width == prior.window else f" {prior.window}×{prior.width}{' circular' if prior.circular else ''}"
    row = {"prior": prior.name, "panorama": f"one window{shape}", "setting": "prior's own draws", "seeds": PRIOR_DRAWS,
           "coherent_fraction": coherent, "collapsed_fraction": collapsed,
           "coherent": f"{coherent * seeds:.1f}/{seeds}", "collapsed": f"{collapsed * seeds:.1f}/{seeds}"}
    print(markdown_table([row], ASPECT_COLUMNS).splitlines()[-1], flush=True)
    return row


def large_modes(images: torch.Tensor, window: int) -> torch.Tensor:
    """The large-scale modes of one-window images (N, window, window): their 4×4 grid of block means, (N, 16)."""
    return torch.nn.functional.avg_pool2d(images[:, None], window // 4).flatten(1)


def mode_variance(images: torch.Tensor, window: int) -> float:
    """Variance over the seeds of the large-scale modes, summed over the modes."""
    return float(large_modes(images, window).var(0).sum())


PRIOR_MODE_VARIANCE: dict[str, float] = {}


def prior_mode_variance(prior) -> float:
    """``mode_variance`` of the prior's own one-window draws: what a faithful coarsest level has."""
    if prior.name not in PRIOR_MODE_VARIANCE:
        draws = prior.sample(PRIOR_DRAWS, torch.Generator().manual_seed(0))
        PRIOR_MODE_VARIANCE[prior.name] = mode_variance(draws, prior.window)
    return PRIOR_MODE_VARIANCE[prior.name]


# A river along a meridian is a wedge on the sphere: within this many degrees of a pole it is at most 0.17 of its
# width across (at the first row of a 32-row world 0.05), below one pixel of the pole caps' views for every river
# of ≤ 5 columns (docs/poles.md). Where the caps draw the poles the river is also scored without those rows.
POLAR_ZONE_DEGREES = 10.0


def polar_rows(height: int) -> int:
    """How many rows at each pole of an equirectangular world ``height`` rows tall lie (by their centres) within
    POLAR_ZONE_DEGREES of it: 2 of 32, 4 of 64."""
    return sum((row + 0.5) * 180 / height < POLAR_ZONE_DEGREES for row in range(height // 2))


def coherent_on_sphere(prior, images, settings) -> int | None:
    """Coherent panoramas scored without the polar rows (``polar_rows``) where the pole caps draw a 360° world and
    the prior's layout runs through its poles; None elsewhere (the plain score is the only one)."""
    if not (prior.runs_through_poles and settings.poles == "sphere"
            and has_poles(settings.width, settings.height, settings.wrap)):
        return None
    from poles import polar_rows_left_out

    rows = polar_rows(images.shape[-2])
    return sum(prior.score(polar_rows_left_out(image, rows), True)["coherent"] for image in images)


def run_aspect(prior, shape, setting, seeds, keep=None, quick=False) -> dict:
    """One prior × aspect × setting: layout of the finest and of the coarsest level, and the UNet work.

    Shapes are given for 16-px windows; a prior with smaller windows (the sun) gets the same shape in
    windows. ``work``: UNet window passes of the plan (a backward counted as plan.BACKWARD_COST forwards)
    over MultiDiffusion's on the same shape and steps."""
    scale = 16 // prior.window
    height, width, wrap = shape[0] // scale, shape[1] // scale, shape[2]
    changes = dict(ALL_SETTINGS[setting])
    circular, pair = changes.pop("circular_prior", None), changes.pop("pair", None)
    settings = dataclasses.replace(GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                      height=height * PRIOR_FACTOR, wrap=wrap), **changes)
    if quick:
        settings = dataclasses.replace(settings, steps=max(5, settings.steps // 5))
    coarsest, levels = [], []

    def on_step(index, results):
        # The coarsest level at the last step that ran every level (later steps run only the finest).
        if index == 0 or len(results) >= len(levels):
            coarsest[:] = [results[0].latents[0]]
            levels[:] = [tuple(r.latents.shape[2:]) for r in results]

    started = time.perf_counter()
    images, plan = sample_with_settings(prior, settings, seeds, on_step=on_step, circular=circular,
                                        pair=pair)
    seconds = time.perf_counter() - started
    md_plan = make_plan(dataclasses.replace(settings, method="multidiffusion"), PRIOR_FACTOR, plan.window * PRIOR_FACTOR)
    scores = [prior.score(image, wrap) for image in images]
    coarse = [prior.score(image, wrap) for image in coarsest[0]]
    # Large-scale modes against the prior's, where the coarsest level is one window: that level's own, and
    # the finished panorama's averaged down to it (the same modes, after the finer levels' work).
    one_window = plan.levels > 1 and tuple(coarsest[0].shape[1:]) == (prior.window, prior.window)
    modes = {}
    if one_window:
        reference = prior_mode_variance(prior)
        final = torch.nn.functional.avg_pool2d(images[:, None], plan.coarsest_factor)[:, 0]
        modes = {"gain": math.prod(plan.coarsest_factor),
                 "modes_coarsest": mode_variance(coarsest[0], prior.window) / reference,
                 "modes_final": mode_variance(final, prior.window) / reference}
    count_key = next(key for key in scores[0] if key not in ("coherent", "collapsed"))
    row = {
        "prior": prior.name, "panorama": f"{shape[0]}×{shape[1]}{' wrap' if wrap else ''}", "setting": setting,
        "seeds": len(seeds), "steps": settings.steps, "scheduler": settings.scheduler,
        "levels": " → ".join(f"{h}×{w}" for h, w in levels),
        "coherent_count": sum(s["coherent"] for s in scores), "collapsed_count": sum(s["collapsed"] for s in scores),
        "coarsest_coherent_count": sum(s["coherent"] for s in coarse),
        "coherent_on_sphere_count": coherent_on_sphere(prior, images, settings),
        "count_name": count_key, "count_mean": statistics.mean(s[count_key] for s in scores),
        **{f"unet_{key}": value for key, value in plan.work().items()},
        "work_vs_md": sum(plan.step_costs()) / sum(md_plan.step_costs()), "seconds": seconds,
        **{f"window_seam_{side}": value for side, value in window_seam_ratio(
            images, plan.grids_at(plan.steps - 1)[-1], seam_multiple(plan)).items()},
        # the same within each class (common.window_seam_ratio): an object's boundary on an edge is no seam
        **{f"texture_seam_{side}": value for side, value in window_seam_ratio(
            images, plan.grids_at(plan.steps - 1)[-1], seam_multiple(plan), within_class=True).items()},
        "seam_360": statistics.mean(seam_ratio(image) for image in images) if wrap else None,
        # the same within each class, and the coarsest level's own (at the last step that ran it)
        "texture_seam_360": wrap_seam_ratio(images, within_class=True) if wrap else None,
        "coarsest_seam_360": wrap_seam_ratio(coarsest[0]) if wrap and plan.levels > 1 else None,
        "coarsest_texture_seam_360": wrap_seam_ratio(coarsest[0], within_class=True) if wrap and plan.levels > 1 else None,
        "start_steps": plan.start_steps, **modes,
    }
    if prior.name == "sun":
        aspects = [s["aspect"] for s in scores if s["coherent"]]
        row["sun_aspect"] = statistics.mean(aspects) if aspects else None
    n = len(seeds)
    seams = [row[f"{kind}_seam_{side}"] for kind in ("window", "texture") for side in ("rows", "columns")]
    seams += [row["seam_360"], row["texture_seam_360"], row["coarsest_seam_360"]]
    row.update(modes=f"{modes['modes_coarsest']:.2f} / {modes['modes_final']:.2f} (g {modes['gain']})" if modes else "—",
               coherent=f"{row['coherent_count']}/{n}", collapsed=f"{row['collapsed_count']}/{n}",
               work=f"{row['work_vs_md']:.2f}×", seams=" / ".join("—" if v is None else f"{v:.2f}" for v in seams),
               **{"coarsest coherent": f"{row['coarsest_coherent_count']}/{n}",
                  "count": f"{count_key} {row['count_mean']:.2f}"})
    if keep is not None:
        keep.append((row, images[:4].clone()))
    print(markdown_table([row], ASPECT_COLUMNS).splitlines()[-1], flush=True)
    return row


def start_table(rows: list[dict], settings=("v0.4 Standard", "Standard, drawn", "v0.4 Draft", "Draft, drawn")) -> str:
    """Issue 20's table: per prior and shape, each setting's coherent (collapsed) of the seeds and coherent as a
    share of the prior's own one-window rate; MultiDiffusion's coherent count where it ran. A river on a world whose
    poles the caps draw also shows its count scored without the polar rows (``coherent_on_sphere``)."""
    own = {r["prior"]: r for r in rows if r["setting"] == "prior's own draws"}
    header = ["prior", "shape", "prior's own", *settings, "MD"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = {(r["prior"], r["panorama"], r["setting"]): r for r in rows if r["setting"] != "prior's own draws"}
    for prior, shape in dict.fromkeys((r["prior"], r["panorama"]) for r in rows if r["setting"] != "prior's own draws"):
        reference = own[prior]
        line = [prior, shape, f"{reference['coherent_fraction']:.0%} ({reference['collapsed_fraction']:.0%})"]
        for setting in (*settings, "MD"):
            row = cells.get((prior, shape, setting))
            if row is None:
                line.append("—")
                continue
            n = row["seeds"]
            ratio = row["coherent_count"] / n / reference["coherent_fraction"]
            cell = (f"{row['coherent_count']}/{n}" if setting == "MD" else
                    f"{row['coherent_count']} ({row['collapsed_count']}) {ratio:.0%}")
            on_sphere = row.get("coherent_on_sphere_count")
            if on_sphere is not None and setting != "MD":
                cell += f"; on the sphere {on_sphere} {on_sphere / n / reference['coherent_fraction']:.0%}"
            line.append(cell)
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def gaussian_modes_part(seeds: int, settings=("v0.4 Standard", "Standard, drawn", "v0.4 Draft", "Draft, drawn"),
                        shapes=MODE_ASPECTS) -> list[dict]:
    """The large-scale modes of a linear (Gaussian) prior, where the per-mode analysis of the coarse start holds:
    their variance over ``seeds`` panoramas against the prior's, at the coarsest level and in the finished
    panorama averaged down to it; and one window sampled alone by the same solver (what any sampler of this
    schedule reaches: its first noise level is not pure noise for the largest modes)."""
    prior = GaussianPrior()
    reference = prior_mode_variance(prior)
    rows = []
    for name in settings:
        window = dataclasses.replace(GenerationSettings(prompt="bench", width=prior.window * PRIOR_FACTOR,
                                                        height=prior.window * PRIOR_FACTOR, wrap=False), **ALL_SETTINGS[name])
        alone, _ = sample_with_settings(prior, window, list(range(max(seeds, 400))))
        for shape in shapes:
            settings_ = dataclasses.replace(GenerationSettings(prompt="bench", width=shape[1] * PRIOR_FACTOR,
                                                               height=shape[0] * PRIOR_FACTOR, wrap=shape[2]),
                                            **ALL_SETTINGS[name])
            coarsest, levels = [], [0]

            def on_step(index, results):
                if index == 0 or len(results) >= levels[0]:
                    coarsest[:], levels[0] = [results[0].latents[0]], len(results)

            images, plan = sample_with_settings(prior, settings_, list(range(seeds)), on_step=on_step)
            final = torch.nn.functional.avg_pool2d(images[:, None], plan.coarsest_factor)[:, 0]
            row = {"prior": "gaussian", "panorama": f"{shape[0]}×{shape[1]}{' wrap' if shape[2] else ''}", "setting": name,
                   "seeds": seeds, "gain": math.prod(plan.coarsest_factor), "start_steps": plan.start_steps,
                   "modes_coarsest": mode_variance(coarsest[0], prior.window) / reference,
                   "modes_final": mode_variance(final, prior.window) / reference,
                   "modes_one_window": mode_variance(alone, prior.window) / reference}
            rows.append(row)
            print(row, flush=True)
    return rows


# Measured on v0.7's presets (docs/layout.md 6.7-6.8); --detail --settings "v0.7 Standard" default … compares v0.8's.
DETAIL_SETTINGS = ("v0.7 Standard", "Standard, fine start 0.3", "Standard, fine start 0.6",
                   "Standard, fine start 0.3, deterministic join", "Standard, fine start 0.6, deterministic join",
                   "v0.7 Draft", "Draft, fine start 0.3", "Draft, fine start 0.6",
                   "Draft, fine start 0.3, deterministic join", "Draft, fine start 0.6, deterministic join")
DETAIL_SHAPES = (ASPECTS[0], ASPECTS[1])  # 64×64 and the 360° world's 32×64 wrap


def detail_part(seeds: int, settings=DETAIL_SETTINGS, shapes=DETAIL_SHAPES, exponent: float = 2.0) -> list[dict]:
    """Detail on a Gaussian prior with a natural image's 1/f² spectrum (``GaussianPrior(exponent=…)``: its exact
    denoiser is linear, so nothing but the sampler decides the output's spectrum): the power per frequency band
    of window-sized crops of the panoramas (``spectrum.band_power``) over the prior's own and over one window
    sampled alone by the same solver, each band's mean over the seeds and its standard error; and the
    block-edge ratio at the finest level's 2×2 blocks (``spectrum.block_edge_ratio``: > 1 where the level
    above's blocks show). ``--detail``; docs/layout.md 6.7."""
    prior = GaussianPrior(texture=0.1, exponent=exponent)
    reference = band_power(prior.sample(PRIOR_DRAWS, torch.Generator().manual_seed(0)), prior.window)
    seeds_ = list(range(seeds))
    rows = []
    for name in settings:
        window = dataclasses.replace(GenerationSettings(prompt="bench", width=prior.window * PRIOR_FACTOR,
                                                        height=prior.window * PRIOR_FACTOR, wrap=False), **ALL_SETTINGS[name])
        alone = band_power(sample_with_settings(prior, window, seeds_)[0], prior.window)
        for shape in shapes:
            settings_ = dataclasses.replace(GenerationSettings(prompt="bench", width=shape[1] * PRIOR_FACTOR,
                                                               height=shape[0] * PRIOR_FACTOR, wrap=shape[2]),
                                            **ALL_SETTINGS[name])
            images, plan = sample_with_settings(prior, settings_, seeds_)
            grids = plan.grids_at(plan.steps - 1)
            factor = level_factor(grids[-1], grids[-2])
            per_seed = torch.stack([band_power(image, prior.window) for image in images]) / reference
            edges = torch.tensor([block_edge_ratio(image, factor) for image in images])
            row = {"prior": prior.name, "panorama": f"{shape[0]}×{shape[1]}{' wrap' if shape[2] else ''}",
                   "setting": name, "seeds": seeds, "block": list(factor), "level_starts": list(plan.level_starts),
                   "bands_vs_prior": per_seed.mean(0).tolist(), "bands_se": standard_error(per_seed).tolist(),
                   "bands_vs_one_window": (per_seed.mean(0) * reference / alone).tolist(),
                   "one_window_vs_prior": (alone / reference).tolist(),
                   "block_edge_ratio": float(edges.mean()), "block_edge_se": float(standard_error(edges[:, None])[0]),
                   "per_seed_bands": per_seed.tolist()}
            rows.append(row)
            print(f"{row['panorama']:>12} {name:<26} bands/prior " + " ".join(f"{v:.3f}" for v in row["bands_vs_prior"])
                  + f"  (se ≤ {max(row['bands_se']):.3f})  block edges {row['block_edge_ratio']:.3f} ± "
                  f"{row['block_edge_se']:.3f}", flush=True)
    return rows


def detail_table(rows: list[dict]) -> str:
    """Per shape and setting: each band's power over the prior's and the block-edge ratio; for every other setting, also
    its bands over its preset's (v0.7's where it ran, else today's), paired (the same seeds: the same initial noise),
    with the standard error."""
    lines = ["| shape | setting | ring (cycles / 16 px) | 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | block edges |", "|" + "---|" * 12]
    cells = {(r["panorama"], r["setting"]): r for r in rows}
    for (shape, name), row in cells.items():
        lines.append(f"| {shape} | {name} | band / prior's | " + " | ".join(f"{v:.3f}" for v in row["bands_vs_prior"])
                     + f" | {row['block_edge_ratio']:.3f} ± {row['block_edge_se']:.3f} |")
        draft = "Draft" in name
        base = cells.get((shape, "v0.7 Draft" if draft else "v0.7 Standard")) or cells.get((shape, "default, Draft" if draft else "default"))
        if base is None or base is row:
            continue
        paired = (torch.tensor(row["per_seed_bands"]) / torch.tensor(base["per_seed_bands"])).log()
        lines.append(f"| {shape} | {name} | over every level's | " + " | ".join(
            f"{m:.3f} ± {e:.3f}" for m, e in zip(paired.mean(0).exp().tolist(), standard_error(paired).tolist())) + " | |")
    return "\n".join(lines)


def tiny_detail_part(seeds: int, sizes=((512, 256), (1024, 512))) -> list[dict]:
    """The tiny SD model (its real UNet, random weights), the defaults with and without ``--fine-start 0.6`` (its
    stochastic join and v0.6's deterministic one): the finished latent's block-edge ratio at the finest level's
    blocks and its band powers (window-sized crops, all four channels) with the fine start over without
    (``--detail --tiny``)."""
    from msd_core.pipeline import MSDPanoramaPipeline

    base = GenerationSettings(prompt="a misty alpine valley", model="tiny", device="cpu", width=sizes[0][0],
                              height=sizes[0][1])
    pipe = MSDPanoramaPipeline.from_settings(base)
    window = pipe.unet.config.sample_size
    rows = []
    for width, height in sizes:
        powers = {}
        variants = ((0.0, "stochastic"), (0.6, "deterministic"), (0.6, "stochastic"))
        for fine_start, fine_join in variants:
            for seed in range(seeds):
                settings = dataclasses.replace(base, width=width, height=height, seed=seed, fine_start=fine_start,
                                               fine_join=fine_join)
                result = pipe(settings, decode=False)
                grids = result.plan.grids_at(result.plan.steps - 1)
                factor = level_factor(grids[-1], grids[-2])
                powers[fine_start, fine_join, seed] = band_power(result.latents[0], window)
                rows.append({"part": "tiny detail", "size": f"{width}×{height}", "fine_start": fine_start,
                             "fine_join": fine_join, "seed": seed, "block": list(factor),
                             "block_edge_ratio": block_edge_ratio(result.latents[0], factor),
                             "bands": powers[fine_start, fine_join, seed].tolist()})
                print({k: v for k, v in rows[-1].items() if k != "bands"}, flush=True)
        for fine_join in ("deterministic", "stochastic"):
            ratio = torch.stack([powers[0.6, fine_join, seed] / powers[variants[0] + (seed,)]
                                 for seed in range(seeds)]).log()
            rows.append({"part": "tiny bands", "size": f"{width}×{height}", "seeds": seeds, "fine_join": fine_join,
                         "fine_start_over_every_level": ratio.mean(0).exp().tolist(),
                         "se_log": standard_error(ratio).tolist()})
            print(rows[-1], flush=True)
    return rows


def diagnose(prior, shape, setting, seeds) -> dict:
    """Where a layout is lost: every level's x₀ estimate scored at every step (coherent count and the prior's own
    count, e.g. suns per panorama), for one prior × shape × setting."""
    scale = 16 // prior.window
    height, width, wrap = shape[0] // scale, shape[1] // scale, shape[2]
    settings = dataclasses.replace(GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                      height=height * PRIOR_FACTOR, wrap=wrap), **ALL_SETTINGS[setting])
    table = []

    def on_step(index, results):
        for result in results:
            scores = [prior.score(image, wrap) for image in result.pred_x0[0]]
            key = next(k for k in scores[0] if k not in ("coherent", "collapsed"))
            table.append({"step": index, "level": result.level, "shape": tuple(result.pred_x0.shape[2:]),
                          "coherent": sum(s["coherent"] for s in scores),
                          "collapsed": sum(s["collapsed"] for s in scores),
                          key: statistics.mean(s[key] for s in scores if s[key] is not None)})

    images, plan = sample_with_settings(prior, settings, seeds, on_step=on_step)
    final = [prior.score(image, wrap) for image in images]
    print(f"{prior.name} {shape} {setting}: final coherent {sum(s['coherent'] for s in final)}/{len(seeds)}")
    for row in table:
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return {"prior": prior.name, "shape": shape, "setting": setting, "per_step": table}


def aspects_part(quick: bool, seeds: int | None = None, settings=ASPECT_SETTINGS,
                 priors=None, first_seed: int = 0, shapes=None) -> tuple[list[dict], list]:
    shapes = shapes or ((ASPECTS[0], ASPECTS[2]) if quick else ASPECTS)
    seeds = list(range(first_seed, first_seed + (seeds or (8 if quick else 24))))
    print(f"\naspects: {len(seeds)} seeds, the pipeline's plan for each setting (Standard preset unless named"
          f"{', steps ÷ 5' if quick else ''})")
    print("\n".join(markdown_table([], ASPECT_COLUMNS).splitlines()[:2]))
    rows, examples = [], []
    for name, prior in aspect_priors().items():
        if priors and name not in priors:
            continue
        rows.append(prior_draws_row(prior, len(seeds)))
        if any(ALL_SETTINGS[setting].get("global_window") == "wide" for setting in settings):
            for factor, circular in ((2, True), (2, False), (4, False)):  # the 2:1 worlds', and the 4:1 strip's
                rows.append(prior_draws_row(prior.widened(factor * prior.window, circular), len(seeds), circular))
        for shape in shapes:
            for setting in settings:
                keep = examples if shape == ASPECTS[2] and setting in EXAMPLE_SETTINGS else None
                rows.append(run_aspect(prior, shape, setting, seeds, keep, quick))
    return rows, examples


def plot_aspects(rows: list[dict], examples: list, quick: bool) -> None:
    """Example panoramas (matplotlib is optional, so drawn with PIL): for each prior, seeds 0–3 at 2:1
    wrap with the paper's pyramid and with the global level, sky/sun/water light."""
    from PIL import Image, ImageDraw

    tiles = []
    for row, images in examples:
        label = f"{row['prior']}, {row['setting']}: {row['coherent']} coherent"
        strip = torch.cat([torch.cat([image, torch.full((image.shape[0], 2), 2.0, dtype=image.dtype)], 1)
                           for image in images], 1)
        pixels = ((strip.clamp(-1.5, 1.5) + 1.5) / 3 * 255).byte().numpy()
        scale = 256 // images.shape[1]  # the same on-screen size for 16- and 8-pixel-window priors
        tile = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST)
        canvas = Image.new("L", (tile.width, tile.height + 14), 255)
        canvas.paste(tile, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), label, fill=0)
        tiles.append(canvas)
    if not tiles:
        return
    figure = Image.new("L", (max(t.width for t in tiles), sum(t.height + 4 for t in tiles)), 255)
    top = 0
    for tile in tiles:
        figure.paste(tile, (0, top))
        top += tile.height + 4
    path = figure_path("layout-aspects-examples", quick)
    figure.save(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and steps (a few minutes)")
    parser.add_argument("--skip-tiny", action="store_true", help="only the horizon prior")
    parser.add_argument("--aspects", action="store_true", help="only part 3: every prior × aspect × pyramid")
    parser.add_argument("--seeds", type=int, help="part 3's seeds per cell (default 24, quick 8)")
    parser.add_argument("--first-seed", type=int, default=0, help="part 3's seeds are first-seed, first-seed + 1, …")
    parser.add_argument("--start", action="store_true",
                        help="issue 20: v0.4's presets with the coarse start as it was and drawn (START_SETTINGS)")
    parser.add_argument("--move", action="store_true",
                        help="the global level of a wrapped world fixed or rolled every step (MOVE_SETTINGS)")
    parser.add_argument("--tiny", action="store_true", help="with --move: the tiny SD model's 0/360° seam instead")
    parser.add_argument("--large", action="store_true", help="part 3 at the large shapes (LARGE_ASPECTS) only")
    parser.add_argument("--modes", action="store_true", help="part 3 at g = 8, 32, 128 only (MODE_ASPECTS)")
    parser.add_argument("--gaussian", action="store_true",
                        help="the large-scale modes of a Gaussian prior at g = 8, 32, 128 (default 48 seeds)")
    parser.add_argument("--detail", action="store_true",
                        help="band powers and block edges of a 1/f² Gaussian prior's panoramas with and without the "
                             "fine start (default 48 seeds); with --tiny: the tiny SD model's latents (default 4)")
    parser.add_argument("--settings", nargs="+", choices=list(ALL_SETTINGS), metavar="SETTING",
                        help="part 3: only these settings (ASPECT_SETTINGS, SPEED_SETTINGS, "
                             "START_SETTINGS, MOVE_SETTINGS, WIDE_SETTINGS, POLE_SETTINGS or FINE_START_SETTINGS)")
    parser.add_argument("--priors", nargs="+", choices=list(aspect_priors()), help="part 3: only these priors")
    parser.add_argument("--shapes", nargs="+", type=int, choices=range(len(ASPECTS)), metavar="INDEX",
                        help=f"part 3: only these shapes, by index in {ASPECTS} (height, width, wrap)")
    parser.add_argument("--output", help="part 3's results name in bench/results (default layout-aspects[-quick])")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small float64 tensors: one thread is fastest and fair to a busy machine
    env = environment()
    suffix = "-quick" if args.quick else ""
    if args.gaussian:
        rows = gaussian_modes_part(args.seeds or 48, *([args.settings] if args.settings else []))
        write_json(args.output or "layout-gaussian-modes", {"environment": env, "modes": rows})
        return
    if args.detail and args.tiny:
        write_json(args.output or "layout-detail-tiny", {"environment": env, "tiny": tiny_detail_part(args.seeds or 4)})
        return
    if args.detail:
        rows = detail_part(args.seeds or 48, *([args.settings] if args.settings else []))
        print("\n" + detail_table(rows))
        write_json(args.output or "layout-detail", {"environment": env, "detail": rows})
        return
    if args.move and args.tiny:
        write_json(args.output or "layout-move-tiny", {"environment": env, "tiny": tiny_move_part(args.seeds or 4)})
        return
    if args.aspects or args.start or args.move:
        quick_start = ("MD", "v0.4 Standard", "Standard, drawn")  # --start --quick: Standard before and after
        settings = args.settings or (MOVE_SETTINGS if args.move else (quick_start if args.quick else START_SETTINGS)
                                     if args.start else ASPECT_SETTINGS)
        shapes = (MODE_ASPECTS if args.modes else LARGE_ASPECTS[:1] if args.large and args.move
                  else LARGE_ASPECTS if args.large
                  else [ASPECTS[index] for index in args.shapes] if args.shapes
                  else (ASPECTS[1], ASPECTS[2]) if args.move  # the wrapped shapes: only they roll
                  else (ASPECTS[0], ASPECTS[2], LARGE_ASPECTS[0]) if args.quick and args.start else None)
        rows, examples = aspects_part(args.quick, args.seeds, settings, args.priors, args.first_seed, shapes)
        print("\n" + markdown_table(rows, ASPECT_COLUMNS))
        if args.start:
            print("\n" + start_table(rows, *([tuple(args.settings)] if args.settings else [])))
        if args.move:
            print("\n" + start_table(rows, tuple(settings)))
        name = "layout-move" if args.move else "layout-start" if args.start else "layout-aspects"
        part = "-modes" if args.modes else "-large" if args.large else ""
        write_json(args.output or f"{name}{part}{suffix}", {"environment": env, "aspects": rows})
        if not args.settings and not args.start and not args.move:
            plot_aspects(rows, examples, args.quick)
        return
    horizon_rows, examples = horizon_part(args.quick)
    print("\n" + markdown_table(horizon_rows, COLUMNS))
    tiny_rows = [] if args.skip_tiny else tiny_model_part(args.quick)
    write_json(f"layout{suffix}", {"environment": env, "horizon": horizon_rows, "tiny_model": tiny_rows})
    plot(horizon_rows, examples, args.quick)


if __name__ == "__main__":
    main()
