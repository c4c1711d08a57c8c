"""Hub models: the cache listing, downloads of exactly the files a run loads (with progress and cancel),
the `models` CLI and the worker's download/models requests — against a fake Hub on 127.0.0.1 serving
the tiny model's files, never the network."""

import hashlib
import io
import os
import subprocess
import sys
import threading
import time

import huggingface_hub
import pytest
from huggingface_hub import scan_cache_dir
from safetensors.torch import load_file, save_file

from fake_hub import PAUSE_LIMIT, FakeHub
from msd_core import cli
from msd_core.models import hub, loading
from msd_core.worker import protocol
from msd_core.worker.client import WorkerClient
from msd_core.errors import Cancelled, ModelNotFound, NetworkError, UnsupportedModelFile
from msd_core.models.hub import DownloadProgress, ProgressMeter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 120  # seconds: an upper bound for every wait, never an expectation
REPO = "test/tiny"
# Files a real Stable Diffusion repository also has and a download must never request.
DECOYS = {
    "unet/diffusion_pytorch_model.bin": b"pickle" * 10,
    "text_encoder/pytorch_model.bin": b"pickle" * 10,
    "vae/diffusion_pytorch_model.ckpt": b"pickle" * 10,
    "unet/diffusion_pytorch_model.non_ema.safetensors": b"other variant",
    "safety_checker/config.json": b"{}",
    "safety_checker/model.safetensors": b"not loaded",
    "feature_extractor/preprocessor_config.json": b"{}",
    "README.md": b"# tiny",
    "v1-inference.yaml": b"model: {}",
}
BIG = 25_000_000  # bytes: three of huggingface_hub's 10 MiB transfer chunks, so a cancel lands mid-file


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    folder = loading.tiny_model_dir()
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def fake_hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def online(monkeypatch):
    """This process may use the (fake) Hub: conftest.py made it offline for every other test."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def fp16_only(files: dict[str, bytes], tmp_path) -> dict[str, bytes]:
    """The tiny model with its weights only as the fp16 variant (real float16 safetensors)."""
    result = {}
    for name, data in files.items():
        if name.endswith(".safetensors"):
            source = tmp_path / "full.safetensors"
            source.write_bytes(data)
            half = tmp_path / "half.safetensors"
            save_file({key: value.half() for key, value in load_file(source).items()}, half)
            name = name.replace(".safetensors", ".fp16.safetensors")
            data = half.read_bytes()
        result[name] = data
    return result


def snapshot_bytes(folder) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# ------------------------------------------------------------------------------------- choosing files


def test_select_files_takes_configs_and_one_safetensors_variant_small_files_first():
    sizes = {
        "model_index.json": 5, "scheduler/scheduler_config.json": 5, "tokenizer/vocab.json": 50,
        "tokenizer/merges.txt": 40, "text_encoder/config.json": 5, "text_encoder/model.safetensors": 400,
        "text_encoder/model.fp16.safetensors": 200, "text_encoder/pytorch_model.bin": 400,
        "unet/config.json": 5, "unet/diffusion_pytorch_model.safetensors.index.json": 9,
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors": 900,
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors": 800,
        "unet/diffusion_pytorch_model.fp16.safetensors": 850, "unet/diffusion_pytorch_model.ema.safetensors": 1700,
        "vae/config.json": 5, "vae/diffusion_pytorch_model.safetensors": 300, "safety_checker/model.safetensors": 1,
    }  # fmt: skip
    full = hub.select_files(sizes, fp16=False)
    assert set(full) == {
        "model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
        "text_encoder/config.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json", "text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    }  # fmt: skip
    assert [sizes[name] for name in full[8:]] == [300, 400, 800, 900]  # configs first, then weights by size
    half = hub.select_files(sizes, fp16=True)
    # fp16 where the component has it; the VAE has only full-precision weights.
    assert [name for name in half if name.endswith(".safetensors")] == [
        "text_encoder/model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_select_files_refuses_pickle_only_weights_and_non_diffusers_repos():
    with pytest.raises(UnsupportedModelFile, match="unet has no safetensors weights"):
        hub.select_files(
            {f"{c}/config.json": 1 for c in hub.COMPONENTS}
            | {"text_encoder/model.safetensors": 9, "vae/w.safetensors": 9, "unet/diffusion_pytorch_model.bin": 9},
            False,
        )
    with pytest.raises(ModelNotFound, match="no scheduler, tokenizer, text_encoder, unet, vae folder"):
        hub.select_files({"config.json": 1, "model.safetensors": 9}, False)


def test_weights_variant_prefers_what_the_run_wants_and_falls_back_to_what_is_there(tmp_path):
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert hub.weights_variant(tmp_path, prefer_fp16=True) == "fp16"
    assert hub.weights_variant(tmp_path, prefer_fp16=False) is None
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    assert hub.weights_variant(tmp_path, prefer_fp16=False) == "fp16"


# ------------------------------------------------------------------------------------------ progress


def test_progress_meter_measures_speed_over_recent_transfer_and_counts_cached_files():
    now = [0.0]
    reports = []
    meter = ProgressMeter(total=1000, on_progress=reports.append, clock=lambda: now[0])
    meter.start_file("cached.json", 100)
    meter.finish_file()  # found on disk: counted, but no transfer
    meter.start_file("weights.safetensors", 900)
    for _ in range(4):
        now[0] += 1.0
        meter.advance(100)
    last = reports[-1]
    assert (last.done, last.total, last.file) == (500, 1000, "weights.safetensors")
    assert last.speed == pytest.approx(100.0)  # 300 bytes between the first and last sample, 3 s apart
    assert last.eta == pytest.approx(5.0)
    meter.finish_file()
    assert reports[-1].done == 1000 and reports[-1].eta == 0


def test_describe_progress_reads_like_a_download_dialog():
    progress = DownloadProgress(file="unet", done=1_234_000_000, total=2_600_000_000, speed=35_000_000, eta=40)
    assert hub.describe_progress(progress) == "1.2 GB / 2.6 GB · 35.0 MB/s · 40 s left"
    assert hub.format_bytes(999) == "999 B" and hub.format_bytes(1500) == "1.5 kB"
    assert hub.format_duration(3725) == "1 h 02 min"


# ---------------------------------------------------------------------------------------- downloading


def test_download_fetches_only_configs_and_safetensors_with_monotonic_progress(fake_hub, online, tiny_files, tmp_path):
    fake_hub.add_repo(REPO, {**tiny_files, **DECOYS})
    reports = []
    folder = hub.download(REPO, on_progress=reports.append, cache=tmp_path, endpoint=fake_hub.url)

    assert set(fake_hub.fetched(REPO)) == set(tiny_files)  # every decoy left alone
    assert snapshot_bytes(folder) == tiny_files
    done = [report.done for report in reports]
    assert done == sorted(done) and done[-1] == reports[-1].total == sum(map(len, tiny_files.values()))
    assert {report.file for report in reports} == set(tiny_files)
    status = hub.model_status(REPO, tmp_path)
    assert status.complete and status.missing == () and status.snapshot == str(folder)


def test_listing_shows_the_model_with_the_size_scan_cache_dir_reports(fake_hub, online, tiny_files, tmp_path):
    fake_hub.add_repo(REPO, tiny_files)
    fake_hub.add_repo("test/text-encoder-only", {"config.json": b"{}", "model.safetensors": b"x" * 100})
    hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    huggingface_hub.hf_hub_download("test/text-encoder-only", "model.safetensors", cache_dir=tmp_path, endpoint=fake_hub.url)

    listed = hub.list_models(tmp_path)
    assert [model.id for model in listed] == [REPO]  # the lone text encoder is no model we can load
    reference = {repo.repo_id: repo.size_on_disk for repo in scan_cache_dir(tmp_path).repos}
    assert listed[0].size_on_disk == reference[REPO] == sum(map(len, tiny_files.values()))
    assert listed[0].complete


def test_cancel_mid_file_stops_and_leaves_no_complete_snapshot_then_a_new_download_completes(
    fake_hub, online, tiny_files, tmp_path
):
    files = {**tiny_files, "unet/diffusion_pytorch_model.safetensors": os.urandom(BIG)}
    fake_hub.add_repo(REPO, files)
    cancel = threading.Event()
    reports = []

    def on_progress(progress):
        reports.append(progress)
        if progress.file.startswith("unet/diffusion") and 0 < progress.done < progress.total:
            cancel.set()  # the first chunk of the big file has arrived: the rest must not

    with pytest.raises(Cancelled):
        hub.download(REPO, on_progress=on_progress, cancel=cancel, cache=tmp_path, endpoint=fake_hub.url)
    assert reports[-1].done < reports[-1].total - 10_000_000  # stopped after the first chunk of 25 MB
    status = hub.model_status(REPO, tmp_path)
    assert not status.complete and status.missing == ("unet",)
    snapshots = tmp_path / hub.repo_folder(REPO) / "snapshots"
    assert not list(snapshots.glob("*/unet/diffusion_pytorch_model.safetensors"))

    folder = hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    assert snapshot_bytes(folder) == files
    assert hub.model_status(REPO, tmp_path).complete and hub.model_status(REPO, tmp_path).partial_bytes == 0


def test_offline_download_is_refused_before_any_request(fake_hub, tiny_files, tmp_path):
    fake_hub.add_repo(REPO, tiny_files)
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest.py
    with pytest.raises(NetworkError, match="HF_HUB_OFFLINE"):
        hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    assert fake_hub.requests == [] and hub.model_status(REPO, tmp_path) is None


@pytest.mark.parametrize(
    "repo_id, files, error, message",
    [
        ("test/missing", None, ModelNotFound, "test/missing was not found on the Hugging Face Hub"),
        ("test/pickles", {f"{c}/diffusion_pytorch_model.bin": b"x" for c in hub.COMPONENTS}, UnsupportedModelFile,
         "only pickle files"),
        ("not an id", None, hub.BadInput, "not a Hugging Face model id"),
    ],
)  # fmt: skip
def test_download_errors_are_specific_and_fetch_nothing(fake_hub, online, tmp_path, repo_id, files, error, message):
    if files:
        fake_hub.add_repo(repo_id, files)
    with pytest.raises(error, match=message):
        hub.download(repo_id, cache=tmp_path, endpoint=fake_hub.url)
    assert fake_hub.fetched(repo_id) == [] and hub.list_models(tmp_path) == []


def test_an_unreachable_hub_is_said_as_generate_says_it_after_one_probe(tmp_path):
    """`models download` with the network down: one line, the words generate uses, no errno, no retries."""
    result = run_cli("models", "download", REPO, "--dtype", "float32",
                     env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
    assert f"cannot download {REPO}: the Hub cannot be reached (127.0.0.1: Connection refused): " in result.stderr
    assert "check the internet connection, or give a local diffusers folder" in result.stderr
    assert "Errno" not in result.stderr


# -------------------------------------------------------------------------------------------------- CLI


def run_cli(*args, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "msd_core.cli", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=WAIT, env={**os.environ, **env},
    )  # fmt: skip


def hub_env(fake_hub, cache) -> dict:
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub.url, "HF_HUB_CACHE": str(cache)}


def test_cli_models_download_prints_progress_lines_then_list_shows_the_model(fake_hub, tiny_files, tmp_path):
    fake_hub.add_repo(REPO, {**tiny_files, **DECOYS})
    env = hub_env(fake_hub, tmp_path)
    result = run_cli("models", "download", REPO, "--dtype", "float32", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "\r" not in result.stdout  # not a terminal: plain lines
    assert lines[0].startswith("  0%") and lines[-2].startswith("100%  1.3 MB / 1.3 MB")
    assert lines[-1].startswith(f"downloaded {REPO} (1.3 MB) to {tmp_path}")
    assert set(fake_hub.fetched(REPO)) == set(tiny_files)

    listed = run_cli("models", "list", env=env)
    assert listed.returncode == 0
    assert listed.stdout.splitlines() == ["ID         FAMILY    SIZE  STATE", f"{REPO}  SD      1.3 MB  complete"]


def test_cli_download_errors_are_one_line_with_exit_2(fake_hub, tmp_path):
    offline = run_cli("models", "download", REPO, "--dtype", "float32", env={"HF_HUB_CACHE": str(tmp_path)})
    missing = run_cli("models", "download", "test/missing", "--dtype", "float32", env=hub_env(fake_hub, tmp_path))
    for result, words in ((offline, "HF_HUB_OFFLINE is set"), (missing, "test/missing was not found")):
        assert result.returncode == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and words in result.stderr


@pytest.mark.parametrize("columns", [200, 40])
def test_download_bar_on_a_terminal_rewrites_one_line_that_fits(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = cli.DownloadBar(stream)
    for done in (0, 500, 1000):
        bar.update(DownloadProgress(file="unet/w.safetensors", done=done, total=1000, speed=100.0, eta=(1000 - done) / 100))
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("\n")
    assert all(len(line) == columns - 1 for line in text.strip("\n").split("\r")[1:])
    expected = "[############------------]  50%  500 B / 1.0 kB · 100 B/s · 5 s left  unet/w.safetensors"
    assert expected[: columns - 1] in text


# ----------------------------------------------------------------------------------------------- worker


def next_matching(client, predicate, seen):
    while True:
        event = client.next_event(timeout=WAIT)
        assert event is not None, f"no matching event within {WAIT} s; saw {seen}; stderr: {client.stderr_lines}"
        seen.append(event)
        if predicate(event):
            return event


def test_worker_downloads_with_progress_lists_and_generates_offline_from_fp16_weights(fake_hub, tiny_files, tmp_path):
    fake_hub.add_repo(REPO, {**fp16_only(tiny_files, tmp_path), **DECOYS})
    env = {**hub_env(fake_hub, tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    settings = {"prompt": "a cove", "model": REPO, "width": 128, "height": 64, "steps": 2, "gradient": "fast",
                "device": "cpu", "dtype": "float32"}  # fmt: skip
    with WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=env) as client:
        early = client.generate(settings, tmp_path / "early.png")
        seen = []
        error = next_matching(client, lambda e: e["id"] == early and e["event"] in protocol.FINAL_EVENTS, seen)
        assert error["kind"] == "model_not_found" and f"{REPO} is not downloaded yet" in error["message"]
        assert [e["event"] for e in seen if e["id"] == early] == ["accepted", "error"]  # no "loading"

        request = client.download(REPO, device="cpu", dtype="float32")
        seen = []
        done = next_matching(client, lambda e: e["id"] == request and e["event"] in protocol.FINAL_EVENTS, seen)
        assert done["event"] == "done", done
        progress = [e for e in seen if e["event"] == "download"]
        assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
        assert progress[-1]["done"] == progress[-1]["total"] == done["size"]
        assert all(name.endswith(".fp16.safetensors") for name in fake_hub.fetched(REPO) if ".safetensors" in name)

        listing = client.list_models()
        event = next_matching(client, lambda e: e["id"] == listing, [])
        assert event["event"] == "models" and event["cache"] == str(tmp_path / "hf")
        assert [(m["id"], m["complete"], m["size_on_disk"]) for m in event["models"]] == [(REPO, True, done["size"])]

    # A new worker, offline: the run loads the fp16 weights (upcast to float32) from the cache alone.
    with WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=env, offline=True) as client:
        run = client.generate(settings, tmp_path / "pano.png")
        result = next_matching(client, lambda e: e["id"] == run and e["event"] in protocol.FINAL_EVENTS, [])
        assert result["event"] == "done", result
        assert (tmp_path / "pano.png").is_file()


def test_worker_cancels_a_download_mid_file(fake_hub, tiny_files, tmp_path):
    big = "unet/diffusion_pytorch_model.safetensors"
    fake_hub.add_repo(REPO, {**tiny_files, big: os.urandom(BIG)})
    fake_hub.pause_after(big, 12_000_000)  # one chunk arrives, then the transfer waits for release()
    env = {**hub_env(fake_hub, tmp_path), "OMP_NUM_THREADS": "1"}
    with WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=env) as client:
        request = client.download(REPO, device="cpu", dtype="float32")
        seen = []
        next_matching(client, lambda e: e["event"] == "download" and e["file"] == big and e["done"] > e["total"] - BIG, seen)
        client.cancel(request)
        threading.Timer(1.0, fake_hub.release).start()  # the rest flows once the cancel has surely arrived
        end = next_matching(client, lambda e: e["id"] == request and e["event"] in protocol.FINAL_EVENTS, seen)
    assert end["event"] == "error" and end["kind"] == "cancelled"
    status = hub.model_status(REPO, tmp_path)
    assert not status.complete and "unet" in status.missing


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({}, "'model' must be a Hugging Face model id"),
        ({"model": "../models/sd"}, "'model' must be a Hugging Face model id (owner/name), got '../models/sd'"),
        ({"model": REPO, "mirror": "x"}, "unknown field(s) in the download request: mirror"),
        ({"model": REPO, "dtype": "float8"}, "unknown dtype 'float8'"),
    ],
)
def test_download_requests_are_validated_before_anything_starts(fields, fragment):
    from msd_core.worker.process import parse_download

    with pytest.raises(hub.BadInput) as caught:
        parse_download({"op": "download", "id": 1, **fields})
    assert fragment in str(caught.value)


def test_a_download_request_for_float16_fetches_the_fp16_weights():
    from msd_core.worker.process import parse_download

    assert parse_download({"op": "download", "id": 1, "model": REPO, "device": "cpu", "dtype": "float32"}).fp16 is False
    # float16 is refused on the CPU (no kernels): it is what a GPU run in "auto" uses.
    with pytest.raises(hub.BadInput, match="float16 is not supported on the CPU"):
        parse_download({"op": "download", "id": 1, "model": REPO, "device": "cpu", "dtype": "float16"})


# ------------------------------------------------------------------------------- hostile Hub answers


@pytest.mark.parametrize(
    "headers",
    [
        {"ETag": '"../../../../escaped.pth"'},
        {"X-Linked-Etag": '"../../../../escaped.pth"'},
        {"X-Repo-Commit": "../../../../escaped"},
    ],
)
def test_an_etag_or_commit_that_is_not_a_plain_hash_is_refused_before_anything_is_written(
    fake_hub, online, tiny_files, tmp_path, headers
):
    fake_hub.add_repo(REPO, tiny_files)
    fake_hub.headers["model_index.json"] = headers
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(NetworkError, match="is not a plain hash"):
        hub.download(REPO, cache=cache, endpoint=fake_hub.url)
    assert fake_hub.fetched(REPO) == []  # refused after the HEAD, before any GET
    written = {path.name for path in tmp_path.rglob("*") if not path.is_dir()}
    assert not any("escaped" in name for name in written), written


def test_only_the_config_files_a_component_needs_are_fetched(fake_hub, online, tiny_files, tmp_path):
    clutter = {f"unet/extra-{number}.json": b"{}" for number in range(30)}
    clutter |= {"tokenizer/notes.txt": b"x", "text_encoder/training_args.json": b"{}", "scheduler/sub/config.json": b"{}"}
    fake_hub.add_repo(REPO, {**tiny_files, **clutter})
    hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    assert set(fake_hub.fetched(REPO)) == set(tiny_files)


@pytest.mark.parametrize(
    "sibling, fragment",
    [
        ({"rfilename": "unet/diffusion_pytorch_model.safetensors", "size": 60 * 10**9}, "larger than 50.0 GB"),
        ({"rfilename": "unet/config.json", "size": "12"}, "malformed"),
        ({"rfilename": 7, "size": 1}, "malformed"),
    ],
)
def test_a_malformed_or_oversized_model_info_is_a_clear_error(fake_hub, online, tiny_files, tmp_path, sibling, fragment):
    fake_hub.add_repo(REPO, tiny_files)
    fake_hub.siblings[REPO] = [{"rfilename": name, "size": len(data)} for name, data in tiny_files.items()] + [sibling]
    with pytest.raises(NetworkError, match=fragment):
        hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    assert fake_hub.fetched(REPO) == []


# (headers of model_index.json, an extra file in the model info, words of the error)
HOSTILE_ANSWERS = {
    "commit-with-dots": ({"X-Repo-Commit": "../../../../escaped"}, None, "is not a plain hash"),
    "etag-with-dots": ({"ETag": '"../../../../escaped.pth"'}, None, "is not a plain hash"),
    "file-over-50-GB": ({}, {"rfilename": "unet/diffusion_pytorch_model.safetensors", "size": 60 * 10**9}, "larger than 50.0 GB"),
    "size-not-a-number": ({}, {"rfilename": "unet/config.json", "size": "12"}, "malformed"),
    "name-not-text": ({}, {"rfilename": 7, "size": 1}, "malformed"),
}  # fmt: skip


def test_hostile_hub_answers_are_one_line_exit_2_in_the_cli_and_a_network_error_in_the_worker(fake_hub, tiny_files, tmp_path):
    env = hub_env(fake_hub, tmp_path / "hf")
    fake_hub.add_repo(REPO, tiny_files)
    honest = [{"rfilename": name, "size": len(data)} for name, data in tiny_files.items()]
    with WorkerClient(sys.executable, pythonpath=REPO_ROOT, env={**env, "OMP_NUM_THREADS": "1"}) as client:
        for case, (headers, sibling, words) in HOSTILE_ANSWERS.items():
            fake_hub.headers.clear()
            fake_hub.headers["model_index.json"] = headers
            fake_hub.siblings[REPO] = honest + ([sibling] if sibling else [])
            result = run_cli("models", "download", REPO, "--dtype", "float32", env=env)
            assert (result.returncode, len(result.stderr.splitlines())) == (2, 1), (case, result)  # stdout: progress
            assert result.stderr.startswith("msd-panorama: error: ") and words in result.stderr, (case, result.stderr)
            request = client.download(REPO, device="cpu", dtype="float32")
            end = next_matching(client, lambda e: e["id"] == request and e["event"] in protocol.FINAL_EVENTS, [])
            assert (end["event"], end["kind"]) == ("error", "network") and words in end["message"], (case, end)
            assert "\n" not in end["message"]
    assert not any("escaped" in path.name for path in tmp_path.rglob("*"))
    status = hub.model_status(REPO, tmp_path / "hf")
    assert status is None or not status.complete


def start_download(fake_hub, tmp_path, files, **options):
    """hub.download on a thread, paused by the fake Hub 1000 bytes into the big file; (thread, outcome)."""
    fake_hub.add_repo(REPO, files)
    fake_hub.pause_after("unet/diffusion_pytorch_model.safetensors", 1000)
    outcome = {}

    def run():
        try:
            outcome["folder"] = hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url, **options)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not any(method == "GET" and "unet/diffusion" in path for method, path, _ in fake_hub.requests):
        assert time.monotonic() < deadline and thread.is_alive(), outcome
        time.sleep(0.05)
    return thread, outcome


def test_cancel_stops_a_stalled_transfer_at_once(fake_hub, online, tiny_files, tmp_path):
    """The server sends 1000 bytes of the big file and then nothing until released (30 s at most): a
    cancel must end the download while the transfer is still stuck, not when the next chunk comes."""
    cancel = threading.Event()
    files = {**tiny_files, "unet/diffusion_pytorch_model.safetensors": os.urandom(BIG)}
    thread, outcome = start_download(fake_hub, tmp_path, files, cancel=cancel)
    cancel.set()
    thread.join(PAUSE_LIMIT / 3)  # far less than the pause: returning at all means it did not wait for data
    assert not thread.is_alive() and isinstance(outcome.get("error"), Cancelled), outcome
    assert not hub.model_status(REPO, tmp_path).complete
    fake_hub.release()


def test_a_stalled_transfer_is_a_network_error_after_the_stated_time(fake_hub, online, tiny_files, tmp_path):
    files = {**tiny_files, "unet/diffusion_pytorch_model.safetensors": os.urandom(BIG)}
    thread, outcome = start_download(fake_hub, tmp_path, files, stall_seconds=1.0)
    thread.join(PAUSE_LIMIT / 3)
    assert not thread.is_alive(), "a stall must end the download"
    error = outcome.get("error")
    assert isinstance(error, NetworkError) and "stalled: no data arrived for 1 s" in str(error), outcome
    fake_hub.release()


def test_a_file_that_does_not_match_its_hash_is_deleted_and_the_model_is_not_complete(
    fake_hub, online, tiny_files, tmp_path
):
    name = "unet/diffusion_pytorch_model.safetensors"
    fake_hub.add_repo(REPO, tiny_files)
    fake_hub.headers[name] = {"ETag": f'"{hashlib.sha256(b"other bytes").hexdigest()}"'}  # a corrupting proxy
    with pytest.raises(NetworkError, match=f"{name} of {REPO} arrived damaged"):
        hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)
    status = hub.model_status(REPO, tmp_path)
    assert not status.complete and "unet" in status.missing
    assert not list((tmp_path / hub.repo_folder(REPO) / "snapshots").glob(f"*/{name}"))
    del fake_hub.headers[name]
    assert snapshot_bytes(hub.download(REPO, cache=tmp_path, endpoint=fake_hub.url)) == tiny_files
