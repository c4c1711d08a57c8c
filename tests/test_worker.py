"""The worker process with the tiny model on the CPU, driven through WorkerClient (and once through raw
pipes): events, previews, the warm model, cancel, queueing, errors, and a worker killed mid-run.

Every wait is bounded (WAIT seconds), so a broken worker fails a test instead of hanging it."""

import importlib.metadata
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import msd_core
from msd_core.models import loading
from msd_core.imageio import pngmeta
from msd_core.worker import protocol
from msd_core.worker.client import WorkerClient
from msd_core.settings import GenerationSettings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 120  # seconds; an upper bound for every wait, never an expectation
LONG_RUN = {"steps": 500}  # a minute or more unless cancelled or killed
SMALL = {"width": 128, "height": 64, "steps": 2}  # one level, one window row: the quickest run
# The tiny model's operations are too small to gain from threads, and on a busy 2-core machine torch's
# worker threads thrash (runs 20× slower): one thread, in the workers and in-process alike.
THREADS = 1


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory) -> dict:
    """Variables for the test workers: one thread, and a temporary folder inside the test's own (a
    worker killed by SIGKILL cannot delete its preview folder)."""
    return {"OMP_NUM_THREADS": str(THREADS), "TMPDIR": str(tmp_path_factory.mktemp("worker-tmp"))}


def tiny(**changes) -> dict:
    """Settings for the tiny model: 192×128 px is two pyramid levels of 64 px windows."""
    values = {"prompt": "a misty alpine valley", "model": "tiny", "width": 192, "height": 128, "steps": 4,
              "gradient": "fast", "device": "cpu", **changes}  # fmt: skip
    return GenerationSettings(**values).to_dict()


def wait_for(client: WorkerClient, predicate) -> list[dict]:
    """All events up to and including the first that matches."""
    seen = []
    while True:
        event = client.next_event(timeout=WAIT)
        assert event is not None, f"no matching event within {WAIT} s; saw {seen}; stderr: {client.stderr_lines}"
        seen.append(event)
        if predicate(event):
            return seen


def finished(request_id):
    return lambda event: event["id"] == request_id and event["event"] in protocol.FINAL_EVENTS


def of(events: list[dict], request_id, name: str | None = None) -> list[dict]:
    return [e for e in events if e["id"] == request_id and name in (None, e["event"])]


@pytest.fixture(scope="module")
def worker(worker_env):
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=worker_env).start()
    wait_for(client, lambda event: event["event"] == "ready")
    yield client
    # A clean exit, however long a loaded machine takes to unload torch.
    assert client.stop(timeout=60) == 0


def test_ready_reports_versions_device_and_pid(worker):
    ready = worker.ready_info
    assert ready["event"] == "ready" and ready["id"] is None
    assert ready["protocol"] == protocol.PROTOCOL_VERSION
    assert (ready["msd_core"], ready["torch"]) == (msd_core.__version__, torch.__version__)
    assert ready["diffusers"] == importlib.metadata.version("diffusers")
    device, dtype = loading.resolve_device("auto", "auto")  # "float32" on a CPU, "float16" on a GPU
    assert (ready["device"], ready["dtype"]) == (device.type, str(dtype).removeprefix("torch."))
    assert ready["pid"] == worker.pid


def test_generate_streams_progress_and_previews_then_writes_the_png(worker, tmp_path):
    output = tmp_path / "pano.png"
    # Steps 1–2 guided (both levels run), 3–5 only the finest level.
    settings = tiny(steps=5, guided_fraction=0.4, late_gradient="none")
    request_id = worker.generate(settings, output, preview_every=2)
    events = of(wait_for(worker, finished(request_id)), request_id)

    names = [e["event"] for e in events]
    assert names[:2] == ["accepted", "loading"] and names[-1] == "done", names
    assert set(names[2:-1]) == {"progress", "preview"}
    progress = of(events, request_id, "progress")
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
    assert all((p["total"], p["level"], p["levels"]) == (5, 2, 2) for p in progress)
    assert all(a["elapsed"] <= b["elapsed"] for a, b in zip(progress, progress[1:]))
    assert all(p["eta"] >= 0 for p in progress) and progress[-1]["eta"] == 0
    # The UNet rate is measured from the end of step 1 on (step 1 holds the warm-up).
    assert progress[0]["ms_per_window"] is None and all(p["ms_per_window"] > 0 for p in progress[1:])

    previews = of(events, request_id, "preview")
    assert [p["step"] for p in previews] == [1, 2, 4]  # the first step, then every 2nd
    for preview in previews:
        with Image.open(preview["path"]) as image:
            assert image.format == "PNG"
            # The coarsest of two levels is half the size; step 4's finest level is shown at that size too.
            assert image.size == (preview["width"], preview["height"]) == (96, 64)

    done = events[-1]
    assert Path(done["output"]) == output
    with Image.open(output) as image:
        assert (image.format, image.size) == ("PNG", (192, 128))
    assert pngmeta.read_text_chunks(output) == done["metadata"]
    assert json.loads(done["metadata"]["settings"]) == settings
    assert {"load", "sample", "decode", "save", "total"} <= set(done["timings"])
    assert all(seconds >= 0 for seconds in done["timings"].values())


def test_same_model_stays_warm_and_another_model_replaces_it(worker, tmp_path):
    """Only this test uses "tiny-v", so its first request here loads it whatever ran before."""

    def run(model: str, name: str) -> tuple[bool, float]:
        """(the loading event's warm flag, seconds from sending the request to its first progress)"""
        started = time.perf_counter()
        request_id = worker.generate(tiny(model=model, **SMALL), tmp_path / name)
        loading = wait_for(worker, lambda e: e["id"] == request_id and e["event"] == "loading")[-1]
        assert loading["model"] == model
        wait_for(worker, lambda e: e["id"] == request_id and e["event"] == "progress")
        first_progress = time.perf_counter() - started
        assert wait_for(worker, finished(request_id))[-1]["event"] == "done"
        return loading["warm"], first_progress

    cold_warm, cold_seconds = run("tiny-v", "cold.png")
    warm_warm, warm_seconds = run("tiny-v", "warm.png")
    assert (cold_warm, warm_warm) == (False, True)
    assert warm_seconds < cold_seconds

    assert run("tiny", "other.png")[0] is False
    assert run("tiny-v", "again.png")[0] is False  # one model at a time: tiny-v was dropped for tiny


def test_cancel_stops_the_run_writes_nothing_and_the_worker_goes_on(worker, tmp_path):
    output = tmp_path / "pano.png"
    request_id = worker.generate(tiny(**LONG_RUN), output, preview_every=1)
    events = wait_for(worker, lambda e: e["id"] == request_id and e["event"] == "progress")
    ping_id = worker.ping()
    events += wait_for(worker, lambda e: e["id"] == ping_id)
    assert events[-1]["event"] == "pong"
    assert not of(events, request_id, "done") and not of(events, request_id, "error")  # answered mid-run

    worker.cancel(request_id)
    events += wait_for(worker, finished(request_id))
    assert (events[-1]["event"], events[-1]["kind"]) == ("error", "cancelled")
    assert max(p["step"] for p in of(events, request_id, "progress")) < LONG_RUN["steps"]
    assert list(tmp_path.iterdir()) == []  # no output, no partial file
    previews = of(events, request_id, "preview")
    assert previews and not any(os.path.exists(p["path"]) for p in previews)  # the worker's temp files are gone

    again = worker.generate(tiny(**SMALL), output)
    assert wait_for(worker, finished(again))[-1]["event"] == "done"
    assert output.is_file()


def test_requests_queue_in_order_and_a_queued_one_can_be_cancelled(worker, tmp_path):
    first = worker.generate(tiny(**{**SMALL, "steps": 8}), tmp_path / "first.png")
    queued = worker.generate(tiny(**SMALL), tmp_path / "queued.png")
    last = worker.generate(tiny(**SMALL), tmp_path / "last.png")
    worker.cancel(queued)
    events = wait_for(worker, finished(last))

    # Accepted then cancelled; or, when the cancel came while it was still being validated, only cancelled.
    assert [e["event"] for e in of(events, queued)] in (["accepted", "error"], ["error"])
    assert of(events, queued)[-1]["kind"] == "cancelled"
    assert of(events, first)[-1]["event"] == "done" and of(events, last)[-1]["event"] == "done"
    assert events.index(of(events, first, "done")[0]) < events.index(of(events, last, "loading")[0])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["first.png", "last.png"]


def test_previews_go_to_the_clients_folder_when_given_and_the_workers_own_are_cleaned(worker, tmp_path):
    own = worker.generate(tiny(**SMALL), tmp_path / "own.png", preview_every=1)
    own_previews = of(wait_for(worker, finished(own)), own, "preview")
    assert own_previews and all(os.path.exists(p["path"]) for p in own_previews)  # kept until the next run

    folder = tmp_path / "previews"
    folder.mkdir()
    given = worker.generate(tiny(**SMALL), tmp_path / "given.png", preview_every=1, preview_dir=folder)
    given_previews = of(wait_for(worker, finished(given)), given, "preview")
    assert not any(os.path.exists(p["path"]) for p in own_previews)
    assert sorted(os.listdir(folder)) == [f"msd-preview-{given}-step-0001.png", f"msd-preview-{given}-step-0002.png"]
    assert [Path(p["path"]) for p in given_previews] == [folder / name for name in sorted(os.listdir(folder))]


GENERATE = {"op": "generate", "settings": tiny(), "output": "OUT"}


@pytest.mark.parametrize(
    ("request_fields", "kind", "fragment"),
    [
        ({"op": "dance"}, "bad_input", "unknown op 'dance'"),
        ({}, "bad_input", "no 'op'"),
        ({"op": "generate", "settings": tiny()}, "bad_input", "output must be the path"),
        ({**GENERATE, "settings": tiny(width=100)}, "bad_input", "width 100 is not a multiple of 8"),
        ({**GENERATE, "settings": {**tiny(), "sampler": "x"}}, "bad_input", "unknown setting(s): sampler"),
        ({**GENERATE, "colour": 1}, "bad_input", "unknown field(s)"),
        ({**GENERATE, "preview_every": -1}, "bad_input", "preview_every"),
        ({**GENERATE, "preview_dir": "/no/such/dir"}, "bad_input", "preview_dir"),
        ({**GENERATE, "output": "EXISTING"}, "bad_input", "exists"),
        ({**GENERATE, "settings": tiny(model="no/such-model")}, "model_not_found", "no/such-model"),
    ],
    ids=["unknown-op", "no-op", "no-output", "bad-width", "unknown-setting", "unknown-field", "bad-preview-every",
         "missing-preview-dir", "output-exists", "unknown-model"],  # fmt: skip
)
def test_bad_requests_get_specific_errors_and_the_worker_keeps_answering(
    worker, tmp_path, request_fields, kind, fragment
):
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"not replaced")
    paths = {"OUT": str(tmp_path / "out.png"), "EXISTING": str(existing)}
    request_id = f"bad-{kind}-{fragment}"
    message = {**request_fields, "id": request_id}
    if "output" in message:
        message["output"] = paths[message["output"]]
    worker.send(message)
    error = wait_for(worker, finished(request_id))[-1]
    assert (error["event"], error["kind"]) == ("error", kind)
    assert fragment in error["message"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing.png"]
    assert existing.read_bytes() == b"not replaced"

    ping_id = worker.ping()
    assert wait_for(worker, lambda e: e["id"] == ping_id)[-1]["event"] == "pong"


@pytest.mark.parametrize(
    ("request_fields", "field", "fragment"),
    [
        ({**GENERATE, "settings": tiny(wrap="yes")}, "wrap", "wrap must be true or false, got 'yes'"),
        ({**GENERATE, "settings": tiny(feather="no")}, "feather", "feather must be true or false"),
        ({**GENERATE, "settings": tiny(model_config=3)}, "model_config", "model_config must be text, got 3"),
        ({**GENERATE, "settings": tiny(seed=5.0)}, "seed", "seed must be a whole number"),
        ({**GENERATE, "settings": tiny(steps=True)}, "steps", "steps must be a whole number from 1 to 1000"),
        ({**GENERATE, "settings": tiny(steps=100000)}, "steps", "scheduler has 1000 timesteps"),
        ({**GENERATE, "settings": tiny(omega=float("inf"))}, "omega", "got inf"),
        ({**GENERATE, "settings": tiny(guidance=float("nan"))}, "guidance", "got nan"),
        ({**GENERATE, "settings": tiny(width=100000)}, "width", "from 8 to 16384"),
        ({**GENERATE, "settings": tiny(scales=2**40)}, "scales", "from 1 to 12"),
        ({**GENERATE, "settings": tiny(view_batch=2**200)}, "view_batch", "got a 201-bit number"),
        ({**GENERATE, "settings": tiny(prompt="a\x00b")}, "prompt", "control character U+0000"),
        ({**GENERATE, "settings": tiny(prompt="x" * 20000)}, "prompt", "the limit is 10000"),
        ({**GENERATE, "settings": tiny(negative_prompt=["a"])}, "negative_prompt", "must be text"),
        ({**GENERATE, "settings": tiny(stride=8, windows="dense")}, "stride", "stride 8 px: with more than one pyramid level"),
        ({**GENERATE, "settings": tiny(stride=24, scales=2, windows="dense")}, "stride", "nearest valid: 16 or 32"),
        ({**GENERATE, "overwrite": "yes"}, "overwrite", "overwrite must be true or false"),
        ({**GENERATE, "output": "EXISTING"}, "overwrite", "exists; to replace it, turn on overwrite"),
        ({**GENERATE, "output": "DANGLING"}, "output", "is a link to"),
        ({**GENERATE, "output": "OUT\x00.png"}, "output", "NUL"),
        ({**GENERATE, "preview_every": 1.5}, "preview_every", "preview_every must be a whole number"),
        ({**GENERATE, "threads": -1}, "threads", "threads must be a whole number from 0"),
        ({**GENERATE, "threads": "4"}, "threads", "threads must be a whole number from 0"),
        ({**GENERATE, "ranks": -1}, "ranks", "ranks must be a whole number from 0 (one per GPU)"),
        ({**GENERATE, "ranks": 1.0}, "ranks", "ranks must be a whole number from 0 (one per GPU)"),
    ],
)  # fmt: skip
def test_every_field_is_checked_and_the_error_names_it(worker, tmp_path, request_fields, field, fragment):
    (tmp_path / "existing.png").write_bytes(b"not replaced")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    paths = {"OUT": str(tmp_path / "out.png"), "EXISTING": str(tmp_path / "existing.png"),
             "DANGLING": str(tmp_path / "dangling.png"), "OUT\x00.png": str(tmp_path / "out\x00.png")}  # fmt: skip
    request_id = f"field-{field}-{fragment}"
    worker.send({**request_fields, "id": request_id, "output": paths[request_fields["output"]]})
    error = wait_for(worker, finished(request_id))[-1]
    assert (error["event"], error["kind"], error["field"]) == ("error", "bad_input", field), error
    assert fragment in error["message"] and "--" not in error["message"]  # protocol words, not CLI flags
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dangling.png", "existing.png"]


def test_an_unwritable_preview_dir_is_refused_before_anything_runs(worker, tmp_path, unwritable_folder):
    request_id = worker.generate(tiny(**SMALL), tmp_path / "out.png", preview_dir=unwritable_folder)
    error = wait_for(worker, finished(request_id))[-1]
    assert (error["kind"], error["field"]) == ("bad_input", "preview_dir")
    assert "not writable" in error["message"] and not (tmp_path / "out.png").exists()


def test_a_second_request_for_the_same_output_is_refused_at_once(worker, tmp_path):
    output = tmp_path / "pano.png"
    first = worker.generate(tiny(**LONG_RUN), output)
    second = worker.generate(tiny(**SMALL), output)
    events = wait_for(worker, finished(second))
    assert (events[-1]["kind"], events[-1]["field"]) == ("bad_input", "output")
    assert f"already the output of the queued or running request {first!r}" in events[-1]["message"]
    assert not of(events, first, "done")  # refused while the first still runs
    worker.cancel(first)
    assert wait_for(worker, finished(first))[-1]["kind"] == "cancelled"


def test_raw_lines_malformed_input_and_end_of_stdin(worker_env):
    """Straight through pipes: every stdout line is protocol JSON, bad lines get errors, EOF ends it."""
    lines = [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b"",
        b'{"op": "ping", "id": 7}',
        b'{"op": "cancel", "id": "nothing-runs"}',
        b'{"op": "ping", "id": {"nested": 1}}',
    ]
    result = subprocess.run(
        [sys.executable, "-u", "-m", "msd_core.worker"],
        input=b"\n".join(lines) + b"\n",
        capture_output=True,
        cwd=REPO_ROOT,
        env={**os.environ, **worker_env},
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    events = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
    summary = [(e["event"], e["id"], e.get("kind")) for e in events]
    assert summary == [
        ("ready", None, None),
        ("error", None, "bad_input"),
        ("error", None, "bad_input"),
        ("error", None, "bad_input"),
        ("pong", 7, None),
        ("error", None, "bad_input"),
        ("bye", None, None),
    ]
    assert "not valid JSON" in events[1]["message"]
    assert "UTF-8" in events[2]["message"]
    assert "JSON object" in events[3]["message"]
    assert "string or an integer" in events[5]["message"]


def test_a_20_mb_request_line_is_refused_and_ping_is_still_answered(worker_env):
    """Through pipes: a 20 MB line (a huge prompt), then ping. The long line is dropped as it arrives and
    answered with bad_input; the ping after it is answered; the worker ends normally."""
    huge = json.dumps(protocol.request("generate", "huge", settings=tiny(prompt="x" * 20_000_000), output="/x.png"))
    result = subprocess.run(
        [sys.executable, "-u", "-m", "msd_core.worker"],
        input=huge.encode() + b"\n" + b'{"op": "ping", "id": "after"}\n',
        capture_output=True, cwd=REPO_ROOT, env={**os.environ, **worker_env}, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    events = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
    assert [(e["event"], e["id"], e.get("kind")) for e in events] == [
        ("ready", None, None), ("error", None, "bad_input"), ("pong", "after", None), ("bye", None, None)
    ]  # fmt: skip
    assert events[1]["message"] == (
        f"a request of {len(huge)} bytes was ignored: the limit is {protocol.MAX_LINE_BYTES} bytes a line"
    )


def test_bounded_lines_drops_a_long_line_and_keeps_the_lines_around_it():
    """The reader itself: a 50 MB line in 64 KB chunks becomes one LineTooLong with its length, and the
    lines around it come through intact, split anywhere across chunks."""
    chunk = b"y" * 65536
    stream = [b'{"op": "ping"}\n{"op":', *([chunk] * 800), b'"x"}\n', b"tail-", b"end\n", b"last"]
    lines = list(protocol.bounded_lines(iter(stream)))
    assert lines[0] == b'{"op": "ping"}'
    assert isinstance(lines[1], protocol.LineTooLong) and lines[1].length == 6 + 800 * 65536 + 4
    assert lines[2:] == [b"tail-end", b"last"]
    assert list(protocol.bounded_lines([b"a" * 10 + b"\n"], limit=10)) == [b"a" * 10]  # the limit itself is fine


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX scheduling priority and pids")
def test_default_threads_priority_and_stale_files_of_dead_workers(tmp_path, monkeypatch):
    """A worker started as a user's Blender starts it: no OMP_NUM_THREADS, no niceness override. It uses
    max(1, physical cores − 1) threads, runs at lower priority, and sweeps what killed workers left
    behind (their preview folders, half-written PNGs), never a live process's files."""
    from msd_core.worker.environment import physical_cores

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    stale = [temporary / f"msd-worker-previews-{dead.pid}-abcd1234", tmp_path / f".pano.png.{dead.pid}-0123abcd.tmp"]
    alive = [temporary / f"msd-worker-previews-{os.getpid()}-abcd1234", temporary / "msd-worker-previews-nopid",
             tmp_path / f".pano.png.{os.getpid()}-0123abcd.tmp", tmp_path / f".other.png.{dead.pid}-0123abcd.TMP"]  # fmt: skip
    for path in stale + alive:
        path.mkdir() if "previews" in path.name else path.write_bytes(b"")
    monkeypatch.delenv("OMP_NUM_THREADS")  # set for every test by conftest.py
    monkeypatch.delenv("MSD_WORKER_NICENESS")
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env={"TMPDIR": str(temporary)}).start()
    try:
        ready = wait_for(client, lambda e: e["event"] == "ready")[-1]
        assert ready["threads"] == max(1, physical_cores() - 1)
        assert os.getpriority(os.PRIO_PROCESS, ready["pid"]) >= os.getpriority(os.PRIO_PROCESS, 0) + 10
        assert not stale[0].exists()  # swept at start-up
        request_id = client.generate(tiny(**SMALL), tmp_path / "pano.png", preview_every=0,
                                     threads=ready["threads"] + 1)
        events = wait_for(client, finished(request_id))
        assert events[-1]["event"] == "done"
        assert of(events, request_id, "loading")[0]["threads"] == ready["threads"] + 1  # the request's own count
        assert not stale[1].exists()  # swept when a request for that folder came
        assert all(path.exists() for path in alive)
    finally:
        client.stop()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_worker_killed_mid_run_is_reported_as_died_for_the_running_request(tmp_path, worker_env):
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=worker_env).start()
    try:
        ready = wait_for(client, lambda e: e["event"] == "ready")[-1]
        request_id = client.generate(tiny(**LONG_RUN), tmp_path / "pano.png")
        wait_for(client, lambda e: e["id"] == request_id and e["event"] == "progress")
        os.kill(ready["pid"], signal.SIGKILL)
        died = wait_for(client, finished(request_id))[-1]
        assert (died["event"], died["kind"]) == ("error", "died")
        assert (died["returncode"], died["signal"]) == (-signal.SIGKILL, "SIGKILL")
        assert "killed by SIGKILL" in died["message"]
        assert not client.alive
        assert client.next_event(timeout=0.5) is None  # exactly one report
        assert list(tmp_path.iterdir()) == []
    finally:
        client.stop(timeout=1)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """A Worker in this process writing events to a string, with the tiny model already loaded."""
    from msd_core.worker.process import EventWriter, Worker, parse_generate

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    folder = tmp_path_factory.mktemp("in-process")
    stream = io.StringIO()
    worker = Worker(EventWriter(stream), folder / "previews")

    def run(request_id: str) -> dict:
        """Run one small request to its end; its last event."""
        output = folder / f"{request_id}.png"
        request = protocol.request("generate", request_id, settings=tiny(**SMALL), output=str(output), preview_every=1)
        worker.run_job(parse_generate(request))
        return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["id"] == request_id][-1]

    assert run("warm-up")["event"] == "done"
    yield worker, run, folder
    torch.set_num_threads(threads)


def test_an_idle_worker_gives_its_cached_gpu_memory_back_after_a_run_but_keeps_it_for_a_queued_one(in_process, monkeypatch):
    """PyTorch's allocator keeps a run's peak reserved (86 GiB after an SDXL Draft on an H200, docs/speed.md): a
    warm worker would hold it while it waits, and Blender's own GPU renders could not have it. Once nothing is
    queued it is released, after the run's final event; a request already waiting gets the cache as it is."""
    from msd_core.worker import process

    worker, run, folder = in_process
    happened = []
    emit = worker.emit
    monkeypatch.setattr(worker, "emit", lambda message: (happened.append(message["event"]), emit(message)))
    monkeypatch.setattr(process, "_free_accelerator_memory", lambda: happened.append("released"))
    assert run("then-idle")["event"] == "done"
    assert happened[-2:] == ["done", "released"] and happened.count("released") == 1

    happened.clear()
    waiting = process.parse_generate(protocol.request("generate", "waiting", settings=tiny(**SMALL),
                                                      output=str(folder / "waiting.png")))
    worker._queue.append(waiting)
    try:
        assert run("with-one-waiting")["event"] == "done"
    finally:
        worker._queue.remove(waiting)
    assert "released" not in happened and happened[-1] == "done"


@pytest.mark.parametrize(
    ("failure", "kind", "message"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out_of_memory", None),
        (RuntimeError("MPS backend out of memory (MPS allocated: 17 GB)"), "out_of_memory", None),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB"), "out_of_memory", None),
        (ZeroDivisionError("division by zero\nmore detail"), "internal", "ZeroDivisionError: division by zero"),
    ],
    ids=["cuda-oom", "mps-oom", "cpu-oom", "other"],
)
def test_failures_inside_a_run_are_reported_and_the_worker_goes_on(
    in_process, monkeypatch, request, failure, kind, message
):
    """In-process, because a UNet that fails on cue cannot be made in the subprocess: the real tiny
    pipeline's UNet raises mid-run; the error has the right kind and message, the next request succeeds."""
    worker, run, folder = in_process
    case = request.node.callspec.id

    def failing_forward(*args, **kwargs):
        raise failure

    monkeypatch.setattr(worker._pipeline.unet, "forward", failing_forward)
    error = run(f"failing-{case}")
    assert (error["event"], error["kind"]) == ("error", kind)
    if kind == "out_of_memory":
        assert error["message"].startswith("out of memory on cpu: ")
        assert all(hint in error["message"] for hint in ("smaller size", "--gradient fast", "view batch"))
    else:
        assert error["message"] == message  # one line; the traceback went to the log
    assert not (folder / f"failing-{case}.png").exists()
    assert os.listdir(folder / "previews") == []  # the failed run's previews are gone (and the last one's)

    monkeypatch.undo()
    assert run(f"after-{case}")["event"] == "done"


def test_a_cancel_during_the_decode_of_a_large_output_ends_it_between_tiles(in_process, monkeypatch):
    """A 16K panorama decodes as hundreds of VAE tiles (minutes on a slow device): here 12 slowed tiles of
    the tiny model's VAE. The cancel, as the reader thread hands it over, ends the run at the next tile
    with 'cancelled', and nothing is written."""
    import threading

    from msd_core.models import vae
    from msd_core.worker.process import parse_generate

    worker, run, folder = in_process
    pipe = worker._pipeline
    monkeypatch.setattr(vae, "auto_tile", lambda height, width, device: 10)  # 10-latent-px tiles: 12 for 128×64
    decoding, tiles = threading.Event(), []
    decode = pipe.vae.decode

    def slow_decode(latents):
        tiles.append(latents.shape)
        decoding.set()
        time.sleep(0.2)
        return decode(latents)

    monkeypatch.setattr(pipe.vae, "decode", slow_decode)
    output = folder / "large.png"
    job = parse_generate(protocol.request("generate", "large", settings=tiny(**SMALL), output=str(output), preview_every=0))
    with worker._lock:
        worker._current = job  # as run() does when it takes the job from the queue
    running = threading.Thread(target=worker.run_job, args=(job,))
    running.start()
    assert decoding.wait(WAIT)
    worker.cancel("large")
    running.join(WAIT)
    stream = worker.emit.__self__._stream  # the in-process EventWriter's StringIO
    last = [e for e in map(json.loads, stream.getvalue().splitlines()) if e["id"] == "large"][-1]
    assert (last["event"], last["kind"]) == ("error", "cancelled")
    assert len(tiles) <= 2 and not output.exists()  # of 12
    monkeypatch.undo()
    assert run("after-decode-cancel")["event"] == "done"


def test_ctrl_c_in_the_terminal_leaves_a_piped_worker_to_its_client(worker_env):
    """Ctrl+C reaches the client and its worker alike: the worker ignores it (no traceback mid-request)
    and the client cancels and stops it."""
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=worker_env).start()
    try:
        wait_for(client, lambda event: event["event"] == "ready")
        os.kill(client.pid, signal.SIGINT)
        request_id = client.ping()
        wait_for(client, lambda event: event["event"] == "pong" and event["id"] == request_id)
    finally:
        assert client.stop(timeout=60) == 0
    assert not any("KeyboardInterrupt" in line for line in client.stderr_lines)


# -- hostile names, encodings and slow requests (issue 21) --------------------------------------------


def test_files_named_with_absurd_pids_never_fail_a_sweep_and_are_left_alone(tmp_path):
    """Anyone can create these names in a shared temporary or output folder: a sweep must not raise
    (os.kill overflows above a C int) and must not delete what no pid of ours made."""
    from msd_core.worker.environment import process_alive
    from msd_core.imageio.output import remove_stale_temporaries
    from msd_core.worker.process import sweep_stale_preview_roots

    huge = "99999999999"
    odd = [tmp_path / f"msd-worker-previews-{huge}-x", tmp_path / f"msd-worker-previews-{'9' * 200}-x",
           tmp_path / f".a.png.{huge}-0123abcd.tmp", tmp_path / f".b.png.{'9' * 200}-0123abcd.tmp"]  # fmt: skip
    for path in odd:
        path.mkdir() if "previews" in path.name else path.write_bytes(b"")
    assert process_alive(int(huge)) and process_alive(0) and process_alive(-5)
    assert sweep_stale_preview_roots(tmp_path) == []
    assert remove_stale_temporaries(tmp_path) == []
    assert all(path.exists() for path in odd)
    assert remove_stale_temporaries(tmp_path / "no such folder") == []


def test_texts_that_are_not_valid_unicode_get_exactly_one_final_event_each(worker_env, tmp_path):
    """Through pipes: lone surrogates (JSON \\ud800 escapes) in an id, a prompt and an output path: each
    request is answered once (the pong used to be dropped: the event could not be encoded)."""
    requests = [
        protocol.request("ping", "\ud800"),
        protocol.request("generate", "prompt", settings=tiny(**SMALL, prompt="sun \ud83d"), output=str(tmp_path / "p.png")),
        protocol.request("generate", "path", settings=tiny(**SMALL), output=str(tmp_path / "\ud800.png")),
    ]
    lines = [json.dumps(request, ensure_ascii=True).encode() for request in requests]
    result = subprocess.run(
        [sys.executable, "-u", "-m", "msd_core.worker"], input=b"\n".join(lines) + b"\n", capture_output=True,
        cwd=REPO_ROOT, env={**os.environ, **worker_env}, timeout=WAIT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    events = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
    final = [(e["event"], e["id"], e.get("field")) for e in events if e["event"] in ("pong", "done", "error")]
    assert final == [("pong", "\ud800", None), ("error", "prompt", "prompt"), ("error", "path", "output")], events
    assert os.listdir(tmp_path) == []


def test_the_client_sends_a_file_name_that_is_not_utf8_as_it_is(worker, tmp_path):
    name = os.fsdecode(b"ni\xf1o.png")
    request_id = worker.generate(tiny(**SMALL), tmp_path / name, preview_every=0)
    events = wait_for(worker, finished(request_id))
    assert events[-1]["event"] == "done", events[-1]
    assert events[-1]["output"] == str(tmp_path / name)
    assert os.listdir(os.fsencode(tmp_path)) == [b"ni\xf1o.png"]  # not "ni?o.png"


def slow_png(path: Path, chunks: int = 300_000, kind: bytes = b"teST") -> Path:
    """A valid 16×8 PNG with many empty ``kind`` chunks before its pixels: ancillary ones (the default) make
    reading its header take seconds, empty IDAT ones its decoding."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pixels = zlib.compress(b"".join(b"\0" + b"\x80" * 48 for _ in range(8)))
    header = struct.pack(">IIBBBBB", 16, 8, 8, 2, 0, 0, 0)
    path.write_bytes(pngmeta.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(kind, b"") * chunks
                     + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_a_slow_request_never_delays_ping_or_cancel(worker, tmp_path):
    """Validating a refine reads its source's header: seconds for this one. Meanwhile ping is answered at
    once, and a cancel ends the request (it is never accepted or run)."""
    source = slow_png(tmp_path / "slow.png")
    worker.send(protocol.request("generate", "slow", settings=tiny(**SMALL), output=str(tmp_path / "out.png"),
                                 refine={"source": str(source)}))
    pong = worker.ping()
    worker.cancel("slow")
    events = wait_for(worker, finished("slow"))
    names = [(e["event"], e["id"]) for e in events if e["id"] in (pong, "slow")]
    assert names == [("pong", pong), ("error", "slow")], names
    assert events[-1]["kind"] == "cancelled" and not (tmp_path / "out.png").exists()
    again = worker.ping()
    assert wait_for(worker, lambda e: e["id"] == again)[-1]["event"] == "pong"  # and it goes on


def test_worker_writes_cube_map_faces_and_refuses_to_clobber_them(in_process, tmp_path):
    from msd_core.errors import BadInput
    from msd_core.worker.process import parse_generate

    worker, run, folder = in_process
    output = tmp_path / "world.png"
    settings = tiny(**SMALL, cubemap=True, poles="sphere")
    request = protocol.request("generate", "cube", settings=settings, output=str(output))
    worker.run_job(parse_generate(request))
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        ["world.png"] + [f"world_{face}.png" for face in ("px", "nx", "py", "ny", "pz", "nz")])
    output.unlink()
    with pytest.raises(BadInput, match="world_px.png exists"):
        parse_generate(protocol.request("generate", "again", settings=settings, output=str(output)))
