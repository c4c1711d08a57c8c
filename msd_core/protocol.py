"""The worker protocol: JSON lines, one request per line on the worker's stdin, one event per line on
its stdout. Defined once here; the worker, the client and the Blender add-on all import it.

Requests (client → worker), each a JSON object with ``op``:
  {"op": "generate", "id": ID, "settings": {...GenerationSettings...}, "output": PATH,
   "overwrite": false, "preview_every": 5, "preview_dir": PATH|null}
  {"op": "cancel", "id": ID}           stop the generate request ID at its next window batch
  {"op": "ping", "id": ID}             answered with a "pong" event
  {"op": "shutdown", "id": ID}         the worker answers "bye" and exits 0

Events (worker → client), each a JSON object with ``event`` and ``id`` (the request id; null for
"ready" and for errors about lines that could not be parsed):
  ready      {msd_core, torch, diffusers, device, dtype, pid}
  accepted   {}                                    the request passed validation
  loading    {model, warm}                         warm = the model was already loaded
  progress   {step, total, level, levels, elapsed, eta}   step counts from 1; eta in seconds or null
  preview    {path, step, width, height}           a small PNG of the coarsest level's x0 estimate
  done       {output, metadata, timings}           timings: {load, sample, decode, total} seconds
  error      {kind, message}                       kind is one of ERROR_KINDS
  pong       {}
  bye        {}
"""

from __future__ import annotations

import json

PROTOCOL_VERSION = 1

REQUEST_OPS = ("generate", "cancel", "ping", "shutdown")
EVENTS = ("ready", "accepted", "loading", "progress", "preview", "done", "error", "pong", "bye")
# "died" is produced by the client, never by the worker: the worker process ended unexpectedly.
ERROR_KINDS = ("bad_input", "model_not_found", "out_of_memory", "cancelled", "internal", "died")
# After one of these events a generate request is over.
FINAL_EVENTS = ("done", "error")


class ProtocolError(ValueError):
    """A line that is not a valid message."""


def encode(message: dict) -> str:
    """One message as one line of JSON (newline included)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")) + "\n"


def decode(line: str) -> dict:
    """Parse one line into a message dict, or raise ProtocolError."""
    try:
        message = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def event(name: str, request_id, **fields) -> dict:
    if name not in EVENTS:
        raise ValueError(f"unknown event {name!r}")
    return {"event": name, "id": request_id, **fields}


def error_event(request_id, kind: str, message: str) -> dict:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return event("error", request_id, kind=kind, message=message)


def request(op: str, request_id, **fields) -> dict:
    if op not in REQUEST_OPS:
        raise ValueError(f"unknown op {op!r}")
    return {"op": op, "id": request_id, **fields}
