"""Peak memory of decoding a 4096×2048 panorama (tiled vs one VAE call) and of a full 4096×2048 MSD run.

Each measurement runs in a fresh subprocess, so one peak never hides another: on the CPU the peak is
the child's ru_maxrss (also reported above the RSS it had after loading the model), on a GPU
torch.cuda.max_memory_allocated. The child's address space is capped (--limit-gb), so a decode that
cannot fit fails inside the child with an allocation error instead of waking the OOM killer; then the
next smaller size is tried, down to the largest that worked.

    .venv/bin/python bench/memory.py            # full: the MSD run takes 4 steps   (≈ 6 min on 2 cores)
    .venv/bin/python bench/memory.py --quick    # the MSD run takes 1 step           (≈ 3 min)

Writes bench/results/memory[-quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import ROOT, environment, markdown_table, write_json

SIZES = [(4096, 2048), (2048, 1024), (1024, 512)]  # width × height px, tried largest first


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(kind: str, width: int, height: int, device: str, steps: int) -> dict:
    """Runs in the subprocess: load the tiny model, do one thing, report the peak."""
    import torch

    from msd_core.models import loading, vae
    from msd_core.pipeline import MSDPanoramaPipeline
    from msd_core.settings import GenerationSettings

    torch.manual_seed(0)
    components = loading.load_components("tiny", device=device, dtype="float32")
    baseline = rss_mib()
    cuda = components.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if kind in ("decode_plain", "decode_tiled"):
        latents = torch.randn(1, 4, height // 8, width // 8, device=components.device)
        tile = vae.auto_tile(height // 8, width // 8, components.device) if kind == "decode_tiled" else None
        image = vae.decode_latents(components.vae, latents, tile=tile)
        extra = {"tile": tile, "output_shape": list(image.shape)}
    else:
        settings = GenerationSettings(prompt="alpine valley", model="tiny", device=device, width=width, height=height,
                                      wrap=True, steps=steps, gradient="fast", windows="dense", view_batch=64, seed=0)
        pipe = MSDPanoramaPipeline(components)
        result = pipe(settings)
        extra = {"plan": result.plan.describe(), "timings": result.timings, "steps": steps}
    seconds = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "width": width, "height": height, "device": str(components.device), "ok": True,
            "seconds": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": peak_rss,
            "peak_above_baseline_mib": peak_rss - baseline,
            "cuda_peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, **extra}


def measure(kind: str, width: int, height: int, device: str, steps: int, limit_gb: float, threads: int) -> dict:
    def cap_address_space():
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, __file__, "--child", kind, "--size", f"{width}x{height}", "--device", device,
               "--steps", str(steps)]
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                          preexec_fn=cap_address_space if device == "cpu" else None)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"kind": kind, "width": width, "height": height, "device": device, "ok": False,
            "seconds": time.perf_counter() - started, "error": reason[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--limit-gb", type=float, default=8.0, help="address-space cap of each CPU child")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        width, height = (int(v) for v in args.size.split("x"))
        print(json.dumps(child(args.child, width, height, args.device, args.steps)))
        return

    env = environment()
    rows = []
    for kind in ("decode_tiled", "decode_plain"):
        for width, height in SIZES:
            row = measure(kind, width, height, args.device, 1, args.limit_gb, args.threads)
            rows.append(row)
            print(row, flush=True)
            if row["ok"]:
                break  # the largest size that worked
    steps = 1 if args.quick else 4
    rows.append(measure("msd_run", 4096, 2048, args.device, steps, args.limit_gb, args.threads))
    print(rows[-1], flush=True)
    print(markdown_table(rows, ["kind", "width", "height", "ok", "tile", "seconds", "baseline_rss_mib", "peak_rss_mib",
                                "peak_above_baseline_mib", "cuda_peak_allocated_mib", "error"]))
    write_json("memory-quick" if args.quick else "memory",
               {"environment": env, "limit_gb": args.limit_gb, "child_threads": args.threads, "rows": rows})


if __name__ == "__main__":
    main()
