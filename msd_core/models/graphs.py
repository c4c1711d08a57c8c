"""CUDA graphs of the UNet's small calls: a run's coarse levels, pole caps and drawn start.

A pyramid's coarse levels denoise one or two windows per UNet call. At that size the GPU waits on the CPU
launching a thousand kernels one by one: on an H200 an SD-2-base window costs 44 ms alone against 6 ms in a
batch of 32 (docs/speed.md). A CUDA graph records a call's kernels once and replays them in one launch
(9.7 ms for that window). Replay runs the very kernels the capture recorded, so the output is the eager
call's, bit for bit.

A graph is recorded per input shape the first time a small call of that shape comes, and lives for one run:
a run's LoRAs and prompt stay as they are within it, and its memory (the activations of one call of at most
``GRAPHED_PIXELS``) goes back when the run ends. Calls with autograd on (the exact gradient),
larger batches (already launch-free) and other devices run eagerly. ``MSD_CUDA_GRAPHS=0`` turns graphs off;
a capture the model refuses turns them off for the run and says why.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

# The largest UNet batch recorded, in latent pixels (batch × height × width): one SDXL window's CFG pair, or four
# SD windows'. Larger calls already keep the GPU busy: SDXL's 2-window call replays only 1.09× faster (docs/speed.md).
GRAPHED_PIXELS = 2 * 128 * 128
WARMUP_CALLS = 2  # eager calls on a side stream before a capture (kernel choices and caches settle)

log = logging.getLogger(__name__)

UNetCall = Callable[..., torch.Tensor]  # (sample, timestep, text, text_embeds | None, time_ids | None) -> output


def wanted() -> bool:
    """Graphs unless the environment says ``MSD_CUDA_GRAPHS=0`` (the pipeline adds: on CUDA, an eager UNet)."""
    return os.environ.get("MSD_CUDA_GRAPHS", "1").strip().upper() not in ("0", "OFF", "NO", "FALSE")


class GraphedCalls:
    """One run's graphs of ``call``, keyed by the inputs' shapes and dtypes. ``__call__`` replays the graph of a
    small no-grad call (recording it the first time) and runs anything else eagerly."""

    def __init__(self, call: UNetCall, largest: int = GRAPHED_PIXELS):
        self.call, self.largest = call, largest
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], torch.Tensor]] = {}
        self.pool = None  # one memory pool for the run's graphs (never replayed at once), made at the first capture
        self.failed: str | None = None
        self.recorded = self.replays = 0

    def __call__(self, sample: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
        inputs = (sample, *inputs)
        if self.failed or torch.is_grad_enabled() or sample.shape[0] * sample.shape[-2] * sample.shape[-1] > self.largest:
            return self.call(*inputs)
        key = tuple(None if each is None else (each.shape, each.dtype) for each in inputs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._record(inputs)
                self.recorded += 1
            except Exception as exc:  # e.g. an attention processor that synchronises: eager for the rest of the run
                self.failed = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
                log.warning("CUDA graphs off for this run, the capture failed: %s", self.failed)
                self.graphs.clear()
                return self.call(*inputs)
        graph, static, output = self.graphs[key]
        for buffer, each in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(each)
        graph.replay()
        self.replays += 1
        return output.clone()  # the next replay overwrites the graph's output

    def release(self) -> dict:
        """Drop the graphs and their memory pool (the run is over); returns what they did."""
        self.graphs.clear()
        self.pool = None
        return {"recorded": self.recorded, "replays": self.replays, "failed": self.failed}

    def _record(self, inputs) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor | None], torch.Tensor]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode(False):  # plain tensors: written in place by later calls in any mode
            static = [None if each is None else each.detach().clone() for each in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.call(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's other threads (requests, progress) may touch CUDA while this one records
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.call(*static)
        return graph, static, output
