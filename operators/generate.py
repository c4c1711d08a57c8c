"""Generate a panorama in the worker process, without freezing Blender.

The logic is in plain functions, so scripts and tests drive it without a window:
``start_generation(context)`` sends the request, ``poll_worker(context)`` handles the events that
arrived since the last call (the operator calls it from a modal timer, or in a loop with wait=True).
The result is imported only when the worker reports "done"; until then the scene is untouched,
except for the live preview of a world run (see _show_preview_as_world), which a save never stores.

Datablocks are found again by session_uid, never by name: the user may rename anything mid-run,
and Python references to datablocks do not survive an undo.
"""

import os
import time
from dataclasses import dataclass
from typing import Callable

import bpy
from bpy.app.handlers import persistent
from bpy.props import BoolProperty
from bpy.types import Operator

from ..msd_core.models import hub
from ..msd_core.worker.client import WorkerClient
from ..msd_core.errors import BadInput, MSDError
from ..msd_core.settings import GenerationSettings, RefineSettings
from ..msd_core.variations import variation_path
from ..preferences import ADDON_DIR, get_preferences, output_folder, user_folder, worker_python
from ..properties import in_panel_terms, request_ranks, run_state, settings_from_scene
from .backdrop import add_backdrop
from .images import load_panorama
from .world import SOURCE_PROPERTY, apply_world, keep_if_unused

POLL_INTERVAL = 0.2  # seconds between timer polls in the UI
WAIT_INTERVAL = 0.05  # seconds between polls when blocking (wait=True, background)
PREVIEW_EVERY = 5  # steps between coarse previews
DEFAULT_SETTING_OF_KIND = {"model_not_found": "model"}  # what to set when the worker's error names no field
PREVIEW_PROPERTY = "msd_live_preview"  # on the live preview's world: the world it replaced (or 0), its fake user
# Datablocks a failed import may have created; removed again so a failure changes nothing.
_IMPORTED_KINDS = ("objects", "meshes", "materials", "node_groups", "worlds", "images")


@dataclass
class Job:
    """The run in progress and what to do with its result (as chosen when it was started)."""

    request_id: str
    settings: GenerationSettings
    output: str
    scene_uid: int
    scene_name: str  # for messages only
    target: str
    backdrop_shape: str
    world_strength: float
    world_rotation: float
    backdrop_strength: float
    world_before_uid: int | None = None  # the scene's own world (None: it had none)
    live_world: bool = False  # the previews are shown as the world (until the user picks another one)
    preview_world_uid: int | None = None  # the world showing them, while it does
    fake_user_before: bool = False  # the user's world's own fake-user flag, while we hold it
    cancel_requested: bool = False
    # Another kind of run (operators/variations.py) handles its events instead of handle_event.
    on_event: Callable[..., str | None] | None = None


class WorkerSession:
    """The one worker process of this Blender session and its current run."""

    def __init__(self):
        self.client: WorkerClient | None = None
        self.job: Job | None = None

    @property
    def busy(self) -> bool:
        return self.job is not None

    def client_for(self, python: str, offline: bool) -> WorkerClient:
        """The running worker if it matches, else a newly started one (raises WorkerStartError)."""
        client = self.client
        if client is not None and client.alive and (client.python, client.offline) == (python, offline):
            return client
        self.stop()
        run_state.status, run_state.message = "STARTING", "Starting the worker…"
        self.client = WorkerClient(python, pythonpath=ADDON_DIR, offline=offline).start()
        return self.client

    def stop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.stop()


session = WorkerSession()


def start_generation(
    context,
    settings: GenerationSettings | None = None,
    refine: RefineSettings | None = None,
    send: Callable[[WorkerClient, GenerationSettings], tuple[str, str]] | None = None,
) -> Job:
    """Validate the panel's settings (or use ``settings``) and send them to the worker, refining the
    image ``refine.source`` when given; raises MSDError with a clear message.

    ``send(client, settings) -> (request id, output)`` sends another kind of request instead of generate."""
    if session.busy:
        raise BadInput("a panorama is already being generated; wait for it or cancel it")
    prefs = get_preferences(context)
    scene = context.scene
    settings = settings or settings_from_scene(scene, prefs)
    hub.require_downloaded(settings.model)  # at once, rather than a long "Loading" that downloads unasked
    python = worker_python(prefs)
    if not python:
        raise BadInput(
            "the worker is not installed: click Install Worker in the Panorama panel, "
            "or set Worker Python in the add-on preferences"
        )
    run_state.last_error = run_state.last_error_kind = ""
    try:
        client = session.client_for(python, offline=not bpy.app.online_access)
    except MSDError:
        run_state.status = "ERROR"
        raise
    if send is None:
        output = unique_output_path(output_folder(prefs), settings.seed)
        request_id = client.generate(
            settings, output, preview_every=PREVIEW_EVERY, preview_dir=_empty_preview_folder(), refine=refine,
            threads=prefs.threads, ranks=request_ranks(prefs),
        )
    else:
        request_id, output = send(client, settings)
    group = scene.msd_panorama
    session.job = Job(
        request_id=request_id,
        settings=settings,
        output=output,
        scene_uid=scene.session_uid,
        scene_name=scene.name,
        target=group.target,
        backdrop_shape=group.backdrop_shape,
        world_strength=group.world_strength,
        world_rotation=group.world_rotation,
        backdrop_strength=group.backdrop_strength,
        world_before_uid=scene.world.session_uid if scene.world else None,
        live_world=group.target == "WORLD",
    )
    run_state.reset_progress()
    run_state.last_seed = settings.seed
    if client.ready_info is not None:
        run_state.status, run_state.message = "BUSY", "Waiting for the worker…"
    return session.job


def worker_status(prefs) -> str:
    """NOT_INSTALLED, STARTING, READY, BUSY or ERROR (the last run failed)."""
    if session.busy:
        return "STARTING" if run_state.status == "STARTING" else "BUSY"
    if not worker_python(prefs):
        return "NOT_INSTALLED"
    return "ERROR" if run_state.status == "ERROR" else "READY"


def unique_output_path(folder: str, seed: int, variations: int = 0) -> str:
    """A new file name in ``folder`` (created if needed) that no earlier run has used; with
    ``variations``, one whose draft files (``_v01``, …) are all free too, so two runs in the same second
    never clash (the panel has no overwrite option to offer)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"cannot create the output folder {folder!r}: {exc.strerror}") from None
    stem = f"msd_{time.strftime('%Y%m%d-%H%M%S')}_{seed}"
    path = os.path.join(folder, stem + ".png")
    number = 1
    while os.path.exists(path) or any(os.path.lexists(variation_path(path, index)) for index in range(variations)):
        number += 1
        path = os.path.join(folder, f"{stem}_{number}.png")
    return path


def poll_worker(context) -> str:
    """Handle the worker's new events: 'RUNNING', 'FINISHED' (result imported) or 'CANCELLED'
    (cancelled or failed; run_state.last_error says why when it failed)."""
    job = session.job
    if job is None:
        return 'CANCELLED'
    handle = job.on_event or handle_event
    for event in session.client.poll():
        outcome = handle(context, job, event)
        if outcome is not None:
            _end_run(context, failed=outcome != 'FINISHED')
            return outcome
    return 'RUNNING'


def wait_for_run(context) -> str:
    """Block until the run ends (scripts, background mode); Ctrl+C cancels it."""
    while True:
        try:
            outcome = poll_worker(context)
            if outcome != 'RUNNING':
                return outcome
            time.sleep(WAIT_INTERVAL)
        except KeyboardInterrupt:
            cancel_generation()


def cancel_generation() -> bool:
    """Ask the worker to stop the current run; poll_worker then reports 'CANCELLED'."""
    job = session.job
    if job is None or job.cancel_requested:
        return False
    job.cancel_requested = True
    session.client.cancel(job.request_id)
    run_state.message = "Cancelling…"
    return True


def handle_event(context, job: Job, event: dict) -> str | None:
    """What an event means for the run: an outcome when it ended it, else None."""
    name = event.get("event")
    if event.get("id") not in (job.request_id, None):
        return None  # a late event of an earlier, cancelled run
    if name == "ready":
        run_state.status, run_state.message = "BUSY", f"Worker ready ({event.get('device')})"
    elif name == "loading":
        run_state.status = "BUSY"
        run_state.message = "Model loaded" if event.get("warm") else f"Loading {event.get('model')}…"
    elif name == "progress":
        run_state.message = "Generating"
        run_state.step, run_state.total = event["step"], event["total"]
        run_state.level, run_state.levels = event["level"], event["levels"]
        run_state.eta = event.get("eta")
        run_state.ms_per_window = event.get("ms_per_window") or run_state.ms_per_window
        run_state.progress = event["step"] / max(1, event["total"])
    elif name == "preview":
        _show_preview(event["path"])
        _show_preview_as_world(context, job)
    elif name == "done":
        if job.cancel_requested:
            return 'CANCELLED'  # finished just before the cancel arrived: the user no longer wants it
        return _import_result(context, job, event["output"])
    elif name == "error":
        if event.get("kind") == "cancelled":
            return 'CANCELLED'
        if event.get("kind") == "died":
            session.client = None  # the process is gone; the next run starts a new one
        message = event.get("message") or "the worker failed without a message"
        fallback = DEFAULT_SETTING_OF_KIND.get(event.get("kind"))
        run_state.last_error = in_panel_terms(message, event.get("field"), fallback)
        run_state.last_error_kind = event.get("kind", "internal")
        return 'CANCELLED'
    return None


def _import_result(context, job: Job, output: str) -> str:
    """Load the panorama and use it as chosen; on any failure remove what was added and report it."""
    _end_live_preview(job)
    scene = find_by_uid(bpy.data.scenes, job.scene_uid)
    before = _datablock_pointers()
    previous_world = scene.world if scene else None
    kept_before = previous_world.use_fake_user if previous_world else False
    try:
        image = load_panorama(output)
        if scene is None:
            run_state.last_error = (
                f"the scene {job.scene_name!r} was deleted during the run: the panorama is loaded as image {image.name!r} only"
            )
        elif job.target in {"WORLD", "BACKDROP"}:
            with context.temp_override(scene=scene):
                if job.target == "WORLD":
                    apply_world(bpy.context, image, strength=job.world_strength, rotation=job.world_rotation)
                else:
                    add_backdrop(bpy.context, image, shape=job.backdrop_shape, strength=job.backdrop_strength)
    except Exception as exc:  # whatever failed (Blender or our import code), leave the scene as it was
        if scene is not None:
            scene.world = previous_world
        if previous_world is not None:
            previous_world.use_fake_user = kept_before
        _remove_new_datablocks(before)
        run_state.last_error = f"the panorama was saved to {output} but could not be imported: {exc}"
        run_state.last_error_kind = "internal"
        return 'CANCELLED'
    run_state.last_output, run_state.last_image = output, image.name
    return 'FINISHED'


def _end_run(context, failed: bool) -> None:
    _end_live_preview(session.job)
    session.job = None
    _remove_preview()
    run_state.reset_progress()
    if failed and run_state.last_error:
        run_state.status, run_state.message = "ERROR", ""
    else:
        run_state.status, run_state.message = "READY", ""
    if session.client is not None and not get_preferences(context).keep_worker_warm:
        session.stop()


def _datablock_pointers() -> dict[str, set[int]]:
    return {kind: {block.as_pointer() for block in getattr(bpy.data, kind)} for kind in _IMPORTED_KINDS}


def _remove_new_datablocks(before: dict[str, set[int]]) -> None:
    new = [
        block for kind in _IMPORTED_KINDS for block in getattr(bpy.data, kind) if block.as_pointer() not in before[kind]
    ]
    bpy.data.batch_remove(new)


def _empty_preview_folder() -> str:
    folder = user_folder("previews")
    for name in os.listdir(folder):
        if name.endswith(".png"):
            os.remove(os.path.join(folder, name))
    return folder


def find_by_uid(collection, uid: int | None):
    """The datablock of ``collection`` (e.g. bpy.data.worlds) with this session_uid, if it still exists."""
    return None if uid is None else next((block for block in collection if block.session_uid == uid), None)


def preview_image() -> bpy.types.Image | None:
    """The image showing the run's latest coarse preview, if any."""
    return find_by_uid(bpy.data.images, run_state.preview_image_uid)


def _show_preview(path: str) -> None:
    """Show the latest coarse preview in one reused image datablock (never saved: see _before_save)."""
    image = preview_image()
    try:
        if image is None:
            image = bpy.data.images.load(path, check_existing=False)
            image.name = "MSD Preview"
        else:
            image.filepath = path
            image.reload()
    except RuntimeError:
        return  # a preview that cannot be read is skipped; the next one will do
    run_state.preview_image_uid = image.session_uid
    if image.preview is not None:
        image.preview.reload()


def _show_preview_as_world(context, job: Job) -> None:
    """Let the viewport show the layout forming: the preview becomes the scene's world.

    The user's world keeps a fake user meanwhile, so it never drops to 0 users (a purge or a save
    would lose it); _end_live_preview gives it back. If the user picks another world mid-run, or
    removes ours, their choice stands and the previews stop being shown as the world.
    """
    scene = find_by_uid(bpy.data.scenes, job.scene_uid)
    image = preview_image()
    if not job.live_world or scene is None or image is None:
        return
    preview_world = find_by_uid(bpy.data.worlds, job.preview_world_uid)
    shown = scene.world.session_uid if scene.world else None
    if preview_world is None and shown == job.world_before_uid:  # first preview (or an undo took ours away)
        user_world = scene.world
        if user_world is not None:
            job.fake_user_before = user_world.use_fake_user
            user_world.use_fake_user = True
    elif preview_world is None or scene.world != preview_world:
        _end_live_preview(job)
        job.live_world = False
        return
    with context.temp_override(scene=scene):
        world = apply_world(bpy.context, image, strength=job.world_strength, rotation=job.world_rotation, world=preview_world)
    # What _recover_previews needs after an autosave or an undo; the reference is a second user too.
    world[PREVIEW_PROPERTY] = {
        "world": find_by_uid(bpy.data.worlds, job.world_before_uid) or 0,
        "fake_user": job.fake_user_before,
    }
    job.preview_world_uid = world.session_uid


def _end_live_preview(job: Job | None) -> None:
    """Give the scene its own world back (unless the user chose another one) and remove the preview's."""
    if job is None or job.preview_world_uid is None:
        return
    preview_world = find_by_uid(bpy.data.worlds, job.preview_world_uid)
    user_world = find_by_uid(bpy.data.worlds, job.world_before_uid)
    scene = find_by_uid(bpy.data.scenes, job.scene_uid)
    if scene is not None and (scene.world is None or scene.world == preview_world):
        scene.world = user_world
    if preview_world is not None:
        bpy.data.worlds.remove(preview_world)
    if user_world is not None:
        user_world.use_fake_user = job.fake_user_before
        keep_if_unused(user_world)  # the user may have shown another world meanwhile
    job.preview_world_uid = None


def _remove_preview() -> None:
    image = preview_image()
    if image is not None:
        bpy.data.images.remove(image)
    run_state.preview_image_uid = None


def redraw_panels(context) -> None:
    for window in context.window_manager.windows:
        for area in window.screen.areas:
            if area.type in {'VIEW_3D', 'PREFERENCES'}:
                area.tag_redraw()


@persistent
def _forget_run_on_load(*_args) -> None:
    """Another file replaces the scene the run was for: cancel it (the worker stays)."""
    if session.busy:
        cancel_generation()
        session.job = None
        run_state.preview_image_uid = None  # the datablocks went with the old file
        run_state.reset_progress()
        run_state.status, run_state.message = "READY", ""


@persistent
def _before_save(*_args) -> None:
    """A save mid-run stores the user's world, assigned as before, and nothing of the live preview."""
    _end_live_preview(session.job)


@persistent
def _after_save(*_args) -> None:
    if session.job is not None:
        _show_preview_as_world(bpy.context, session.job)


@persistent
def _recover_previews(*_args) -> None:
    """Undo, redo, or opening a file saved without our save handlers (an autosave, a crash's
    quit.blend) can bring back a live preview's world without its run: give each scene showing it
    the world it replaced, and remove it."""
    live = session.job.preview_world_uid if session.job else None
    for world in [world for world in bpy.data.worlds if PREVIEW_PROPERTY in world and world.session_uid != live]:
        user_world, fake_user = world[PREVIEW_PROPERTY]["world"] or None, bool(world[PREVIEW_PROPERTY]["fake_user"])
        image = world.get(SOURCE_PROPERTY)
        for scene in bpy.data.scenes:
            if scene.world == world:
                scene.world = user_world
        bpy.data.worlds.remove(world)
        if user_world is not None:
            user_world.use_fake_user = fake_user
            keep_if_unused(user_world)
        if image is not None and image.users == 0 and image.session_uid != run_state.preview_image_uid:
            bpy.data.images.remove(image)  # the preview image that came back with it


_HANDLERS = (
    (bpy.app.handlers.load_pre, _forget_run_on_load),
    (bpy.app.handlers.load_post, _recover_previews),
    (bpy.app.handlers.undo_post, _recover_previews),
    (bpy.app.handlers.redo_post, _recover_previews),
    (bpy.app.handlers.save_pre, _before_save),
    (bpy.app.handlers.save_post, _after_save),
)


class WorkerRunOperator:
    """Mix-in for operators that run a request in the worker: ``start(context)`` sends it; execute then
    waits for it (wait=True, background) or polls it from a modal timer, Esc cancelling. Subclasses
    override start and finished_message."""

    wait: BoolProperty(
        name="Wait",
        description="Block until the panorama is done (for scripts; always so in background mode)",
        options={'SKIP_SAVE'},
    )

    @classmethod
    def poll(cls, context):
        if session.busy:
            cls.poll_message_set("A panorama is being generated")
            return False
        return True

    def start(self, context) -> Job:
        """Send the run to the worker; raises MSDError (operators for other kinds of run override it)."""
        return start_generation(context)

    def execute(self, context):
        try:
            self.start(context)
        except MSDError as exc:
            run_state.last_error = in_panel_terms(str(exc), getattr(exc, "field", None))
            run_state.last_error_kind = exc.kind
            return self._finish('CANCELLED')
        except KeyboardInterrupt:  # Ctrl+C while a script's run starts: cancelled as during the wait, no traceback
            if session.job is None:  # nothing was sent
                run_state.message = ""
                return self._finish('CANCELLED')
            cancel_generation()
            return self._finish(wait_for_run(context))
        if self.wait or bpy.app.background or context.window is None:
            return self._finish(wait_for_run(context))
        wm = context.window_manager
        self._timer = wm.event_timer_add(POLL_INTERVAL, window=context.window)
        wm.modal_handler_add(self)
        return {'RUNNING_MODAL'}

    def modal(self, context, event):
        if event.type == 'ESC' and event.value == 'PRESS':
            cancel_generation()
            return {'RUNNING_MODAL'}
        if event.type != 'TIMER':
            return {'PASS_THROUGH'}
        outcome = poll_worker(context)
        redraw_panels(context)
        if outcome == 'RUNNING':
            return {'PASS_THROUGH'}
        context.window_manager.event_timer_remove(self._timer)
        return self._finish(outcome)

    def finished_message(self) -> str:
        return f"Panorama saved to {run_state.last_output}"

    def _finish(self, outcome: str) -> set:
        if outcome == 'FINISHED':
            self.report({'INFO'}, self.finished_message())
            return {'FINISHED'}
        if run_state.last_error:
            self.report({'ERROR'}, run_state.last_error)
        else:
            self.report({'WARNING'}, "Generation cancelled")
        return {'CANCELLED'}


class MSD_OT_generate(WorkerRunOperator, Operator):
    """Generate a panorama from the prompt in a background process"""

    bl_idname = "msd.generate"
    bl_label = "Generate Panorama"
    bl_options = {'UNDO'}


class MSD_OT_cancel(Operator):
    """Stop the panorama being generated (Esc does the same)"""

    bl_idname = "msd.cancel"
    bl_label = "Cancel"

    @classmethod
    def poll(cls, context):
        return session.busy and not session.job.cancel_requested

    def execute(self, context):
        cancel_generation()
        return {'FINISHED'}


classes = (MSD_OT_generate, MSD_OT_cancel)


def register():
    for handlers, handler in _HANDLERS:
        handlers.append(handler)


def unregister():
    for handlers, handler in _HANDLERS:
        if handler in handlers:
            handlers.remove(handler)
    session.job = None
    session.stop()
