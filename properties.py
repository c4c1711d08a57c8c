"""Scene settings (Scene.msd_panorama), the run's live state, and the one mapping UI ⇄ GenerationSettings."""

import math
import os
import random
from dataclasses import dataclass

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty
from bpy.types import PropertyGroup

from .msd_core import settings as core
from .msd_core.errors import BadInput
from .msd_core.settings import GenerationSettings

# Aspect enum item → msd_core preset name.
ASPECT_PRESETS = {"WORLD_360": "360", "STRIP": "strip", "BACKDROP": "backdrop"}
SEED_MAX = 2**31 - 1  # Blender's IntProperty is 32-bit


@dataclass
class RunState:
    """What the panel shows about the worker and the run: lives in memory, never in the .blend."""

    status: str = "READY"  # STARTING, READY, BUSY, ERROR (NOT_INSTALLED is derived: see worker_status)
    message: str = ""  # what the worker is doing, in words
    progress: float = 0.0  # 0..1
    step: int = 0
    total: int = 0
    level: int = 0
    levels: int = 0
    eta: float | None = None  # seconds
    last_error: str = ""
    last_error_kind: str = ""  # msd_core.protocol.ERROR_KINDS, e.g. "model_not_found"
    preview_image: str = ""  # name of the image datablock with the latest coarse preview
    last_output: str = ""  # file of the latest finished panorama
    last_image: str = ""  # its image datablock
    last_seed: int | None = None

    def reset_progress(self) -> None:
        self.progress, self.step, self.total, self.level, self.levels, self.eta = 0.0, 0, 0, 0, 0, None


run_state = RunState()


def _round_to_latent(value: int) -> int:
    return max(core.LATENT_FACTOR, (value + core.LATENT_FACTOR // 2) // core.LATENT_FACTOR * core.LATENT_FACTOR)


def preset_ratio(aspect: str) -> float | None:
    """Width / height of a preset, None for CUSTOM."""
    if aspect not in ASPECT_PRESETS:
        return None
    width, height, _, _ = core.PRESETS[ASPECT_PRESETS[aspect]]
    return width / height


def _update_aspect(group, context):
    preset = ASPECT_PRESETS.get(group.aspect)
    if preset is None:
        return
    width, height, wrap, _ = core.PRESETS[preset]
    group["wrap"] = wrap
    group["height"] = height
    group.width = width


def _update_size(changed: str):
    """Round the changed side to a multiple of 8 and, for a preset, set the other side to keep its ratio.

    Writes go through the ID properties (group["…"]) so this callback does not call itself again."""

    def update(group, context):
        value = _round_to_latent(group[changed])
        group[changed] = value
        ratio = preset_ratio(group.aspect)
        if ratio is not None:
            if changed == "width":
                group["height"] = _round_to_latent(round(value / ratio))
            else:
                group["width"] = _round_to_latent(round(value * ratio))

    return update


def effective_wrap(group) -> bool:
    preset = ASPECT_PRESETS.get(group.aspect)
    return core.PRESETS[preset][2] if preset else group.wrap


class MSD_PanoramaSettings(PropertyGroup):
    prompt: StringProperty(name="Prompt", description="What the panorama shows")
    negative_prompt: StringProperty(name="Negative Prompt", description="What it should not show")
    aspect: EnumProperty(
        name="Aspect",
        items=[
            ("WORLD_360", "360° world (2:1, seamless)", "Equirectangular world, seamless at 0/360°"),
            ("STRIP", "Wide strip (4:1)", "Wide panorama strip, not wrapped"),
            ("BACKDROP", "Backdrop (3:1)", "Wide backdrop, not wrapped"),
            ("CUSTOM", "Custom", "Any size (multiples of 8 pixels)"),
        ],
        default="WORLD_360",
        update=_update_aspect,
    )
    width: IntProperty(
        name="Width", subtype='PIXEL', default=2048, min=8, soft_min=256, soft_max=8192, step=8,
        update=_update_size("width"),
    )
    height: IntProperty(
        name="Height", subtype='PIXEL', default=1024, min=8, soft_min=256, soft_max=4096, step=8,
        update=_update_size("height"),
    )
    wrap: BoolProperty(
        name="Seamless Wrap", description="Make the left and right edges meet (for custom sizes)", default=True
    )
    seed: IntProperty(name="Seed", min=0, max=SEED_MAX, default=0)
    random_seed: BoolProperty(name="Random Seed", description="Use a new seed for every run", default=True)
    steps: IntProperty(name="Steps", min=1, soft_max=150, default=50)
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale", min=0.0, soft_max=20.0, default=7.5)
    method: EnumProperty(
        name="Method",
        items=[
            ("msd", "Multi-Scale Diffusion", "Windows guided by a coarser copy of the panorama (coherent layout)"),
            ("multidiffusion", "MultiDiffusion", "Plain overlapping windows"),
        ],
        default="msd",
    )
    omega: FloatProperty(name="Omega", description="Strength of the coarse-level guidance (0 = MultiDiffusion)", min=0.0, soft_max=20.0, default=10.0)
    gradient: EnumProperty(
        name="Gradient",
        items=[
            ("exact", "Exact", "Gradient through the UNet, the paper's method (best layout, about 4× the time of MultiDiffusion)"),
            ("refresh", "Refresh", "Closed-form gradient, then the guided window is denoised again (about 2×)"),
            ("fast", "Fast", "Closed-form gradient, one UNet call per window (as fast as MultiDiffusion, less memory)"),
        ],
        default="exact",
    )
    scales: IntProperty(name="Levels", description="Pyramid levels (0 = automatic)", min=0, soft_max=6, default=0)
    target: EnumProperty(
        name="Use As",
        items=[
            ("WORLD", "World", "Set as the scene's world background"),
            ("BACKDROP", "Backdrop", "Add a backdrop object showing the panorama"),
            ("IMAGE", "Image Only", "Load the image, change nothing else"),
        ],
        default="WORLD",
    )
    backdrop_shape: EnumProperty(
        name="Shape",
        items=[("FLAT", "Flat", "A plane"), ("CURVED", "Curved", "A curved sheet around the scene")],
        default="FLAT",
    )
    world_strength: FloatProperty(name="Strength", min=0.0, soft_max=10.0, default=1.0)
    world_rotation: FloatProperty(name="Rotation", subtype='ANGLE', soft_min=-math.pi, soft_max=math.pi, default=0.0)
    backdrop_strength: FloatProperty(name="Strength", min=0.0, soft_max=10.0, default=1.0)
    hdr: BoolProperty(
        name="HDR (EXR)",
        description="Also write a linear OpenEXR beside the PNG whose bright highlights (sun, sky) are expanded, "
                    "and light the world with it. An estimate for lighting, not measured radiance",
        default=GenerationSettings.hdr,
    )
    hdr_knee: FloatProperty(
        name="HDR Knee", description="Linear brightness above which highlights are expanded; below it the EXR "
                                     "equals the PNG",
        min=core.HDR_KNEE_RANGE[0], max=core.HDR_KNEE_RANGE[1], default=GenerationSettings.hdr_knee,
    )
    hdr_peak: FloatProperty(
        name="HDR Peak", description="Linear brightness that white becomes in the EXR (1 = no expansion)",
        min=core.HDR_PEAK_RANGE[0], max=core.HDR_PEAK_RANGE[1], soft_max=100.0, default=GenerationSettings.hdr_peak,
    )


def settings_from_scene(scene, prefs) -> GenerationSettings:
    """The GenerationSettings for the scene's panel values and the preferences; raises BadInput."""
    group = scene.msd_panorama
    seed = random.randint(0, SEED_MAX) if group.random_seed else group.seed
    return GenerationSettings(
        prompt=group.prompt,
        negative_prompt=group.negative_prompt,
        width=group.width,
        height=group.height,
        wrap=effective_wrap(group),
        model=_model_path(prefs.model.strip()),
        model_config=_model_path(prefs.model_config.strip()) or None,
        method=group.method,
        gradient=group.gradient,
        omega=group.omega,
        scales=group.scales or None,
        steps=group.steps,
        guidance=group.guidance,
        seed=seed,
        device=prefs.device,
        dtype=prefs.precision,
        hdr=group.hdr,
        hdr_knee=group.hdr_knee,
        hdr_peak=group.hdr_peak,
    ).validate()


def _model_path(text: str) -> str:
    """Local model paths made absolute (Blender's "//" included), since the worker runs in another
    folder; anything else (a Hugging Face id) unchanged."""
    if text.startswith("//"):
        return bpy.path.abspath(text)
    expanded = os.path.expanduser(text)
    return os.path.abspath(expanded) if os.path.exists(expanded) else text


def settings_to_scene(settings: GenerationSettings, scene) -> None:
    """Fill the panel from settings (the reverse of settings_from_scene for the scene's fields)."""
    if settings.seed > SEED_MAX:
        raise BadInput(f"seed {settings.seed} is larger than Blender's seed field allows ({SEED_MAX})")
    group = scene.msd_panorama
    aspect = next(
        (item for item, preset in ASPECT_PRESETS.items() if core.PRESETS[preset][:3] == (settings.width, settings.height, settings.wrap)),
        "CUSTOM",
    )
    group.aspect = aspect
    # Through the ID properties: the size callbacks would otherwise adjust one side to the preset's ratio.
    group["width"], group["height"], group["wrap"] = settings.width, settings.height, settings.wrap
    group.prompt = settings.prompt
    group.negative_prompt = settings.negative_prompt
    group.method = settings.method
    group.gradient = settings.gradient
    group.omega = settings.omega
    group.scales = settings.scales or 0
    group.steps = settings.steps
    group.guidance = settings.guidance
    group.seed = settings.seed
    group.random_seed = False
    group.hdr, group.hdr_knee, group.hdr_peak = settings.hdr, settings.hdr_knee, settings.hdr_peak


classes = (MSD_PanoramaSettings,)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)


def register():
    _register_classes()
    bpy.types.Scene.msd_panorama = PointerProperty(type=MSD_PanoramaSettings)


def unregister():
    del bpy.types.Scene.msd_panorama
    _unregister_classes()
