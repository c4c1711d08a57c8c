"""Models in Blender: Download Model through a real worker process (this Python) from a fake Hub on
127.0.0.1, its progress in the panel and Cancel, the refusal without online access, the cached-model
list in the preferences, and a Generate with a model that is not downloaded."""

import json
import sys
import threading
import time

import bpy
import pytest

from blender_env import MODULE, addon_preferences, blender, extension  # noqa: F401  (fixtures)
from fake_hub import FakeHub
from msd_core.models import loading
from test_extension import CheckingLayout, draw

REPO = "test/tiny"
POLL_TIMEOUT = 120.0  # seconds: an upper bound, never an expectation
BIG = 25_000_000  # bytes: a download of it is reliably still running when the test acts


def models_op():
    return sys.modules[f"{MODULE}.operators.models"]


@pytest.fixture
def addon(extension, tmp_path, monkeypatch):
    """The add-on with this Python as the worker and the Hugging Face cache in tmp_path/hf."""
    prefs = addon_preferences()
    prefs.worker_python = sys.executable
    prefs.device, prefs.precision = "cpu", "float32"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    state = models_op().download_state
    state.message, state.failed = "", False
    models_op()._listing["time"] = -1.0
    yield extension
    if state.busy:
        models_op().cancel_download()
        poll_until_done()
    prefs.model = "tiny"


@pytest.fixture
def fake_hub(monkeypatch):
    with FakeHub() as server:
        server.add_folder(REPO, loading.tiny_model_dir(), {"unet/diffusion_pytorch_model.bin": b"pickle"})
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the worker may go online; this process still does not
        yield server


@pytest.fixture
def online(monkeypatch):
    """Blender's Allow Online Access, on (headless Blender has it off and read-only)."""
    monkeypatch.setattr(models_op(), "online_access_allowed", lambda: True)


def poll_until_done(on_poll=None) -> str:
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        outcome = models_op().poll_download()
        if on_poll is not None:
            on_poll()
        if outcome != "RUNNING":
            return outcome
        time.sleep(0.02)
    raise AssertionError("the download did not end in time")


def draw_preferences() -> list:
    log = []
    prefs = addon_preferences()

    class Preferences:  # the real preferences, drawn into a checking layout
        layout = CheckingLayout(log)

        def __getattr__(self, name):
            return getattr(prefs, name)

    type(prefs).draw(Preferences(), bpy.context)
    return log


def test_download_is_refused_when_online_access_is_off(addon, fake_hub):
    assert not bpy.app.online_access  # headless Blender's default
    addon_preferences().model = REPO
    with pytest.raises(RuntimeError, match=r"online access is off: allow it in Preferences › System › Network"):
        bpy.ops.msd.download_model()
    assert not models_op().download_state.busy and fake_hub.requests == []


def test_download_model_shows_progress_then_the_model_is_listed_with_its_size(addon, fake_hub, online):
    addon_preferences().model = REPO
    panel = draw("MSD_PT_panorama")
    assert ("label", f"{REPO} is not downloaded yet (a Stable") in panel and ("operator", "msd.download_model") in panel

    state = models_op().download_state
    fake_hub.pause_after("unet/diffusion_pytorch_model.safetensors", 1000)
    models_op().start_download(bpy.context)
    fractions, drawn = [], []

    def watch():
        if state.busy:
            fractions.append(state.progress)
        if state.busy and state.file == "unet/diffusion_pytorch_model.safetensors" and not drawn:
            drawn.append(draw("MSD_PT_panorama"))  # while the transfer is held in the middle of that file
            fake_hub.release()

    assert poll_until_done(watch) == "FINISHED", state.message
    assert fractions == sorted(fractions) and any(0 < f < 1 for f in fractions)
    (during,) = drawn
    progress = next(text for kind, text in during if kind == "progress")
    assert " / 1.3 MB" in progress
    assert ("operator", "msd.cancel_download") in during and ("operator", "msd.generate") in during
    assert state.message == f"Downloaded {REPO} (1.3 MB)" and not state.busy
    assert "unet/diffusion_pytorch_model.bin" not in fake_hub.fetched(REPO)

    panel = draw("MSD_PT_panorama")
    assert ("operator", "msd.download_model") not in panel and ("label", state.message) in panel
    preferences = draw_preferences()
    assert ("label", f"{REPO} (SD)") in preferences and ("label", "1.3 MB") in preferences and ("label", "In use") in preferences


def test_cancel_stops_the_download_and_the_model_still_needs_one(addon, fake_hub, online):
    big = "unet/diffusion_pytorch_model.safetensors"
    fake_hub.repos[REPO][big] = bytes(BIG)
    fake_hub.pause_after(big, 12_000_000)
    addon_preferences().model = REPO
    state = models_op().download_state
    models_op().start_download(bpy.context)

    def cancel_in_the_big_file():
        if state.busy and state.file == big and not state.cancel_requested:
            assert bpy.ops.msd.cancel_download() == {"FINISHED"}
            threading.Timer(1.0, fake_hub.release).start()

    assert poll_until_done(cancel_in_the_big_file) == "CANCELLED"
    assert state.message == "Download cancelled" and not state.failed
    assert models_op().needs_download(REPO)
    assert ("operator", "msd.download_model") in draw("MSD_PT_panorama")


@pytest.mark.parametrize("headers", [{"X-Repo-Commit": "../../../../escaped"}, {"ETag": '"../../escaped.pth"'}])
def test_a_hostile_hub_answer_is_an_error_report_and_the_model_still_needs_a_download(addon, fake_hub, online, headers):
    fake_hub.headers["model_index.json"] = headers
    addon_preferences().model = REPO
    with pytest.raises(RuntimeError, match="is not a plain hash"):  # the operator's error report
        bpy.ops.msd.download_model(wait=True)
    state = models_op().download_state
    assert state.failed and not state.busy and models_op().needs_download(REPO)
    assert fake_hub.fetched(REPO) == []


def test_generate_with_a_model_that_is_not_downloaded_says_so_at_once(addon):
    addon_preferences().model = "test/not-here"
    bpy.context.scene.msd_panorama.prompt = "a quiet harbour at dusk"
    generate = sys.modules[f"{MODULE}.operators.generate"]
    with pytest.raises(RuntimeError, match="model test/not-here is not downloaded yet: download it first"):
        bpy.ops.msd.generate()
    assert not generate.session.busy  # nothing started
    panel = draw("MSD_PT_panorama")
    assert ("operator", "msd.download_model") in panel
    assert any(kind == "label" and "not downloaded" in text for kind, text in panel)


def test_a_slow_cache_listing_never_runs_on_a_redraw(addon, monkeypatch):
    """Redraws after the first listing draw the last one; a new listing is made on a thread of its own,
    so a cache that takes seconds to list (a 232 MB shard index) never freezes the panel."""
    listed = models_op().cached_models()
    release = threading.Event()

    def slow_listing(cache=None):
        release.wait(30)
        return []

    monkeypatch.setattr(models_op().hub, "list_models", slow_listing)
    models_op()._listing["time"] -= 2 * models_op().CACHE_LIST_SECONDS  # the listing is old
    redraw = threading.Thread(target=lambda: [models_op().cached_models() for _ in range(3)], daemon=True)
    redraw.start()
    redraw.join(10)  # far less than the listing takes
    alive = redraw.is_alive()
    release.set()
    assert not alive, "a redraw waited for the listing"
    assert models_op().cached_models() == listed


def test_a_cache_index_that_is_huge_or_a_device_is_not_read(tmp_path, monkeypatch):
    from msd_core.models import hub

    unet = tmp_path / "models--x--y" / "snapshots" / ("a" * 40) / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model-00001-of-00001.safetensors").write_bytes(b"")
    index = {"weight_map": {"w": "diffusion_pytorch_model-00001-of-00001.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index) + " " * 4096)
    assert hub._has_weights(unet)
    monkeypatch.setattr(hub, "MAX_INDEX_BYTES", 1024)  # the index is now too large to be a real one
    assert not hub._has_weights(unet)
    monkeypatch.undo()
    (unet / "diffusion_pytorch_model.safetensors.index.json").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").symlink_to("/dev/zero")  # read without bound before
    assert not hub._has_weights(unet)
    assert [model.missing for model in hub.list_models(tmp_path)] == [tuple(c for c in hub.COMPONENTS)]
