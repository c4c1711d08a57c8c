"""Does MSD keep the layout coherent where MultiDiffusion does not? Tested without pretrained weights.

Part 1 samples panoramas from an analytic horizon prior (bench/horizon.py: an exact posterior-mean
denoiser of window-sized sky-above-ground images) with msd_core's own sampler, and counts how many
panoramas have one horizon across every column. Part 2 runs the tiny SD model through the real
pipeline and records the cross-scale discrepancy and the 360° seam.

    .venv/bin/python bench/layout.py            # full: 24 seeds, 50 steps   (≈ 15 min on 2 cores)
    .venv/bin/python bench/layout.py --quick    # 8 seeds, 20 steps           (≈ 3 min)
    .venv/bin/python bench/layout.py --aspects [--quick]   # only part 3: every prior × aspect × pyramid

Writes bench/results/layout.json, docs/bench-layout.png and docs/bench-horizon-examples.png (--quick:
bench/results/layout-quick.json and the figures as bench-*-quick.png beside it). Part 3 (``--aspects``,
docs/layout.md) samples three analytic priors (horizon, sun, river: bench/priors.py) at four aspects with
the paper's halving pyramid and with the global level, and writes layout-aspects.json and
docs/bench-layout-aspects.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from common import environment, figure_path, markdown_table, pyplot, seam_multiple, window_seam_ratio, write_json
from horizon import (PRIOR_FACTOR, SD_COARSE_NUMEL, HorizonPrior, sample_panoramas, sample_with_settings,
                     score_layout, seam_ratio)
from priors import RiverPrior, SunPrior

from msd_core.sampler import cross_scale_discrepancy
from msd_core.plan import make_plan
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
    from msd_core.vae import decode_latents

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
# v0.3's Standard preset (shifted tiles, exact gradient at every step, DDIM 50), the base of the rows below
# that name no preset: they were measured against it (docs/layout.md).
V03_STANDARD = {"windows": "shifted", "gradient": "exact", "steps": 50, "scheduler": "ddim", "guided_fraction": 1.0,
                "late_gradient": "none"}
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
    "DPM++ 15, guided 0.5": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 15, "guided_fraction": 0.5},
    "DPM++ 20, guided 0.4": {**V03_STANDARD, "scheduler": "dpmpp-2m", "steps": 20, "guided_fraction": 0.4},
}
# The poles (docs/poles.md): the presets with and without the pole caps (2:1 wrapping shapes only differ).
POLE_SETTINGS = {
    "Standard, flat poles": {"poles": "flat"},
    "Standard, sphere poles": {"poles": "sphere"},
    "Draft, flat poles": {**QUALITY["draft"][0], "poles": "flat"},
    "Draft, sphere poles": {**QUALITY["draft"][0], "poles": "sphere"},
}
EXAMPLE_SETTINGS = ("paper pyramid", "v0.3 Standard")
ASPECT_COLUMNS = ["prior", "panorama", "setting", "levels", "coherent", "collapsed", "coarsest coherent", "count",
                  "work", "seams", "seconds"]
PRIOR_DRAWS = 4000


def aspect_priors() -> dict:
    return {"horizon": HorizonPrior(horizons=WIDE_PRIOR), "sun": SunPrior(), "river": RiverPrior()}


def prior_draws_row(prior, seeds: int) -> dict:
    """The prior's own exact draws, one window each, scored like a panorama and expressed per ``seeds``
    panoramas: what a sampler faithful to the model at its coarsest level (one window) inherits."""
    scores = [prior.score(image) for image in prior.sample(PRIOR_DRAWS, torch.Generator().manual_seed(0))]
    coherent, collapsed = (sum(s[key] for s in scores) / PRIOR_DRAWS for key in ("coherent", "collapsed"))
    row = {"prior": prior.name, "panorama": "one window", "setting": "prior's own draws", "seeds": PRIOR_DRAWS,
           "coherent_fraction": coherent, "collapsed_fraction": collapsed,
           "coherent": f"{coherent * seeds:.1f}/{seeds}", "collapsed": f"{collapsed * seeds:.1f}/{seeds}"}
    print(markdown_table([row], ASPECT_COLUMNS).splitlines()[-1], flush=True)
    return row


def run_aspect(prior, shape, setting, seeds, keep=None, quick=False) -> dict:
    """One prior × aspect × setting: layout of the finest and of the coarsest level, and the UNet work.

    Shapes are given for 16-px windows; a prior with smaller windows (the sun) gets the same shape in
    windows. ``work``: UNet window passes of the plan (a backward counted as plan.BACKWARD_COST forwards)
    over MultiDiffusion's on the same shape and steps."""
    scale = 16 // prior.window
    height, width, wrap = shape[0] // scale, shape[1] // scale, shape[2]
    settings = dataclasses.replace(GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                      height=height * PRIOR_FACTOR, wrap=wrap),
                                   **(ASPECT_SETTINGS | SPEED_SETTINGS | POLE_SETTINGS)[setting])
    if quick:
        settings = dataclasses.replace(settings, steps=max(5, settings.steps // 5))
    coarsest, levels = [], []

    def on_step(index, results):
        # The coarsest level at the last step that ran every level (later steps run only the finest).
        if index == 0 or len(results) >= len(levels):
            coarsest[:] = [results[0].latents[0]]
            levels[:] = [tuple(r.latents.shape[2:]) for r in results]

    started = time.perf_counter()
    images, plan = sample_with_settings(prior, settings, seeds, on_step=on_step)
    seconds = time.perf_counter() - started
    md_plan = make_plan(dataclasses.replace(settings, method="multidiffusion"), PRIOR_FACTOR, plan.window * PRIOR_FACTOR)
    scores = [prior.score(image, wrap) for image in images]
    coarse = [prior.score(image, wrap) for image in coarsest[0]]
    count_key = next(key for key in scores[0] if key not in ("coherent", "collapsed"))
    row = {
        "prior": prior.name, "panorama": f"{shape[0]}×{shape[1]}{' wrap' if wrap else ''}", "setting": setting,
        "seeds": len(seeds), "steps": settings.steps, "scheduler": settings.scheduler,
        "levels": " → ".join(f"{h}×{w}" for h, w in levels),
        "coherent_count": sum(s["coherent"] for s in scores), "collapsed_count": sum(s["collapsed"] for s in scores),
        "coarsest_coherent_count": sum(s["coherent"] for s in coarse),
        "count_name": count_key, "count_mean": statistics.mean(s[count_key] for s in scores),
        **{f"unet_{key}": value for key, value in plan.work().items()},
        "work_vs_md": sum(plan.step_costs()) / sum(md_plan.step_costs()), "seconds": seconds,
        **{f"window_seam_{side}": value for side, value in window_seam_ratio(
            images, plan.grids_at(plan.steps - 1)[-1], seam_multiple(plan)).items()},
        "seam_360": statistics.mean(seam_ratio(image) for image in images) if wrap else None,
    }
    if prior.name == "sun":
        aspects = [s["aspect"] for s in scores if s["coherent"]]
        row["sun_aspect"] = statistics.mean(aspects) if aspects else None
    n = len(seeds)
    seams = [row[f"window_seam_{side}"] for side in ("rows", "columns")] + [row["seam_360"]]
    row.update(coherent=f"{row['coherent_count']}/{n}", collapsed=f"{row['collapsed_count']}/{n}",
               work=f"{row['work_vs_md']:.2f}×", seams=" / ".join("—" if v is None else f"{v:.2f}" for v in seams),
               **{"coarsest coherent": f"{row['coarsest_coherent_count']}/{n}",
                  "count": f"{count_key} {row['count_mean']:.2f}"})
    if keep is not None:
        keep.append((row, images[:4].clone()))
    print(markdown_table([row], ASPECT_COLUMNS).splitlines()[-1], flush=True)
    return row


def aspects_part(quick: bool, seeds: int | None = None, settings=ASPECT_SETTINGS,
                 priors=None) -> tuple[list[dict], list]:
    shapes = (ASPECTS[0], ASPECTS[2]) if quick else ASPECTS
    seeds = list(range(seeds or (8 if quick else 24)))
    print(f"\naspects: {len(seeds)} seeds, the pipeline's plan for each setting (Standard preset unless named"
          f"{', steps ÷ 5' if quick else ''}), ω = 10 (projection)")
    print("\n".join(markdown_table([], ASPECT_COLUMNS).splitlines()[:2]))
    rows, examples = [], []
    for name, prior in aspect_priors().items():
        if priors and name not in priors:
            continue
        rows.append(prior_draws_row(prior, len(seeds)))
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
    parser.add_argument("--settings", nargs="+", choices=list(ASPECT_SETTINGS | SPEED_SETTINGS | POLE_SETTINGS), metavar="SETTING",
                        help="part 3: only these settings (ASPECT_SETTINGS, SPEED_SETTINGS or POLE_SETTINGS)")
    parser.add_argument("--priors", nargs="+", choices=("horizon", "sun", "river"), help="part 3: only these priors")
    parser.add_argument("--output", help="part 3's results name in bench/results (default layout-aspects[-quick])")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small float64 tensors: one thread is fastest and fair to a busy machine
    env = environment()
    suffix = "-quick" if args.quick else ""
    if args.aspects:
        rows, examples = aspects_part(args.quick, args.seeds, args.settings or ASPECT_SETTINGS, args.priors)
        print("\n" + markdown_table(rows, ASPECT_COLUMNS))
        write_json(args.output or f"layout-aspects{suffix}", {"environment": env, "aspects": rows})
        if not args.settings:
            plot_aspects(rows, examples, args.quick)
        return
    horizon_rows, examples = horizon_part(args.quick)
    print("\n" + markdown_table(horizon_rows, COLUMNS))
    tiny_rows = [] if args.skip_tiny else tiny_model_part(args.quick)
    write_json(f"layout{suffix}", {"environment": env, "horizon": horizon_rows, "tiny_model": tiny_rows})
    plot(horizon_rows, examples, args.quick)


if __name__ == "__main__":
    main()
