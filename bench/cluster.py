"""Beyond one process: a tiny 8-window panorama sharded over 2 CPU ranks (gloo) against one process, and
`msd-panorama batch` throughput here against a local Ray instance (docs/cluster.md).

Everything runs the tiny SD model on the CPU. Sharding: MultiDiffusion at 288×64 px, stride 32 px (8 windows
of 64 px in one row), view batch 1 (8 batches: 4 per rank), timed as the sampling call alone after one
warm-up run; the ranks start each repetition together (a barrier); one torch thread per process. Batch: the same job file run by one warm model in this process and by
Ray actors (1 and 2), wall time including model loading and Ray's start.

    .venv/bin/python bench/cluster.py --quick   # 3 repetitions, 4 steps, 4 batch jobs
    .venv/bin/python bench/cluster.py           # 5 repetitions, 10 steps, 8 batch jobs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from common import environment, write_json

from msd_core.sampling import distributed
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

EIGHT_WINDOWS = dict(prompt="alpine valley", model="tiny", width=288, height=64, wrap=False, method="multidiffusion",
                     windows="dense", stride=32, view_batch=1, seed=1, device="cpu", scheduler="ddim")


def timed_runs(pipe, settings, repetitions: int, before=None) -> tuple[list[float], torch.Tensor]:
    pipe(settings, decode=False)  # warm-up
    seconds = []
    for _ in range(repetitions):
        if before:
            before()
        started = time.perf_counter()
        latents = pipe(settings, decode=False).latents
        seconds.append(time.perf_counter() - started)
    return seconds, latents


def rank_main(rank: int, world: int, port: int, steps: int, repetitions: int, folder: str) -> None:
    torch.set_num_threads(1)
    settings = GenerationSettings(**EIGHT_WINDOWS, steps=steps).validate()
    pipe = MSDPanoramaPipeline.from_settings(settings)
    pipe.map_batches = distributed.join(distributed.RankInfo(rank, world, rank), "cpu", f"tcp://127.0.0.1:{port}")
    try:
        seconds, latents = timed_runs(pipe, settings, repetitions, before=torch.distributed.barrier)
    finally:
        distributed.leave()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({"latents": latents.contiguous()}, os.path.join(folder, "sharded.safetensors"))
        with open(os.path.join(folder, "sharded.json"), "w") as file:
            json.dump(seconds, file)


def sharding(steps: int, repetitions: int) -> dict:
    settings = GenerationSettings(**EIGHT_WINDOWS, steps=steps).validate()
    pipe = MSDPanoramaPipeline.from_settings(settings)
    # One thread everywhere: equality needs the same thread count (a CPU reduction split over threads adds in
    # another order), and on a shared 2-core machine 2 threads in one process thrash (100× slower here).
    torch.set_num_threads(1)
    seconds, reference = timed_runs(pipe, settings, repetitions)
    results = {"one process, 1 thread": statistics.median(seconds)}
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(rank_main, args=(2, distributed.free_port(), steps, repetitions, folder), nprocs=2,
                           start_method="spawn")
        with open(os.path.join(folder, "sharded.json")) as file:
            results["2 gloo ranks, 1 thread each"] = statistics.median(json.load(file))
        from safetensors.torch import load_file

        identical = torch.equal(load_file(os.path.join(folder, "sharded.safetensors"))["latents"], reference)
    windows = len(pipe.check_inputs(settings).grids_at(0)[-1])
    return {"windows": windows, "steps": steps, "repetitions": repetitions, "identical_latents": identical,
            "median_seconds": results}


def batch_throughput(jobs: int, ray_workers: tuple[int, ...]) -> dict:
    from msd_core import batch

    def job_file(folder: str) -> str:
        path = os.path.join(folder, "jobs.jsonl")
        with open(path, "w") as file:
            for seed in range(jobs):
                settings = {"prompt": "alpine valley", "model": "tiny", "width": 256, "height": 128, "steps": 4,
                            "seed": seed, "device": "cpu"}
                file.write(json.dumps({"settings": settings, "output": f"job{seed}.png"}) + "\n")
        return path

    def run(**options) -> float:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            summary = batch.run_batch(job_file(folder), out=open(os.devnull, "w"), threads=1, **options)
            assert summary.done == jobs, summary
            return time.perf_counter() - started

    seconds = {"here, one warm model": run()}
    try:
        import ray
    except ImportError:
        return {"jobs": jobs, "wall_seconds": seconds, "ray": "not installed"}
    ray_init = {}
    for workers in ray_workers:
        name = f"Ray, {workers} actor{'s' * (workers > 1)}"
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20)
        ray_init[name] = round(time.perf_counter() - started, 2)
        try:
            run(ray_address="local", workers=workers)
        finally:
            ray.shutdown()
        seconds[name] = time.perf_counter() - started  # ray.init and the actors' model loading included
    return {"jobs": jobs, "wall_seconds": {name: round(value, 2) for name, value in seconds.items()},
            "ray_init_seconds": ray_init,
            "jobs_per_minute": {name: round(60 * jobs / value, 1) for name, value in seconds.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("sharding", "batch"), help="run one part (written as cluster[-quick]-PART.json)")
    args = parser.parse_args()
    steps, repetitions, jobs = (4, 3, 4) if args.quick else (10, 5, 8)
    report = {"environment": environment()}
    if args.only != "batch":
        report["sharding"] = sharding(steps, repetitions)
    if args.only != "sharding":
        report["batch"] = batch_throughput(jobs, (1, 2))
    print(json.dumps(report, indent=1))
    write_json("cluster" + "-quick" * args.quick + (f"-{args.only}" if args.only else ""), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
