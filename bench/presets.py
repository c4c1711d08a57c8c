"""Quality presets against today's default: UNet work, layout, window seams and wall time.

1. Work: exact UNet window forwards and backwards from the plan (msd_core.sampling.plan) for every preset at the
   real sizes (360, strip, backdrop) with SD-2-base's 512 px window.
2. Layout: panoramas sampled from an analytic prior (bench/horizon.py; ``--prior`` picks one of PRIORS)
   with the pipeline's own plan (the same window grids, step by step) and msd_core's sampler: coherent
   and collapsed (all sky or all ground) fractions, mean transitions per column, the 0/360° seam, and
   the window-seam ratio at the last step's tile edges (``common.window_seam_ratio``).
3. Time: wall time side by side on the tiny model (CPU, one thread; 256×128 px, two levels),
   against diffusers' StableDiffusionPanoramaPipeline (MultiDiffusion at today's stride), and the
   window-seam ratio of the tiny model's latents.

    .venv/bin/python bench/presets.py            # full: 24 seeds, real step counts   (≈ 40 min on 2 cores)
    .venv/bin/python bench/presets.py --quick    # 8 seeds, steps ÷ 5, two shapes     (≈ 4 min)

Writes bench/results/presets[-quick].json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from common import RESULTS, environment, markdown_table, median_spread, seam_multiple, window_seam_ratio, write_json
from horizon import PRIOR_FACTOR, HorizonPrior, sample_with_settings, score_layout, seam_ratio
from speed import WindowPanorama, interleaved, Meter

from msd_core.models import loading
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.sampling.plan import forward_equivalents, plan_without_model
from msd_core.settings import PRESETS, QUALITY, GenerationSettings

PRIORS = {"horizon": HorizonPrior}
SD_WINDOW = 512
# An SDXL world has the same windows per level as SD-2's 360° world at twice the pixels (docs/sdxl.md).
SDXL_MODEL, SDXL_WINDOW = "stabilityai/stable-diffusion-xl-base-1.0", 1024
SDXL_WORLD = {"360 SDXL (4096×2048)": (4096, 2048, True, SDXL_WINDOW)}
# (height, width, wrap) in prior pixels: the four shapes (the prior's window is 16)
SHAPES = [(64, 64, False), (32, 64, True), (64, 128, True), (32, 128, False)]
QUICK_SHAPES = [(64, 64, False), (32, 64, True)]
TILE_GROUPS = 4  # tile layouts per layout row (seeds are split between them)


def shape_name(height: int, width: int, wrap: bool) -> str:
    return f"{height}×{width}{' wrap' if wrap else ''}"


SHAPE_NAMES = [shape_name(*shape) for shape in SHAPES]
# v0.3's presets (DDIM, the exact gradient at every step), timed beside today's (issue 18);
# the variants below change them.
V03 = {"guided_fraction": 1.0, "late_gradient": "none", "scheduler": "ddim", "windows": "shifted", "gradient": "exact"}
V03_CONFIGS = {"draft v0.3": {**V03, "steps": 25}, "standard v0.3": {**V03, "steps": 50}}
# Rows of the tables: the presets, and variants that answer "what does each choice cost or buy".
CONFIGS = {name: values for name, (values, _) in QUALITY.items()}
VARIANTS = {
    "dense stride w/4, exact": {**V03, "windows": "dense", "gradient": "exact", "steps": 50, "stride_fraction": 4},
    "dense stride w/2, exact": {**V03, "windows": "dense", "gradient": "exact", "steps": 50, "stride_fraction": 2},
    "shifted, refresh, 50": {**V03, "windows": "shifted", "gradient": "refresh", "steps": 50},
    "shifted, fast, 50": {**V03, "windows": "shifted", "gradient": "fast", "steps": 50},
    "shifted, exact, 25": {**V03, "windows": "shifted", "gradient": "exact", "steps": 25},
    "shifted, refresh, 25": {**V03, "windows": "shifted", "gradient": "refresh", "steps": 25},
    "shifted, exact, dpmpp-2m 20": {**V03, "windows": "shifted", "gradient": "exact", "steps": 20, "scheduler": "dpmpp-2m"},
    "shifted, exact, dpmpp-2m 15": {**V03, "windows": "shifted", "gradient": "exact", "steps": 15, "scheduler": "dpmpp-2m"},
    "shifted, exact, dpmpp-2m 20, guided 0.5": {**V03, "windows": "shifted", "gradient": "exact", "steps": 20,
                                                "scheduler": "dpmpp-2m", "guided_fraction": 0.5},
}


def settings_for(config: dict, window: int, base: GenerationSettings) -> GenerationSettings:
    """``base`` with a CONFIGS/VARIANTS row's settings (``stride_fraction`` n: a dense stride of window/n px)."""
    values = dict(config)
    fraction = values.pop("stride_fraction", None)
    return dataclasses.replace(base, stride=window // fraction if fraction else None, **values)


# ------------------------------------------------------------------------------------------------ work


WORK_COLUMNS = ["preset", "config", "scheduler", "steps", "guided_steps", "windows_per_level", "forwards", "backwards",
                "forward_equivalents", "limit", "ratio_to_limit"]


def work_part(configs: dict) -> list[dict]:
    """UNet work of every config at every size preset: forwards, backwards, forward-equivalents (a backward =
    plan.BACKWARD_COST forwards) and their ratio to ``Plan.limit`` (one pass per window area per level per step)."""
    rows = []
    sizes = {preset: (width, height, wrap, SD_WINDOW) for preset, (width, height, wrap, _) in PRESETS.items()}
    for preset, (width, height, wrap, window) in (sizes | SDXL_WORLD).items():
        for name, config in configs.items():
            model = SDXL_MODEL if window == SDXL_WINDOW else GenerationSettings.model
            base = GenerationSettings(prompt="bench", width=width, height=height, wrap=wrap, window=window, model=model)
            settings = settings_for(config, window, base)
            plan = plan_without_model(settings, None, "float16")
            work = plan.work()
            rows.append({"preset": preset, "config": name, **work, "steps": plan.steps,
                         "scheduler": settings.scheduler, "guided_steps": plan.describe()["guided_steps"],
                         "windows_per_level": plan.describe()["windows_per_level"],
                         "forward_equivalents": round(forward_equivalents(work)), "limit": round(plan.limit()),
                         "ratio_to_limit": round(forward_equivalents(work) / plan.limit(), 2)})
    return rows


# ---------------------------------------------------------------------------------------------- layout


def mean_of(values) -> float | None:
    values = [value for value in values if value is not None]
    return statistics.mean(values) if values else None


def layout_row(prior, name: str, config: dict, shape, seeds: list[int], steps_divisor: int) -> dict:
    height, width, wrap = shape
    base = GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR, height=height * PRIOR_FACTOR, wrap=wrap)
    settings = settings_for(config, prior.window * PRIOR_FACTOR, base)
    settings = dataclasses.replace(settings, steps=max(1, settings.steps // steps_divisor))
    started = time.perf_counter()
    # As in the product, the panorama's seed places its tiles: groups of seeds, each with its own tiles
    # (every panorama of one group shares them), so the seam ratio is not that of one tile layout.
    images, seams = [], []
    for group in range(TILE_GROUPS):
        group_seeds = seeds[group::TILE_GROUPS]
        group_images, plan = sample_with_settings(prior, dataclasses.replace(settings, seed=group_seeds[0]), group_seeds)
        images.append(group_images)
        last_grid = plan.grids_at(plan.steps - 1)[-1]
        seams.append({**window_seam_ratio(group_images, last_grid, seam_multiple(plan)),
                      **{f"texture_{side}": value for side, value in window_seam_ratio(
                          group_images, last_grid, seam_multiple(plan), within_class=True).items()}})
    images = torch.cat(images)
    seconds = time.perf_counter() - started
    layouts = [score_layout(image) for image in images]
    row = {
        "config": name, "panorama": shape_name(height, width, wrap), "seeds": len(seeds),
        "steps": settings.steps, "coherent": statistics.mean(layout.coherent for layout in layouts),
        "collapsed": statistics.mean(layout.uniform for layout in layouts),
        "transitions": statistics.mean(layout.transitions for layout in layouts),
        **{f"window_seam_{side}": mean_of(seam[side] for seam in seams)
           for side in ("rows", "columns", "texture_rows", "texture_columns")},
        "seam_360": statistics.mean(seam_ratio(image) for image in images) if wrap else None,
        "seconds": seconds,
    }
    print(row, flush=True)
    return row


# ------------------------------------------------------------------------------------------------ time


def time_part(configs: dict, size: dict, steps_divisor: int, repetitions: int) -> dict:
    """Wall time of every config and of diffusers' MultiDiffusion on the tiny model, interleaved."""
    components = loading.load_components("tiny", device="cpu", dtype="float32")
    pipe = MSDPanoramaPipeline(components)
    base = GenerationSettings(prompt="alpine valley", model="tiny", device="cpu", seed=1, view_batch=16, **size)
    runs, settings_of, latents_of = {}, {}, {}
    initial = pipe.initial_latents(pipe.check_inputs(base), base.seed)
    for name, config in configs.items():
        settings = settings_for(config, components.window, base)
        settings = dataclasses.replace(settings, steps=max(1, settings.steps // steps_divisor))
        settings_of[name] = settings

        def run(settings=settings, name=name):
            latents_of[name] = pipe(settings, latents=initial, decode=False).latents

        runs[name] = run
    today = settings_of["best"]
    reference = WindowPanorama(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.stride_latent = pipe.check_inputs(today).stride
    reference.set_progress_bar_config(disable=True)

    def run_diffusers():
        with torch.no_grad():
            reference(today.prompt, height=today.height, width=today.width, num_inference_steps=today.steps,
                      guidance_scale=today.guidance, latents=initial.clone(), output_type="latent",
                      view_batch_size=today.view_batch, circular_padding=today.wrap)

    runs["diffusers MultiDiffusion"] = run_diffusers
    measured = interleaved(Meter(components), runs, repetitions)
    rows = []
    for name, result in measured.items():
        row = {"config": name, **median_spread(result["times"]), "unet_windows_counted": result["windows"],
               "vs_best": result["median"] / measured["best"]["median"],
               "vs_diffusers": result["median"] / measured["diffusers MultiDiffusion"]["median"]}
        if name in settings_of:
            plan = pipe.check_inputs(settings_of[name])
            seams = window_seam_ratio(latents_of[name][0], plan.grids_at(plan.steps - 1)[-1], seam_multiple(plan))
            row.update(steps=plan.steps, **{f"planned_{k}": v for k, v in plan.work().items()},
                       window_seam_rows=seams["rows"], window_seam_columns=seams["columns"])
        rows.append(row)
    return {"size": size, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prior", choices=PRIORS, default="horizon")
    parser.add_argument("--seeds", type=int, help="seeds per layout row (default 24, quick 8)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, …")
    parser.add_argument("--output", help="results name in bench/results (default presets[-quick])")
    parser.add_argument("--variants", action="store_true", help="also the VARIANTS rows (what each choice buys)")
    parser.add_argument("--skip-time", action="store_true", help="no tiny-model timing")
    parser.add_argument("--work-only", action="store_true", help="only print the UNet work table (no sampling)")
    parser.add_argument("--time-only", action="store_true", help="only the work table and the tiny-model timing")
    parser.add_argument("--only", nargs="+", metavar="CONFIG",
                        help="sample only these layout rows and keep the others of the last results file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quick = args.quick
    configs = CONFIGS | V03_CONFIGS | (VARIANTS if args.variants else {})
    sampled = {name: config for name, config in configs.items() if not args.only or name in args.only}
    seeds = list(range(args.first_seed, args.first_seed + (args.seeds or (8 if quick else 24))))
    output = args.output or ("presets-quick" if quick else "presets")
    steps_divisor = 5 if quick else 1

    work = work_part(configs)
    print(markdown_table(work, WORK_COLUMNS))
    if args.work_only:
        return

    prior = PRIORS[args.prior]()
    layout = [] if args.time_only else [layout_row(prior, name, config, shape, seeds, steps_divisor)
                                        for shape in (QUICK_SHAPES if quick else SHAPES) for name, config in sampled.items()]
    last_path = RESULTS / f"{output}.json"
    if args.only and last_path.exists():  # the other rows as the last run measured them
        last = json.loads(last_path.read_text(encoding="utf-8"))
        layout += [row for row in last["layout"] if row["config"] in configs and row["config"] not in sampled]
        layout.sort(key=lambda row: (SHAPE_NAMES.index(row["panorama"]), list(configs).index(row["config"])))
    print(markdown_table(layout, ["panorama", "config", "steps", "coherent", "collapsed", "transitions",
                                  "window_seam_rows", "window_seam_columns", "window_seam_texture_rows",
                                  "window_seam_texture_columns", "seam_360", "seconds"]))

    timing = None
    if not args.skip_time:
        # 256×128 px: two levels of the tiny model's 64 px window. Without wrap: diffusers' circular
        # padding fails for windows other than its own 64 latents.
        timing = time_part(CONFIGS | V03_CONFIGS, {"width": 256, "height": 128, "wrap": False}, steps_divisor,
                           1 if quick else 2)
        print(markdown_table(timing["rows"], ["config", "median", "min", "max", "vs_best", "vs_diffusers", "steps",
                                              "planned_forwards", "planned_backwards", "unet_windows_counted",
                                              "window_seam_rows", "window_seam_columns"]))

    write_json(output, {
        "environment": environment(), "prior": args.prior, "seeds": [seeds[0], seeds[-1]],
        "quality": {k: v for k, (v, _) in QUALITY.items()},
        "variants": VARIANTS if args.variants else {}, "work": work, "layout": layout, "time": timing,
    })


if __name__ == "__main__":
    main()
