"""A linear HDR companion of a panorama for lighting: sRGB decoding, highlight expansion, OpenEXR I/O.

An 8-bit panorama stops at white, so a sun and a bright sky light a scene no more than a white wall
does. ``expand_highlights`` turns the PNG's linear light back into something a renderer can light
with: pixels whose luminance is at most ``knee`` keep their values; brighter ones are scaled up along
``inverse_tonemap``, an exponential curve that leaves the knee with slope 1 and reaches ``peak`` at
white. This is an expansion by a chosen curve, not measured radiance (see docs/hdr.md).

``write_exr`` writes a half-float RGB scanline OpenEXR (ZIP compressed) with text attributes through
the OpenEXR package (the Academy Software Foundation's binding, a worker requirement, imported only
there); ``read_exr_attributes`` reads a header back in numpy alone (Blender's Python, which has no
OpenEXR package, uses it to check that an EXR belongs to its PNG). No torch, no bpy.
"""

from __future__ import annotations

import math
import struct

import numpy as np

REC709_LUMINANCE = (0.2126, 0.7152, 0.0722)

EXR_MAGIC = 20000630
ZIP_COMPRESSION = 3  # the compression attribute's value for ZIP (zlib, 16 scanlines per block)
MAX_HEADER_BYTES = 4 * 2**20  # a header is a few KB; a larger one is not ours
MAX_NAME_BYTES = 255
# Attributes the writer sets (and OpenEXR's required ones): metadata may not take their names.
RESERVED_ATTRIBUTES = frozenset({
    "channels", "compression", "dataWindow", "displayWindow", "lineOrder", "pixelAspectRatio",
    "screenWindowCenter", "screenWindowWidth", "type", "envmap", "name", "version", "chunkCount", "tiles",
})


def srgb_to_linear(encoded: np.ndarray) -> np.ndarray:
    """The sRGB transfer function's inverse (IEC 61966-2-1): encoded values in [0, 1] → linear light."""
    encoded = np.asarray(encoded, dtype=np.float64)
    return np.where(encoded <= 0.04045, encoded / 12.92, ((encoded + 0.055) / 1.055) ** 2.4)


_SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)  # a table: 8-bit codes → linear


def expansion_rate(knee: float, peak: float) -> float:
    """The rate a > 0 of the exponential branch of inverse_tonemap, i.e. the root of
    (1 − knee) · (e^a − 1) / a = peak − knee (0 when peak is 1: no expansion)."""
    target = (peak - knee) / (1.0 - knee)  # g(1): the branch's height at white, in units of (1 − knee)
    if target <= 1.0:
        return 0.0
    low, high = 0.0, 2.0 * math.log(target) + 2.0  # expm1(high) / high > target there
    for _ in range(200):  # bisection: expm1(a) / a is increasing, the bracket halves each time
        middle = 0.5 * (low + high)
        if math.expm1(middle) / middle < target:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def inverse_tonemap(linear: np.ndarray, knee: float, peak: float) -> np.ndarray:
    """Expand linear values above ``knee`` so that 1 (white) becomes ``peak``; values ≤ knee are unchanged.

        f(x) = x                                  for x ≤ knee
        f(x) = knee + (1 − knee) · (e^(a·t) − 1) / a,   t = (x − knee) / (1 − knee),   for x > knee

    with a = expansion_rate(knee, peak). f is continuous with slope 1 at the knee (C¹), strictly
    increasing, and f(1) = peak; equal steps of x near white add equal numbers of stops.
    """
    linear = np.asarray(linear, dtype=np.float64)
    rate = expansion_rate(knee, peak)
    t = (linear - knee) / (1.0 - knee)
    branch = knee + (1.0 - knee) * (np.expm1(rate * t) / rate if rate else t)
    return np.where(linear > knee, branch, linear)


def expand_highlights(rgb_linear: np.ndarray, knee: float, peak: float) -> np.ndarray:
    """Scale each pixel of a linear Rec.709 image (…, 3) by inverse_tonemap(Y) / Y, Y its luminance.

    Keyed on luminance, not per channel: hues are kept, and a saturated colour with one channel at 1
    (a deep blue sky) is not mistaken for a light source; white becomes (peak, peak, peak). Computed
    in the input's float precision (at least float32), so an 8192 × 4096 panorama fits in memory.
    """
    rgb = np.asarray(rgb_linear)
    rgb = rgb.astype(np.result_type(rgb.dtype, np.float32), copy=True)
    luminance = rgb @ np.asarray(REC709_LUMINANCE, dtype=rgb.dtype)
    bright = luminance > knee
    rgb[bright] *= (inverse_tonemap(luminance[bright], knee, peak) / luminance[bright])[:, None].astype(rgb.dtype)
    return rgb


def linear_hdr(srgb8: np.ndarray, knee: float, peak: float) -> np.ndarray:
    """The HDR companion of an 8-bit sRGB image (H, W, 3): linearised, highlights expanded (float32)."""
    return expand_highlights(_SRGB8_TO_LINEAR[np.asarray(srgb8, dtype=np.uint8)[..., :3]], knee, peak)


# -- OpenEXR -------------------------------------------------------------------------------------------


def write_exr(file, rgb: np.ndarray, attributes: dict[str, str] | None = None, *, latlong: bool = False) -> None:
    """Write ``rgb`` (H, W, 3, linear, top row first) to the binary ``file`` (a path or a writable
    stream) as a half-float RGB scanline OpenEXR with ZIP compression and ``attributes`` as string
    attributes, through the OpenEXR package (a worker requirement). ``latlong`` marks it as a
    latitude-longitude environment map (the standard "envmap" attribute)."""
    import OpenEXR

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"write_exr needs an (H, W, 3) image, got shape {rgb.shape}")
    if not np.isfinite(rgb).all() or rgb.max() > np.finfo(np.float16).max:
        raise ValueError("write_exr needs finite values within the half-float range")
    attributes = attributes or {}
    clashes = sorted(RESERVED_ATTRIBUTES & set(attributes))
    if clashes:
        raise ValueError(f"attribute name(s) reserved by OpenEXR: {', '.join(clashes)}")
    for name in attributes:
        encoded = name.encode("utf-8")
        if not 0 < len(encoded) <= MAX_NAME_BYTES or b"\0" in encoded:
            raise ValueError(f"OpenEXR attribute names are 1–{MAX_NAME_BYTES} bytes without NUL, got {name!r}")
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage, **attributes}
    if latlong:
        header["envmap"] = OpenEXR.ENVMAP_LATLONG
    OpenEXR.File(header, {"RGB": np.ascontiguousarray(rgb, dtype=np.float16)}).write(file)


def read_exr_attributes(path) -> dict[str, bytes | str]:
    """The header attributes of the OpenEXR file at ``path``: string attributes as text, the others
    as their raw bytes. Raises ValueError for a file that is not an OpenEXR or has a malformed header."""
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8 or struct.unpack("<i", start[:4])[0] != EXR_MAGIC:
            raise ValueError(f"{path} is not an OpenEXR file")
        data = file.read(MAX_HEADER_BYTES)
    attributes, position = {}, 0
    try:
        while data[position] != 0:
            name, position = _exr_name(data, position)
            kind, position = _exr_name(data, position)
            (size,) = struct.unpack_from("<i", data, position)
            position += 4
            value = data[position : position + size]
            if size < 0 or len(value) < size:
                raise ValueError
            position += size
            attributes[name] = value.decode("utf-8", "replace") if kind == "string" else value
    except (IndexError, struct.error, ValueError):
        raise ValueError(f"{path} has a malformed or oversized OpenEXR header") from None
    return attributes


def _exr_name(data: bytes, position: int) -> tuple[str, int]:
    end = data.index(b"\0", position, position + MAX_NAME_BYTES + 1)
    return data[position:end].decode("utf-8"), end + 1
