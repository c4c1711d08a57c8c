"""Cube map faces of an equirectangular 360° world, for game engines (``--cubemap``; the panel's Export Cube Map).

Pure numpy (no torch, no bpy): the add-on exports faces from Blender's own Python.

Convention: the OpenGL cube map (Y up, right-handed), each face as seen from the centre of the cube, named
``px nx py ny pz nz`` (+X, −X, +Y, −Y, +Z, −Z): the names and orientation three.js's CubeTextureLoader,
Babylon.js and Godot's six-image cube maps expect; Unity and Unreal import the same six images (Unity as
"6 Frames Layout"). Blender is Z up: the engine's +Y is Blender's +Z (the zenith), its +X Blender's +X (the
panorama's centre) and its +Z Blender's −Y. Per face (the OpenGL specification's table of cube map
faces, rows from the top of the image): right = s axis, down = t axis.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np

FACES = ("px", "nx", "py", "ny", "pz", "nz")
# face: (forward, right, down) in the engine's (OpenGL) coordinates
FACE_AXES = {
    "px": ((1, 0, 0), (0, 0, -1), (0, -1, 0)),
    "nx": ((-1, 0, 0), (0, 0, 1), (0, -1, 0)),
    "py": ((0, 1, 0), (1, 0, 0), (0, 0, 1)),
    "ny": ((0, -1, 0), (1, 0, 0), (0, 0, -1)),
    "pz": ((0, 0, 1), (1, 0, 0), (0, -1, 0)),
    "nz": ((0, 0, -1), (-1, 0, 0), (0, -1, 0)),
}


def engine_to_blender(directions: np.ndarray) -> np.ndarray:
    """OpenGL (Y up) directions to Blender's (Z up): (x, y, z) → (x, −z, y)."""
    x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
    return np.stack([x, -z, y], axis=-1)


def face_directions(face: str, size: int) -> np.ndarray:
    """Unit directions (size, size, 3) in Blender's coordinates of a face's pixel centres, top row first."""
    forward, right, down = (np.asarray(axis, float) for axis in FACE_AXES[face])
    ticks = (np.arange(size) + 0.5) / size * 2 - 1
    t, s = np.meshgrid(ticks, ticks, indexing="ij")
    directions = forward + s[..., None] * right + t[..., None] * down
    return engine_to_blender(directions / np.linalg.norm(directions, axis=-1, keepdims=True))


def equirect_coords(directions: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (row, column) of Blender directions in an equirectangular image: the image's centre faces +X,
    its top row is the zenith, u = 0.5 − atan2(y, x)/2π (Blender's mapping); pixel centres at integers."""
    x, y, z = directions[..., 0], directions[..., 1], directions[..., 2]
    u = 0.5 - np.arctan2(y, x) / (2 * math.pi)
    v = 0.5 - np.arctan2(z, np.hypot(x, y)) / math.pi  # from the top
    return v * height - 0.5, u * width - 0.5


def sample_equirect(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (H, W, C) image, wrapping across 0/360° and clamped at the top and bottom rows."""
    height, width = image.shape[:2]
    rows = np.clip(rows, 0, height - 1)
    top = np.clip(np.floor(rows).astype(int), 0, max(height - 2, 0))
    left = np.floor(cols).astype(int)
    fr, fc = (rows - top)[..., None], (cols - left)[..., None]
    bottom = np.minimum(top + 1, height - 1)
    left, right = left % width, (left + 1) % width
    upper = image[top, left] * (1 - fc) + image[top, right] * fc
    lower = image[bottom, left] * (1 - fc) + image[bottom, right] * fc
    return upper * (1 - fr) + lower * fr


def cube_faces(image: np.ndarray, size: int | None = None) -> dict[str, np.ndarray]:
    """The six faces (size × size × C, float) of an equirectangular (H, W, C) image; ``size`` defaults to W/4,
    the panorama's own resolution at the horizon (a face spans 90°)."""
    image = np.asarray(image, dtype=np.float64)
    height, width = image.shape[:2]
    size = size or max(1, width // 4)
    return {face: sample_equirect(image, *equirect_coords(face_directions(face, size), height, width))
            for face in FACES}


def face_paths(path, suffix: str = ".png") -> dict[str, pathlib.Path]:
    """Where the faces of the panorama saved as ``path`` go: beside it, ``<stem>_px.png`` … ``<stem>_nz.png``."""
    path = pathlib.Path(path)
    return {face: path.with_name(f"{path.stem}_{face}{suffix}") for face in FACES}
