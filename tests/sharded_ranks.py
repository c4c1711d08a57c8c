"""What each rank of the sharding tests runs (imported by the processes test_distributed spawns).

Every rank runs the same cases as one process would, sharded (``msd_core.sampling.distributed``), and writes its
final latents as safetensors (never pickle) or, when the run fails, the error's class and message."""

import dataclasses
import json
import os
import signal
import threading
import time

import torch
from safetensors.torch import save_file

from msd_core.sampling import distributed
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

BASE = GenerationSettings(
    prompt="a quiet lake under mountains", width=256, height=128, wrap=True, model="tiny", steps=3, seed=5,
    device="cpu", view_batch=3, guided_fraction=1.0, late_gradient="none",
)
CASES = {  # MD and MSD, shifted and dense windows, the global level, both solvers, all with wrap
    "md-dense-ddim": dict(method="multidiffusion", windows="dense", stride=32, scheduler="ddim"),
    "msd-shifted-global-ddim-exact": dict(windows="shifted", pyramid="global", scheduler="ddim", gradient="exact"),
    "msd-dense-halving-dpm-refresh": dict(windows="dense", stride=32, pyramid="halving", scheduler="dpmpp-2m",
                                          gradient="refresh"),
    "msd-shifted-global-dpm-fast-poles": dict(windows="shifted", pyramid="global", scheduler="dpmpp-2m",
                                              gradient="fast", poles="sphere"),
}


def settings(case: str) -> GenerationSettings:
    return dataclasses.replace(BASE, **CASES[case]).validate()


def run_rank(rank: int, world: int, port: int, scenario: str, folder: str) -> None:
    torch.set_num_threads(1)
    pipe = MSDPanoramaPipeline.from_settings(BASE)
    pipe.map_batches = distributed.join(distributed.RankInfo(rank, world, rank), "cpu", f"tcp://127.0.0.1:{port}",
                                        timeout=120)
    try:
        if scenario == "equal":
            latents = {case: pipe(settings(case), decode=False).latents.contiguous() for case in CASES}
            save_file(latents, os.path.join(folder, f"rank{rank}.safetensors"))
            return
        interrupt, callback = threading.Event(), None
        if scenario == "cancel" and rank == 0:  # the cancel reaches rank 0 only, as the worker's does

            def callback(info):
                if info.step == 2:
                    interrupt.set()
        elif scenario == "kill" and rank == 1:

            def callback(info):
                if info.step == 2:
                    with open(os.path.join(folder, "killed"), "w") as file:
                        file.write(str(time.time()))
                    os.kill(os.getpid(), signal.SIGKILL)
        try:
            pipe(settings("msd-shifted-global-ddim-exact"), decode=False, callback=callback, interrupt=interrupt)
            outcome = {"error": None}
        except Exception as exc:
            outcome = {"error": type(exc).__name__, "message": str(exc)}
        outcome["time"] = time.time()
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as file:
            json.dump(outcome, file)
    finally:
        distributed.leave()
