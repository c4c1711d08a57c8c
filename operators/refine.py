"""Refine / upscale the panorama the scene shows, through the worker like Generate.

The source is the active backdrop's image (an object whose material has an Image Texture), else the
image of the scene world's Environment Texture: one we generated or any other, since it is only read.
A named image or an image file (the History sub-panel's Refine) can be given instead.
Its file is sent to the worker as it is; a packed image's bytes are first copied to a file in the
add-on's user folder, and an HDR image (EXR, Radiance HDR) is tone-mapped into a PNG there
(msd_core.imageio.tonemap), so the worker needs no HDR reader. The result is used the way the panel says (world, backdrop or image), as for
Generate, with the panel's prompt and sampler settings at the source's size × the Refine scale.
"""

import dataclasses
import math
import os

import bpy
import numpy as np
from bpy.props import StringProperty
from bpy.types import Operator

from ..msd_core.errors import BadInput
from ..msd_core.settings import LATENT_FACTOR, MAX_SIDE, RefineSettings
from ..msd_core.imageio.tonemap import tone_map, write_png
from ..preferences import get_preferences, user_folder
from ..properties import settings_from_scene
from . import generate
from .images import load_panorama
from .world import SOURCE_PROPERTY, is_equirectangular

IMAGE_NODES = {'TEX_ENVIRONMENT', 'TEX_IMAGE'}
# Files of scene-linear light above 1 (HDRIs). Blender also holds 16-bit PNGs and TIFFs as float, but
# their values are display values in [0, 1]: those files are sent as they are, never tone-mapped.
HDR_FORMATS = {'OPEN_EXR', 'OPEN_EXR_MULTILAYER', 'HDR'}


def source_image(context) -> bpy.types.Image | None:
    """The panorama to refine: the active object's, else the world's. For a backdrop or world the
    add-on made, the panorama it was made from (not the HDR companion a world may be lit by);
    otherwise the first image of an image node in its material or world."""
    obj = context.active_object
    if obj is not None:
        image = obj.get(SOURCE_PROPERTY) or next(
            filter(None, (_first_image(slot.material) for slot in obj.material_slots)), None
        )
        if image is not None:
            return image
    world = context.scene.world
    return world and (world.get(SOURCE_PROPERTY) or _first_image(world))


def _first_image(owner) -> bpy.types.Image | None:
    if owner is None or owner.node_tree is None:
        return None
    return next((node.image for node in owner.node_tree.nodes if node.type in IMAGE_NODES and node.image), None)


def source_file(image: bpy.types.Image) -> str:
    """A file with the image's pixels for the worker: its own file, a copy of its packed bytes, or for
    an HDR image (HDR_FORMATS) a tone-mapped PNG of its pixels. Files are named after the image's file, since the
    result's metadata records the name."""
    if image.source != 'FILE':
        raise BadInput(f"the image {image.name!r} has no file (it was generated or rendered): save it first")
    path = bpy.path.abspath(image.filepath, library=image.library)
    if 0 in image.size or (image.packed_file is None and not os.path.isfile(path)):  # the size loads the pixels
        raise BadInput(f"the file of the image {image.name!r} is missing or unreadable: {path}")
    name = os.path.basename(path) or bpy.path.clean_name(image.name)
    if image.is_float and image.file_format in HDR_FORMATS:
        width, height = image.size
        pixels = np.empty(width * height * image.channels, np.float32)
        image.pixels.foreach_get(pixels)  # scene-linear, bottom row first
        path = os.path.join(user_folder("refine"), name + ".png")
        write_png(path, tone_map(pixels.reshape(height, width, image.channels)[::-1, :, :3]))
        return path
    if image.packed_file is not None:
        path = os.path.join(user_folder("refine"), name)
        with open(path, "wb") as file:
            file.write(image.packed_file.data)
        return path
    return path


def refine_target_size(image: bpy.types.Image, scale: float) -> tuple[int, int]:
    """The source's size × ``scale``, each side rounded to the nearest multiple of 8; BadInput for a scale
    that gives no size (a script may set inf or NaN: the property has no upper bound)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise BadInput(f"Scale must be a number above 0, got {scale}")
    width, height = image.size
    if max(width, height) * scale > MAX_SIDE:
        raise BadInput(f"Scale {scale:g} makes the {width}×{height} source more than {MAX_SIDE} px a side; "
                       "choose a smaller Scale")
    return tuple(max(LATENT_FACTOR, round(side * scale / LATENT_FACTOR) * LATENT_FACTOR) for side in image.size)


def start_refine(context, image: bpy.types.Image) -> generate.Job:
    """Send the refine of ``image`` to the worker with the panel's settings; raises MSDError."""
    group = context.scene.msd_panorama
    settings = settings_from_scene(context.scene, get_preferences(context))
    width, height = refine_target_size(image, group.refine_scale)
    settings = dataclasses.replace(settings, width=width, height=height, wrap=is_equirectangular(image)).validate()
    source = RefineSettings(source_file(image), group.refine_strength).validate()
    return generate.start_generation(context, settings=settings, refine=source)


def start_refine_file(context, filepath: str) -> generate.Job:
    """Refine the image file at ``filepath``. Its image is only read for its size and pixels: one loaded
    just for this is removed again, so the .blend gains nothing but the result."""
    known = set(bpy.data.images)
    image = load_panorama(filepath)
    try:
        return start_refine(context, image)
    finally:
        if image not in known:
            bpy.data.images.remove(image)


class MSD_OT_refine(generate.WorkerRunOperator, Operator):
    """Refine or upscale the panorama the world or the active backdrop shows, with the prompt and the Refine settings"""

    bl_idname = "msd.refine"
    bl_label = "Refine Panorama"
    bl_options = {'UNDO'}

    image_name: StringProperty(
        name="Image", description="The image to refine (default: the active backdrop's, else the world's)",
        options={'SKIP_SAVE'},
    )
    filepath: StringProperty(
        name="File", description="An image file to refine instead (absolute or //-relative)",
        subtype='FILE_PATH', options={'SKIP_SAVE'},
    )

    def start(self, context) -> generate.Job:
        if self.filepath:
            return start_refine_file(context, self.filepath)
        image = bpy.data.images.get(self.image_name) if self.image_name else source_image(context)
        if image is None:
            raise BadInput(
                f"there is no image named {self.image_name!r}" if self.image_name
                else "there is no panorama to refine: show one as the world or select its backdrop"
            )
        return start_refine(context, image)


classes = (MSD_OT_refine,)
