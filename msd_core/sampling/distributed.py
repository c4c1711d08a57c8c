"""One panorama sharded across processes with torch.distributed (``torchrun --nproc-per-node N -m msd_core
generate …``): within a step, each level's window batches are split over the ranks, every rank gathers all
windows' results and merges them itself, then steps on.

Equal to one process by construction, not by tolerance: a rank runs exactly the batches one process would
(same windows, same view batch, so the same model calls), the gather copies their results bit for bit, and
every rank merges the whole level in the one-process order (``WindowGrid.merge``). Nothing is summed across
ranks, so no float addition happens in another order. On the CPU with gloo the latents are identical; on
CUDA with NCCL they are as identical as the GPUs' kernels are deterministic.

Failures reach every rank at the next gather: before it, the ranks exchange a status (ok, cancelled,
failed, out of memory), so a cancel on rank 0 or an error on any rank ends them all with the same kind of
error, and a rank that died (its connection closes) makes the others' gather fail at once with
``RankLost``; a rank that hangs is given up after ``TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import Cancelled, MSDError
from .sampler import BatchRun, batch_slices

TIMEOUT_SECONDS = 600  # a gather that waits longer for a rank that neither answers nor dies gives up
OK, CANCELLED, FAILED, OUT_OF_MEMORY = range(4)  # a rank's status before each gather


class RankFailed(MSDError):
    """Another rank of a sharded run failed (its own error is in its log)."""

    kind = "internal"


class RankOutOfMemory(RankFailed):
    kind = "out_of_memory"


class RankLost(MSDError):
    """A rank of a sharded run stopped answering: it died, or the connection to it broke."""

    kind = "internal"


def _status(failure: BaseException | None) -> int:
    if failure is None:
        return OK
    if isinstance(failure, Cancelled):
        return CANCELLED
    if isinstance(failure, torch.cuda.OutOfMemoryError) or "out of memory" in str(failure):
        return OUT_OF_MEMORY
    return FAILED


@dataclass
class ShardedBatches:
    """The ``sampler.BatchMap`` of one rank: batch i of a level runs on rank i mod world; every rank then
    holds all batches' (x_{t−1}, x₀) in order. Needs an initialised process group (``process_group``)."""

    rank: int
    world: int

    def __call__(self, windows: torch.Tensor, view_batch: int, run_batch: BatchRun) -> tuple[torch.Tensor, torch.Tensor]:
        batches = batch_slices(windows.shape[0], view_batch)
        results, failure = [], None
        try:
            for index in range(self.rank, len(batches), self.world):
                prev, x0 = run_batch(batches[index])
                results.append(torch.stack([prev, x0]).to(windows.dtype))
        except Exception as exc:  # told to the other ranks first, so that none waits for this one's windows
            failure = exc
        self._agree(failure, windows.device)
        return self._gather(windows, batches, results)

    def _agree(self, failure: Exception | None, device: torch.device) -> None:
        """Exchange every rank's status; raise on all ranks if any rank failed or was cancelled."""
        statuses = self._all_gather(torch.tensor([_status(failure)], device=device))
        if failure is not None:
            raise failure
        codes = [int(status) for status in statuses]
        if CANCELLED in codes:  # a cancel reaches rank 0 only; the others learn it here
            raise Cancelled("generation cancelled")
        failed = next((rank for rank, code in enumerate(codes) if code != OK), None)
        if failed is not None:
            kind = RankOutOfMemory if codes[failed] == OUT_OF_MEMORY else RankFailed
            what = "ran out of memory" if codes[failed] == OUT_OF_MEMORY else "failed"
            raise kind(f"rank {failed} of {self.world} of the sharded run {what}; its error is in its own log")

    def _gather(self, windows: torch.Tensor, batches: list[slice], results: list[torch.Tensor]):
        sizes = [sum(batch.stop - batch.start for batch in batches[rank::self.world]) for rank in range(self.world)]
        # all_gather needs one shape on every rank: each sends (2, most windows a rank has, C, h, w), padded.
        local = windows.new_zeros((2, max(sizes), *windows.shape[1:]))
        if results:
            mine = torch.cat(results, dim=1)
            local[:, :mine.shape[1]] = mine
        shards = self._all_gather(local)
        taken, pieces = [0] * self.world, []
        for index, batch in enumerate(batches):  # back into the one-process order
            owner, count = index % self.world, batch.stop - batch.start
            pieces.append(shards[owner][:, taken[owner]:taken[owner] + count])
            taken[owner] += count
        merged = torch.cat(pieces, dim=1)
        return merged[0], merged[1]

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gathered = [torch.empty_like(tensor) for _ in range(self.world)]
        try:
            dist.all_gather(gathered, tensor)
        except RuntimeError as exc:  # gloo and NCCL report a dead peer or a timeout as RuntimeError subclasses
            raise RankLost(f"rank {self.rank} of {self.world} lost the other ranks of the sharded run (one died or "
                           f"did not answer within {TIMEOUT_SECONDS} s): {str(exc).strip().splitlines()[0]}") from None
        return gathered


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int


def rank_from_env(environ=os.environ) -> RankInfo | None:
    """The rank torchrun gave this process (RANK, WORLD_SIZE, LOCAL_RANK), or None outside torchrun."""
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return None
    try:
        info = RankInfo(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", environ["RANK"])))
    except ValueError:
        raise MSDError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    if not 0 <= info.rank < info.world:
        raise MSDError(f"RANK {info.rank} is outside WORLD_SIZE {info.world}")
    return info


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo on the CPU; MPS has no collective backend."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "cpu":
        return "gloo"
    raise MSDError(f"a sharded run needs CUDA GPUs or the CPU; {device_type} has no torch.distributed backend")


def join(info: RankInfo, device_type: str, init_method: str = "env://",
         timeout: float = TIMEOUT_SECONDS) -> ShardedBatches:
    """Join the process group (torchrun's MASTER_ADDR/PORT by default); on CUDA each rank takes the GPU of
    its LOCAL_RANK, so "cuda" means that GPU from here on. ``leave()`` ends it."""
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend_for(device_type), init_method=init_method, rank=info.rank,
                            world_size=info.world, timeout=timedelta(seconds=timeout))
    return ShardedBatches(info.rank, info.world)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size(ranks: int, device_type: str, gpus: int) -> int:
    """The number of ranks a request's ``ranks`` asks for (0 = one per GPU), checked against the machine."""
    from ..errors import BadInput

    backend_for(device_type)
    if ranks == 0:
        if device_type != "cuda" or gpus == 0:
            raise BadInput("{field} 0 (one rank per GPU, All GPUs) needs CUDA GPUs; this run is on the {device}",
                           field="ranks", device=device_type)
        return gpus
    if device_type == "cuda" and ranks > gpus:
        raise BadInput("{field} {ranks} needs as many GPUs; torch sees {gpus}", field="ranks", ranks=ranks, gpus=gpus)
    return ranks


def free_port() -> int:
    """A TCP port free on this machine now, for rank 0's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun tells a rank on one machine (``rank_from_env`` reads it)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def shared_seed(seed: int, device: torch.device) -> int:
    """Rank 0's seed on every rank (a seed drawn at random differs per process)."""
    value = torch.tensor([seed], dtype=torch.int64, device=device)
    dist.broadcast(value, src=0)
    return int(value)
