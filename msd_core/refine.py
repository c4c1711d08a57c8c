"""Refine / upscale a panorama from an image: SDEdit (renoise the source's latent, run the rest of the
schedule) with MSD at the target size. Same size = restyle with a new prompt; ×2 = upscale.

The steps, each a small function:
1. ``read_source``: the image file as floats in [0, 1] (8/16-bit PNG, JPEG, …; float images such as
   32-bit TIFF and OpenEXR are linear light and go through ``tonemap.tone_map``; OpenEXR through the
   OpenEXR package, a worker requirement).
2. ``resize_panorama``: to the target size, wrap-aware (the resampling filter reads across 0/360°).
3. ``vae.encode_images``: tiled and wrap-aware, the distribution's mean (deterministic).
4. ``start_step`` and ``renoise``: SDEdit. ⌊strength·steps⌋ steps remain; x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.
5. ``guide_layout``: during the early steps, the coarsest pyramid level's scale of the latent is kept
   the source's (renoised to the same step), so the composition survives even at strength 1; the
   model draws everything finer. docs/refine.md has the evidence on the analytic horizon prior.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import BadInput, Cancelled
from .imageio.output import exr_path_for, storable_text
from .sampling.sampler import alphas_cumprod
from .settings import (
    MAX_SOURCE_PIXELS,
    SOURCE_BYTES_PER_PIXEL,
    SOURCE_PIXELS_ALWAYS,
    SOURCE_PIXELS_PER_TARGET,
    available_memory,
    why_not_a_file,
)
from .imageio.tonemap import tone_map

# The layout guidance (guide_layout) acts while t is above this fraction of the training timesteps:
# the steps that decide the composition; later steps only add detail.
LAYOUT_GUIDANCE_UNTIL = 0.5
EXR_SIGNATURE = b"\x76\x2f\x31\x01"
RADIANCE_SIGNATURES = (b"#?RADIANCE", b"#?RGBE")
# The formats a source may be in (besides OpenEXR, read by the OpenEXR package): Pillow is never
# asked to guess, so an EPS or a PDF renamed .png is refused rather than handed to Ghostscript.
SOURCE_FORMATS = ("PNG", "JPEG", "TIFF", "WEBP")


def start_step(strength: float, steps: int) -> int:
    """The index in a ``steps``-step schedule where SDEdit starts: ⌊strength·steps⌋ steps remain.

    strength 1 runs every step (from almost pure noise), 0.5 the second half. Raises BadInput when no
    step would remain.
    """
    remaining = math.floor(strength * steps)
    if remaining < 1:
        raise BadInput(f"strength {strength} × {steps} steps leaves no step to run; raise the strength or the steps")
    return steps - remaining


def renoise(clean: torch.Tensor, noise: torch.Tensor, alpha: float) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε: the forward diffusion of ``clean`` to the timestep with ᾱ_t = ``alpha``."""
    return math.sqrt(alpha) * clean + math.sqrt(1 - alpha) * noise


def source_size(path) -> tuple[int, int]:
    """(width, height) of the image at ``path`` from its header, nothing decoded; BadInput if it is not
    an image that ``read_source`` can read or has more than MAX_SOURCE_PIXELS pixels."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise BadInput(f"the source image {path} {why_not_a_file(path)}")
    with open(path, "rb") as file:
        head = file.read(16)
    if head.startswith(EXR_SIGNATURE):
        with _open_exr(path, header_only=True) as exr:
            (left, top), (right, bottom) = exr.header()["dataWindow"]
            size = int(right - left + 1), int(bottom - top + 1)
    elif head.startswith(RADIANCE_SIGNATURES):
        raise BadInput(f"{path} is a Radiance HDR file, which cannot be read here; save it as OpenEXR or 16-bit PNG")
    else:
        try:
            with warnings.catch_warnings():  # PIL warns above its own limit; MAX_SOURCE_PIXELS is ours
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path, formats=SOURCE_FORMATS) as image:
                    size = image.size
        except Image.DecompressionBombError:  # PIL's own limit, far above ours
            raise BadInput(f"the source image {path} has more than the {MAX_SOURCE_PIXELS:,} pixels allowed") from None
        except Image.UnidentifiedImageError:
            raise BadInput(f"{path} is not an image that can be read (PNG, JPEG, TIFF, WebP or OpenEXR)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # e.g. a text or ICC chunk over Pillow's limit
            raise BadInput(f"cannot read the source image {path}: {_first_line(exc)}") from None
    if size[0] * size[1] > MAX_SOURCE_PIXELS:
        raise BadInput(f"the source image {path} is {size[0]}×{size[1]}: more than the {MAX_SOURCE_PIXELS:,} pixels allowed")
    return size


def check_source_cost(path, width: int, height: int, available: int | None = None) -> None:
    """Refuse a source whose decoding costs more memory than a ``width`` × ``height`` refine needs:
    more than SOURCE_PIXELS_PER_TARGET times the target's pixels (and more than SOURCE_PIXELS_ALWAYS),
    or more than the memory available now. Reads the header only, so a 74-byte PNG declaring
    8 × 16 000 000 pixels is refused before a byte of it is decoded."""
    source_width, source_height = source_size(path)
    pixels = source_width * source_height
    allowed = max(SOURCE_PIXELS_ALWAYS, SOURCE_PIXELS_PER_TARGET * width * height)
    if pixels > allowed:
        raise BadInput(
            f"the source image {storable_text(os.fspath(path))} is {source_width}×{source_height}: decoding it for a "
            f"{width}×{height} result would cost {pixels * SOURCE_BYTES_PER_PIXEL / 1e9:.1f} GB of memory for "
            f"nothing; scale it down to at most {SOURCE_PIXELS_PER_TARGET}× the result's pixels first"
        )
    available = available_memory() if available is None else available
    if available is not None and pixels * SOURCE_BYTES_PER_PIXEL > available:
        raise BadInput(
            f"reading the source image {storable_text(os.fspath(path))} ({source_width}×{source_height}) needs about "
            f"{pixels * SOURCE_BYTES_PER_PIXEL / 1e9:.1f} GB of memory, more than the {available / 1e9:.1f} GB "
            "available; scale it down first"
        )


def read_source(path, interrupt=None) -> np.ndarray:
    """The image at ``path`` as float32 RGB (H, W, 3) in [0, 1]; BadInput for anything else.

    The size is checked from the header (``source_size``) before any pixel is decoded. A set
    ``interrupt`` (threading.Event) raises Cancelled: PNG and JPEG are decoded as their data is read,
    and every read looks at it, so a cancel ends even a 16K decode at once. (TIFF, WebP and OpenEXR
    decode in one library call, within the pixel limit.)
    """
    path = os.fspath(path)
    source_size(path)
    with open(path, "rb") as file:
        is_exr = file.read(4) == EXR_SIGNATURE
    Cancelled.check(interrupt)
    if is_exr:
        return _read_exr(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _InterruptibleReader(io.FileIO(path), interrupt) as file, Image.open(file, formats=SOURCE_FORMATS) as image:
                image.load()
                Cancelled.check(interrupt)
                return _to_rgb_floats(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # a file cut short or damaged after its header
        raise BadInput(f"cannot read the source image {path}: {_first_line(exc)}") from None


class _InterruptibleReader(io.BufferedReader):
    """A file whose every read first raises Cancelled if ``interrupt`` is set. Pillow decodes PNG and
    JPEG block by block as it reads (64 KB of compressed data at a time, a few MB of pixels at most)."""

    def __init__(self, raw: io.FileIO, interrupt):
        super().__init__(raw)
        self.interrupt = interrupt

    def read(self, size: int | None = -1) -> bytes:
        Cancelled.check(self.interrupt)
        return super().read(size)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _to_rgb_floats(image: Image.Image) -> np.ndarray:
    if image.mode == "F":  # 32-bit float: linear light
        return tone_map(np.repeat(np.asarray(image, dtype=np.float32)[..., None], 3, axis=-1))
    if image.mode.startswith("I"):  # 16-bit (I;16…) or 32-bit integer greys, e.g. 16-bit PNGs
        grey = np.asarray(image.convert("I") if image.mode != "I" else image, dtype=np.float32)
        return np.repeat(np.clip(grey / 65535, 0, 1)[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def _open_exr(path: str, header_only: bool = False):
    try:
        import OpenEXR  # a worker requirement; a worker installed before it was one may lack it
    except ImportError:
        raise BadInput(
            f"{path} is OpenEXR, which needs the OpenEXR package in the worker's Python; "
            "install the worker again (Install Worker) or save the image as 16-bit PNG"
        ) from None
    try:
        return OpenEXR.File(path, header_only=header_only)
    except RuntimeError as exc:  # the library's one error type: damaged, cut short, not really OpenEXR
        raise BadInput(f"cannot read the source image {path}: {exc}") from None


def _read_exr(path: str) -> np.ndarray:
    with _open_exr(path) as exr:
        channels = exr.channels()
        if "RGB" in channels:
            rgb = channels["RGB"].pixels
        elif all(name in channels for name in "RGB"):
            rgb = np.stack([channels[name].pixels for name in "RGB"], axis=-1)
        else:
            raise BadInput(f"{path} has no R, G and B channels")
    return tone_map(np.asarray(rgb, dtype=np.float32)[..., :3])


def resize_panorama(image: np.ndarray, width: int, height: int, wrap: bool) -> torch.Tensor:
    """(H, W, 3) floats → (1, 3, height, width) tensor, bicubic (antialiased when shrinking).

    With ``wrap`` the image is extended circularly before resampling, so the columns at 0° and 360°
    are computed from their true neighbours and the seam stays continuous.
    """
    source_h, source_w = image.shape[:2]
    pad = math.ceil(2 * max(1.0, source_w / width)) + 2 if wrap else 0  # the bicubic filter's reach
    pad = min(pad, source_w)
    channels = []
    for channel in range(image.shape[2]):
        plane = image[..., channel]
        if pad:
            plane = np.concatenate([plane[:, -pad:], plane, plane[:, :pad]], axis=1)
        resized = Image.fromarray(np.ascontiguousarray(plane), "F").resize(
            (width, height), Image.Resampling.BICUBIC, box=(pad, 0, pad + source_w, source_h)
        )
        channels.append(torch.from_numpy(np.asarray(resized, dtype=np.float32).copy()))
    return torch.stack(channels)[None].clamp(0, 1)


def source_metadata(path, strength: float, start: int) -> dict[str, str]:
    """PNG text entries that say where a refined panorama came from (the file's name, not its folder;
    a name that is not UTF-8 with its bytes escaped, see output.storable_text)."""
    name = storable_text(os.path.basename(os.fspath(path)))
    return {"source": name, "strength": repr(float(strength)), "start_step": str(start)}


def check_source_and_output(source, output, exr: bool = False) -> None:
    """Refuse a refine whose output (or, with ``exr``, its EXR companion) is the source file itself:
    the source is only ever read, --overwrite or not."""
    source = os.path.realpath(os.fspath(source))
    for target in (output, exr_path_for(output)) if exr else (output,):
        target = os.path.realpath(os.fspath(target))
        same = target == source or (os.path.exists(target) and os.path.samefile(target, source))
        if same:
            raise BadInput("the {field} {target} is the source image; a refine never writes its source, so choose "
                           "another file", field="output", target=target)


def guide_layout(latents: torch.Tensor, reference: torch.Tensor, factor: int) -> torch.Tensor:
    """Replace the lowest frequencies of ``latents`` with those of ``reference`` (both (1, C, H, W)):
    z − up(ds_f(z)) + up(ds_f(y)), ds_f the f×f block average, up its nearest-neighbour inverse.

    With ``reference`` the source renoised to the same timestep and ``factor`` the coarsest pyramid
    level's, the layout at that scale is the source's while every finer detail is the model's (the
    low-pass guidance of ILVR, Choi et al. 2021). Block averages never mix columns across the 0/360°
    seam, so wrapped panoramas stay seamless.
    """
    def low(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(F.avg_pool2d(z, factor), scale_factor=factor, mode="nearest")

    return latents - low(latents) + low(reference)


def layout_guide(clean: torch.Tensor, noise: torch.Tensor, factor: int, until_t: float):
    """guide(z, step) for the sampling loop: while step.t > ``until_t``, ``guide_layout`` towards the
    source ``clean`` renoised with ``noise`` to the step's end; later steps are left alone.
    ``factor`` 1 (no level coarser than a window) guides nothing: the renoised start alone carries the layout.
    """

    def guide(latents: torch.Tensor, step) -> torch.Tensor:
        if factor == 1 or step.t <= until_t:
            return latents
        return guide_layout(latents, renoise(clean, noise, alphas_cumprod(step)[1]), factor)

    return guide
