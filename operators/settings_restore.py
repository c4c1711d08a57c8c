"""Put the settings a panorama was made with back into the panel, to make it again or vary it."""

import json
import os
import random

import bpy
from bpy.props import BoolProperty, StringProperty
from bpy.types import Operator

from ..msd_core.imageio import pngmeta
from ..msd_core.errors import BadInput
from ..msd_core.models.lora_files import restore_loras
from ..msd_core.settings import GenerationSettings
from ..preferences import get_preferences
from ..properties import SEED_MAX, settings_to_scene
from .images import absolute_path, metadata_of

MAX_SETTINGS_CHARS = 64 * 1024  # a prompt of thousands of words fits; anything longer is not ours
MAX_DIGITS = 19  # a seed below 2^63 has at most 19 digits


def settings_of_image(image, lora_folders=(), missing: list[str] | None = None) -> GenerationSettings:
    """The settings stored on an image by load_panorama, else in its PNG file; raises BadInput.

    Its LoRAs are looked for as ``restore_loras`` does, in ``lora_folders`` and beside the image's file;
    a sentence for each one not found is appended to ``missing``."""
    metadata = metadata_of(image)
    text = metadata.get(pngmeta.SETTINGS_KEY)
    if text is None and image.source == 'FILE' and image.packed_file is None:
        return settings_of_file(absolute_path(image.filepath, image.library), lora_folders, missing)
    if text is None:
        raise BadInput(f"image {image.name!r} carries no MSD Panorama settings")
    beside = os.path.dirname(absolute_path(image.filepath, image.library)) if image.filepath else ""
    return _parse(text, image.name, metadata.get(pngmeta.LORAS_KEY), [*lora_folders, beside], missing)


def settings_of_file(path: str, lora_folders=(), missing: list[str] | None = None) -> GenerationSettings:
    try:
        texts = pngmeta.read_text_chunks(path)
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    text = texts.get(pngmeta.SETTINGS_KEY)
    if text is None:
        raise BadInput(f"{path} carries no MSD Panorama settings")
    return _parse(text, path, texts.get(pngmeta.LORAS_KEY), [*lora_folders, os.path.dirname(path)], missing)


def _parse(text, source: str, lora_records=None, lora_folders=(), missing: list[str] | None = None) -> GenerationSettings:
    """Settings JSON → validated settings, with the LoRAs that are found on this machine. Bounded: the
    text's length, its numbers' digits and (through Python's recursion limit) its nesting; any failure is
    one BadInput sentence."""
    damaged = f"the settings stored in {source} are damaged"
    data = _json(text, damaged)
    try:
        settings = GenerationSettings.from_stored(data)
    except TypeError as exc:
        raise BadInput(f"{damaged}: {exc}") from None
    if isinstance(settings.loras, list) and settings.loras:
        records = _json(lora_records, f"the LoRA records stored in {source} are damaged") if lora_records else None
        settings.loras, lost = restore_loras(settings.loras, records, [folder for folder in lora_folders if folder])
        if missing is not None:
            missing.extend(lost)
    return settings.validate()


def _json(text, damaged: str):
    if not isinstance(text, str):
        raise BadInput(f"{damaged}: not text")
    if len(text) > MAX_SETTINGS_CHARS:
        raise BadInput(f"{damaged}: {len(text)} characters, more than settings ever take ({MAX_SETTINGS_CHARS})")
    try:
        data = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except BadInput as exc:
        raise BadInput(f"{damaged}: {exc}") from None
    except RecursionError:
        raise BadInput(f"{damaged}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError included
        raise BadInput(f"{damaged}: {exc}") from None
    try:  # Blender's strings are UTF-8: an unpaired surrogate ("\\ud800") would fail half-way through the panel
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{damaged}: a text in them is not valid Unicode (an unpaired surrogate)") from None
    return data


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise BadInput(f"a number of {len(digits)} digits; no setting needs more than {MAX_DIGITS}")
    return int(digits)


def _no_constant(name: str):
    raise BadInput(f"{name} is not a setting value")


class MSD_OT_restore_settings(Operator):
    """Fill the Panorama panel with the settings an MSD panorama was made with"""

    bl_idname = "msd.restore_settings"
    bl_label = "Use Settings of Panorama"
    bl_options = {'REGISTER', 'UNDO'}

    image_name: StringProperty(name="Image", description="Image datablock (default: the Image Editor's image)")
    filepath: StringProperty(name="File", description="A panorama PNG file", subtype='FILE_PATH')
    vary_seed: BoolProperty(name="New Seed", description="Keep everything but the seed")

    def execute(self, context):
        missing = []
        try:
            settings = self._settings(context, missing)
            if self.vary_seed:
                settings.seed = random.randint(0, SEED_MAX)
            settings_to_scene(settings, context.scene)
        except BadInput as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        loras = f", {len(settings.loras)} LoRA{'s' * (len(settings.loras) != 1)}" if settings.loras else ""
        self.report({'INFO'}, f"Settings restored (seed {settings.seed}, model {settings.model}{loras})")
        for sentence in missing:
            self.report({'WARNING'}, sentence)
        return {'FINISHED'}

    def _settings(self, context, missing: list[str]) -> GenerationSettings:
        folder = get_preferences(context).lora_folder.strip()
        folders = [bpy.path.abspath(folder)] if folder else []
        if self.filepath:
            return settings_of_file(bpy.path.abspath(self.filepath), folders, missing)
        if self.image_name:
            image = bpy.data.images.get(self.image_name)
            if image is None:
                raise BadInput(f"no image named {self.image_name!r}")
            return settings_of_image(image, folders, missing)
        image = getattr(context.space_data, "image", None) if context.space_data else None
        if image is None:
            raise BadInput("no panorama given: open one in the Image Editor, or give an image name or a file")
        return settings_of_image(image, folders, missing)


classes = (MSD_OT_restore_settings,)
