"""Loading a generated panorama into Blender: one image datablock per file, carrying its settings.

The generation settings written into the PNG's text chunks (msd_core.pngmeta) are stored on the
image as one custom property group, ``image["msd"]``: ``image["msd"]["prompt"]``,
``image["msd"]["seed"]``, …, and ``image["msd"]["settings"]`` (the full settings JSON). Values are
the text exactly as the file holds it. Custom properties are saved with the .blend.

The image stays with the .blend: a relative path when the .blend is saved, packed into it when not.
"""

from __future__ import annotations

import os

import bpy
from bpy.props import BoolProperty, StringProperty

from ..msd_core import pngmeta
from ..msd_core.errors import BadInput

METADATA_PROPERTY = "msd"
NAME_PREFIX = "MSD "
NAME_WORDS = 5  # words of the prompt in the image's name
NAME_CHARS = 40


class PanoramaImageError(BadInput):
    """The panorama file is missing or is not an image Blender can read; nothing was loaded."""


def load_panorama(filepath: str) -> bpy.types.Image:
    """Load the panorama at ``filepath`` (absolute or Blender-relative ``//``) and return its image.

    An image already loaded from the same file is reloaded and returned, never duplicated.
    Raises PanoramaImageError for a missing file or one Blender cannot read.
    """
    path = absolute_path(filepath)
    if not os.path.isfile(path):
        raise PanoramaImageError(f"panorama file not found: {path or filepath!r}")
    metadata = _read_metadata(path)
    image = find_loaded(path)
    if image is None:
        image = _load_new(path, panorama_name(metadata, path))
    else:
        _reload(image, path)
    if not image.is_float:  # 8-bit pixels are sRGB: say so, whatever a custom colour config defaults to
        image.colorspace_settings.name = "sRGB"
    image[METADATA_PROPERTY] = metadata
    _keep_with_blend(image, path)
    return image


def absolute_path(filepath: str, library=None) -> str:
    """The real, normalised path of a file path as Blender writes it (may start with //)."""
    return os.path.normcase(os.path.realpath(bpy.path.abspath(filepath, library=library))) if filepath else ""


def find_loaded(path: str) -> bpy.types.Image | None:
    """The image already loaded from the file ``path`` (as returned by absolute_path), if any."""
    for image in bpy.data.images:  # linked images belong to another .blend: they cannot be reloaded here
        if image.source == "FILE" and image.library is None and absolute_path(image.filepath) == path:
            return image
    return None


def panorama_name(metadata: dict[str, str], path: str) -> str:
    """The image's name: MSD and the first words of the prompt, or the file's name without a prompt."""
    words = metadata.get("prompt", "").split() or [bpy.path.display_name_from_filepath(path)]
    return NAME_PREFIX + " ".join(words[:NAME_WORDS])[:NAME_CHARS]


def metadata_of(image: bpy.types.Image) -> dict[str, str]:
    """The generation settings stored on an image by load_panorama ({} for any other image)."""
    group = image.get(METADATA_PROPERTY)
    return group.to_dict() if group is not None else {}


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


def _reload(image: bpy.types.Image, path: str) -> None:
    # A packed image would reload its packed copy: drop it (nothing is written) to read the new file.
    if image.packed_file is not None:
        image.unpack(method="REMOVE")
    image.reload()
    if 0 in image.size:  # reading the size loads the pixels
        raise PanoramaImageError(f"not an image Blender can read: {path}")


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
        try:
            return load_panorama(self.filepath)
        except PanoramaImageError as error:
            self.report({"ERROR"}, str(error))
            return None


classes = ()
