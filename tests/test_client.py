"""WorkerClient against small stand-in worker programs (no torch): start-up failures, the environment
the worker gets, start-up timeout, unexpected exits, stop(). The real worker is in test_worker.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from msd_core.worker import protocol
from msd_core.worker.client import WorkerClient, WorkerStartError
from msd_core.errors import BadInput

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 30  # seconds; an upper bound for every wait, never an expectation


def stand_in_worker(tmp_path, monkeypatch, body: str) -> str:
    """A folder with a package ``msd_core`` whose ``worker`` module runs ``body``; returns the folder.

    The working directory moves to tmp_path: ``python -m`` puts it first on sys.path, and the repo root
    (pytest's usual one) would shadow the stand-in with the real msd_core.
    """
    package = tmp_path / "stand_in" / "msd_core"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "worker.py").write_text(textwrap.dedent(body))
    monkeypatch.chdir(tmp_path)
    return str(package.parent)


def events_until(client: WorkerClient, predicate) -> list[dict]:
    """Events up to and including the first that matches; fails after WAIT seconds without one."""
    seen = []
    while True:
        event = client.next_event(timeout=WAIT)
        assert event is not None, f"no matching event within {WAIT} s; saw {seen}"
        seen.append(event)
        if predicate(event):
            return seen


def is_died(event: dict) -> bool:
    return event["event"] == "error" and event["kind"] == "died"


def test_missing_python_raises_a_start_error_naming_the_path(tmp_path):
    missing = tmp_path / "no" / "python3"
    client = WorkerClient(str(missing))
    with pytest.raises(WorkerStartError, match="does not exist") as caught:
        client.start()
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value, BadInput) and caught.value.kind == "bad_input"
    assert not client.alive


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_python_that_is_not_executable_raises_a_start_error(tmp_path):
    not_executable = tmp_path / "python3"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    with pytest.raises(WorkerStartError, match="not executable") as caught:
        WorkerClient(str(not_executable)).start()
    assert str(not_executable) in str(caught.value)


def test_worker_gets_pythonpath_offline_flags_and_extra_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import json, os, sys
        names = ("PYTHONPATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MSD_TEST_MARK")
        print(json.dumps({"event": "ready", "id": None, "pid": os.getpid(),
                          "env": {name: os.environ.get(name) for name in names}}), flush=True)
        sys.stdin.readline()  # the shutdown request
        print(json.dumps({"event": "bye", "id": None}), flush=True)
        """,
    )
    with WorkerClient(sys.executable, pythonpath=folder, env={"MSD_TEST_MARK": "x y"}, offline=True) as client:
        ready = events_until(client, lambda e: e["event"] == "ready")[-1]
        assert client.ready_info == ready
        assert ready["env"] == {
            "PYTHONPATH": os.pathsep.join([folder, "/already/there"]),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MSD_TEST_MARK": "x y",
        }
        assert client.alive
    assert client.stop() == 0
    assert not client.alive
    assert [e for e in client.poll() if e["event"] == "error"] == []  # an asked-for exit is not a death


def test_worker_that_never_gets_ready_is_killed_and_reported(tmp_path, monkeypatch):
    folder = stand_in_worker(tmp_path, monkeypatch, "import time\ntime.sleep(600)\n")
    client = WorkerClient(sys.executable, pythonpath=folder, startup_timeout=1.0).start()
    try:
        died = events_until(client, is_died)[-1]
        assert "did not report ready within 1 s" in died["message"]
        assert died["id"] is None
        assert not client.alive
        assert client.ready_info is None
    finally:
        client.stop(timeout=1)


def test_worker_crashing_at_start_is_reported_once_with_status_and_stderr(tmp_path, monkeypatch):
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import sys
        print("starting", file=sys.stderr)
        print("ModuleNotFoundError: No module named 'diffusers'", file=sys.stderr)
        sys.exit(3)
        """,
    )
    client = WorkerClient(sys.executable, pythonpath=folder).start()
    try:
        died = events_until(client, is_died)[-1]
        assert died["returncode"] == 3 and died["signal"] is None
        assert "exited unexpectedly with status 3" in died["message"]
        assert "No module named 'diffusers'" in died["message"]
        assert died["stderr"] == ["starting", "ModuleNotFoundError: No module named 'diffusers'"]
        client.ping()  # writing to a dead worker is not an error: the death was already reported
        assert client.next_event(timeout=0.5) is None
    finally:
        client.stop(timeout=1)


def test_death_is_reported_for_the_request_in_flight(tmp_path, monkeypatch):
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import json, os, sys
        print(json.dumps({"event": "ready", "id": None, "pid": os.getpid()}), flush=True)
        request = json.loads(sys.stdin.readline())
        print(json.dumps({"event": "accepted", "id": request["id"]}), flush=True)
        print("crash while generating", file=sys.stderr, flush=True)
        os._exit(7)
        """,
    )
    client = WorkerClient(sys.executable, pythonpath=folder).start()
    try:
        events_until(client, lambda e: e["event"] == "ready")
        request_id = client.generate({"prompt": "p", "model": "tiny"}, tmp_path / "out.png")
        events = events_until(client, is_died)
        assert [e["event"] for e in events] == ["accepted", "error"]
        assert events[-1]["id"] == request_id and events[-1]["returncode"] == 7
        assert "crash while generating" in events[-1]["message"]
    finally:
        client.stop(timeout=1)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_stop_terminates_then_kills_a_worker_that_ignores_shutdown(tmp_path, monkeypatch):
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import json, os, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(json.dumps({"event": "ready", "id": None, "pid": os.getpid()}), flush=True)
        time.sleep(600)
        """,
    )
    client = WorkerClient(sys.executable, pythonpath=folder).start()
    events_until(client, lambda e: e["event"] == "ready")
    assert client.stop(timeout=0.5) == -signal.SIGKILL
    assert not client.alive
    assert client.poll() == []  # stop() asked for the end: no "died"


def test_generate_sends_settings_as_json_and_returns_unique_ids(tmp_path, monkeypatch):
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import json, os, sys
        print(json.dumps({"event": "ready", "id": None, "pid": os.getpid()}), flush=True)
        for line in sys.stdin:  # echo each request back inside a pong
            request = json.loads(line)
            print(json.dumps({"event": "pong", "id": request["id"], "request": request}), flush=True)
            if request["op"] == "shutdown":
                break
        """,
    )
    from msd_core.settings import GenerationSettings

    settings = GenerationSettings(prompt='a "quoted" prompt\nwith a newline', model="tiny", width=128, height=64)
    with WorkerClient(sys.executable, pythonpath=folder) as client:
        first = client.generate(settings, tmp_path / "a.png", preview_every=2)
        second = client.generate(
            settings.to_dict(), str(tmp_path / "b.png"), overwrite=True, preview_dir=tmp_path, threads=3
        )
        client.cancel(second)
        echoed = [e["request"] for e in events_until(client, lambda e: e.get("request", {}).get("op") == "cancel")[1:]]
    assert first != second
    assert echoed == [
        protocol.request(
            "generate", first, settings=settings.to_dict(), output=str(tmp_path / "a.png"),
            overwrite=False, preview_every=2, preview_dir=None, threads=0,
        ),
        protocol.request(
            "generate", second, settings=settings.to_dict(), output=str(tmp_path / "b.png"),
            overwrite=True, preview_every=protocol.DEFAULT_PREVIEW_EVERY, preview_dir=str(tmp_path), threads=3,
        ),
        protocol.request("cancel", second),
    ]


def test_client_and_protocol_import_without_torch():
    code = (
        "import sys, msd_core.worker.client, msd_core.worker.protocol, msd_core.settings, msd_core.errors; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'bpy') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=WAIT, check=True
    )
    assert result.stdout.strip() == "[]"


def test_runaway_output_lines_are_dropped_not_held(tmp_path, monkeypatch):
    """A worker that writes a 20 MB line on stdout and on stderr: both are replaced by a note, the
    events after them still arrive."""
    folder = stand_in_worker(
        tmp_path,
        monkeypatch,
        """
        import json, os, sys
        print(json.dumps({"event": "ready", "id": None, "pid": os.getpid()}), flush=True)
        sys.stdout.write('{"event": "pong", "id": "' + "x" * 20_000_000 + '"}\\n')
        sys.stderr.write("y" * 20_000_000 + "\\n")
        print(json.dumps({"event": "pong", "id": "after"}), flush=True)
        print("the end", file=sys.stderr, flush=True)
        sys.stdin.read()
        """,
    )
    with WorkerClient(sys.executable, pythonpath=folder) as client:
        events = events_until(client, lambda e: e["id"] == "after")
        assert [e["event"] for e in events] == ["ready", "pong"]
        deadline = time.monotonic() + WAIT
        while "the end" not in client.stderr_lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("(a line of 20000" in line and "bytes was dropped)" in line for line in client.stderr_lines)
        assert client.stderr_lines[-1] == "the end"
        assert max(map(len, client.stderr_lines)) < 1000


def test_a_worker_python_without_torch_is_one_sentence_saying_what_to_do(tmp_path):
    """The real worker started by a Python that lacks torch (a stand-in torch that fails to import):
    the died error is the worker's one sentence, no traceback."""
    shadow = tmp_path / "shadow" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env={"PYTHONPATH": str(shadow.parent)}).start()
    try:
        died = events_until(client, is_died)[-1]
    finally:
        client.stop(timeout=5)
    from msd_core.worker.client import EXIT_MISSING_PACKAGES

    assert died["returncode"] == EXIT_MISSING_PACKAGES
    assert died["message"].startswith(f"{sys.executable} cannot run the worker: No module named 'torch'; install the worker")
    assert "\n" not in died["message"] and "Traceback" not in "".join(died["stderr"])
