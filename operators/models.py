"""Models: download a Hugging Face model through a worker process, with progress and Cancel, and list
what the local cache holds.

A download runs in its own worker process (its events never mix with a generation's, and a panorama
can be generated with another model meanwhile). As for generating, the logic is in plain functions:
``start_download(context, model)`` sends the request, ``poll_download()`` handles the events that
arrived since the last call (the operator calls it from a modal timer, or in a loop when blocking).
The cache is read directly (msd_core.models.hub is pure path logic), so the list needs no worker.
"""

import threading
import time
from dataclasses import dataclass

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy.types import Operator

from ..msd_core.models import hub
from ..msd_core.worker.client import WorkerClient
from ..msd_core.errors import BadInput, MSDError
from ..preferences import ADDON_DIR, get_preferences, worker_python
from ..properties import settings_device
from .generate import POLL_INTERVAL, WAIT_INTERVAL, redraw_panels

CACHE_LIST_SECONDS = 2.0  # how long a listing of the cache is reused by the UI's redraws


@dataclass
class DownloadState:
    """The download in progress (or the last one's outcome), for the panel: in memory only."""

    model: str = ""
    request_id: str = ""
    client: WorkerClient | None = None
    progress: float = 0.0  # 0..1
    text: str = ""  # bytes, speed and time left, in words
    file: str = ""
    message: str = ""  # the outcome of the last download
    failed: bool = False
    cancel_requested: bool = False

    @property
    def busy(self) -> bool:
        return self.client is not None

    def begin(self, model: str, request_id: str, client: WorkerClient) -> None:
        self.model, self.request_id, self.client = model, request_id, client
        self.message, self.failed, self.cancel_requested = "", False, False
        self.progress, self.text, self.file = 0.0, "Starting the worker…", ""


download_state = DownloadState()
# The last listing of the cache; time < 0: none yet, or the cache changed through us (list it now).
_listing: dict = {"time": -1.0, "models": [], "refreshing": False, "generation": 0}


def online_access_allowed() -> bool:
    """Blender's Allow Online Access (Preferences › System › Network), or --online-mode."""
    return bpy.app.online_access


def cached_models() -> list:
    """The models in the Hugging Face cache (hub.CachedModel). Panels call this on every redraw: the
    listing is made at once only when there is none or the cache changed through us (a download);
    after CACHE_LIST_SECONDS it is made again on a thread of its own, the panel drawing the last one."""
    now = time.monotonic()
    if _listing["time"] < 0:
        _listing["generation"] += 1
        _listing["models"], _listing["time"] = hub.list_models(), now
    elif now - _listing["time"] > CACHE_LIST_SECONDS and not _listing["refreshing"]:
        _listing["refreshing"] = True
        threading.Thread(target=_refresh_listing, args=(_listing["generation"],), daemon=True).start()
    return _listing["models"]


def _refresh_listing(generation: int) -> None:
    """Make the listing off Blender's UI thread (hub.list_models is file I/O only, no bpy)."""
    try:
        models = hub.list_models()
    except Exception:  # an odd cache must not end the panel's listing: keep the last one
        models = None
    outdated = generation != _listing["generation"] or _listing["time"] < 0  # a download changed the cache since
    if not outdated:
        if models is not None:
            _listing["models"] = models
        _listing["time"] = time.monotonic()
    _listing["refreshing"] = False


def needs_download(model: str) -> bool:
    """A Hugging Face id whose files are not (all) in the cache; paths and built-in models never do."""
    if not hub.is_hub_id(model):
        return False
    return not any(cached.id == model and cached.complete for cached in cached_models())


def start_download(context, model: str = "") -> str:
    """Start downloading ``model`` (default: the preferences' model); raises MSDError saying why not."""
    if download_state.busy:
        raise BadInput(f"{download_state.model} is being downloaded; wait for it or cancel it")
    if not online_access_allowed():
        raise BadInput(
            "online access is off: allow it in Preferences › System › Network (Allow Online Access) to download "
            "models, or download with `msd-panorama models download` in a shell"
        )
    prefs = get_preferences(context)
    model = model or prefs.model
    if not hub.REPO_ID.match(model):
        raise BadInput(f"{model!r} is not a Hugging Face model id (owner/name); only those can be downloaded")
    python = worker_python(prefs)
    if not python:
        raise BadInput("the worker is not installed: click Install Worker first (it also does the downloads)")
    client = WorkerClient(python, pythonpath=ADDON_DIR, offline=False, env=hub.DOWNLOAD_ENV).start()
    request_id = client.download(model, device=settings_device(prefs), dtype=prefs.precision)
    download_state.begin(model, request_id, client)
    return request_id


def poll_download() -> str:
    """Handle the download's new events: 'RUNNING', 'FINISHED' or 'CANCELLED' (cancelled or failed;
    download_state.message says why when it failed)."""
    state = download_state
    if state.client is None:
        return 'CANCELLED'
    for event in state.client.poll():
        if event.get("id") != state.request_id:
            continue  # "ready", or an answer to nothing we asked
        name = event.get("event")
        if name == "download":
            progress = hub.DownloadProgress(**{key: event[key] for key in ("file", "done", "total", "speed", "eta")})
            state.progress = progress.done / progress.total if progress.total else 0.0
            state.text, state.file = hub.describe_progress(progress), progress.file
        elif name == "done":
            return _end_download('FINISHED', f"Downloaded {state.model} ({hub.format_bytes(event['size'])})")
        elif name == "error" and event.get("kind") == "cancelled":
            return _end_download('CANCELLED', "Download cancelled")
        elif name == "error":
            return _end_download('CANCELLED', event.get("message") or "the download failed", failed=True)
    return 'RUNNING'


def wait_for_download() -> str:
    """Block until the download ends (scripts, background mode); Ctrl+C cancels it."""
    while True:
        try:
            outcome = poll_download()
            if outcome != 'RUNNING':
                return outcome
            time.sleep(WAIT_INTERVAL)
        except KeyboardInterrupt:
            cancel_download()


def cancel_download() -> bool:
    state = download_state
    if not state.busy or state.cancel_requested:
        return False
    state.cancel_requested = True
    state.client.cancel(state.request_id)
    state.text = "Cancelling…"
    return True


def _end_download(outcome: str, message: str, failed: bool = False) -> str:
    state = download_state
    client, state.client = state.client, None
    client.stop()
    state.message, state.failed = message, failed
    state.progress, state.text, state.file = 0.0, "", ""
    _listing["time"] = -1.0  # the cache changed
    return outcome


class MSD_OT_download_model(Operator):
    """Download the model from the Hugging Face Hub into the local cache (only the files a run loads)"""

    bl_idname = "msd.download_model"
    bl_label = "Download Model"

    model: StringProperty(
        name="Model",
        description="Hugging Face id to download; empty: the model chosen in the preferences",
        options={'SKIP_SAVE'},
    )
    wait: BoolProperty(
        name="Wait",
        description="Block until the download is done (for scripts; always so in background mode)",
        options={'SKIP_SAVE'},
    )

    @classmethod
    def poll(cls, context):
        if download_state.busy:
            cls.poll_message_set("A model is being downloaded")
            return False
        return True

    def execute(self, context):
        try:
            start_download(context, self.model)
        except MSDError as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        if self.wait or bpy.app.background or context.window is None:
            return self._finish(wait_for_download())
        wm = context.window_manager
        self._timer = wm.event_timer_add(POLL_INTERVAL, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        if event.type != 'TIMER':
            return {'PASS_THROUGH'}
        outcome = poll_download()
        redraw_panels(context)
        if outcome == 'RUNNING':
            return {'PASS_THROUGH'}
        context.window_manager.event_timer_remove(self._timer)
        return self._finish(outcome)

    def _finish(self, outcome: str) -> set:
        level = 'INFO' if outcome == 'FINISHED' else 'ERROR' if download_state.failed else 'WARNING'
        self.report({level}, download_state.message)
        return {'FINISHED'} if outcome == 'FINISHED' else {'CANCELLED'}


class MSD_OT_cancel_download(Operator):
    """Stop the model download (what was fetched of the current file is discarded)"""

    bl_idname = "msd.cancel_download"
    bl_label = "Cancel Download"

    @classmethod
    def poll(cls, context):
        return download_state.busy and not download_state.cancel_requested

    def execute(self, context):
        cancel_download()
        return {'FINISHED'}


class MSD_OT_use_model(Operator):
    """Generate with this model"""

    bl_idname = "msd.use_model"
    bl_label = "Use Model"

    model: StringProperty(name="Model", options={'SKIP_SAVE'})

    def execute(self, context):
        get_preferences(context).model = self.model
        return {'FINISHED'}


classes = (MSD_OT_download_model, MSD_OT_cancel_download, MSD_OT_use_model)


def unregister():
    if download_state.busy:
        client, download_state.client = download_state.client, None
        client.stop()
