"""History: the panoramas of this .blend and of the output folder, with what to do with each.

``list_panoramas`` makes the listing (tests call it directly): the .blend's images that carry our
settings (operators/images.py stores them on the image) and the output folder's PNG files that carry
them (read with msd_core.imageio.pngmeta, no pixels), newest first, at most MAX_ENTRIES, reading at most
MAX_FILES_READ files; long texts are cut to SHOWN_PROMPT_CHARS. The panel draws a cached listing
(``cached_history``): the folder is scanned again on a thread of its own (``scan_folder`` reads files
only, no bpy) when its modification time or the set of our images changes, or on Refresh, and a
timer (``poll_history_scan``, a plain function) redraws the panels when the scan has ended: a redraw
reads no file. ``history_buttons`` says which operator each button runs, with which arguments. Drafts
(the output folder's "drafts" folder, see variations.py) are not listed unless used in this .blend.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import bpy
import bpy.utils.previews
from bpy.types import Operator

from ..msd_core.imageio import pngmeta
from ..preferences import get_preferences, output_folder
from .generate import redraw_panels
from .images import METADATA_PROPERTY, absolute_path, metadata_of

MAX_ENTRIES = 50
# Newest PNG files of the output folder whose text chunks one scan reads: only the chunks before the
# pixels, where our writer puts them, so a foreign PNG costs a few small reads.
MAX_FILES_READ = 2000
SHOWN_PROMPT_CHARS = 300  # of a prompt in the panel (a file may hold a 1 MB one)
SCAN_POLL_INTERVAL = 0.2  # seconds between looks at a folder scan under way (to redraw once it ends)
SCRIPT_WAIT = 60.0  # seconds Refresh waits for the scan in background mode


@dataclass(frozen=True)
class HistoryEntry:
    """One panorama: an image of this .blend (image_name set) or a file of the output folder."""

    prompt: str
    seed: str
    width: str
    height: str
    filepath: str  # absolute; "" when the image's file is gone (it is packed in the .blend)
    image_name: str = ""

    @property
    def size_text(self) -> str:
        return f"{self.width}×{self.height}"


def list_panoramas(folder: str, limit: int = MAX_ENTRIES) -> list[HistoryEntry]:
    """This .blend's panoramas (in Blender's order), then the folder's panorama files not loaded here,
    newest first; ``limit`` at most. Reads the files at once: the panel uses ``cached_history``."""
    entries, loaded = blend_panoramas()
    return (entries + scan_folder(folder, limit, loaded))[:limit]


def blend_panoramas() -> tuple[list[HistoryEntry], frozenset[str]]:
    """This .blend's images that carry our settings (read from the images, no file), and the real paths
    of their files (gone or not: a file of one is not listed again)."""
    entries, loaded = [], set()
    for image in bpy.data.images:
        metadata = metadata_of(image)
        if pngmeta.SETTINGS_KEY not in metadata or image.library is not None:
            continue
        path = absolute_path(image.filepath) if image.filepath else ""
        loaded.add(path)
        entries.append(_entry(metadata, path if os.path.isfile(path) else "", image.name))
    return entries, frozenset(loaded)


def scan_folder(folder: str, limit: int, loaded: frozenset = frozenset()) -> list[HistoryEntry]:
    """The folder's panorama files whose real path is not in ``loaded``, newest first, ``limit`` at
    most. File I/O only, no bpy: it runs on a thread of its own for the panel."""
    entries = []
    for path in _newest_pngs(folder):
        if len(entries) >= limit:
            break
        if os.path.normcase(os.path.realpath(path)) in loaded:
            continue
        try:
            metadata = pngmeta.read_text_chunks(path, stop_at_data=True)
        except (OSError, ValueError):
            continue  # unreadable or damaged: not ours to list
        if pngmeta.SETTINGS_KEY in metadata:
            entries.append(_entry(metadata, path))
    return entries


def _entry(metadata: dict, filepath: str, image_name: str = "") -> HistoryEntry:
    return HistoryEntry(_shown(metadata.get("prompt", "")), _shown(metadata.get("seed", "?")),
                        _shown(metadata.get("width", "?")), _shown(metadata.get("height", "?")), filepath, image_name)


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_PROMPT_CHARS else text[: SHOWN_PROMPT_CHARS - 1] + "…"


def _newest_pngs(folder: str) -> list[str]:
    """The folder's PNG files, newest first. One that cannot be examined is skipped, not the folder; so
    is one whose name is not UTF-8 (Blender cannot hold it in an operator's file path)."""
    files = []
    try:
        with os.scandir(folder) as found:
            for entry in found:
                try:
                    if entry.name.lower().endswith(".png") and _is_utf8(entry.path) and entry.is_file():
                        files.append((entry.stat().st_mtime_ns, entry.path))
                except OSError:
                    continue  # gone since, or not ours to read
    except OSError:
        return []  # no output folder yet
    return [path for _, path in sorted(files, reverse=True)[:MAX_FILES_READ]]


def _is_utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def history_buttons(entry: HistoryEntry, group) -> list[tuple[str, str, str, dict]]:
    """(operator, label, icon, arguments) of an entry's buttons; applying needs the file on disk."""
    settings = {"image_name": entry.image_name} if entry.image_name else {"filepath": entry.filepath}
    buttons = [("msd.restore_settings", "Use Settings", 'RECOVER_LAST', settings),
               ("msd.refine", "Refine", 'SHADERFX', dict(settings))]
    if entry.filepath:
        buttons[:0] = [
            ("msd.apply_world", "Apply as World", 'WORLD',
             {"filepath": entry.filepath, "strength": group.world_strength, "rotation": group.world_rotation}),
            ("msd.add_backdrop", "Add as Backdrop", 'IMAGE_PLANE',
             {"filepath": entry.filepath, "shape": group.backdrop_shape, "strength": group.backdrop_strength}),
        ]
    return buttons


class HistoryCache:
    """The listing the panel draws, the scan of the output folder that feeds it, and the thumbnails.

    The folder's files are read on a thread of its own (``start_scan``): a redraw only combines what
    the last scan left (``files``) with this .blend's panoramas, so it never waits on the disk, however
    many files or however long their texts."""

    def __init__(self):
        self.key = None
        self.entries: list[HistoryEntry] = []
        self.previews = None  # a bpy.utils.previews collection while the add-on is registered
        self.ours, self.blend, self.loaded = None, [], frozenset()  # this .blend's panoramas, by image names
        self.files_key, self.files = None, []  # (folder, its modification time, loaded) of the last scan
        self.scan: threading.Thread | None = None
        self.scan_pending = False  # from a scan's start until its listing is stored
        self.lock = threading.Lock()

    @property
    def scanning(self) -> bool:
        # Not the thread's liveness: a thread that has stored its listing may not have exited yet, and a
        # scan refused then would leave the listing of a folder as it was.
        return self.scan_pending

    def start_scan(self, key: tuple, folder: str, loaded: frozenset) -> None:
        """Read the folder on a thread; one scan at a time (the redraw after it starts the next)."""
        with self.lock:
            if self.scanning:
                return
            self.scan_pending = True
            self.scan = threading.Thread(target=self._scan, args=(key, folder, loaded), daemon=True)
            self.scan.start()
        if not bpy.app.timers.is_registered(poll_history_scan):
            bpy.app.timers.register(poll_history_scan, first_interval=SCAN_POLL_INTERVAL)

    def _scan(self, key: tuple, folder: str, loaded: frozenset) -> None:
        try:
            files = scan_folder(folder, MAX_ENTRIES, loaded)
        except Exception:  # anything odd in the folder lists nothing rather than scanning it again and again
            files = []
        with self.lock:
            self.files, self.files_key, self.scan_pending = files, key, False

    def wait(self, timeout: float | None = None) -> None:
        """Until the scan under way has ended (scripts, tests)."""
        scan = self.scan
        if scan is not None:
            scan.join(timeout)

    def icon_id(self, entry: HistoryEntry, layout) -> int:
        """The image's own preview for a .blend image, else the file's thumbnail."""
        if entry.image_name:
            image = bpy.data.images.get(entry.image_name)
            return layout.icon(image) if image is not None else 0
        if entry.filepath not in self.previews:
            self.previews.load(entry.filepath, entry.filepath, 'IMAGE')
        return self.previews[entry.filepath].icon_id


history_cache = HistoryCache()


def cached_history(context) -> list[HistoryEntry]:
    """The listing the panel draws. This .blend's panoramas are read from its images when their set
    changes; the folder's files are the last scan's, and a new scan starts when the folder's
    modification time (or the set of loaded files) changed. No file is read here."""
    cache = history_cache
    folder = output_folder(get_preferences(context))
    try:
        modified = os.stat(folder).st_mtime_ns
    except OSError:
        modified = None
    # session_uid: another .blend's images of the same names are other images
    ours = tuple((image.session_uid, image.name, image.filepath) for image in bpy.data.images
                 if METADATA_PROPERTY in image)
    if ours != cache.ours:
        (cache.blend, cache.loaded), cache.ours = blend_panoramas(), ours
    files_key = (folder, modified, cache.loaded)
    if files_key != cache.files_key:
        cache.start_scan(files_key, folder, cache.loaded)
    with cache.lock:
        key, files = (ours, cache.files_key), cache.files
    if key != cache.key:
        # A scan made before an image was loaded may list its file: left out until the next scan.
        fresh = [entry for entry in files if os.path.normcase(os.path.realpath(entry.filepath)) not in cache.loaded]
        cache.entries, cache.key = (cache.blend + fresh)[:MAX_ENTRIES], key
        cache.previews.clear()
    return cache.entries


def read_history(context, timeout: float) -> list[HistoryEntry]:
    """The listing once the folder has been read as it is now, waiting up to ``timeout`` seconds for
    the scans (scripts and background mode; the panel never waits)."""
    deadline = time.monotonic() + timeout
    while True:
        # Idle before and after the read: the listing is of the folder as it is now. A scan under way
        # may be of an older state (its end starts another), or end during the read.
        idle, scan = not history_cache.scanning, history_cache.scan
        entries = cached_history(context)
        # A scan this read started may already have ended: its listing came after these entries were made.
        if idle and history_cache.scan is scan and not history_cache.scanning or time.monotonic() >= deadline:
            return entries
        history_cache.wait(max(0.0, deadline - time.monotonic()))


def poll_history_scan() -> float | None:
    """While a scan runs, the seconds until the next look (a bpy.app.timers callback); when it has
    ended, redraw the panels, which then draw its listing, and stop (None)."""
    if history_cache.scanning:
        return SCAN_POLL_INTERVAL
    redraw_panels(bpy.context)
    return None


class MSD_OT_refresh_history(Operator):
    """Read the output folder and this file's panoramas again"""

    bl_idname = "msd.refresh_history"
    bl_label = "Refresh History"

    def execute(self, context):
        history_cache.ours = history_cache.files_key = None
        if bpy.app.background:  # a script gets the new listing; in the UI the panel shows it when read
            self.report({'INFO'}, f"{len(read_history(context, SCRIPT_WAIT))} panoramas")
        else:
            cached_history(context)
        return {'FINISHED'}


classes = (MSD_OT_refresh_history,)


def register():
    history_cache.previews = bpy.utils.previews.new()


def unregister():
    if bpy.app.timers.is_registered(poll_history_scan):
        bpy.app.timers.unregister(poll_history_scan)
    history_cache.wait(SCAN_POLL_INTERVAL)
    bpy.utils.previews.remove(history_cache.previews)
    history_cache.previews = None
    history_cache.key, history_cache.entries, history_cache.ours, history_cache.files_key = None, [], None, None
