"""The generator process, run as ``python -m msd_core.worker`` (whose ``__main__`` claims stdout first).

Reads one JSON request per line on stdin and writes one JSON event per line on stdout; the shapes
are in ``msd_core.worker.protocol``. stdout carries nothing else: at start the real stdout is kept for the
protocol and file descriptor 1 (and ``sys.stdout``) are pointed at stderr, so prints, progress bars
and library chatter cannot corrupt the stream.

Three threads: the reader thread parses requests, answers ping and handles cancel and shutdown at
once; the intake thread validates the other requests (which may read files) and queues them; the
main thread runs the queued requests one after the other. The loaded pipeline stays warm between
requests with the same (model, model_config, device, dtype); a request with another key replaces it.
LoRAs are not part of the key: each request's LoRAs are put into the warm model, and the previous
request's taken out (msd_core.models.lora.apply_loras).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import importlib.metadata
import logging
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path


import torch

from .. import __version__, variations
from ..errors import BadInput, Cancelled, MSDError
from ..imageio.output import (
    check_cubemap_paths,
    check_output_path,
    check_writable_folder,
    remove_stale_temporaries,
    save_cubemap,
    save_exr,
    save_png,
)
from ..models import hub, loading
from ..pipeline import MSDPanoramaPipeline
from ..refine import check_source_and_output, check_source_cost
from ..sampling import distributed
from ..settings import MAX_STEPS, GenerationSettings, RefineSettings, check_memory, is_int, shown
from . import environment, protocol

log = logging.getLogger("msd_core.worker")

OOM_HINT = "try a smaller size, the fast gradient (--gradient fast) or a smaller view batch (--view-batch)"
# How out-of-memory failures read when they are not torch.cuda.OutOfMemoryError: MPS, the CPU allocator.
OOM_PHRASES = ("out of memory", "can't allocate memory")
# Lower scheduling priority, so a CPU run does not make Blender's interface stutter. MSD_WORKER_NICENESS
# overrides it (the tests set 0: beside other busy processes a niced worker gets a tenth of a core).
NICENESS = 10
PREVIEW_ROOT_PREFIX = "msd-worker-previews-"  # + "<pid>-<random>" in the temporary folder
MAX_THREADS = 1024
INTAKE_WAIT = 30.0  # seconds "bye" waits for the validation of requests that arrived before a shutdown
MAX_RANKS = 64
RANK_POLL = 0.05  # seconds between looks at the ranks of a sharded request
RANK_GRACE = 5.0  # seconds rank 0 is given to report a dead rank itself before the relay says so


@dataclass
class Job:
    """One accepted generate or variations request."""

    id: str | int
    settings: GenerationSettings
    output: Path
    overwrite: bool
    preview_every: int
    preview_dir: Path | None  # None: the worker's own temporary folder
    refine: RefineSettings | None = None  # start from this image instead of noise
    threads: int = 0  # torch's CPU threads for this run; 0 = the worker's default
    interrupt: threading.Event = field(default_factory=threading.Event)
    variations: int = 0  # > 0: a variations request making that many drafts
    ranks: int = 1  # processes sharing the run (msd_core.sampling.distributed); 0 = one per GPU


@dataclass
class DownloadJob:
    """One accepted download request."""

    id: str | int
    model: str
    fp16: bool  # fetch the fp16 weights where the repository has them: the run will use float16
    interrupt: threading.Event = field(default_factory=threading.Event)


class EventWriter:
    """The protocol stream. Writes are serialised: the reader thread answers ping while a job runs."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, message: dict) -> None:
        try:
            line = protocol.encode(message)
        except (TypeError, ValueError) as exc:  # a bug: still answer the request, with what went wrong
            log.exception("could not encode the %r event", message.get("event"))
            line = protocol.encode(protocol.error_event(message.get("id"), "internal", f"the worker could not send "
                                                        f"its {message.get('event')!r} event: {_one_line(exc)}"))
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (OSError, ValueError):
                pass  # the client is gone; end of file on stdin shuts the worker down


class Worker:
    """The request queue, the warm pipeline and the runs. The reader thread calls handle_line, which
    answers ping, cancel and shutdown at once and hands every other request to the intake thread
    (validation reads files: a slow one must never delay a ping or a cancel); the intake thread
    validates and queues (submit) or answers (models); the main thread calls run."""

    def __init__(self, writer: EventWriter, preview_root: Path, threads: int = 1):
        self.emit = writer.emit
        self.threads = threads
        self._preview_root = preview_root
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[Job | DownloadJob] = collections.deque()
        self._current: Job | DownloadJob | None = None
        self._shutdown_id = None
        self._shutting_down = False
        self._pipeline: MSDPanoramaPipeline | None = None
        self._job_count = 0
        self._previous_previews: Path | None = None  # the last finished job's folder in preview_root
        self._intake: queue.Queue = queue.Queue()  # (message, id) to validate; None ends the intake thread
        self._intake_ids: collections.Counter = collections.Counter()  # ids of the requests in _intake
        self._cancelled_in_intake: set = set()
        self._intake_thread: threading.Thread | None = None
        # A rank of a sharded request (started by _run_sharded with torchrun's variables): it joins the
        # other ranks at its first run and shares every run's windows with them.
        self._rank = distributed.rank_from_env()
        self._shard: distributed.ShardedBatches | None = None

    # -- reader thread ----------------------------------------------------------------------------

    def read_requests(self, fd: int) -> None:
        self.start_intake()
        for line in protocol.bounded_lines(protocol.read_chunks(fd)):
            if isinstance(line, protocol.LineTooLong):
                self._error(None, "bad_input", f"a request of {line.length} bytes was ignored: the limit is "
                            f"{protocol.MAX_LINE_BYTES} bytes a line")
                continue
            if not line.strip():
                continue
            try:
                self.handle_line(line)
            except Exception as exc:  # a bug here must not leave the worker deaf
                log.exception("could not handle a request")
                self._error(None, "internal", _one_line(exc))
        self.shutdown(None)

    def handle_line(self, raw: bytes) -> None:
        try:
            message = protocol.decode(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._error(None, "bad_input", "the request is not UTF-8 text")
            return
        except protocol.ProtocolError as exc:
            self._error(None, "bad_input", f"the request could not be read: {exc}")
            return
        request_id = message.get("id")
        if not (request_id is None or isinstance(request_id, str) or is_int(request_id)):
            self._error(None, "bad_input", f"a request id must be a string or an integer, got {request_id!r}")
            return
        op = message.get("op")
        if op == "ping":
            self.emit(protocol.event("pong", request_id))
        elif op == "cancel":
            self.cancel(request_id)
        elif op == "shutdown":
            self.shutdown(request_id)
        elif self._intake_thread is not None:
            with self._lock:
                if self._shutting_down:
                    self._error(request_id, "cancelled", "the worker is shutting down")
                    return
                self._intake_ids[_key(request_id)] += 1
                self._intake.put((message, request_id))
        else:  # no intake thread (a Worker driven directly, as tests do): validate here
            self._dispatch(message, request_id)

    # -- intake thread ----------------------------------------------------------------------------

    def start_intake(self) -> None:
        self._intake_thread = threading.Thread(target=self._take_in, name="msd-intake", daemon=True)
        self._intake_thread.start()

    def _take_in(self) -> None:
        while (item := self._intake.get()) is not None:
            message, request_id = item
            try:
                self._dispatch(message, request_id)
            finally:
                with self._lock:
                    self._intake_ids[_key(request_id)] -= 1
                    if self._intake_ids[_key(request_id)] <= 0:
                        del self._intake_ids[_key(request_id)]
                        self._cancelled_in_intake.discard(_key(request_id))

    def _dispatch(self, message: dict, request_id) -> None:
        """Validate and queue, or answer, a request other than ping, cancel and shutdown."""
        try:
            self._dispatch_op(message, request_id)
        except Exception as exc:  # a bug here must not leave the request without its one final event
            log.exception("could not handle a %r request", message.get("op"))
            self._error(request_id, "internal", _one_line(exc))

    def _dispatch_op(self, message: dict, request_id) -> None:
        op = message.get("op")
        if op == "generate":
            self.submit(message)
        elif op == "variations":
            self.submit(message, parse_variations)
        elif op == "download":
            self.submit(message, parse_download)
        elif op == "models":
            models_found = [model.to_dict() for model in hub.list_models()]
            self.emit(protocol.event("models", request_id, models=models_found, cache=str(hub.cache_dir())))
        else:
            problem = "the request has no 'op'" if op is None else f"unknown op {op!r}"
            self._error(request_id, "bad_input", f"{problem}; expected one of: {', '.join(protocol.REQUEST_OPS)}")

    def submit(self, message: dict, parse=None) -> None:
        """Validate a generate request (or, with parse_download or parse_variations, another kind) and
        queue it; "accepted" or the error is sent at once."""
        request_id = message.get("id")
        try:
            job = (parse or parse_generate)(message)
        except BadInput as exc:
            self._error(request_id, "bad_input", str(exc), exc.field)
            return
        if isinstance(job, Job):
            for folder in (job.output.parent, job.preview_dir):  # files left by a worker killed while writing
                if folder is not None:
                    remove_stale_temporaries(folder)
        with self._lock:
            if self._shutting_down:
                self._error(request_id, "cancelled", "the worker is shutting down")
                return
            if _key(job.id) in self._cancelled_in_intake:  # cancelled while it was being validated
                self._cancelled_in_intake.discard(_key(job.id))
                self._error(job.id, "cancelled", "cancelled before it started")
                return
            if any(j.id == job.id for j in self._active_jobs()):
                # Answering with this id would be read as the other request's end.
                self._error(None, "bad_input", f"request id {job.id!r} is in use by a queued or running request")
                return
            same_output = next((j for j in self._active_jobs() if _output(j) == _output(job)), None)
            if same_output is not None and isinstance(job, Job) and not job.overwrite:
                self._error(job.id, "bad_input", f"{job.output} is already the output of the queued or running "
                            f"request {same_output.id!r}; choose another file", "output")
                return
            self._queue.append(job)
            # Sent under the lock so that "accepted" always precedes the job's "loading".
            self.emit(protocol.event("accepted", job.id))
            self._wake.notify()

    def cancel(self, request_id) -> None:
        with self._lock:
            if self._current is not None and self._current.id == request_id:
                self._current.interrupt.set()
                return
            for job in self._queue:
                if job.id == request_id:
                    self._queue.remove(job)
                    self._error(job.id, "cancelled", "cancelled before it started")
                    return
            if _key(request_id) in self._intake_ids:  # still being validated: it ends when it would be queued
                self._cancelled_in_intake.add(_key(request_id))
                return
        log.info("cancel for %r ignored: no such request is running or queued", request_id)

    def shutdown(self, request_id) -> None:
        """Cancel everything and let the main loop end with "bye" (end of stdin comes here too)."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            self._shutdown_id = request_id
            if self._current is not None:
                self._current.interrupt.set()
            dropped = list(self._queue)
            self._queue.clear()
            for job in dropped:
                self._error(job.id, "cancelled", "the worker is shutting down")
            self._intake.put(None)  # the requests still in intake are answered "cancelled", then it ends
            self._wake.notify()

    def _active_jobs(self) -> list[Job | DownloadJob]:
        return [*self._queue, *([self._current] if self._current else [])]

    # -- main thread ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run queued jobs in order until shutdown."""
        while True:
            with self._lock:
                while not self._queue and not self._shutting_down:
                    self._wake.wait()
                if not self._queue:
                    break
                job = self._current = self._queue.popleft()
            try:
                (self.run_download if isinstance(job, DownloadJob) else self.run_job)(job)
            finally:
                with self._lock:
                    self._current = None
        if self._intake_thread is not None:  # every request in intake gets its answer before "bye"
            self._intake_thread.join(INTAKE_WAIT)
        self.emit(protocol.event("bye", self._shutdown_id))

    def run_job(self, job: Job) -> None:
        started = time.perf_counter()
        self._delete_previous_previews()
        self._job_count += 1
        own_previews = job.preview_dir is None
        preview_dir = self._preview_root / f"job-{self._job_count}" if own_previews else job.preview_dir
        torch.set_num_threads(environment.threads(job.threads) if job.threads else self.threads)
        try:
            hub.require_downloaded(job.settings.model)
            if job.ranks != 1 and self._rank is None:
                self._run_sharded(job, preview_dir)
            else:
                pipe, load_seconds = self._pipeline_for(job)
                run = self._run_variations if job.variations else self._run_panorama
                run(job, pipe, load_seconds, started, preview_dir)
            error = None
        except MSDError as exc:  # Cancelled, BadInput, ModelNotFound, ...
            error = (exc.kind, str(exc), exc.field)
        except Exception as exc:
            if _is_out_of_memory(exc):
                device = self._pipeline.device if self._pipeline is not None else job.settings.device
                error = ("out_of_memory", f"out of memory on {device}: {OOM_HINT}")
            else:
                log.exception("request %r failed", job.id)
                error = ("internal", _one_line(exc))
        if own_previews:
            if error is None:
                self._previous_previews = preview_dir  # kept until the next job: the client may still read them
            else:
                shutil.rmtree(preview_dir, ignore_errors=True)
        with self._lock:
            idle = not self._queue
        if idle or (error is not None and error[0] == "out_of_memory"):
            # Outside the except block, so the traceback's frames (and their tensors) are freed. An idle worker
            # gives the GPU memory its allocator still holds back: Blender's own GPU renders may need it.
            _free_accelerator_memory()
        if error is not None:
            # After the clean-up: when the client reads it, the files are gone.
            self._finish(job, protocol.error_event(job.id, *error))

    def _finish(self, job: Job, message: dict) -> None:
        """Send a job's final event once the job no longer counts as running, so that a request sent in
        reply (for the same output file, say) is not refused as a clash with it."""
        with self._lock:
            if self._current is job:
                self._current = None
            self.emit(message)

    def _run_panorama(self, job: Job, pipe: MSDPanoramaPipeline, load_seconds: float, started: float,
                      preview_dir: Path) -> None:
        run = partial(pipe.refine, source=job.refine) if job.refine else pipe
        speaks = self._join_ranks(pipe)
        result = run(job.settings, callback=self._step_callback(job, pipe, preview_dir), interrupt=job.interrupt,
                     decode=speaks)
        if job.interrupt.is_set():  # cancelled after the last window batch: still write nothing
            raise Cancelled("generation cancelled")
        if not speaks:  # rank 0 writes the result
            self._finish(job, protocol.event("done", job.id, output=None, exr=None, metadata={}, timings={}))
            return
        saving = time.perf_counter()
        output = pipe.save(result, job.output, overwrite=job.overwrite)
        exr = None
        if job.settings.hdr:
            exr = save_exr(result.image, output, result.metadata, knee=job.settings.hdr_knee,
                           peak=job.settings.hdr_peak, overwrite=job.overwrite)
        if job.settings.cubemap:
            curve = (job.settings.hdr_knee, job.settings.hdr_peak) if job.settings.hdr else None
            save_cubemap(result.image, output, result.metadata, hdr_curve=curve, overwrite=job.overwrite)
        now = time.perf_counter()
        timings = {"load": load_seconds, **result.timings, "save": now - saving, "total": now - started}
        self._finish(job, protocol.event(
            "done", job.id, output=str(output), exr=None if exr is None else str(exr), metadata=result.metadata, timings=timings
        ))

    def _run_variations(self, job: Job, pipe: MSDPanoramaPipeline, load_seconds: float, started: float,
                        preview_dir: Path) -> None:
        """The drafts in batches through the UNet (``variations.batch_size``: as many as share one call on a
        GPU, one at a time on the CPU); each batch is on disk and reported as soon as it is done, and a cancel
        keeps the ones already made."""
        draft = variations.draft_settings(job.settings, pipe.unet.config.sample_size * pipe.factor)
        size = variations.batch_size(pipe.check_inputs(draft), pipe.device.type != "cpu")
        outputs = []
        sampling = time.perf_counter()
        for group in variations.draft_groups(job.variations, size):
            batch = [dataclasses.replace(draft, seed=draft.seed + index) for index in group]
            on_step = self._step_callback(job, pipe, preview_dir, variation=group.start,
                                          earlier=time.perf_counter() - sampling, batch=size)
            results = pipe.sample_batch(batch, callback=on_step, interrupt=job.interrupt)
            if job.interrupt.is_set():
                raise Cancelled("generation cancelled")
            for index, settings, result in zip(group, batch, results):
                path = pipe.save(result, variations.variation_path(job.output, index), overwrite=job.overwrite)
                outputs.append(str(path))
                self.emit(protocol.event("variation", job.id, index=index, seed=settings.seed, path=str(path),
                                         width=result.image.width, height=result.image.height))
        timings = {"load": load_seconds, "total": time.perf_counter() - started}
        self._finish(job, protocol.event("done", job.id, outputs=outputs, timings=timings))

    def _join_ranks(self, pipe: MSDPanoramaPipeline) -> bool:
        """As a rank of a sharded request, join the others (at the first run) and share the windows with them;
        returns whether this process reports and writes the result (rank 0, or no rank at all)."""
        if self._rank is None:
            return True
        if self._shard is None:
            self._shard = distributed.join(self._rank, pipe.device.type)
        pipe.map_batches = self._shard
        return self._rank.rank == 0

    def _run_sharded(self, job: Job, preview_dir: Path) -> None:
        """Run ``job`` on job.ranks worker processes of its own, ranks of one process group (msd_core.sampling.distributed),
        relaying rank 0's progress, previews and final event; a cancel goes to rank 0, which tells the others."""
        from .client import WorkerClient

        device, _ = loading.resolve_device(job.settings.device, job.settings.dtype)
        world = distributed.world_size(job.ranks, device.type, torch.cuda.device_count() if device.type == "cuda" else 0)
        threads = job.threads or (max(1, self.threads // world) if device.type == "cpu" else 0)  # CPU ranks share the cores
        self.emit(protocol.event("loading", job.id, model=job.settings.model, warm=False, threads=threads))
        port, package_root = distributed.free_port(), str(Path(__file__).resolve().parent.parent)
        ranks = [WorkerClient(sys.executable, pythonpath=package_root, env=distributed.rank_environment(rank, world, port))
                 for rank in range(world)]
        try:
            for rank in ranks:
                rank.start()
            if job.preview_every:
                preview_dir.mkdir(parents=True, exist_ok=True)
            ids = [rank.generate(job.settings, job.output, overwrite=job.overwrite, refine=job.refine, threads=threads,
                                 preview_every=0 if index else job.preview_every,
                                 preview_dir=None if index or not job.preview_every else preview_dir)
                   for index, rank in enumerate(ranks)]
            final = self._relay(job, ranks, ids[0])
        finally:
            for rank in ranks:
                rank.stop(timeout=2.0)
        if final["event"] == "error":  # raised, so that run_job cleans up as after any failed run
            for index, rank in enumerate(ranks):
                for line in rank.stderr_lines[-5:]:
                    log.warning("rank %d: %s", index, line)
            failure = MSDError(final["message"])
            failure.kind, failure.field = final["kind"], final.get("field")
            raise failure
        self._finish(job, final)

    def _relay(self, job: Job, ranks: list, first_id) -> dict:
        """Forward rank 0's events until its final one, which is returned; a rank that dies ends the run."""
        cancelled, lost, lost_at = False, None, 0.0
        while True:
            if job.interrupt.is_set() and not cancelled:
                ranks[0].cancel(first_id)
                cancelled = True
            for index, rank in enumerate(ranks):
                for message in rank.poll():
                    if message.get("kind") == "died":
                        lost, lost_at = lost or (index, message), lost_at or time.monotonic()
                    elif index == 0 and message.get("id") == first_id and message.get("event") in (
                            "progress", "preview", "done", "error"):
                        if message["event"] in protocol.FINAL_EVENTS:
                            return {**message, "id": job.id}
                        self.emit({**message, "id": job.id})
            if lost and time.monotonic() - lost_at > RANK_GRACE:
                index, message = lost
                how = message.get("signal") or f"exit status {message.get('returncode')}"
                return protocol.error_event(job.id, "internal", f"rank {index} of the sharded run died ({how}); "
                                            "the other ranks were stopped")
            time.sleep(RANK_POLL)

    def run_download(self, job: DownloadJob) -> None:
        """Fetch a Hub model into the cache with "download" progress events; "done" or "error" ends it."""

        def report(progress: hub.DownloadProgress) -> None:
            self.emit(protocol.event("download", job.id, **progress.to_dict()))

        try:
            folder = hub.download(job.model, fp16=job.fp16, on_progress=report, cancel=job.interrupt)
        except MSDError as exc:  # Cancelled, NetworkError, ModelNotFound, UnsupportedModelFile
            self._finish(job, protocol.error_event(job.id, exc.kind, str(exc), exc.field))
            return
        except Exception as exc:
            log.exception("download %r failed", job.id)
            self._finish(job, protocol.error_event(job.id, "internal", _one_line(exc)))
            return
        status = hub.model_status(job.model)
        self._finish(job, protocol.event("done", job.id, model=job.model, snapshot=str(folder), size=status.size_on_disk))

    def _pipeline_for(self, job: Job) -> tuple[MSDPanoramaPipeline, float]:
        """The warm pipeline if the key matches, else a freshly loaded one (the old one dropped first)."""
        key = MSDPanoramaPipeline.key_for(job.settings)
        warm = self._pipeline is not None and self._pipeline.key == key
        self.emit(protocol.event("loading", job.id, model=job.settings.model, warm=warm, threads=torch.get_num_threads()))
        if warm:
            return self._pipeline, 0.0
        if self._pipeline is not None:
            self._pipeline = None  # one model at a time bounds VRAM
            _free_accelerator_memory()
        started = time.perf_counter()
        self._pipeline = MSDPanoramaPipeline.from_settings(job.settings)
        return self._pipeline, time.perf_counter() - started

    def _step_callback(self, job: Job, pipe: MSDPanoramaPipeline, preview_dir: Path, variation: int | None = None,
                       earlier: float = 0.0, batch: int = 1):
        """Previews and progress of one pipeline run; for variations (``batch`` drafts per run), progress names
        the run's first, previews show it, and ``earlier`` (seconds the earlier batches took) lets the eta
        cover all of them."""
        prefix = "" if job.preview_dir is None else f"msd-preview-{_file_safe(job.id)}-"
        extra = {} if variation is None else {"variation": variation, "count": job.variations}
        plan = pipe.check_inputs(job.settings)
        costs = plan.step_costs()  # window forwards per step; a refine runs the last info.total of them
        preview_level = 2 if plan.squeeze > 1 else 1  # a global level is squeezed: the one below has the aspect
        preview_shape = plan.level_shape(preview_level - 1) if plan.levels > 1 else None
        first_step_done = []  # elapsed at the end of step 1: later steps give the rate without warm-up

        def on_step(info) -> None:
            preview_step = job.preview_every and (info.step == 1 or info.step % job.preview_every == 0)
            first = plan.steps - info.total  # the schedule's index of the run's first step (a refine's start step)
            # Steps after the guided ones run only the finest level: its x₀ is shown at the preview level's size.
            shown_level = preview_level if plan.gradient_at(first + info.step - 1) or plan.levels == 1 else info.levels
            if info.level == shown_level and preview_step:
                pred_x0 = info.pred_x0[:1]  # a batch of drafts: the first
                if shown_level != preview_level:
                    pred_x0 = _shrink(pred_x0, preview_shape)
                image = pipe.decode_preview(pred_x0)
                path = preview_dir / f"{prefix}step-{info.step:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_png(image, path, {}, overwrite=True)  # atomic: a client never reads half a preview
                self.emit(
                    protocol.event(
                        "preview", job.id, path=str(path), step=info.step, width=image.width, height=image.height
                    )
                )
            if info.level == info.levels:  # once per step, after its finest level
                seconds_per_window = None
                if info.step == 1:
                    first_step_done.append(info.elapsed)
                else:
                    seconds_per_window = (info.elapsed - first_step_done[0]) / sum(costs[first + 1:first + info.step])
                if variation is not None:  # the batches to come are as long as this one
                    steps_done = variation // batch * info.total + info.step
                    eta = (earlier + info.elapsed) / steps_done * (-(-job.variations // batch) * info.total - steps_done)
                elif seconds_per_window is None:
                    eta = info.elapsed / info.step * (info.total - info.step)
                else:
                    eta = seconds_per_window * sum(costs[first + info.step:])
                self.emit(
                    protocol.event(
                        "progress",
                        job.id,
                        step=info.step,
                        total=info.total,
                        level=info.level,
                        levels=info.levels,
                        elapsed=info.elapsed,
                        eta=eta,
                        ms_per_window=None if seconds_per_window is None else 1000 * seconds_per_window,
                        **extra,
                    )
                )

        return on_step

    def _delete_previous_previews(self) -> None:
        if self._previous_previews is not None:
            shutil.rmtree(self._previous_previews, ignore_errors=True)
            self._previous_previews = None

    def _error(self, request_id, kind: str, message: str, field: str | None = None) -> None:
        self.emit(protocol.error_event(request_id, kind, message, field))


def _check_request(message: dict, op: str, fields) -> None:
    """BadInput for a request of kind ``op`` without an id or with a field that is not in ``fields``."""
    unknown = sorted(set(message) - {"op", "id", *fields})
    if unknown:
        raise BadInput(f"unknown field(s) in the {op} request: {', '.join(unknown)}")
    if message.get("id") is None:
        raise BadInput(f"a {op} request needs an 'id'")


def parse_generate(message: dict) -> Job:
    """A validated Job from a generate request, or BadInput naming the first problem."""
    _check_request(message, "generate", protocol.GENERATE_FIELDS)
    request_id = message["id"]
    if "settings" not in message:
        raise BadInput("the generate request has no {field}", field="settings")
    settings = GenerationSettings.from_dict(message["settings"]).validate()
    check_memory(settings)
    output = message.get("output")
    if not isinstance(output, str) or not output.strip():
        raise BadInput("{field} must be the path of the PNG file to write", field="output")
    overwrite = message.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise BadInput("{field} must be true or false, got {value}", field="overwrite", value=shown(overwrite))
    preview_every = message.get("preview_every", protocol.DEFAULT_PREVIEW_EVERY)
    if not is_int(preview_every) or not 0 <= preview_every <= MAX_STEPS:
        raise BadInput("{field} must be a whole number from 0 (no previews) to {limit}, got {value}",
                       field="preview_every", limit=MAX_STEPS, value=shown(preview_every))
    preview_dir = message.get("preview_dir")
    if preview_dir is not None:
        if not isinstance(preview_dir, str) or "\0" in preview_dir or not Path(preview_dir).is_dir():
            raise BadInput("{field} must be an existing folder, got {value}", field="preview_dir",
                           value=shown(preview_dir))
        preview_dir = Path(preview_dir)
        check_writable_folder(preview_dir, "preview_dir")
    refine = None
    if message.get("refine") is not None:
        try:
            refine = RefineSettings.from_dict(message["refine"]).validate()
            # An image, not too large for the run: refused now rather than after loading the model.
            check_source_cost(refine.source, settings.width, settings.height)
        except BadInput as exc:  # msd_core's source checks speak of the image, the protocol of its field
            exc.field = exc.field or "refine"
            raise
    threads = message.get("threads", 0)
    if not is_int(threads) or not 0 <= threads <= MAX_THREADS:
        raise BadInput("{field} must be a whole number from 0 (the worker's default) to {limit}, got {value}",
                       field="threads", limit=MAX_THREADS, value=shown(threads))
    ranks = message.get("ranks", 1)
    if not is_int(ranks) or not 0 <= ranks <= MAX_RANKS:
        raise BadInput("{field} must be a whole number from 0 (one per GPU) to {limit}, got {value}", field="ranks",
                       limit=MAX_RANKS, value=shown(ranks))
    output = _checked_output(output, overwrite, settings)
    if refine is not None:
        check_source_and_output(refine.source, output, exr=settings.hdr)
    return Job(
        id=request_id,
        settings=settings,
        output=output,
        overwrite=overwrite,
        preview_every=preview_every,
        preview_dir=preview_dir,
        refine=refine,
        threads=threads,
        ranks=ranks,
    )


def _checked_output(output, overwrite: bool, settings: GenerationSettings):
    """The output path, refused now if it (or its EXR, or its cube map faces) would clobber a file."""
    path = check_output_path(output, overwrite, exr=settings.hdr)
    if settings.cubemap:
        check_cubemap_paths(path, overwrite, exr=settings.hdr)
    return path


def parse_variations(message: dict) -> Job:
    """A validated Job from a variations request, or BadInput naming the first problem."""
    _check_request(message, "variations", protocol.VARIATIONS_FIELDS)
    for required in ("settings", "count"):
        if message.get(required) is None:
            raise BadInput(f"the variations request has no '{required}'")
    count = variations.check_count(message["count"])
    fields = {key: message[key] for key in ("id", "settings", "output", "overwrite") if key in message}
    job = parse_generate({"op": "generate", **fields, "preview_every": 0})
    variations.check_seeds(job.settings.seed, count)
    for index in range(count):
        check_output_path(variations.variation_path(job.output, index), job.overwrite)
    return dataclasses.replace(job, variations=count)


def parse_download(message: dict) -> DownloadJob:
    """A validated DownloadJob from a download request, or BadInput naming the first problem."""
    _check_request(message, "download", protocol.DOWNLOAD_FIELDS)
    request_id = message["id"]
    model = message.get("model")
    if not isinstance(model, str) or not hub.REPO_ID.match(model):
        raise BadInput(f"'model' must be a Hugging Face model id (owner/name), got {model!r}")
    device = message.get("device", "auto")
    dtype = message.get("dtype", "auto")
    if not isinstance(device, str) or not isinstance(dtype, str):
        raise BadInput("'device' and 'dtype' must be text, as in the generate settings")
    _, torch_dtype = loading.resolve_device(device, dtype)
    return DownloadJob(id=request_id, model=model, fp16=torch_dtype == torch.float16)


def main(protocol_stream, argv: list[str] | None = None) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="msd-worker %(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m msd_core.worker", description="the generator process")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (default 0: OMP_NUM_THREADS, else physical cores − 1)")
    args = parser.parse_args(argv)
    # A polite terminate() from the client still runs the clean-up below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    writer = EventWriter(protocol_stream)
    threads = environment.threads(max(0, args.threads))
    torch.set_num_threads(threads)
    if hasattr(os, "nice"):
        os.nice(_niceness())
    for stale in sweep_stale_preview_roots(Path(tempfile.gettempdir())):
        log.info("removed %s, left by a worker that is gone", stale)
    preview_root = Path(tempfile.mkdtemp(prefix=f"{PREVIEW_ROOT_PREFIX}{os.getpid()}-"))
    try:
        worker = Worker(writer, preview_root, threads)
        device, dtype = _default_device_and_dtype()
        writer.emit(
            protocol.event(
                "ready",
                None,
                protocol=protocol.PROTOCOL_VERSION,
                msd_core=__version__,
                torch=torch.__version__,
                diffusers=importlib.metadata.version("diffusers"),
                device=device,
                dtype=dtype,
                pid=os.getpid(),
                threads=threads,
            )
        )
        # Started after "ready", so that answers to early requests never precede it.
        reader = threading.Thread(target=worker.read_requests, args=(sys.stdin.fileno(),), name="msd-requests")
        reader.daemon = True  # blocked on stdin; must not keep the process alive after "bye"
        reader.start()
        worker.run()
    finally:
        shutil.rmtree(preview_root, ignore_errors=True)
    return 0


def sweep_stale_preview_roots(folder: Path) -> list[Path]:
    """Delete the preview folders in ``folder`` of workers that are gone (killed before their clean-up);
    the folders of live workers, and ones whose name carries no pid, are left alone."""
    removed = []
    pattern = re.compile(re.escape(PREVIEW_ROOT_PREFIX) + r"(\d{1,10})-")
    try:
        for entry in folder.glob(PREVIEW_ROOT_PREFIX + "*"):
            match = pattern.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not environment.process_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    except (OSError, ValueError):  # housekeeping: whatever lies in the temporary folder, the worker starts
        log.warning("could not sweep the preview folders of %s", folder, exc_info=True)
    return removed


def _key(request_id):
    """A request id as a set member: ids are strings or integers (True and 1 must not meet)."""
    return type(request_id).__name__, request_id


def _output(job: Job | DownloadJob) -> Path | None:
    return job.output if isinstance(job, Job) else None


def _niceness() -> int:
    try:
        return int(os.environ.get("MSD_WORKER_NICENESS", NICENESS))
    except ValueError:
        return NICENESS


def _default_device_and_dtype() -> tuple[str, str]:
    """What device="auto", dtype="auto" resolve to on this machine."""
    device, dtype = loading.resolve_device("auto", "auto")
    return device.type, str(dtype).removeprefix("torch.")


def _is_out_of_memory(exc: Exception) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(phrase in str(exc) for phrase in OOM_PHRASES)


def _shrink(latents, shape: tuple[int, int]):
    """A latent block-averaged to ``shape`` (a preview level's size, which divides it exactly)."""
    return torch.nn.functional.avg_pool2d(latents, (latents.shape[-2] // shape[0], latents.shape[-1] // shape[1]))


def _free_accelerator_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif torch.backends.mps.is_available():
        torch.mps.empty_cache()


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _file_safe(request_id) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(request_id))[:64]
