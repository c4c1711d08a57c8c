"""Sharding one panorama over processes (msd_core.sampling.distributed): 2 gloo ranks on the CPU give exactly the
one-process latents; a cancel on rank 0 and a killed rank end every rank with a clear error, never a hang."""

import json
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import sharded_ranks
from msd_core.sampling import distributed
from msd_core.errors import Cancelled
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.sampling.sampler import batch_slices

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(scenario: str, folder) -> list:
    context = mp.get_context("spawn")
    port = free_port()
    ranks = [context.Process(target=sharded_ranks.run_rank, args=(rank, WORLD, port, scenario, str(folder)), daemon=True)
             for rank in range(WORLD)]
    for process in ranks:
        process.start()
    return ranks


def wait(ranks, timeout: float) -> list[float]:
    """The time each rank ended; fails (and kills them) if any is still running after ``timeout``."""
    deadline, ended = time.time() + timeout, [None] * len(ranks)
    while None in ended and time.time() < deadline:
        for index, process in enumerate(ranks):
            if ended[index] is None and not process.is_alive():
                ended[index] = time.time()
        time.sleep(0.05)
    for process in ranks:
        if process.is_alive():
            process.kill()
    assert None not in ended, f"ranks still running after {timeout} s: {ranks}"
    return ended


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Both ranks' final latents of every case (started first: they run while the reference runs here)."""
    folder = tmp_path_factory.mktemp("sharded")
    ranks = start_ranks("equal", folder)
    yield ranks, folder


@pytest.fixture(scope="module")
def one_process():
    pipe = MSDPanoramaPipeline.from_settings(sharded_ranks.BASE)
    return {case: pipe(sharded_ranks.settings(case), decode=False).latents for case in sharded_ranks.CASES}


def test_two_gloo_ranks_give_exactly_the_one_process_latents(sharded, one_process):
    ranks, folder = sharded
    wait(ranks, 600)
    assert [process.exitcode for process in ranks] == [0, 0]
    for rank in range(WORLD):
        latents = load_file(folder / f"rank{rank}.safetensors")
        assert sorted(latents) == sorted(sharded_ranks.CASES)
        for case, reference in one_process.items():
            assert torch.equal(latents[case], reference), f"rank {rank}, {case}: differs from one process"
    # The cases differ from each other (a sharding that dropped the guidance would not pass unnoticed).
    assert not torch.equal(one_process["md-dense-ddim"], one_process["msd-dense-halving-dpm-refresh"])


def test_cancel_on_rank_zero_ends_every_rank(tmp_path):
    ranks = start_ranks("cancel", tmp_path)
    wait(ranks, 300)
    for rank in range(WORLD):
        outcome = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert outcome["error"] == "Cancelled", outcome


def test_killed_rank_ends_the_others_with_an_error_within_seconds(tmp_path):
    ranks = start_ranks("kill", tmp_path)
    wait(ranks, 300)
    assert ranks[1].exitcode == -9
    outcome = json.loads((tmp_path / "rank0.json").read_text())
    assert outcome["error"] == "RankLost", outcome
    assert "lost the other ranks of the sharded run" in outcome["message"]
    killed = float((tmp_path / "killed").read_text())
    assert outcome["time"] - killed < 20, "rank 0 noticed the dead rank only after a long wait"


class OneRankGather(distributed.ShardedBatches):
    """The sharding's bookkeeping without a process group: rank ``rank`` of ``world`` sees the others'
    shards as they would arrive, from a one-process run of every batch."""

    def __init__(self, rank, world, everything):
        super().__init__(rank, world)
        self.everything = everything

    def _all_gather(self, tensor):
        if tensor.numel() == 1:
            return [torch.zeros_like(tensor) for _ in range(self.world)]
        shards = []
        for rank in range(self.world):
            mine = [self.everything[index] for index in range(rank, len(self.everything), self.world)]
            shard = torch.zeros_like(tensor)
            if mine:
                stacked = torch.cat(mine, dim=1)
                shard[:, :stacked.shape[1]] = stacked
            shards.append(shard)
        return shards


@pytest.mark.parametrize("count, view_batch, world", [(7, 3, 2), (2, 3, 4), (10, 1, 3), (9, 4, 2)])
def test_shards_reassemble_in_the_one_process_order(count, view_batch, world):
    windows = torch.randn(count, 2, 4, 4)

    def run_batch(batch):
        return windows[batch] * 2, windows[batch] - 1

    everything = [torch.stack(run_batch(batch)) for batch in batch_slices(count, view_batch)]
    for rank in range(world):
        prev, x0 = OneRankGather(rank, world, everything)(windows, view_batch, run_batch)
        assert torch.equal(prev, windows * 2) and torch.equal(x0, windows - 1)


def test_a_failed_or_cancelled_rank_is_told_to_every_rank():
    class Statuses(distributed.ShardedBatches):
        def __init__(self, codes):
            super().__init__(0, len(codes))
            self.codes = codes

        def _all_gather(self, tensor):
            return [torch.tensor([code]) for code in self.codes]

    windows = torch.zeros(4, 1, 2, 2)
    with pytest.raises(Cancelled):
        Statuses([distributed.OK, distributed.CANCELLED])(windows, 2, lambda batch: (windows[batch], windows[batch]))
    with pytest.raises(distributed.RankOutOfMemory, match="rank 1 of 2 of the sharded run ran out of memory"):
        Statuses([distributed.OK, distributed.OUT_OF_MEMORY])(windows, 2, lambda batch: (windows[batch], windows[batch]))
    with pytest.raises(distributed.RankFailed, match="rank 2 of 3 of the sharded run failed"):
        Statuses([distributed.OK, distributed.OK, distributed.FAILED])(windows, 2, lambda b: (windows[b], windows[b]))


def test_rank_from_env_reads_torchrun_variables():
    assert distributed.rank_from_env({}) is None
    assert distributed.rank_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == distributed.RankInfo(1, 2, 1)
    with pytest.raises(distributed.MSDError, match="outside WORLD_SIZE"):
        distributed.rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(distributed.MSDError, match="no torch.distributed backend"):
        distributed.backend_for("mps")


def test_torchrun_cli_writes_the_one_process_panorama(tmp_path):
    """`torchrun --nproc-per-node 2 -m msd_core generate …` as a user runs it, with a drawn seed (rank 0's
    is used by all ranks): the PNG is byte for byte the one a single process writes with that seed."""
    import re
    import subprocess
    import sys

    command = ["generate", "a lake", "--model", "tiny", "--width", "256", "--height", "128", "--steps", "2",
               "--device", "cpu", "--view-batch", "3", "-q"]
    sharded = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "msd_core",
         *command, "-o", str(tmp_path / "two.png")], capture_output=True, text=True, timeout=600,
    )
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout.strip() == str(tmp_path / "two.png")  # rank 0 alone reports the file
    seeds = re.findall(r"seed (\d+), sharded over 2 ranks", sharded.stderr)
    assert len(seeds) == 1, sharded.stderr
    single = subprocess.run([sys.executable, "-m", "msd_core", *command, "--seed", seeds[0], "-o", str(tmp_path / "one.png")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()


def _worker():
    import os
    import sys

    from msd_core.worker.client import WorkerClient
    from test_worker import REPO_ROOT, wait_for

    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env={"OMP_NUM_THREADS": "1"}).start()
    wait_for(client, lambda event: event["event"] == "ready")
    assert os.environ.get("WORLD_SIZE") is None
    return client


def _children(pid: int) -> dict[int, int]:
    """{rank: pid} of a worker's rank processes (Linux: /proc)."""
    from pathlib import Path

    ranks = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = int(child)
    return ranks


def test_worker_request_with_two_ranks_relays_rank_zero_and_writes_the_one_process_png(tmp_path):
    """The worker's sharded path (the add-on's All GPUs, here two gloo ranks on the CPU): progress every step,
    previews, and the same PNG as the same request run in one process."""
    from test_worker import finished, of, tiny, wait_for

    client = _worker()
    try:
        settings = tiny(steps=3, windows="dense", seed=11)
        sharded = client.generate(settings, tmp_path / "two.png", ranks=2, preview_every=1, preview_dir=tmp_path)
        events = wait_for(client, finished(sharded))
        assert events[-1]["event"] == "done", events[-1]
        assert [e["step"] for e in of(events, sharded, "progress")] == [1, 2, 3]
        previews = of(events, sharded, "preview")
        assert [p["step"] for p in previews] == [1, 2, 3] and all(os_path_is_file(p["path"]) for p in previews)
        single = client.generate(settings, tmp_path / "one.png")
        assert wait_for(client, finished(single))[-1]["event"] == "done"
    finally:
        client.stop(timeout=60)
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()


def os_path_is_file(path) -> bool:
    import os

    return os.path.isfile(path)


def test_worker_ends_a_sharded_request_when_a_rank_is_killed(tmp_path):
    import os
    import signal

    from test_worker import LONG_RUN, finished, tiny, wait_for

    client = _worker()
    try:
        request = client.generate(tiny(**LONG_RUN), tmp_path / "out.png", ranks=2, preview_every=0)
        wait_for(client, lambda event: event["id"] == request and event["event"] == "progress")
        os.kill(_children(client.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        error = wait_for(client, finished(request))[-1]
        assert time.monotonic() - killed < 20
        assert (error["event"], error["kind"]) == ("error", "internal"), error
        assert "rank" in error["message"] and ("lost the other ranks" in error["message"] or "died" in error["message"])
        assert not (tmp_path / "out.png").exists()
        # The worker goes on: its next request runs in one process.
        again = client.generate(tiny(steps=2, width=128, height=64), tmp_path / "next.png")
        assert wait_for(client, finished(again))[-1]["event"] == "done"
        assert _children(client.pid) == {}
    finally:
        client.stop(timeout=60)
