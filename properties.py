"""Scene settings (Scene.msd_panorama), the run's live state, and the one mapping UI ⇄ GenerationSettings."""

import dataclasses
import math
import os
import random
import re
from dataclasses import dataclass

import bpy
from bpy.props import (
    BoolProperty,
    CollectionProperty,
    EnumProperty,
    FloatProperty,
    IntProperty,
    PointerProperty,
    StringProperty,
)
from bpy.types import PropertyGroup

from .msd_core import settings as core
from .msd_core.sampling import plan
from .msd_core.errors import BadInput
from .msd_core.settings import GenerationSettings
from .msd_core.variations import MAX_VARIATIONS
from .preferences import _BLEND_RELATIVE as BLEND_RELATIVE, ALL_GPUS, MSD_AddonPreferences

# Aspect enum item → msd_core preset name.
ASPECT_PRESETS = {"WORLD_360": "360", "STRIP": "strip", "BACKDROP": "backdrop"}
SEED_MAX = core.DRAWN_SEED_LIMIT - 1  # Blender's IntProperty is 32-bit


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
    last_error_kind: str = ""  # msd_core.worker.protocol.ERROR_KINDS, e.g. "model_not_found"
    preview_image_uid: int | None = None  # session_uid of the image with the latest coarse preview
    last_output: str = ""  # file of the latest finished panorama
    last_image: str = ""  # its image datablock
    last_seed: int | None = None
    ms_per_window: float | None = None  # the worker's last measured UNet rate, for estimates before a run

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


def _update_quality(group, context):
    """Write the quality preset's settings (msd_core.settings.QUALITY) into the panel's fields."""
    for name, value in core.QUALITY[group.quality.lower()][0].items():
        setattr(group, name, value)


_STANDARD = core.QUALITY[core.DEFAULT_QUALITY][0]
# The gradient modes (msd_core.settings.GRADIENTS), for Gradient and Later Gradient alike.
_GRADIENT_ITEMS = (
    ("exact", "Exact", "Gradient through the UNet, the paper's method (best layout, about 4× the time of MultiDiffusion)"),
    ("refresh", "Refresh", "Closed-form gradient, then the guided window is denoised again (about 2×)"),
    ("fast", "Fast", "Closed-form gradient, one UNet call per window (as fast as MultiDiffusion, less memory)"),
)


def _seed_set(group, _context) -> None:
    if group.large_seed:  # setting Seed replaces a stored large seed
        group.large_seed = ""


def _random_seed_set(group, _context) -> None:
    if group.random_seed and group.large_seed:  # and so does drawing seeds again
        group.large_seed = ""


class MSD_LoraSlot(PropertyGroup):
    """One LoRA of the panel's list: a .safetensors file and its weight."""

    path: StringProperty(name="File", description="The LoRA's .safetensors file", subtype='FILE_PATH',
                         options=BLEND_RELATIVE)
    weight: FloatProperty(
        name="Weight", description="How strongly the LoRA applies (1 = as trained, 0 = off, negative = inverted)",
        min=core.LORA_WEIGHT_RANGE[0], max=core.LORA_WEIGHT_RANGE[1], soft_min=-2.0, soft_max=2.0, default=1.0,
    )


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
    seed: IntProperty(name="Seed", min=0, max=SEED_MAX, default=0, update=_seed_set)
    # A restored seed above the Seed field's limit (files made before seeds were drawn below 2^31, or an
    # explicit --seed), kept as text; setting Seed or turning Random Seed on replaces it.
    large_seed: StringProperty(
        name="Stored Seed", description="A seed from a panorama file, too large for the Seed field; setting Seed replaces it",
    )
    random_seed: BoolProperty(
        name="Random Seed", description="Use a new seed for every run", default=True, update=_random_seed_set
    )
    quality: EnumProperty(
        name="Quality",
        items=[(name.upper(), name.capitalize(), what) for name, (_, what) in core.QUALITY.items()],
        default=core.DEFAULT_QUALITY.upper(),
        update=_update_quality,
    )
    steps: IntProperty(name="Steps", min=1, soft_max=150, default=_STANDARD["steps"])
    guidance: FloatProperty(name="Guidance", description="Classifier-free guidance scale", min=0.0, soft_max=20.0, default=7.5)
    method: EnumProperty(
        name="Method",
        items=[
            ("msd", "Multi-Scale Diffusion", "Windows guided by a coarser copy of the panorama (coherent layout)"),
            ("multidiffusion", "MultiDiffusion", "Plain overlapping windows"),
        ],
        default="msd",
    )
    omega: FloatProperty(name="Omega", description="Strength of the coarse-level guidance (0 = MultiDiffusion; the "
                         "paper's 10, Draft and Standard 14)", min=0.0, soft_max=20.0, default=_STANDARD["omega"])
    gradient: EnumProperty(
        name="Gradient",
        items=_GRADIENT_ITEMS,
        default=_STANDARD["gradient"],
    )
    scheduler: EnumProperty(
        name="Solver",
        items=[
            ("ddim", "DDIM", "The paper's solver (50 steps)"),
            ("dpmpp-2m", "DPM-Solver++ (2M)", "A multistep solver: the same layout in 20–25 steps"),
        ],
        default=_STANDARD["scheduler"],
    )
    guided_fraction: FloatProperty(
        name="Guided Steps", description="Share of the steps, from the first, guided with the gradient above",
        subtype='FACTOR', min=0.01, max=1.0, default=_STANDARD["guided_fraction"],
    )
    late_gradient: EnumProperty(
        name="Later Gradient",
        items=[
            ("none", "None", "The later steps denoise only the finest level (MultiDiffusion)"),
            *_GRADIENT_ITEMS,
        ],
        default=_STANDARD["late_gradient"],
    )
    coarse_gradient: EnumProperty(
        name="Coarse Gradient",
        description="Where a step takes the exact gradient, the gradient of the second level from the top, the one "
                    "the coarsest guides (docs/layout.md 6.13)",
        items=[
            ("exact", "Exact", "The exact gradient there too (the paper's, Best)"),
            ("refresh", "Refresh", "No backward pass there, at the same layout (Draft, Standard)"),
        ],
        default=_STANDARD["coarse_gradient"],
    )
    pull_through: EnumProperty(
        name="Pull Through",
        description="The finest level's exact gradient's direction towards the level above (docs/layout.md 6.16)",
        items=[
            ("step", "Solver Step", "Through the solver step, every pixel of a block pulled alike (the paper's)"),
            ("x0", "x₀ Estimate", "Through the model's x₀ estimate, at the same length and cost: more single "
                                 "objects (one sun, not two) and fewer block edges on the test priors"),
        ],
        default=GenerationSettings.pull_through,
    )
    windows: EnumProperty(
        name="Windows",
        items=[
            ("dense", "Dense", "Overlapping windows every 1/8 window (the paper's MultiDiffusion)"),
            ("shifted", "Shifted", "Non-overlapping tiles at a new offset every step (a fraction of the work)"),
        ],
        default=_STANDARD["windows"],
    )
    pyramid: EnumProperty(
        name="Pyramid",
        items=[
            ("global", "Global", "The halving pyramid plus a level that squeezes a wide panorama into one window, "
                                 "so one window sees all of it: one layout at 2:1 and 4:1 far more often"),
            ("halving", "Halving", "The paper's pyramid: each level half the size of the next"),
        ],
        default=GenerationSettings.pyramid,
    )
    global_window: EnumProperty(
        name="Global Window",
        items=[
            ("square", "Square", "The global level squeezes a wide world into one square window"),
            ("wide", "Wide", "The global level is one window of the world's aspect (2:1 for a 360° world): for "
                             "models or LoRAs trained on whole equirectangular images; twice a window's work"),
        ],
        default=GenerationSettings.global_window,
    )
    global_move: EnumProperty(
        name="Global Move",
        items=[
            ("roll", "Roll", "A 360° world's global level moves round the world every step like the tiles below, "
                             "so the 0/360° edge is not always its border"),
            ("fixed", "Fixed", "The global level is one window that never moves (v0.5): its borders always meet "
                               "at 0/360°"),
        ],
        default=GenerationSettings.global_move,
    )
    poles: EnumProperty(
        name="Poles",
        items=[
            ("sphere", "Sphere", "Also denoise each pole cap as a perspective view, so a 360° world does not pinch "
                                 "when the camera looks straight up or down (about 2 % more work)"),
            ("flat", "Flat", "The equirectangular strip alone: the poles pinch into radial streaks"),
        ],
        default=GenerationSettings.poles,
    )
    coarse_noise: EnumProperty(
        name="Coarse Noise",
        items=[
            ("drawn", "Drawn Start", "Matched, and the coarsest level's starting state is drawn first by its own few "
                                     "steps: large panoramas are not pulled towards uniform scenes"),
            ("matched", "Matched", "Each coarse level is denoised at the noise level it really has: one layout at "
                                   "2:1 and 4:1 far more often"),
            ("literal", "Literal", "The paper's: coarse levels denoised as if as noisy as the full panorama"),
        ],
        default=GenerationSettings.coarse_noise,
    )
    fine_start: FloatProperty(
        name="Finest Level Joins",
        description="Share of the steps before the finest level joins, starting from the levels above it: "
                    "better layout and less work, less fine detail (0 = every level from the first step, the paper's)",
        subtype='FACTOR', min=0.0, max=0.9, default=GenerationSettings.fine_start,
    )
    fine_join: EnumProperty(
        name="Late Join",
        items=[
            ("stochastic", "Stochastic", "A level that joined late draws part of its noise afresh each step, finer "
                                         "than the top two levels only: the fine detail comes back"),
            ("deterministic", "Deterministic", "A level that joined late steps like the others (v0.6): the level "
                                               "above's blocks stay"),
        ],
        default=GenerationSettings.fine_join,
    )
    tile_starts: EnumProperty(
        name="Tile Starts",
        description="Where the finer levels' shifted tiles may start (docs/layout.md 6.9)",
        items=[
            ("even", "Even", "On the level above's 2×2 grid, so every tile edge lies on its block edges (v0.7, Best)"),
            ("any", "Any", "On any pixel: a tile starting between two pixels of the level above is guided on the "
                           "blocks it holds whole, the split ones after the merge; fewer 2×2 block edges "
                           "(Draft, Standard)"),
        ],
        default=_STANDARD["tile_starts"],
    )
    fine_steps: EnumProperty(
        name="Finest Steps",
        description="How the finest level steps within its own 2×2 blocks, the part no pull sees (docs/layout.md 6.17)",
        items=[
            ("stochastic", "Stochastic", "Part of that noise is drawn afresh each guided step: more single objects at "
                                         "the same detail and work (Standard)"),
            ("deterministic", "Deterministic", "Stepped like the rest (Draft, Best, the paper)"),
        ],
        default=_STANDARD["fine_steps"],
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
    variation_count: IntProperty(
        name="Variations", description="How many drafts Generate Variations makes (consecutive seeds)",
        min=1, max=MAX_VARIATIONS, default=4,
    )
    refine_strength: FloatProperty(
        name="Strength", description="How much of the panorama is redrawn (the share of the steps that run)",
        min=0.01, max=1.0, default=core.DEFAULT_STRENGTH, subtype='FACTOR',
    )
    refine_scale: FloatProperty(
        name="Scale", description="Size of the result relative to the source (1 = restyle, 2 = upscale)",
        min=0.25, soft_max=4.0, default=2.0,
    )
    hdr: BoolProperty(
        name="HDR (EXR)",
        description="Also write a linear OpenEXR beside the PNG whose bright highlights (sun, sky) are expanded, "
                    "and light the world with it. An estimate for lighting, not measured radiance",
        default=GenerationSettings.hdr,
    )
    cubemap: BoolProperty(
        name="Cube Map",
        description="Also write the six cube map faces of a 360° world beside the PNG (NAME_px.png … NAME_nz.png, "
                    "OpenGL convention, Y up, as game engines expect; EXR faces too with HDR)",
        default=GenerationSettings.cubemap,
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
    loras: CollectionProperty(type=MSD_LoraSlot, name="LoRAs", description="LoRAs applied to the model, in order")
    lora_index: IntProperty(name="Active LoRA", min=0)


def settings_from_scene(scene, prefs) -> GenerationSettings:
    """The GenerationSettings for the scene's panel values and the preferences; raises BadInput."""
    return _scene_settings(scene, prefs).validate()


def _scene_settings(scene, prefs) -> GenerationSettings:
    group = scene.msd_panorama
    seed = random.randint(0, SEED_MAX) if group.random_seed else panel_seed(group)
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
        scheduler=group.scheduler,
        guided_fraction=round(group.guided_fraction, 6),  # Blender's float32: 0.7 reads 0.699999988
        late_gradient=group.late_gradient,
        coarse_gradient=group.coarse_gradient,
        pull_through=group.pull_through,
        windows=group.windows,
        pyramid=group.pyramid,
        global_window=group.global_window,
        global_move=group.global_move,
        coarse_noise=group.coarse_noise,
        fine_start=round(group.fine_start, 6),  # Blender's float32, as guided_fraction
        fine_join=group.fine_join,
        tile_starts=group.tile_starts,
        fine_steps=group.fine_steps,
        poles=group.poles,
        omega=group.omega,
        scales=group.scales or None,
        steps=group.steps,
        guidance=group.guidance,
        seed=seed,
        device=settings_device(prefs),
        dtype=prefs.precision,
        hdr=group.hdr,
        hdr_knee=group.hdr_knee,
        hdr_peak=group.hdr_peak,
        loras=[{"path": _model_path(slot.path.strip()), "weight": round(slot.weight, 6)} for slot in group.loras],
        cubemap=group.cubemap and effective_wrap(group) and group.width == 2 * group.height,
    )


def settings_device(prefs) -> str:
    """The settings' device for the preferences' Device: All GPUs runs on CUDA (shared: ``request_ranks``)."""
    return "cuda" if prefs.device == ALL_GPUS else prefs.device


def request_ranks(prefs) -> int:
    """The generate request's ranks: 0 (one per GPU) for All GPUs, else one process."""
    return 0 if prefs.device == ALL_GPUS else 1


def panel_seed(group) -> int:
    """The panel's fixed seed: a stored large seed if there is one, else the Seed field."""
    if not group.large_seed:
        return group.seed
    if not group.large_seed.isdigit() or len(group.large_seed) > 19:
        raise BadInput(f"the stored seed {group.large_seed[:40]!r} is not a whole number below 2^63; set Seed")
    return int(group.large_seed)


def estimate_text(scene, prefs) -> str:
    """The UNet work the panel's settings will take, in seconds once the worker has measured its rate;
    empty when the settings are invalid or the model's window is unknown without loading it."""
    settings = dataclasses.replace(_scene_settings(scene, prefs), prompt="estimate")
    try:
        work = plan.plan_without_model(settings, None, "float32").work()
    except BadInput:
        return ""
    if run_state.ms_per_window:
        return f"≈ {round(plan.estimated_seconds(work, run_state.ms_per_window))} s of sampling"
    return f"{work['forwards']} UNet window passes + {work['backwards']} backward"


def _model_path(text: str) -> str:
    """Local model paths made absolute (Blender's "//" included), since the worker runs in another
    folder; anything else (a Hugging Face id) unchanged."""
    if text.startswith("//"):
        return bpy.path.abspath(text)
    expanded = os.path.expanduser(text)
    return os.path.abspath(expanded) if os.path.exists(expanded) else text


def settings_to_scene(settings: GenerationSettings, scene) -> None:
    """Fill the panel from settings (the reverse of settings_from_scene for the scene's fields).

    Every value is checked against the panel's own limits first, so either all fields are written
    or, with BadInput naming the field as the panel does, none."""
    values = _panel_values(settings)
    for name, value in values.items():
        _check_fits_panel(name, value)
    for lora in settings.loras:
        _check_fits_panel("weight", lora["weight"], MSD_LoraSlot)
    group = scene.msd_panorama
    group.aspect = values.pop("aspect")
    # Through the ID properties: the size callbacks would otherwise adjust one side to the preset's ratio.
    for name in ("width", "height", "wrap"):
        group[name] = values.pop(name)
    for name, value in values.items():
        setattr(group, name, value)
    group.loras.clear()
    for lora in settings.loras:
        slot = group.loras.add()
        slot.path, slot.weight = lora["path"], lora["weight"]
    group.lora_index = 0


def _panel_values(settings: GenerationSettings) -> dict:
    size = (settings.width, settings.height, settings.wrap)
    aspect = next((item for item, preset in ASPECT_PRESETS.items() if core.PRESETS[preset][:3] == size), "CUSTOM")
    return {
        "aspect": aspect, "width": settings.width, "height": settings.height, "wrap": settings.wrap,
        "prompt": settings.prompt, "negative_prompt": settings.negative_prompt, "method": settings.method,
        "gradient": settings.gradient, "windows": settings.windows, "omega": settings.omega,
        "scheduler": settings.scheduler, "guided_fraction": settings.guided_fraction,
        "late_gradient": settings.late_gradient, "coarse_gradient": settings.coarse_gradient,
        "pull_through": settings.pull_through, "pyramid": settings.pyramid, "global_window": settings.global_window, "global_move": settings.global_move,
        "coarse_noise": settings.coarse_noise, "fine_start": settings.fine_start, "fine_join": settings.fine_join,
        "tile_starts": settings.tile_starts, "fine_steps": settings.fine_steps, "poles": settings.poles,
        "scales": settings.scales or 0, "cubemap": settings.cubemap,
        "steps": settings.steps, "guidance": settings.guidance, "random_seed": False,
        # Seed first (its update clears the stored seed), then a seed too large for it as text.
        "seed": settings.seed if settings.seed <= SEED_MAX else 0,
        "large_seed": str(settings.seed) if settings.seed > SEED_MAX else "",
        "hdr": settings.hdr, "hdr_knee": settings.hdr_knee, "hdr_peak": settings.hdr_peak,
    }  # fmt: skip


def _check_fits_panel(name: str, value, owner=None) -> None:
    """Raise BadInput unless the panel's property ``name`` (of ``owner``, default the scene's settings) can
    hold ``value`` exactly."""
    prop = (owner or MSD_PanoramaSettings).bl_rna.properties[name]
    kind = {"INT": int, "FLOAT": (int, float), "BOOLEAN": bool, "STRING": str, "ENUM": str}[prop.type]
    if isinstance(value, bool) != (prop.type == "BOOLEAN") or not isinstance(value, kind):
        raise BadInput(f"{prop.name} {value!r} is not a {prop.type.lower()} value")
    if prop.type in {"INT", "FLOAT"} and not prop.hard_min <= value <= prop.hard_max:
        raise BadInput(f"{prop.name} {value!r} is outside what the panel allows ({prop.hard_min} to {prop.hard_max})")
    if prop.type == "ENUM" and value not in prop.enum_items.keys():
        raise BadInput(f"{prop.name} {value!r} is not one of the panel's choices")


# Where each setting is set in Blender: (where, property). Settings are GenerationSettings' fields,
# as the worker's events name them ("field"); the CLI's flags are their names with dashes (--model-config).
_PANEL, _SAMPLER, _PREFERENCES = "the Panorama panel", "the Panorama panel's Sampler section", "the add-on preferences"
_LORAS = "the Panorama panel's LoRAs section"
SETTING_PLACES = {
    "prompt": (_PANEL, "prompt"), "negative_prompt": (_PANEL, "negative_prompt"),
    "negative": (_PANEL, "negative_prompt"),  # the CLI's --negative
    "width": (_PANEL, "width"), "height": (_PANEL, "height"), "wrap": (_PANEL, "wrap"),
    "seed": (_SAMPLER, "seed"), "steps": (_SAMPLER, "steps"), "guidance": (_SAMPLER, "guidance"),
    "method": (_SAMPLER, "method"), "omega": (_SAMPLER, "omega"), "gradient": (_SAMPLER, "gradient"), "windows": (_SAMPLER, "windows"),
    "scheduler": (_SAMPLER, "scheduler"), "guided_fraction": (_SAMPLER, "guided_fraction"),
    "late_gradient": (_SAMPLER, "late_gradient"), "coarse_gradient": (_SAMPLER, "coarse_gradient"),
    "pull_through": (_SAMPLER, "pull_through"),
    "pyramid": (_SAMPLER, "pyramid"), "global_window": (_SAMPLER, "global_window"), "global_move": (_SAMPLER, "global_move"),
    "coarse_noise": (_SAMPLER, "coarse_noise"), "fine_start": (_SAMPLER, "fine_start"),
    "fine_join": (_SAMPLER, "fine_join"), "tile_starts": (_SAMPLER, "tile_starts"), "fine_steps": (_SAMPLER, "fine_steps"),
    "scales": (_SAMPLER, "scales"),
    "poles": (_SAMPLER, "poles"), "cubemap": (_PANEL, "cubemap"),
    "hdr": (_PANEL, "hdr"), "hdr_knee": (_SAMPLER, "hdr_knee"), "hdr_peak": (_SAMPLER, "hdr_peak"),
    "model": (_PREFERENCES, "model"), "model_config": (_PREFERENCES, "model_config"),
    "device": (_PREFERENCES, "device"), "dtype": (_PREFERENCES, "precision"),
    "loras": (_LORAS, "loras"), "lora": (_LORAS, "loras"),  # "lora": the CLI's --lora
}  # fmt: skip
_CLI_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def setting_label(setting: str) -> tuple[str, str] | None:
    """(label, where) of a setting as Blender shows it, e.g. ("Model", "the add-on preferences")."""
    if setting not in SETTING_PLACES:  # None included
        return None
    where, name = SETTING_PLACES[setting]
    owner = MSD_AddonPreferences if where == _PREFERENCES else MSD_PanoramaSettings
    return owner.bl_rna.properties[name].name, where


def in_panel_terms(message: str, setting: str | None = None, fallback: str | None = None) -> str:
    """An error message of the worker or msd_core as Blender's panel speaks: command-line flags become
    the labels of the fields they stand for, and the setting concerned (``setting``, else the first
    flag named, else ``fallback``) is pointed to where it is set: "set Model in the add-on preferences"."""
    flags = [match.group(1).replace("-", "_") for match in _CLI_FLAG.finditer(message)]

    def label(match):
        place = setting_label(match.group(1).replace("-", "_"))
        return place[0] if place else match.group(0)

    text = _CLI_FLAG.sub(label, message)
    place = next(filter(None, map(setting_label, [setting, *flags, fallback])), None)
    return f"{text}; set {place[0]} in {place[1]}" if place else text


classes = (MSD_LoraSlot, MSD_PanoramaSettings)

_register_classes, _unregister_classes = bpy.utils.register_classes_factory(classes)


def register():
    _register_classes()
    bpy.types.Scene.msd_panorama = PointerProperty(type=MSD_PanoramaSettings)


def unregister():
    del bpy.types.Scene.msd_panorama
    _unregister_classes()
