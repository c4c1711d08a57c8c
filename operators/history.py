"""History: the panoramas of this .blend and of the output folder, with what to do with each.

``list_panoramas`` makes the listing (tests call it directly): the .blend's images that carry our
settings (operators/images.py stores them on the image) and the output folder's PNG files that carry
them (read with msd_core.imageio.pngmeta, no pixels), newest first, at most MAX_ENTRIES, reading at most
MAX_FILES_READ files; long texts are cut to SHOWN_PROMPT_CHARS. The panel draws a cached listing (``cached_history``) that is made again only
when the folder's modification time or the set of our images changes, or on Refresh: a redraw reads
no file. ``history_buttons`` says which operator each button runs, with which arguments. Drafts
(the output folder's "drafts" folder, see variations.py) are not listed unless used in this .blend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import bpy
import bpy.utils.previews
from bpy.types import Operator

from ..msd_core.imageio import pngmeta
from ..preferences import get_preferences, output_folder
from .images import METADATA_PROPERTY, absolute_path, metadata_of

MAX_ENTRIES = 50
# Newest PNG files of the output folder whose text chunks one scan reads: only the chunks before the
# pixels, where our writer puts them, so a foreign PNG costs a few small reads.
MAX_FILES_READ = 2000
SHOWN_PROMPT_CHARS = 300  # of a prompt in the panel (a file may hold a 1 MB one)


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
    newest first; ``limit`` at most."""
    entries, loaded = [], set()
    for image in bpy.data.images:
        metadata = metadata_of(image)
        if pngmeta.SETTINGS_KEY not in metadata or image.library is not None:
            continue
        path = absolute_path(image.filepath) if image.filepath else ""
        loaded.add(path)
        entries.append(_entry(metadata, path if os.path.isfile(path) else "", image.name))
    for path in _newest_pngs(folder):
        if len(entries) >= limit:
            break
        if absolute_path(path) in loaded:
            continue
        try:
            metadata = pngmeta.read_text_chunks(path, stop_at_data=True)
        except (OSError, ValueError):
            continue  # unreadable or damaged: not ours to list
        if pngmeta.SETTINGS_KEY in metadata:
            entries.append(_entry(metadata, path))
    return entries[:limit]


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
    """The listing the panel draws and the thumbnails of its files."""

    def __init__(self):
        self.key = None
        self.entries: list[HistoryEntry] = []
        self.previews = None  # a bpy.utils.previews collection while the add-on is registered

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
    """The listing, made again only when the output folder or this .blend's panoramas changed."""
    folder = output_folder(get_preferences(context))
    try:
        modified = os.stat(folder).st_mtime_ns
    except OSError:
        modified = None
    ours = tuple(image.name for image in bpy.data.images if METADATA_PROPERTY in image)
    key = (folder, modified, ours)
    if key != history_cache.key:
        history_cache.entries = list_panoramas(folder)
        history_cache.key = key
        history_cache.previews.clear()
    return history_cache.entries


class MSD_OT_refresh_history(Operator):
    """Read the output folder and this file's panoramas again"""

    bl_idname = "msd.refresh_history"
    bl_label = "Refresh History"

    def execute(self, context):
        history_cache.key = None
        entries = cached_history(context)
        self.report({'INFO'}, f"{len(entries)} panoramas")
        return {'FINISHED'}


classes = (MSD_OT_refresh_history,)


def register():
    history_cache.previews = bpy.utils.previews.new()


def unregister():
    bpy.utils.previews.remove(history_cache.previews)
    history_cache.previews = None
    history_cache.key, history_cache.entries = None, []
