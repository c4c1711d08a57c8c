"""Speed: our MultiDiffusion and MSD against diffusers' StableDiffusionPanoramaPipeline, cost growth
with the panorama's area, the sampler's own overhead, and the warm worker.

Everything runs the tiny SD model (msd_core.models.loading, factor-8 VAE, 64 px window) on the CPU, with the
same size, steps, window, stride, view batch, prompt and initial latents for every method. Methods are
timed side by side in one process, repetitions interleaved (the order rotates every round), and the
median and spread are reported: on a shared machine only such ratios mean something.

    .venv/bin/python bench/speed.py            # full: 1024×256 px, areas up to 32 windows  (≈ 20 min on 2 cores)
    .venv/bin/python bench/speed.py --quick    # quick: 512×128 px, areas up to 16 windows  (≈ 5 min)

Writes bench/results/speed.json and docs/bench-cost.png (--quick: bench/results/speed-quick.json and
bench-cost-quick.png beside it).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import os
import pstats
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager

import torch
from common import ROOT, environment, figure_path, markdown_table, median_spread, pyplot, write_json
from diffusers import StableDiffusionPanoramaPipeline

from msd_core.models import loading
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

PROMPT = "alpine valley"  # the tiny model reads 14 characters
METHODS = ("diffusers MD", "our MD", "MSD fast", "MSD exact")


class WindowPanorama(StableDiffusionPanoramaPipeline):
    """diffusers' MultiDiffusion with the model's own window and our stride (it hard-codes 64 and 8 latents)."""

    stride_latent = 2

    def get_views(self, panorama_height, panorama_width, window_size=64, stride=8, circular_padding=False):
        return super().get_views(
            panorama_height, panorama_width, self.unet.config.sample_size, self.stride_latent, circular_padding
        )


class Meter:
    """Wraps the model calls: counts UNet window evaluations and calls, and times every model part."""

    def __init__(self, components: loading.Components):
        self.components = components
        self.reset()

    def reset(self) -> None:
        self.windows = self.calls = 0
        self.seconds = {"unet": 0.0, "unet_backward": 0.0, "vae": 0.0, "text_encoder": 0.0}

    @contextmanager
    def attached(self):
        unet, vae, text = self.components.unet, self.components.vae, self.components.text_encoder
        grad = torch.autograd.grad

        def timed(name, function, on_call=None):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    self.seconds[name] += time.perf_counter() - started
                    if on_call:
                        on_call(args, kwargs)

            return wrapper

        def count_unet(args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            self.windows += sample.shape[0] // 2  # classifier-free guidance: two samples per window
            self.calls += 1

        unet.forward = timed("unet", unet.forward, count_unet)
        vae.decode = timed("vae", vae.decode)
        text.forward = timed("text_encoder", text.forward)
        torch.autograd.grad = timed("unet_backward", grad)  # the exact gradient's backward pass
        try:
            yield self
        finally:
            for module in (unet, vae, text):
                module.__dict__.pop("forward", None)
            vae.__dict__.pop("decode", None)
            torch.autograd.grad = grad


def build(components: loading.Components, stride_latent: int):
    pipe = MSDPanoramaPipeline(components)
    reference = WindowPanorama(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
        unet=components.unet, scheduler=components.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.stride_latent = stride_latent
    reference.set_progress_bar_config(disable=True)
    return pipe, reference


def runner(pipe, reference, base: GenerationSettings, method: str):
    """A zero-argument function that samples once (no decoding) with ``method``."""
    plan = pipe.check_inputs(dataclasses.replace(base, method="multidiffusion"))
    initial = pipe.initial_latents(plan, base.seed)
    if method == "diffusers MD":
        def run():
            with torch.no_grad():
                reference(
                    base.prompt, height=base.height, width=base.width, num_inference_steps=base.steps,
                    guidance_scale=base.guidance, latents=initial.clone(), output_type="latent",
                    view_batch_size=base.view_batch,
                )
        return run
    changes = {
        "our MD": {"method": "multidiffusion"},
        "MSD fast": {"method": "msd", "gradient": "fast"},
        "MSD exact": {"method": "msd", "gradient": "exact"},
    }[method]
    settings = dataclasses.replace(base, **changes)
    return lambda: pipe(settings, latents=initial, decode=False)


def interleaved(meter: Meter, runs: dict, repetitions: int) -> dict:
    """Time every run ``repetitions`` times, rotating the order each round; also count its UNet work."""
    times = {name: [] for name in runs}
    counts = {}
    names = list(runs)
    for name, run in runs.items():  # warm-up (first-call allocations), and the UNet counts
        meter.reset()
        with meter.attached():
            run()
        counts[name] = {"windows": meter.windows, "calls": meter.calls}
    for round_ in range(repetitions):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    return {name: {**median_spread(times[name]), "times": times[name], **counts[name]} for name in names}


def speed_part(components, base: GenerationSettings, repetitions: int) -> dict:
    pipe, reference = build(components, base.stride // 8)
    plan = pipe.check_inputs(base)
    runs = {method: runner(pipe, reference, base, method) for method in METHODS}
    results = interleaved(Meter(components), runs, repetitions)
    reference_time = results["diffusers MD"]["median"]
    our_md = results["our MD"]["median"]
    for name, row in results.items():
        row["vs_diffusers"] = row["median"] / reference_time
        row["vs_our_md"] = row["median"] / our_md
        row["ms_per_call"] = 1000 * row["median"] / row["calls"]
        # The same ratio per round (each round's runs were back to back): its spread shows the noise.
        row["round_ratios_vs_diffusers"] = [t / r for t, r in zip(row["times"], results["diffusers MD"]["times"])]
    return {"settings": base.to_dict(), "windows_per_level": [len(grid) for grid in plan.grids], "results": results}


def growth_part(components, base: GenerationSettings, areas: list[int], repetitions: int) -> list[dict]:
    """Wall time and UNet evaluations for panoramas of ``areas`` × the window area, grown in both directions."""
    pipe, reference = build(components, base.stride // 8)
    window = components.window
    rows = []
    meter = Meter(components)
    for area in areas:
        # 1, 2, 4, 8, … windows: double the width, then the height, alternately.
        exponent = area.bit_length() - 1
        height, width = window * 2 ** (exponent // 2), window * 2 ** (exponent - exponent // 2)
        settings = dataclasses.replace(base, width=width, height=height)
        runs = {name: runner(pipe, reference, settings, name) for name in ("our MD", "MSD fast", "MSD exact")}
        measured = interleaved(meter, runs, repetitions)
        levels = [len(grid) for grid in pipe.check_inputs(settings).grids]
        for name, result in measured.items():
            rows.append({"area": area, "width": width, "height": height, "method": name,
                         "windows_per_level": levels if name != "our MD" else levels[-1:],
                         "unet_windows": result["windows"], "median": result["median"], "min": result["min"],
                         "max": result["max"], "ms_per_window": 1000 * result["median"] / result["windows"]})
            print(rows[-1], flush=True)
    return rows


def fit_linear(xs: list[float], ys: list[float]) -> dict:
    """Least squares y = a x + b and R²."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    b = my - a * mx
    ss_res = sum((y - a * x - b) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"seconds_per_window": a, "intercept": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def overhead_part(components, base: GenerationSettings, repetitions: int) -> dict:
    """Share of wall time outside the model calls (UNet forward/backward, VAE, text encoder), decoding included,
    and the top non-model functions from cProfile for MSD fast."""
    pipe, _ = build(components, base.stride // 8)
    meter = Meter(components)
    results = {}
    for method, changes in (("our MD", {"method": "multidiffusion"}), ("MSD fast", {"gradient": "fast"}),
                            ("MSD exact", {"gradient": "exact"})):
        settings = dataclasses.replace(base, **changes)
        pipe(settings)  # warm-up
        shares = []
        for _ in range(repetitions):
            meter.reset()
            with meter.attached():
                started = time.perf_counter()
                pipe(settings)
                total = time.perf_counter() - started
            model = sum(meter.seconds.values())
            shares.append({"total": total, **meter.seconds, "outside_models": total - model,
                           "overhead_share": (total - model) / total})
        best = min(shares, key=lambda s: s["overhead_share"])
        results[method] = {"median_share": statistics.median(s["overhead_share"] for s in shares),
                           "min_share": best["overhead_share"], "max_share": max(s["overhead_share"] for s in shares),
                           "runs": shares}
    profile = cProfile.Profile()
    settings = dataclasses.replace(base, gradient="fast")
    profile.enable()
    pipe(settings)
    profile.disable()
    # Self time spent in msd_core's own code, plus torch built-ins called directly from msd_core (a
    # built-in's self time is split by caller, so conv2d inside the UNet does not count here).
    own = {}
    for (filename, line, name), (_, _, self_time, _, callers) in pstats.Stats(profile).stats.items():
        if "msd_core" in filename:
            own[f"{pathlib_name(filename)}:{line}({name})"] = self_time
        elif filename == "~":
            for (caller_file, caller_line, caller_name), caller_stats in callers.items():
                if "msd_core" in caller_file:
                    key = f"{name} from {pathlib_name(caller_file)}:{caller_line}({caller_name})"
                    own[key] = own.get(key, 0.0) + caller_stats[2]
    results["profile_top_self_time"] = [
        {"function": key, "self_seconds": seconds} for key, seconds in sorted(own.items(), key=lambda kv: -kv[1])[:12]
    ]
    return results


def pathlib_name(filename: str) -> str:
    parts = filename.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def worker_part(base: GenerationSettings, threads: int) -> dict:
    """Seconds from sending a generate request to its first progress event: cold (model loaded on
    demand) and warm (second request, model kept), plus the worker's start-up until "ready"."""
    from msd_core.worker.client import WorkerClient

    settings = dataclasses.replace(base, wrap=False)
    timings = {}
    started = time.perf_counter()
    worker_env = {"MSD_PANORAMA_CACHE": os.environ["MSD_PANORAMA_CACHE"], "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as folder, WorkerClient(
        sys.executable, pythonpath=str(ROOT), env=worker_env, offline=True
    ) as client:
        event = client.next_event(timeout=300)
        if not event or event["event"] != "ready":
            raise RuntimeError(f"worker did not start: {event}")
        timings["start_to_ready"] = time.perf_counter() - started
        for label in ("cold", "warm", "warm_again"):
            sent = time.perf_counter()
            client.generate(settings, f"{folder}/{label}.png", preview_every=0)
            first = None
            while True:
                event = client.next_event(timeout=300)
                if event is None:
                    raise RuntimeError("the worker went silent")
                if event["event"] == "loading":
                    timings[f"{label}_loading_warm_flag"] = event["warm"]
                if event["event"] == "progress" and first is None:
                    first = time.perf_counter() - sent
                if event["event"] == "error":
                    raise RuntimeError(event["message"])
                if event["event"] == "done":
                    timings[f"{label}_first_progress"] = first
                    timings[f"{label}_total"] = time.perf_counter() - sent
                    timings[f"{label}_worker_timings"] = event["timings"]
                    break
    return timings


def plot_cost(rows: list[dict], quick: bool) -> None:
    plt = pyplot()
    if plt is None:
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in (("our MD", "o"), ("MSD fast", "s"), ("MSD exact", "^")):
        line = [r for r in rows if r["method"] == name]
        axes[0].errorbar([r["area"] for r in line], [r["median"] for r in line],
                         yerr=[[r["median"] - r["min"] for r in line], [r["max"] - r["median"] for r in line]],
                         marker=marker, label=name, capsize=3)
        axes[1].plot([r["unet_windows"] for r in line], [r["median"] for r in line], marker=marker, label=name)
    axes[0].set(xlabel="panorama area / window area", ylabel="seconds (median, min–max)", xscale="log", yscale="log",
                title="tiny SD model on the CPU")
    axes[1].set(xlabel="UNet window evaluations", ylabel="seconds", title="cost is linear in windows evaluated")
    for axis in axes:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(figure_path("cost", quick), dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads can be 50× slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    components = loading.load_components("tiny", device="cpu", dtype="float32")
    quick = args.quick
    base = GenerationSettings(
        prompt=PROMPT, model="tiny", device="cpu", width=512 if quick else 1024, height=128 if quick else 256,
        wrap=False, steps=10, stride=16, windows="dense", view_batch=16, seed=1, omega=10.0,
    )
    repetitions = 3

    print(f"speed: {base.width}×{base.height} px, {base.steps} steps, window 64 px, stride 16 px, view batch 16")
    speed = speed_part(components, base, repetitions)
    rows = [{"method": name, **row} for name, row in speed["results"].items()]
    print(markdown_table(rows, ["method", "median", "min", "max", "vs_diffusers", "vs_our_md", "windows", "calls",
                                "ms_per_call"]))

    growth_base = dataclasses.replace(base, steps=5)
    areas = [1, 2, 4, 8, 16] if quick else [1, 2, 4, 8, 16, 32]
    growth = growth_part(components, growth_base, areas, repetitions)
    fits = {name: fit_linear([r["unet_windows"] for r in growth if r["method"] == name],
                             [r["median"] for r in growth if r["method"] == name])
            for name in ("our MD", "MSD fast", "MSD exact")}
    print(markdown_table(growth, ["area", "width", "height", "method", "windows_per_level", "unet_windows", "median",
                                  "ms_per_window"]))
    print("linear fits (seconds = a · windows + b):", fits)

    overhead = overhead_part(components, dataclasses.replace(base, width=512, height=128, steps=5), repetitions)
    for name in ("our MD", "MSD fast", "MSD exact"):
        print(f"overhead {name}: median {overhead[name]['median_share']:.1%} "
              f"(min {overhead[name]['min_share']:.1%}, max {overhead[name]['max_share']:.1%})")
    print("top self time in msd_core (MSD fast, cProfile):")
    for entry in overhead["profile_top_self_time"][:8]:
        print(f"  {entry['self_seconds']:.3f} s  {entry['function']}")

    worker = worker_part(dataclasses.replace(base, width=256, height=128, steps=5), args.threads)
    print("worker:", worker)

    write_json("speed-quick" if quick else "speed", {"environment": env, "speed": speed, "growth": growth,
                                                     "growth_fits": fits, "overhead": overhead, "worker": worker})
    plot_cost(growth, quick)


if __name__ == "__main__":
    main()
