"""Tone mapping of linear (HDR) pixels for the model, and a plain 8-bit PNG writer: numpy only, so that
Blender's Python (numpy, but neither PIL nor torch) can hand an HDRI to the worker as a PNG.

The operator: Reinhard per channel, c / (1 + c), then the sRGB transfer curve. Mid grey 0.18 maps to
0.43, 1 to 0.74, the sun's 10⁴ to 1: highlights are compressed, never clipped.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def tone_map(linear: np.ndarray) -> np.ndarray:
    """Linear light (any range; negatives count as 0) → display values in [0, 1], float32.

    Non-finite pixels (an overflowed half-float sun, a renderer's NaN) get a defined value rather than
    spreading through the model: +inf is the image's largest finite value, NaN and −inf are 0.
    """
    light = finite_light(np.asarray(linear, dtype=np.float32))
    compressed = light / (1 + light)
    return np.where(
        compressed <= 0.0031308, 12.92 * compressed, 1.055 * np.power(compressed, 1 / 2.4) - 0.055
    ).astype(np.float32)


def finite_light(linear: np.ndarray) -> np.ndarray:
    """``linear`` with negatives as 0, NaN and −inf as 0, +inf as the largest finite value (1 if none)."""
    finite = np.isfinite(linear)
    if finite.all():
        return np.maximum(linear, 0)
    brightest = float(linear[finite].max(initial=1.0))
    return np.maximum(np.nan_to_num(linear, nan=0.0, posinf=brightest, neginf=0.0), 0)


def write_png(path, rgb: np.ndarray) -> None:
    """Write (H, W, 3) values in [0, 1], top row first, as an 8-bit RGB PNG (no metadata)."""
    height, width = rgb.shape[:2]
    pixels = (np.clip(rgb[..., :3], 0, 1) * 255 + 0.5).astype(np.uint8)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)))
        file.write(chunk(b"IEND", b""))
