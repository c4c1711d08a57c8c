"""Add-on preferences: which Python runs the worker, which model, where panoramas are written."""

import os
import sys

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy.types import AddonPreferences

from .msd_core import settings

ADDON_PACKAGE = __package__
# The extension's folder: it contains msd_core/, which the worker process imports (via PYTHONPATH).
ADDON_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT_FOLDER = "//panoramas/"
# Blender 4.5+ warns about "//" in path properties unless they declare support (the flag is new in 4.5).
_BLEND_RELATIVE = {'PATH_SUPPORTS_BLEND_RELATIVE'} if bpy.app.version >= (4, 5, 0) else set()

_DEVICE_LABELS = {"auto": "Automatic", "cuda": "CUDA (NVIDIA)", "mps": "Metal (Apple)", "cpu": "CPU"}
# Not a settings device: CUDA, with each panorama's windows shared by every GPU (the request's ranks 0).
ALL_GPUS = "all-gpus"
_DTYPE_LABELS = {"auto": "Automatic", "float16": "Half (float16)", "bfloat16": "BFloat16", "float32": "Full (float32)"}


def get_preferences(context=None):
    context = context or bpy.context
    return context.preferences.addons[ADDON_PACKAGE].preferences


def user_folder(subfolder: str = "") -> str:
    """A folder of this extension in Blender's user resources (created if missing)."""
    return bpy.utils.extension_path_user(ADDON_PACKAGE, path=subfolder, create=True)


def managed_worker_python() -> str:
    """Where "Install worker" puts the worker environment's Python (it may not exist yet)."""
    env_dir = os.path.join(bpy.utils.extension_path_user(ADDON_PACKAGE), "worker")
    if sys.platform == "win32":
        return os.path.join(env_dir, "Scripts", "python.exe")
    return os.path.join(env_dir, "bin", "python")


def worker_python(prefs) -> str:
    """The Python that runs the worker: the preference if set, else the installed worker
    environment's, else "" (the worker is not installed)."""
    if prefs.worker_python:
        return bpy.path.abspath(prefs.worker_python)
    managed = managed_worker_python()
    return managed if os.path.isfile(managed) else ""


def output_folder(prefs) -> str:
    """The folder new panoramas go to. A relative (//) folder needs a saved .blend; until then it is
    the extension's user folder."""
    folder = prefs.output_folder or DEFAULT_OUTPUT_FOLDER
    if folder.startswith("//") and not bpy.data.is_saved:
        return user_folder("panoramas")
    return os.path.normpath(bpy.path.abspath(folder))


class MSD_AddonPreferences(AddonPreferences):
    bl_idname = ADDON_PACKAGE

    worker_python: StringProperty(
        name="Worker Python",
        description=(
            "Python interpreter with torch and diffusers that runs the generator. "
            "Empty: the environment made by Install Worker"
        ),
        subtype='FILE_PATH',
    )
    install_python: StringProperty(
        name="Base Python",
        description=(
            "Python 3.10 or newer used to create the worker environment. "
            "Empty: search for python3.13 … python3.10, python3 on the system"
        ),
        subtype='FILE_PATH',
    )
    model: StringProperty(
        name="Model",
        description="Hugging Face id, local diffusers folder or .safetensors file of a Stable Diffusion model "
                    "(SD 1.x, SD 2.x or SDXL: the family is read from the model itself)",
        default=settings.DEFAULT_MODEL,
    )
    model_config: StringProperty(
        name="Model Config",
        description="For a single SD 1.x/2.x .safetensors file: a diffusers folder or Hugging Face id with its "
                    "configs (SDXL checkpoints need none)",
    )
    device: EnumProperty(
        name="Device",
        items=[(name, _DEVICE_LABELS[name], "") for name in settings.DEVICES]
        + [(ALL_GPUS, "All GPUs (CUDA)", "Every NVIDIA GPU of this machine works on each panorama, one process each "
                                         "(the same result as one GPU, faster for large panoramas)")],
        default="auto",
    )
    precision: EnumProperty(
        name="Precision",
        description="Number format of the model's weights and activations",
        items=[(name, _DTYPE_LABELS[name], "") for name in settings.DTYPES],
        default="auto",
    )
    threads: IntProperty(
        name="Threads",
        description=(
            "CPU threads the generator uses on the CPU. 0: automatic, one per physical core less one, "
            "which is left to Blender"
        ),
        min=0,
        soft_max=os.cpu_count() or 1,
        default=0,
    )
    keep_worker_warm: BoolProperty(
        name="Keep Model Loaded",
        description="Keep the worker and its model in memory between runs (faster; the model's weights stay on the "
                    "GPU, the memory a run used is given back when it ends)",
        default=True,
    )
    output_folder: StringProperty(
        name="Output Folder",
        description="Where panoramas are written; // is the folder of the .blend file",
        default=DEFAULT_OUTPUT_FOLDER,
        subtype='DIR_PATH',
        options=_BLEND_RELATIVE,
    )
    lora_folder: StringProperty(
        name="LoRA Folder",
        description="Where Use Settings also looks for a panorama's LoRAs (by file name and SHA-256) when they "
                    "are not at the path stored in it",
        subtype='DIR_PATH',
    )

    def draw(self, context):
        from .ui.panel import draw_cached_models, draw_model_download, draw_worker_status  # here: ui imports this module


        layout = self.layout
        layout.use_property_split = True
        col = layout.column(heading="Worker")
        col.prop(self, "worker_python")
        col.prop(self, "install_python")
        col.prop(self, "keep_worker_warm")
        col.prop(self, "threads")
        draw_worker_status(layout, context)
        col = layout.column(heading="Model")
        col.prop(self, "model")
        col.prop(self, "model_config")
        col.label(text=f"Supported: {SUPPORTED_FAMILIES}")
        col.prop(self, "device")
        col.prop(self, "precision")
        draw_model_download(layout, context)
        box = layout.box()
        box.label(text="Downloaded Models", icon='FILE_FOLDER')
        draw_cached_models(box, context)
        layout.prop(self, "output_folder")
        layout.prop(self, "lora_folder")


SUPPORTED_FAMILIES = "SD 1.x, SD 2.x, SDXL (base and fine-tunes; not the refiner)"

classes = (MSD_AddonPreferences,)

register, unregister = bpy.utils.register_classes_factory(classes)
