"""`msd-panorama batch JOBS.jsonl`: a night's queue of panoramas, re-runnable until every job is done.

Each line of the job file is one generate request of the worker protocol (``msd_core.worker.protocol``: "op"
"generate", "settings", "output", and "refine" for a refine; "id" may be left out), so a line means what it
means to the worker. A relative output (or refine source) is relative to the job file's folder.

A job whose output file exists is done and skipped: a re-run finishes what is missing and never redoes or
overwrites finished work. A job that fails is recorded with its reason and the queue goes on. Every outcome
is appended to JOBS.jsonl.log.jsonl (one JSON object a line), and one line per job is printed.

Jobs run through the worker's own code (``worker.Worker.run_job``: the same validation, warm model,
saving and error kinds as the add-on's runs), in one warm model per GPU (one on the CPU, or ``workers``):
here, in processes of this machine, or as Ray actors (``ray_address``; ``pip install .[cluster]``), one
per GPU of the cluster, each holding its model warm. With Ray the output paths must be on storage every
node sees.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .worker import protocol
from .errors import BadInput

MAX_JOBS = 10_000  # lines of one job file
MAX_FILE_BYTES = 64 * 2**20  # a job line is about 1 KB
LOG_SUFFIX = ".log.jsonl"
RAY_HINT = "running on Ray needs the cluster extra: pip install 'msd-panorama[cluster]'"


@dataclass
class Outcome:
    line: int  # 1-based line of the job file
    status: str  # "done", "skipped" or "failed"
    output: str | None
    kind: str | None = None  # protocol error kind of a failure
    message: str | None = None
    seconds: float | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def read_requests(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line, request, problem) for every non-empty line: the request with its id and paths filled in, or
    None and why it could not be read. The file and each line are bounded."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadInput(f"cannot read the job file {path}: {exc.strerror or exc}") from None
    if size > MAX_FILE_BYTES:
        raise BadInput(f"the job file {path} has {size} bytes; the limit is {MAX_FILE_BYTES}")
    with open(path, "rb") as file:
        lines = list(protocol.bounded_lines(iter(lambda: file.read(65536), b"")))
    entries = []
    for number, raw in enumerate(lines, start=1):
        if not isinstance(raw, protocol.LineTooLong) and not raw.strip():
            continue
        if len(entries) == MAX_JOBS:
            raise BadInput(f"the job file {path} has more than {MAX_JOBS} jobs; split it")
        entries.append((number, *_request(raw, number, path.parent)))
    return entries


def _request(raw, number: int, folder: Path) -> tuple[dict | None, str | None]:
    if isinstance(raw, protocol.LineTooLong):
        return None, f"the line has {raw.length} bytes; the limit is {protocol.MAX_LINE_BYTES}"
    try:
        message = protocol.decode(raw.decode("utf-8"))
    except (UnicodeDecodeError, protocol.ProtocolError) as exc:
        return None, f"the line is not a JSON request: {exc}"
    if message.get("op", "generate") != "generate":
        return None, f"op must be \"generate\" (a refine is a generate request with \"refine\"), got {message.get('op')!r}"
    output = message.get("output")
    if not isinstance(output, str) or not output.strip():
        return None, "output must be the path of the PNG file to write"
    request = {**message, "op": "generate", "id": message.get("id", f"line-{number}"), "preview_every": 0,
               "output": str(folder / os.path.expanduser(output))}  # an absolute path stays as it is
    refine = message.get("refine")
    if isinstance(refine, dict) and isinstance(refine.get("source"), str):
        request["refine"] = {**refine, "source": str(folder / os.path.expanduser(refine["source"]))}
    return request, None


def append_job(path, settings: dict) -> tuple[int, str]:
    """Append a generate request for ``settings`` (GenerationSettings.to_dict()) to the job file ``path``
    (created if missing) and return (its line number, its output). The lines already there are never
    rewritten; the output is the first free "<file name>_NNNN.png" beside the file (relative, so the queue
    can move with its folder). Bounded as ``read_requests`` is."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise BadInput(f"the job file {path.name} must end in .jsonl (one JSON request a line)")
    existing = read_requests(path) if path.exists() else []
    if len(existing) >= MAX_JOBS:
        raise BadInput(f"the job file {path} already has {MAX_JOBS} jobs; start another")
    taken = {Path(request["output"]).name for _, request, _ in existing if request}
    number = len(existing) + 1
    while (output := f"{path.stem}_{number:04d}.png") in taken or (path.parent / output).exists():
        number += 1
    line = protocol.encode({"op": "generate", "settings": settings, "output": output})
    if len(line.encode("utf-8")) > protocol.MAX_LINE_BYTES:
        raise BadInput(f"the job is longer than {protocol.MAX_LINE_BYTES} bytes (a very long prompt?)")
    with open(path, "ab") as file:  # appended: a crash mid-write can only leave a last line that fails alone
        if file.tell() and not _ends_with_newline(path):
            file.write(b"\n")
        file.write(line.encode("utf-8"))
    lines = path.read_bytes().count(b"\n")
    return lines, output


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


class JobRunner:
    """One warm model running requests with the worker's own code (``Worker.run_job``)."""

    def __init__(self, threads: int = 0):
        import tempfile

        from .worker import environment
        from .worker.process import Worker

        self._previews = tempfile.TemporaryDirectory(prefix="msd-batch-")  # unused: batch requests have none
        self._final = None
        self._worker = Worker(self, Path(self._previews.name), environment.threads(threads))

    def emit(self, message: dict) -> None:  # the worker's events: only the final one matters here
        if message.get("event") in protocol.FINAL_EVENTS:
            self._final = message

    def run(self, line: int, request: dict) -> Outcome:
        from .errors import MSDError
        from .worker.process import parse_generate

        started = time.perf_counter()
        try:
            job = parse_generate(request)
        except MSDError as exc:
            return Outcome(line, "failed", request["output"], exc.kind, str(exc))
        self._final = None
        self._worker.run_job(job)
        final, seconds = self._final or {}, time.perf_counter() - started
        if final.get("event") == "done":
            return Outcome(line, "done", final["output"], seconds=seconds)
        return Outcome(line, "failed", request["output"], final.get("kind", "internal"),
                       final.get("message", "the run ended without a result"), seconds)


def run_batch(path, *, workers: int | None = None, ray_address: str | None = None, threads: int = 0,
              out=None) -> Summary:
    """Run every job of the file that has no output yet; print and log each outcome. ``workers``: warm
    models at once (default: one per GPU here or in the Ray cluster, one without GPUs)."""
    path, out = Path(path).absolute(), out or sys.stderr
    entries = read_requests(path)
    summary, total = Summary(), len(entries)
    log_path = path.with_name(path.name + LOG_SUFFIX)
    with open(log_path, "a", encoding="utf-8") as log:

        def record(outcome: Outcome) -> None:
            setattr(summary, outcome.status, getattr(summary, outcome.status) + 1)
            log.write(json.dumps({"time": time.time(), **outcome.to_dict()}) + "\n")
            log.flush()
            count = summary.done + summary.skipped + summary.failed
            detail = f" ({outcome.seconds:.1f} s)" if outcome.seconds is not None else ""
            reason = f": {outcome.kind}: {outcome.message}" if outcome.status == "failed" else ""
            print(f"batch: [{count}/{total}] line {outcome.line} {outcome.status}"
                  f"{' ' + outcome.output if outcome.output else ''}{detail}{reason}",
                  file=out, flush=True)

        pending, outputs = [], {}
        for line, request, problem in entries:
            output = request and Path(request["output"]).absolute()
            if problem:
                record(Outcome(line, "failed", None, "bad_input", problem))
            elif output.exists():
                record(Outcome(line, "skipped", str(output)))
            elif output in outputs:
                record(Outcome(line, "failed", str(output), "bad_input", f"line {outputs[output]} writes the same output"))
            else:
                outputs[output] = line
                pending.append((line, request))
        if pending:
            run = _run_on_ray if ray_address else _run_here
            for outcome in run(pending, workers, threads, ray_address):
                record(outcome)
    print(f"batch: {summary.done} done, {summary.skipped} skipped (output exists), {summary.failed} failed"
          + (f"; see {log_path}" if summary.failed else ""), file=out, flush=True)
    return summary


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _run_here(pending, workers, threads, ray_address=None) -> Iterator[Outcome]:
    """One warm model in this process, or ``workers`` processes (one per GPU by default) each with its own."""
    workers = workers or max(1, _gpu_count())
    if workers == 1:
        runner = JobRunner(threads)
        for line, request in pending:
            yield runner.run(line, request)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    gpus = context.Queue()
    for index in range(workers):
        gpus.put(index if _gpu_count() else None)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_pool_runner, initargs=(gpus, threads)) as pool:
        futures = [pool.submit(_pool_run, line, request) for line, request in pending]
        for future in as_completed(futures):
            yield future.result()


_POOL_RUNNER: JobRunner | None = None


def _start_pool_runner(gpus, threads: int) -> None:
    global _POOL_RUNNER
    gpu = gpus.get()
    if gpu is not None:  # before CUDA starts in this process: it sees its one GPU as cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    _POOL_RUNNER = JobRunner(threads)


def _pool_run(line: int, request: dict) -> Outcome:
    return _POOL_RUNNER.run(line, request)


def _run_on_ray(pending, workers, threads, ray_address) -> Iterator[Outcome]:
    """One Ray actor per GPU of the cluster (``workers`` actors on a cluster without GPUs, default 1), each a
    ``JobRunner`` with its model warm; jobs go to whichever actor is free."""
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise BadInput(RAY_HINT) from None
    if not ray.is_initialized():
        ray.init(address=None if ray_address == "local" else ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actor = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(RayJobRunner)
    pool = ActorPool([actor.remote(threads) for _ in range(workers or max(1, gpus))])
    yield from pool.map_unordered(lambda runner, job: runner.run.remote(*job), pending)


class RayJobRunner(JobRunner):
    """A JobRunner as a Ray actor (Ray needs a class of its own to decorate)."""
