"""Drafts batched through the UNet against drafts one after another, side by side in one run.

1. Tiny model (CPU, one thread): four drafts of a 360° world at the tiny model's scale (512×256 px → drafts
   of 128×64, one 64-px window tall: a global level and two finest windows, the structure of SD-2's
   1024×512 drafts), with the default (Standard) settings, as the worker makes them:
   - "one after another": four pipeline calls (the CPU's way, ``variations.batch_size`` = 1);
   - "batched, view batch 16": all four in one ``sample_batch`` (what a GPU with room for 16 windows does);
   - "batched, view batch 4": two batches of two (a view batch of 4 on an accelerator).
   Wall time to the first draft and to all four (decoded), median of the repetitions after a warm-up,
   runs interleaved; UNet calls and windows counted; the largest difference of the batched drafts' latents
   from the drafts made alone.
2. ``--sd-cpu``: SD-2-base's UNet (random weights, exact config) on the CPU in float32 at 32×32 latents:
   ms per window (one classifier-free-guidance pair) for 1, 2 and 4 windows per call, i.e. whether the
   CPU gains from batching at all (it decides ``variations.batch_size`` there).

    .venv/bin/python bench/drafts.py [--repetitions 3] [--sd-cpu]
    .venv/bin/python bench/drafts.py --skip-tiny      # part 2 only

Writes bench/results/drafts.json (--skip-tiny: drafts-sd-cpu.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from common import environment, markdown_table, median_spread, write_json
from speed import Meter

from msd_core import variations
from msd_core.models import loading
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

COUNT = 4


def tiny_part(repetitions: int) -> list[dict]:
    components = loading.load_components("tiny", device="cpu", dtype="float32")
    pipe = MSDPanoramaPipeline(components)
    world = GenerationSettings(prompt="alpine valley at dawn", width=512, height=256, wrap=True, model="tiny",
                               device="cpu", seed=7)
    draft = variations.draft_settings(world, components.window)
    seeds = [dataclasses.replace(draft, seed=draft.seed + index) for index in range(COUNT)]
    results, first_done = {}, {}

    def run(name, view_batch, group):
        def call():
            started = time.perf_counter()
            made = []
            batch = [dataclasses.replace(settings, view_batch=view_batch) for settings in seeds]
            for indices in variations.draft_groups(COUNT, group):
                made += pipe.sample_batch([batch[index] for index in indices])
                if indices.start == 0:  # the first draft is decoded and could be shown
                    first_done.setdefault(name, []).append(time.perf_counter() - started)
            results[name] = made
        return call

    runs = {
        "one after another": run("one after another", 4, 1),
        "batched, view batch 16": run("batched, view batch 16", 16, COUNT),
        "batched, view batch 4": run("batched, view batch 4", 4, 2),
    }
    meter = Meter(components)
    times = {name: [] for name in runs}
    counts = {}
    for name, call in runs.items():  # warm-up and UNet counts
        meter.reset()
        with meter.attached():
            call()
        counts[name] = {"unet_calls": meter.calls, "unet_windows": meter.windows}
    first_done.clear()
    names = list(runs)
    for round_ in range(repetitions):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    alone = results["one after another"]
    sequential = median_spread(times["one after another"])
    rows = []
    for name in names:
        total = median_spread(times[name])
        first = median_spread(first_done[name])
        difference = max(float((a.latents - b.latents).abs().max()) for a, b in zip(results[name], alone))
        rows.append({"config": name, "drafts": COUNT, "draft_size": f"{draft.width}×{draft.height}",
                     "first_draft_s": first["median"], "all_drafts_s": total["median"], "all_min": total["min"],
                     "all_max": total["max"], "vs_one_after_another": total["median"] / sequential["median"],
                     "first_vs_one_after_another": first["median"] / median_spread(first_done["one after another"])["median"],
                     **counts[name], "max_latent_difference": difference,
                     "latent_scale": float(alone[0].latents.abs().max()), "times": times[name]})
    return rows


def sd_cpu_part() -> list[dict]:
    from device import SD2_BASE_UNET, TEXT_TOKENS
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD2_BASE_UNET).eval()
    rows = []
    with torch.inference_mode():
        for windows in (1, 1, 2, 4):  # the first call warms up
            sample = torch.randn(2 * windows, 4, 32, 32)
            text = torch.randn(2 * windows, TEXT_TOKENS, SD2_BASE_UNET["cross_attention_dim"])
            started = time.perf_counter()
            unet(sample, torch.tensor(500.0), encoder_hidden_states=text)
            seconds = time.perf_counter() - started
            rows.append({"windows_per_call": windows, "seconds": seconds, "ms_per_window": 1000 * seconds / windows})
            print(rows[-1], flush=True)
    return rows[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--sd-cpu", action="store_true", help="also SD-2-base's UNet on the CPU, 1–4 windows per call")
    parser.add_argument("--skip-tiny", action="store_true", help="only part 2 (writes drafts-sd-cpu.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    env = environment()
    rows = [] if args.skip_tiny else tiny_part(args.repetitions)
    print(markdown_table(rows, ["config", "first_draft_s", "all_drafts_s", "all_min", "all_max", "vs_one_after_another",
                                "first_vs_one_after_another", "unet_calls", "unet_windows", "max_latent_difference"]))
    sd_rows = sd_cpu_part() if args.sd_cpu or args.skip_tiny else []
    write_json("drafts-sd-cpu" if args.skip_tiny else "drafts", {"environment": env, "tiny": rows, "sd2_cpu": sd_rows})


if __name__ == "__main__":
    main()
