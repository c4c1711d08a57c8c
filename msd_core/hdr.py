"""A linear HDR companion of a panorama for lighting: sRGB decoding, highlight expansion, OpenEXR I/O.

An 8-bit panorama stops at white, so a sun and a bright sky light a scene no more than a white wall
does. ``expand_highlights`` turns the PNG's linear light back into something a renderer can light
with: pixels whose luminance is at most ``knee`` keep their values; brighter ones are scaled up along
``inverse_tonemap``, an exponential curve that leaves the knee with slope 1 and reaches ``peak`` at
white. This is an expansion by a chosen curve, not measured radiance (see docs/hdr.md).

``write_exr`` writes a half-float RGB scanline OpenEXR (ZIP compressed) with text attributes, in
numpy alone; ``read_exr_attributes`` reads a header back (Blender's Python uses it to check that an
EXR belongs to its PNG). Pure numpy: no torch, no bpy.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

REC709_LUMINANCE = (0.2126, 0.7152, 0.0722)

EXR_MAGIC = 20000630
EXR_VERSION = 2  # single-part scanline file
LONG_NAMES_FLAG = 0x400  # set in the version field when an attribute name is longer than 31 bytes
ZIP_COMPRESSION = 3  # zlib, 16 scanlines per block
ZIP_LINES = 16
HALF = 1  # pixel type
MAX_HEADER_BYTES = 4 * 2**20  # a header is a few KB; a larger one is not ours
MAX_NAME_BYTES = 255
SHORT_NAME_BYTES = 31


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
    """Write ``rgb`` (H, W, 3, linear, top row first) to the binary ``file`` as a half-float RGB
    scanline OpenEXR with ZIP compression and ``attributes`` as string attributes. ``latlong`` marks
    it as a latitude-longitude environment map (the standard "envmap" attribute)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"write_exr needs an (H, W, 3) image, got shape {rgb.shape}")
    if not np.isfinite(rgb).all() or rgb.max() > np.finfo(np.float16).max:
        raise ValueError("write_exr needs finite values within the half-float range")
    height, width, _ = rgb.shape
    header = _exr_header(width, height, attributes or {}, latlong)
    # Channels are stored in alphabetical order (B, G, R), each a run of `width` halves per line.
    planes = np.ascontiguousarray(rgb[..., ::-1].astype("<f2").transpose(0, 2, 1))  # (H, 3 channels, W)
    blocks = []
    for top in range(0, height, ZIP_LINES):
        raw = planes[top : top + ZIP_LINES].tobytes()
        packed = zlib.compress(_zip_predict(raw))
        data = packed if len(packed) < len(raw) else raw  # a reader takes an unshrunk block as stored
        blocks.append(struct.pack("<ii", top, len(data)) + data)
    offset = len(header) + 8 * len(blocks)
    table = []
    for block in blocks:
        table.append(struct.pack("<Q", offset))
        offset += len(block)
    file.write(header)
    file.write(b"".join(table))
    for block in blocks:
        file.write(block)


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


def _exr_header(width: int, height: int, attributes: dict[str, str], latlong: bool) -> bytes:
    box = struct.pack("<iiii", 0, 0, width - 1, height - 1)
    channels = b"".join(name + b"\0" + struct.pack("<iB3xii", HALF, 0, 1, 1) for name in (b"B", b"G", b"R")) + b"\0"
    required = [
        ("channels", "chlist", channels),
        ("compression", "compression", bytes([ZIP_COMPRESSION])),
        ("dataWindow", "box2i", box),
        ("displayWindow", "box2i", box),
        ("lineOrder", "lineOrder", b"\0"),  # increasing y
        ("pixelAspectRatio", "float", struct.pack("<f", 1.0)),
        ("screenWindowCenter", "v2f", struct.pack("<ff", 0.0, 0.0)),
        ("screenWindowWidth", "float", struct.pack("<f", 1.0)),
    ]
    if latlong:
        required.append(("envmap", "envmap", b"\0"))
    taken = {name for name, _, _ in required}
    clashes = sorted(taken & set(attributes))
    if clashes:
        raise ValueError(f"attribute name(s) reserved by OpenEXR: {', '.join(clashes)}")
    texts = [(name, "string", value.encode("utf-8")) for name, value in attributes.items()]
    longest = 0
    parts = []
    for name, kind, value in required + texts:
        encoded = name.encode("utf-8")
        if not 0 < len(encoded) <= MAX_NAME_BYTES or b"\0" in encoded:
            raise ValueError(f"OpenEXR attribute names are 1–{MAX_NAME_BYTES} bytes without NUL, got {name!r}")
        longest = max(longest, len(encoded))
        parts.append(encoded + b"\0" + kind.encode() + b"\0" + struct.pack("<i", len(value)) + value)
    version = EXR_VERSION | (LONG_NAMES_FLAG if longest > SHORT_NAME_BYTES else 0)
    parts.insert(0, struct.pack("<ii", EXR_MAGIC, version))
    parts.append(b"\0")
    return b"".join(parts)


def _zip_predict(raw: bytes) -> bytes:
    """OpenEXR's ZIP pre-filter: bytes split into even and odd positions, then delta-coded."""
    data = np.frombuffer(raw, dtype=np.uint8)
    interleaved = np.concatenate([data[0::2], data[1::2]])
    deltas = np.empty_like(interleaved)
    deltas[0] = interleaved[0]
    deltas[1:] = (interleaved[1:].astype(np.int16) - interleaved[:-1] + 128).astype(np.uint8)  # modulo 256
    return deltas.tobytes()


def _exr_name(data: bytes, position: int) -> tuple[str, int]:
    end = data.index(b"\0", position, position + MAX_NAME_BYTES + 1)
    return data[position:end].decode("utf-8"), end + 1
