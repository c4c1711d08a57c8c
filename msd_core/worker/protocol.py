"""The worker protocol: JSON lines, one request per line on the worker's stdin, one event per line on
its stdout (UTF-8; the worker writes nothing else there: logs go to stderr). Defined once here; the
worker, the client and the Blender add-on all import it.

Requests (client → worker), each a JSON object with ``op`` on one line of at most MAX_LINE_BYTES (1 MiB;
a longer line is answered with a bad_input error and otherwise ignored):
  {"op": "generate", "id": ID, "settings": {...GenerationSettings...}, "output": PATH,
   "overwrite": false, "preview_every": 5, "preview_dir": PATH|null, "threads": 0,
   "refine": {"source": PATH, "strength": 0.5}|null, "ranks": 1}
  {"op": "variations", "id": ID, "settings": {...}, "count": N, "output": PATH, "overwrite": false}
  {"op": "download", "id": ID, "model": "owner/name", "device": "auto", "dtype": "auto"}
  {"op": "models", "id": ID}           answered at once with a "models" event: the local cache
  {"op": "cancel", "id": ID}           stop the generate, variations or download request ID
  {"op": "ping", "id": ID}             answered with a "pong" event
  {"op": "shutdown", "id": ID}         the worker answers "bye" and exits 0

  generate: ``id`` (a string or integer, unique among the requests not yet finished), ``settings``
    (GenerationSettings.to_dict(); unknown keys are an error) and ``output`` (the PNG to write) are
    required. ``overwrite`` (default false) allows replacing an existing file. ``preview_every``
    (default 5; 0 = no previews) is the step interval of previews, which are also sent after step 1.
    ``preview_dir`` must be an existing folder, the previews written there
    ("msd-preview-<id>-step-0005.png") belong to the client; null = a folder the worker owns, where a
    request's previews are deleted when it fails or is cancelled, when the next request starts, and
    when the worker exits. ``threads`` (default 0 = the worker's own count, see ready) is the number
    of CPU threads torch uses for this request. Requests that arrive while one runs are queued and run
    in order; one that would write the same output as a queued or running one (without overwrite) is
    refused at once.
    ``settings.loras`` ([{"path": a .safetensors file, "weight": number}], default []) are applied to the
    warm model for this request only (msd_core.models.lora; docs/lora.md): a missing or pickle-named file is
    refused at once, a file whose content is not safetensors or that does not fit the model is a
    bad_input error (field "loras") before any step runs; "done"'s metadata then has "loras" (each
    file's name, SHA-256 and weight).
    ``refine`` (default null) starts from an image instead of noise (refine / upscale, see
    docs/refine.md): ``source`` an existing image file (PNG, JPEG, TIFF, WebP; OpenEXR where the
    worker has the OpenEXR package; at most settings.MAX_SOURCE_PIXELS pixels), ``strength`` in
    (0, 1], default 0.5. The settings' width and height are the target size. The image is read only;
    "done"'s metadata then also has "source" (the file's name), "strength" and "start_step", and
    "progress" counts only the steps that run (total = ⌊strength·steps⌋).
    ``ranks`` (default 1): processes that share the panorama's windows (msd_core.sampling.distributed, the same
    result as one process): 0 = one per CUDA GPU ("All GPUs"), N > 1 = N ranks (on CUDA one GPU each, on
    the CPU gloo ranks). Each rank is a worker process of its own, started for the request and loading
    the model (the warm model is not used); this worker relays rank 0's progress, previews and result,
    sends a cancel to rank 0 (which tells the others), and ends the request with an error within
    seconds when a rank dies.
  variations: N drafts (1 ≤ N ≤ 16) of the panorama ``settings`` describes, with seeds seed, seed+1,
    …, at draft size (msd_core.variations.draft_size: the short side one model window, the aspect
    kept; levels automatic, no HDR). Variation i (0-based) is written to ``output`` with "_v01",
    "_v02", … before ".png" (none of them may exist unless ``overwrite``), with its metadata, and
    reported by a "variation" event as soon as it is written. On an accelerator they run in batches through
    the UNet (as many as one UNet call holds: msd_core.variations.batch_size), a batch in about the time
    of one draft; on the CPU one after the other, so the first arrives after 1/N of the time. Progress
    names a batch's first variation. Cancel stops the rest (the files already reported stay). No previews.
  download: fetch a Hugging Face model into the local cache, only what a run loads (the five
    components' configs and safetensors weights; the fp16 weights where the repository has them and
    device/dtype resolve to float16). Queued with the generate requests. A generate request for a Hub
    model that is not completely in the cache fails at once with model_not_found ("not downloaded
    yet") instead of downloading it unasked. Start the worker with hub.DOWNLOAD_ENV in its
    environment. A cancel ends a download within hub.WATCH_INTERVAL however slow the transfer; a
    transfer that brings no data for hub.STALL_SECONDS (60 s) ends with a "network" error.
  cancel: a queued request ends at once (one still being validated ends with "cancelled" and no
    "accepted"), a running one at its next window batch, both with error
    kind "cancelled" and no output file. A cancel for an id that is neither running nor queued (for
    example one that has just finished) is ignored.
  shutdown: the running request is cancelled, queued ones end with "cancelled", then "bye". End of
    file on stdin does the same.
  ping is answered at once, also while a request runs.

Events (worker → client), each a JSON object with ``event`` and ``id`` (the request id; null for
"ready" and for errors about lines that could not be parsed):
  ready      {protocol, msd_core, torch, diffusers, device, dtype, pid, threads}
                                                   device/dtype: what "auto" resolves to on this machine;
                                                   threads: torch's CPU threads (see environment.threads)
  accepted   {}                                    the request passed validation
  loading    {model, warm, threads}                warm = the model was already loaded; threads:
                                                   torch's CPU threads for this run
  progress   {step, total, level, levels, elapsed, eta, ms_per_window}
                                                   step counts from 1; eta in seconds or null; ms_per_window:
                                                   ms per UNet window forward measured after step 1 (null at 1)
  preview    {path, step, width, height}           a small PNG of the coarsest level's x0 estimate
  variation  {index, seed, path, width, height}   one finished draft of a variations request
  done       {output, exr, metadata, timings}      timings: {load, sample, decode, save, total} seconds;
                                                   exr: the HDR EXR's path with settings.hdr, else null
  error      {kind, message, field}                kind is one of ERROR_KINDS; field: the setting or
                                                   request field at fault (e.g. "omega", "output"), or null
  download   {file, done, total, speed, eta}      bytes (cached files count as done), bytes/s or null,
                                                   seconds or null; done never decreases, ends at total
  models     {models: [{id, size_on_disk, partial_bytes, complete, missing, snapshot}], cache}
  pong       {}
  bye        {}

  done of a variations request: {outputs, timings} (the N files in order; timings {load, total}).
  Its progress events also carry {variation, count} (step and total count within the variation;
  eta covers all variations).

  A generate request's events come in this order: accepted, loading, then progress and preview
  (progress once per step, step increasing), then exactly one of done or error. A request rejected
  by validation gets only its error. Error kinds: bad_input (invalid request or settings; nothing
  was started or written), model_not_found, out_of_memory (the message suggests what to reduce),
  cancelled, network (the Hub could not be reached, or the worker runs offline: HF_HUB_OFFLINE),
  internal (an unexpected failure; a one-line message, the traceback is on stderr).
  ``field`` lets a front end point at the culprit in its own words (the message names it as the
  protocol does: "omega", "overwrite"); docs/bad-input.md lists every case.
  The worker keeps running after every error. A download request's events: accepted, download
  (repeated), then done {model, snapshot, size} (size: bytes on disk) or error.

  A variations request's events: accepted, loading, then progress and one "variation" per draft
  (index increasing), then done or error.

  "died" errors are made by the client (msd_core.worker.client), never by the worker: the process ended
  without being asked to, or did not send "ready" in time. They carry the id of the request that
  was running (null if none) and three more fields: {kind: "died", message, returncode, signal,
  stderr}; returncode is the exit status (negative = killed by a signal on POSIX, null if unknown),
  signal its name (e.g. "SIGKILL") or null, stderr the last lines the worker wrote there.
"""

from __future__ import annotations

import json
import os

PROTOCOL_VERSION = 1

REQUEST_OPS = ("generate", "variations", "download", "models", "cancel", "ping", "shutdown")
# The requests that run (queued, one at a time, ending with one of FINAL_EVENTS).
RUN_OPS = ("generate", "variations", "download")
EVENTS = (
    "ready", "accepted", "loading", "progress", "preview", "variation", "download", "models", "done", "error",
    "pong", "bye",
)
# "died" is produced by the client, never by the worker: the worker process ended unexpectedly.
ERROR_KINDS = ("bad_input", "model_not_found", "out_of_memory", "cancelled", "network", "internal", "died")
# After one of these events a generate request is over.
FINAL_EVENTS = ("done", "error")
# The fields a generate request may have besides "op" and "id", and the default preview interval.
GENERATE_FIELDS = ("settings", "output", "overwrite", "preview_every", "preview_dir", "threads", "refine", "ranks")
DEFAULT_PREVIEW_EVERY = 5
VARIATIONS_FIELDS = ("settings", "count", "output", "overwrite")
# The fields a download request may have besides "op" and "id".
DOWNLOAD_FIELDS = ("model", "device", "dtype")
MAX_LINE_BYTES = 2**20  # one request or event; a generate request is about 1 KB


class LineTooLong:
    """Stands for a line longer than the limit, whose bytes were dropped as they came in."""

    def __init__(self, length: int):
        self.length = length


def bounded_lines(chunks, limit: int = MAX_LINE_BYTES):
    """Split an iterable of byte chunks into lines (without the newline), in time linear in the input.

    A line longer than ``limit`` bytes is not kept: its bytes are dropped as they arrive and a
    LineTooLong stands for it when it ends, so memory stays bounded whatever the other side sends.
    """
    parts: list[bytes] = []
    size = 0
    too_long = False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            size += len(piece)
            if size > limit:
                too_long, parts = True, []
            elif piece:
                parts.append(piece)
            if end < 0:
                break
            yield LineTooLong(size) if too_long else b"".join(parts)
            parts, size, too_long = [], 0, False
            start = end + 1
    if size:
        yield LineTooLong(size) if too_long else b"".join(parts)


def read_chunks(fd: int, size: int = 65536):
    """The bytes of a file descriptor as they arrive, until end of file. os.read rather than a Python
    file object: a daemon thread blocked inside a buffered reader can stall the interpreter's shutdown."""
    while chunk := os.read(fd, size):
        yield chunk


class ProtocolError(ValueError):
    """A line that is not a valid message."""


def encode(message: dict) -> str:
    """One message as one line of JSON (newline included), always encodable as UTF-8: a text with an
    unpaired surrogate (a file name's raw bytes, Python's surrogate escapes) makes the whole line ASCII
    with JSON's \\u escapes, so it arrives as the very same string instead of failing or turning into "?"."""
    line = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(message, ensure_ascii=True, separators=(",", ":"))
    return line + "\n"


def decode(line: str) -> dict:
    """Parse one line into a message dict, or raise ProtocolError."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ProtocolError("not a valid request: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ProtocolError(f"not a valid request: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def event(name: str, request_id, **fields) -> dict:
    if name not in EVENTS:
        raise ValueError(f"unknown event {name!r}")
    return {"event": name, "id": request_id, **fields}


def error_event(request_id, kind: str, message: str, field: str | None = None, **fields) -> dict:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return event("error", request_id, kind=kind, message=message, field=field, **fields)


def request(op: str, request_id, **fields) -> dict:
    if op not in REQUEST_OPS:
        raise ValueError(f"unknown op {op!r}")
    return {"op": op, "id": request_id, **fields}
