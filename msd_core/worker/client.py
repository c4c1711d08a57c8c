"""Drive the worker process (``python -m msd_core.worker``) from any Python, Blender's included.

Pure Python, no torch: the add-on runs the model in a separate Python that has torch, and talks to it
through this class with the JSON-lines protocol of ``msd_core.worker.protocol``. Everything is
non-blocking for the caller: events are read on a background thread and collected with ``poll()``
(from a Blender timer, say), so the UI never waits on the model.

    client = WorkerClient("/path/to/python", pythonpath="/path/to/extension").start()
    request_id = client.generate(settings, "/tmp/pano.png")
    ... later, repeatedly: for event in client.poll(): ...
    client.stop()

If the worker ends without being asked to (a crash, a kill, a missing dependency at start-up) or
does not send "ready" within ``startup_timeout`` seconds, ``poll()`` yields exactly one error event
of kind "died" (see protocol.py for its fields).
"""

from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import uuid

from . import protocol
from ..errors import BadInput
from ..settings import GenerationSettings, RefineSettings

STDERR_LINES = 50  # how much of the worker's stderr is kept for "died" reports
DIED_MESSAGE_LINES = 10  # how many of them go into the message itself
EXIT_WAIT = 5.0  # seconds to wait for the process after its stdout closed


class WorkerStartError(BadInput):
    """The worker process could not be started: the Python executable is missing or cannot run.

    A BadInput (kind "bad_input") because the cause is the configured Python path.
    """


class WorkerClient:
    """One worker process and its event stream.

    ``python``: the interpreter that has torch and diffusers. ``pythonpath``: a folder prepended to
    PYTHONPATH, the one that contains ``msd_core``. ``env``: variables set on top of this process's
    environment. ``offline``: forbid the Hugging Face Hub (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE).
    """

    def __init__(
        self,
        python: str,
        *,
        pythonpath: str | None = None,
        env: dict | None = None,
        offline: bool = False,
        startup_timeout: float = 120.0,
    ):
        self.python = os.fspath(python)
        self.pythonpath = None if pythonpath is None else os.fspath(pythonpath)
        self.env = dict(env or {})
        self.offline = offline
        self.startup_timeout = startup_timeout
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue = queue.Queue()
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_LINES)
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._unfinished: list = []  # generate and download ids sent and not finished, in the worker's (FIFO) order
        self._ready: dict | None = None
        self._said_bye = False
        self._stopping = False
        self._startup_expired = False
        self._events_thread: threading.Thread | None = None
        self._stderr_thread: threading.Thread | None = None
        self._startup_timer: threading.Timer | None = None

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> "WorkerClient":
        """Spawn the worker; raise WorkerStartError if the Python executable cannot be run."""
        if self._process is not None:
            raise RuntimeError("this WorkerClient was already started; make a new one")
        command = [self.python, "-u", "-m", "msd_core.worker"]
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._environment(),
                # `-m` puts the working folder first on sys.path: start in pythonpath, so a folder
                # that happens to contain another msd_core (a checkout Blender was started from)
                # cannot shadow the one the add-on ships.
                cwd=self.pythonpath,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                # On Windows a console program started from Blender would open a console window.
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
        except FileNotFoundError as exc:
            raise WorkerStartError(f"the worker's Python executable {self.python!r} does not exist") from exc
        except PermissionError as exc:
            raise WorkerStartError(f"the worker's Python executable {self.python!r} is not executable") from exc
        except OSError as exc:
            raise WorkerStartError(f"cannot run the worker's Python executable {self.python!r}: {exc}") from exc
        self._events_thread = _start_thread(self._read_events, self._process, "msd-worker-events")
        self._stderr_thread = _start_thread(self._read_stderr, self._process, "msd-worker-stderr")
        self._startup_timer = threading.Timer(self.startup_timeout, self._on_startup_timeout)
        self._startup_timer.daemon = True
        self._startup_timer.start()
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask the worker to shut down; terminate it, then kill it, if it does not within ``timeout``.

        Returns the exit status (None if it was never started). No "died" event follows a stop().
        """
        process = self._process
        if process is None:
            return None
        self._stopping = True
        self._cancel_startup_timer()
        if process.poll() is None:
            self.send(protocol.request("shutdown", _new_id()))
            if not _exits_within(process, timeout):
                process.terminate()
                if not _exits_within(process, timeout):
                    process.kill()
                    process.wait()
        with self._write_lock:
            try:
                process.stdin.close()
            except OSError:
                pass  # the pipe is already broken: the worker is gone
        for thread in (self._events_thread, self._stderr_thread):
            thread.join(timeout)
        return process.returncode

    def __enter__(self) -> "WorkerClient":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def ready_info(self) -> dict | None:
        """The worker's "ready" event (versions, device, dtype, pid) once it has arrived."""
        return self._ready

    @property
    def stderr_lines(self) -> list[str]:
        """The last lines (up to STDERR_LINES) the worker wrote to stderr: its log."""
        return list(self._stderr)

    # -- requests ---------------------------------------------------------------------------------

    def send(self, message: dict) -> None:
        """Write one request. If the worker is gone this does nothing: a "died" event reports it."""
        if self._process is None:
            raise RuntimeError("the worker is not started; call start() first")
        if message.get("op") in protocol.RUN_OPS:
            with self._state_lock:
                self._unfinished.append(message.get("id"))
        line = protocol.encode(message)
        with self._write_lock:
            try:
                self._process.stdin.write(line)
                self._process.stdin.flush()
            except (OSError, ValueError):
                pass  # broken or closed pipe: the events thread reports the exit

    def generate(
        self,
        settings: GenerationSettings | dict,
        output,
        *,
        overwrite: bool = False,
        preview_every: int = protocol.DEFAULT_PREVIEW_EVERY,
        preview_dir=None,
        refine: RefineSettings | None = None,
        threads: int = 0,
        ranks: int = 1,
    ) -> str:
        """Queue one panorama (refined from ``refine.source`` when given); returns the new request's id,
        which all its events carry. ``threads``: torch's CPU threads for this run (0: the worker's
        default, physical cores − 1). ``ranks``: processes sharing the run (0 = one per GPU; protocol.py)."""
        request_id = _new_id()
        data = settings.to_dict() if isinstance(settings, GenerationSettings) else dict(settings)
        request = protocol.request(
            "generate",
            request_id,
            settings=data,
            output=os.path.abspath(output),  # the worker runs in another folder
            overwrite=overwrite,
            preview_every=preview_every,
            preview_dir=None if preview_dir is None else os.path.abspath(preview_dir),
            threads=threads,
        )
        if refine is not None:
            request["refine"] = {**refine.to_dict(), "source": os.path.abspath(refine.source)}
        if ranks != 1:
            request["ranks"] = ranks
        self.send(request)
        return request_id

    def variations(self, settings: GenerationSettings | dict, output, count: int, *, overwrite: bool = False) -> str:
        """Queue ``count`` drafts (seeds seed, seed+1, …) written beside ``output`` as ``*_v01.png``, …;
        returns the request's id."""
        data = settings.to_dict() if isinstance(settings, GenerationSettings) else dict(settings)
        request_id = _new_id()
        self.send(protocol.request("variations", request_id, settings=data, count=count,
                                   output=os.path.abspath(output), overwrite=overwrite))
        return request_id

    def download(self, model: str, *, device: str = "auto", dtype: str = "auto") -> str:
        """Queue the download of a Hugging Face model (what a run on device/dtype loads); returns the
        request's id. Its "download" events carry bytes done/total, speed and time left."""
        request_id = _new_id()
        self.send(protocol.request("download", request_id, model=model, device=device, dtype=dtype))
        return request_id

    def list_models(self) -> str:
        """Ask for the models in the worker's Hugging Face cache; a "models" event answers."""
        request_id = _new_id()
        self.send(protocol.request("models", request_id))
        return request_id

    def cancel(self, request_id) -> None:
        self.send(protocol.request("cancel", request_id))

    def ping(self) -> str:
        """Send a ping; the worker answers with a "pong" event carrying the returned id."""
        request_id = _new_id()
        self.send(protocol.request("ping", request_id))
        return request_id

    # -- events -----------------------------------------------------------------------------------

    def poll(self) -> list[dict]:
        """All events that have arrived since the last call, oldest first; never blocks."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def next_event(self, timeout: float | None = None) -> dict | None:
        """Wait up to ``timeout`` seconds (None = forever) for the next event; None if none came."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- internals --------------------------------------------------------------------------------

    def _environment(self) -> dict:
        env = dict(os.environ)
        env.update(self.env)
        if self.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (self.pythonpath, env.get("PYTHONPATH")) if p)
        if self.offline:
            env["HF_HUB_OFFLINE"] = "1"
            env["TRANSFORMERS_OFFLINE"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"  # the worker's stderr, whatever the platform's default
        return env

    def _read_events(self, process: subprocess.Popen) -> None:
        for line in _lines(process.stdout):
            line = line.strip()
            if not line:
                continue
            try:
                message = protocol.decode(line)
            except protocol.ProtocolError:
                self._stderr.append(f"(not a protocol line on stdout) {line}")
                continue
            self._track(message)
            self._events.put(message)
        self._on_exit(process)

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in _lines(process.stderr):
            self._stderr.append(line.rstrip("\r"))

    def _track(self, message: dict) -> None:
        name = message.get("event")
        if name == "ready":
            self._ready = message
            self._cancel_startup_timer()
        elif name == "bye":
            self._said_bye = True
        elif name in protocol.FINAL_EVENTS:
            with self._state_lock:
                if message.get("id") in self._unfinished:
                    self._unfinished.remove(message.get("id"))

    def _on_exit(self, process: subprocess.Popen) -> None:
        """stdout reached its end: wait for the exit status and report it unless the exit was asked for."""
        try:
            returncode = process.wait(EXIT_WAIT)
        except subprocess.TimeoutExpired:  # it closed stdout but lives on: it can no longer talk to us
            process.kill()
            returncode = process.wait()
        self._cancel_startup_timer()
        if self._stopping or (self._said_bye and returncode == 0):
            return
        self._stderr_thread.join(EXIT_WAIT)  # the last lines usually say why
        with self._state_lock:
            request_id = self._unfinished[0] if self._unfinished else None
            self._unfinished.clear()
        signal_name = _signal_name(returncode)
        if self._startup_expired:
            headline = f"the worker did not report ready within {self.startup_timeout:g} s and was stopped"
        elif signal_name:
            headline = f"the worker process was killed by {signal_name} (exit status {returncode})"
        else:
            headline = f"the worker process exited unexpectedly with status {returncode}"
        tail = list(self._stderr)
        message = headline
        if returncode == EXIT_MISSING_PACKAGES and tail:
            message = tail[-1]  # the worker's own sentence: which package is missing and what to do
        elif tail:
            message += "; its last output:\n" + "\n".join(tail[-DIED_MESSAGE_LINES:])
        self._events.put(
            protocol.error_event(request_id, "died", message, returncode=returncode, signal=signal_name, stderr=tail)
        )

    def _on_startup_timeout(self) -> None:
        process = self._process
        if self._ready is None and process is not None and process.poll() is None:
            self._startup_expired = True
            process.kill()

    def _cancel_startup_timer(self) -> None:
        if self._startup_timer is not None:
            self._startup_timer.cancel()


def _lines(stream):
    """Text lines from one of the worker's pipes, each bounded (protocol.MAX_LINE_BYTES): a runaway line
    is replaced by a note rather than held in memory. Read as bytes from the descriptor, so a line's
    length is known before it is decoded."""
    for line in protocol.bounded_lines(protocol.read_chunks(stream.fileno())):
        if isinstance(line, protocol.LineTooLong):
            yield f"(a line of {line.length} bytes was dropped)"
        else:
            yield line.decode("utf-8", errors="replace")


def _new_id() -> str:
    return uuid.uuid4().hex


# The worker's exit status when its Python lacks torch, diffusers or transformers (msd_core.worker's __main__
# exits with it).
EXIT_MISSING_PACKAGES = 78


def _start_thread(target, process: subprocess.Popen, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, args=(process,), name=name, daemon=True)
    thread.start()
    return thread


def _exits_within(process: subprocess.Popen, timeout: float) -> bool:
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def _signal_name(returncode: int | None) -> str | None:
    """The name of the signal that ended a POSIX process (negative status), else None."""
    if returncode is None or returncode >= 0 or sys.platform == "win32":
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"
