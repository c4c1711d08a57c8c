"""Drafts: several small variations of one panorama (consecutive seeds), to pick one for the full-size run.

Pure Python (no torch): the worker and the Blender add-on share these rules.

A draft is the panorama at the model's smallest size: its short side is one window (512 px for
Stable Diffusion 2 base), the long side keeps the aspect. One window tall means one level of the
halving pyramid, where MSD is exactly MultiDiffusion unless the global level (the default) squeezes a
wide draft into one window on top, so a draft costs a few dozen window denoisings per step.
Because the size differs, the full-size run with a draft's seed starts from other noise: it keeps
the draft's prompt and settings, not its exact picture.
"""

from __future__ import annotations

import dataclasses
import os

from .errors import BadInput
from .settings import LATENT_FACTOR, GenerationSettings, is_int

MAX_VARIATIONS = 16
SEED_LIMIT = 2**63  # GenerationSettings.seed is below this


def draft_size(width: int, height: int, window: int) -> tuple[int, int]:
    """(width, height) of a draft of a width×height panorama on a model whose window is ``window`` px.

    The short side becomes one window (never larger than the panorama's), the long side keeps the
    aspect, rounded to the VAE's factor and at least one window. 2048×1024 with 512 px windows →
    1024×512; 4096×1024 → 2048×512; 256×128 with the tiny model's 64 px windows → 128×64.
    """
    short = min(width, height, window)
    scale = short / min(width, height)
    long_side = max(window, round(max(width, height) * scale / LATENT_FACTOR) * LATENT_FACTOR)
    return (long_side, short) if width >= height else (short, long_side)


def draft_settings(settings: GenerationSettings, model_window: int) -> GenerationSettings:
    """The settings of the first draft (seed = settings.seed): draft size, automatic levels, no HDR.

    ``model_window`` is the model's native window in pixels; an explicit ``settings.window`` wins.
    """
    window = settings.window or model_window
    width, height = draft_size(settings.width, settings.height, window)
    return dataclasses.replace(settings, width=width, height=height, scales=None, hdr=False)


def batch_size(plan, accelerator: bool) -> int:
    """How many drafts to sample together (``MSDPanoramaPipeline.sample_batch``), given one draft's
    ``plan`` (``msd_core.sampling.plan.Plan``) and whether the model runs on an accelerator.

    On an accelerator, as many as one UNet call holds: ``plan.view_batch`` windows (the memory rule) over
    the most windows one draft sends in a call (a level's windows at one step). A GPU denoises a call of
    several windows in little more time than one (SD-2 on an H200: 40 ms for one window, 9.8 ms a window
    for four, 6 for 32: docs/speed.md), while a draft sends only 2–5, so a batch costs about what one draft
    does and the first draft comes no later. On the CPU one: there the time grows with the windows, so a
    batch would only hold the first draft back. Pole caps add each draft's own cap windows in calls of
    their own over the last steps (``plan.caps``), which does not change how many drafts one call holds.
    """
    if not accelerator:
        return 1
    return max(1, plan.view_batch // max(plan.describe()["windows_per_level"]))


def draft_groups(count: int, size: int) -> list[range]:
    """The drafts' indices 0 … count − 1 in batches of ``size`` (the last one may be smaller)."""
    return [range(first, min(first + size, count)) for first in range(0, count, size)]


def check_count(count) -> int:
    """``count`` if it is a valid number of variations, else BadInput."""
    if not is_int(count) or not 1 <= count <= MAX_VARIATIONS:
        raise BadInput(f"'count' must be a whole number from 1 to {MAX_VARIATIONS}, got {count!r}")
    return count


def check_seeds(seed: int, count: int) -> None:
    if seed + count > SEED_LIMIT:
        raise BadInput(f"seeds {seed} to {seed + count - 1} pass the largest seed (2^63−1); use a smaller seed")


def variation_path(output, index: int) -> str:
    """Where variation ``index`` (0-based) of a request whose output is ``output`` is written:
    ``drafts/msd_x.png`` → ``drafts/msd_x_v01.png``, ``drafts/msd_x_v02.png``, …"""
    stem, suffix = os.path.splitext(os.fspath(output))
    return f"{stem}_v{index + 1:02d}{suffix}"
