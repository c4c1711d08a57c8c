"""Loading a generated panorama into Blender: one image datablock per file, carrying its settings.

The generation settings written into the PNG's text chunks (msd_core.imageio.pngmeta) are stored on the
image as one custom property group, ``image["msd"]``: ``image["msd"]["prompt"]``,
``image["msd"]["seed"]``, …, and ``image["msd"]["settings"]`` (the full settings JSON). Values are
the text exactly as the file holds it; only MSD Panorama's own keys are kept (a file may carry any
text, of any size). Custom properties are saved with the .blend.

Every image made here is marked with the SHA-256 of the file it was loaded from (``image["msd_file"]``):
applying the same file again finds that image by its mark, never by path, and never reloads it. So
the user's own images, even of the same file, are never touched, and a rewritten file is a new image.

The image stays with the .blend: a relative path when the .blend is saved, packed into it when not.
"""

from __future__ import annotations

import hashlib
import os

import bpy
from bpy.props import BoolProperty, StringProperty

from ..msd_core.imageio import pngmeta
from ..msd_core.errors import BadInput

METADATA_PROPERTY = "msd"
MARKER_PROPERTY = "msd_file"
NAME_PREFIX = "MSD "
NAME_WORDS = 5  # at most this many whole words of the prompt in the image's name,
NAME_CHARS = 40  # and at most this many characters: fewer words rather than a word cut in two
# Words a name does not end on ("MSD a misty alpine valley", not "… valley at").
JOINING_WORDS = {"a", "an", "and", "as", "at", "by", "for", "from", "in", "of", "on", "or", "the", "to", "with"}
DIGEST_CHUNK = 1 << 20
LISTED_KEYS = 5  # names of ignored text entries a warning lists
LISTED_KEY_CHARS = 30


class PanoramaImageError(BadInput):
    """The panorama file is missing or is not an image Blender can read; nothing was loaded."""


def load_panorama(filepath: str, warnings: list[str] | None = None) -> bpy.types.Image:
    """Load the panorama at ``filepath`` (absolute or Blender-relative ``//``) and return its image.

    The image made earlier for the same file (same bytes) is returned as it is, unless its pixels
    were edited since; otherwise a new image is made. Text entries of the file that are not ours are
    left out, with a sentence saying so appended to ``warnings``.
    Raises PanoramaImageError for a missing file or one Blender cannot read; nothing changes then.
    """
    path = absolute_path(filepath)
    if not os.path.isfile(path):
        raise PanoramaImageError(f"panorama file not found: {path or filepath!r}")
    digest = _file_digest(path)
    image = find_panorama(digest)
    if image is not None:
        return image
    texts = _read_metadata(path)
    metadata = {key: text for key, text in texts.items() if key in pngmeta.OWN_KEYS}
    image = _load_new(path, panorama_name(metadata, path))
    if not image.is_float:  # 8-bit pixels are sRGB: say so, whatever a custom colour config defaults to
        image.colorspace_settings.name = "sRGB"
    image[METADATA_PROPERTY] = metadata
    image[MARKER_PROPERTY] = digest
    _keep_with_blend(image, path)
    ignored = [key for key in texts if key not in metadata]
    if ignored and warnings is not None:
        warnings.append(_ignored_keys_warning(path, ignored))
    return image


def find_panorama(digest: str) -> bpy.types.Image | None:
    """The image load_panorama made for the file with this SHA-256, if it is still as loaded: not
    edited (a painted image is the user's work) and with its pixels (reading the size loads them)."""
    for image in bpy.data.images:  # linked images belong to another .blend
        if image.get(MARKER_PROPERTY) == digest and image.library is None and not image.is_dirty and 0 not in image.size:
            return image
    return None


def absolute_path(filepath: str, library=None) -> str:
    """The real, normalised path of a file path as Blender writes it (may start with //)."""
    return os.path.normcase(os.path.realpath(bpy.path.abspath(filepath, library=library))) if filepath else ""


def panorama_name(metadata: dict[str, str], path: str) -> str:
    """The image's name (and its world's): MSD and the prompt's first whole words, or the file's name
    without a prompt; a single word longer than the name allows ends in "…"."""
    words = metadata.get("prompt", "").split() or [bpy.path.display_name_from_filepath(path)]
    kept = []
    for word in words[:NAME_WORDS]:
        if len(" ".join([*kept, word])) > NAME_CHARS:
            break
        kept.append(word)
    while len(kept) > 1 and kept[-1].lower() in JOINING_WORDS:
        kept.pop()
    text = " ".join(kept).rstrip(",;:-–—") or words[0][: NAME_CHARS - 1] + "…"
    return NAME_PREFIX + text


def metadata_of(image: bpy.types.Image) -> dict[str, str]:
    """The generation settings stored on an image by load_panorama ({} for any other image)."""
    group = image.get(METADATA_PROPERTY)
    if not hasattr(group, "to_dict"):  # absent, or a property of that name the user set
        return {}
    return {key: text for key, text in group.to_dict().items() if isinstance(text, str)}


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(DIGEST_CHUNK):
                digest.update(chunk)
    except OSError as error:
        raise PanoramaImageError(f"cannot read {path}: {error.strerror}") from None
    return digest.hexdigest()


def _ignored_keys_warning(path: str, keys: list[str]) -> str:
    names = ", ".join(repr(key[:LISTED_KEY_CHARS]) for key in keys[:LISTED_KEYS])
    more = f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else ""
    return (
        f"{os.path.basename(path)}: ignored {len(keys)} text entr{'y' if len(keys) == 1 else 'ies'} "
        f"that are not MSD Panorama settings ({names}{more})"
    )


def _read_metadata(path: str) -> dict[str, str]:
    # Panoramas made elsewhere (JPEG, EXR, …) are welcome too; they just carry no settings.
    try:
        with open(path, "rb") as file:
            is_png = file.read(len(pngmeta.PNG_SIGNATURE)) == pngmeta.PNG_SIGNATURE
        return pngmeta.read_text_chunks(path) if is_png else {}
    except OSError as error:
        raise PanoramaImageError(f"cannot read {path}: {error.strerror}") from None
    except ValueError as error:
        raise PanoramaImageError(f"damaged panorama file: {error}") from None


def _load_new(path: str, name: str) -> bpy.types.Image:
    # images.load does not raise for an unreadable file: it returns an image without pixels.
    image = bpy.data.images.load(path, check_existing=False)
    if 0 in image.size:  # reading the size loads the pixels
        bpy.data.images.remove(image)
        raise PanoramaImageError(f"not an image Blender can read: {path}")
    image.name = name
    return image


def _keep_with_blend(image: bpy.types.Image, path: str) -> None:
    if not bpy.data.is_saved:
        image.pack()
        return
    try:
        image.filepath = bpy.path.relpath(path)
    except ValueError:  # on another drive (Windows): no relative path exists
        image.filepath = path


class PanoramaFileOperator:
    """Mix-in for operators that apply a panorama file: opens the file browser when no file is given,
    and turns a bad file into an error report with nothing changed."""

    filepath: StringProperty(name="Panorama", description="The panorama image to use", subtype="FILE_PATH")
    filter_image: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    filter_folder: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})

    def invoke(self, context, _event):
        if self.filepath:
            return self.execute(context)
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def load_image(self) -> bpy.types.Image | None:
        """The panorama's image, or None after reporting why it could not be loaded."""
        warnings = []
        try:
            image = load_panorama(self.filepath, warnings)
        except PanoramaImageError as error:
            self.report({"ERROR"}, str(error))
            return None
        for warning in warnings:
            self.report({"WARNING"}, warning)
        return image


classes = ()
