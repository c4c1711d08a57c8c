"""Cube map export (msd_core.imageio.cubemap, --cubemap): faces where game engines expect them, continuous across
every edge, written beside the PNG (and as EXR with --hdr) without clobbering files."""

import math

import numpy as np
import pytest
from PIL import Image

from msd_core.imageio import cubemap, hdr, output
from msd_core.errors import BadInput

HEIGHT = 128


def smooth_world(height=HEIGHT):
    """An equirectangular image whose value is a smooth function of the Blender direction: (x, y, z) → RGB."""
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(2 * height) + 0.5, indexing="ij")
    latitude, longitude = math.pi * (0.5 - rows / height), math.pi * (1 - 2 * cols / (2 * height))
    direction = np.stack([np.cos(latitude) * np.cos(longitude), np.cos(latitude) * np.sin(longitude),
                          np.sin(latitude)], axis=-1)
    return direction


def test_faces_look_where_the_opengl_convention_says():
    faces = cubemap.cube_faces(smooth_world(), 32)
    centre = {face: faces[face][15:17, 15:17].mean(axis=(0, 1)) for face in cubemap.FACES}
    # Engine (Y up) axes in Blender terms: +X = +X, +Y = +Z (up), +Z = −Y.
    expected = {"px": (1, 0, 0), "nx": (-1, 0, 0), "py": (0, 0, 1), "ny": (0, 0, -1), "pz": (0, -1, 0), "nz": (0, 1, 0)}
    for face, direction in expected.items():
        assert centre[face] == pytest.approx(direction, abs=0.05), face
    # Side faces have the sky at the top; the top face has −Z (Blender +Y) at its top edge.
    for face in ("px", "nx", "pz", "nz"):
        assert faces[face][0, 16, 2] > 0.5 and faces[face][-1, 16, 2] < -0.5
    assert faces["py"][0, 16, 1] > 0.5  # engine −Z = Blender +Y
    # Right of +X is −Z in the engine, which is Blender +Y.
    assert faces["px"][16, -1, 1] > 0.5


def test_faces_are_continuous_across_every_edge():
    size = 32
    faces = cubemap.cube_faces(smooth_world(256), size)
    ticks = (np.arange(size) + 0.5) / size * 2 - 1
    beyond = 1 + 1 / size  # one pixel past the edge, in the face's plane
    worst, landed = 0.0, set()
    for face, (forward, right, down) in cubemap.FACE_AXES.items():
        forward, right, down = (np.array(axis, float) for axis in (forward, right, down))
        edges = {"top": (np.full(size, -beyond), ticks, faces[face][0]),
                 "bottom": (np.full(size, beyond), ticks, faces[face][-1]),
                 "left": (ticks, np.full(size, -beyond), faces[face][:, 0]),
                 "right": (ticks, np.full(size, beyond), faces[face][:, -1])}
        for name, (t, s, own) in edges.items():
            engine = forward + s[:, None] * right + t[:, None] * down
            for direction, value in zip(engine, own):
                other, pixel = nearest_face_pixel(direction, size)
                assert other != face, (face, name)
                landed.add(other)
                worst = max(worst, float(np.abs(faces[other][pixel] - value).max()))
    assert landed == set(cubemap.FACES)
    # Neighbouring pixels are ≤ 2·(2/size) radians apart; the image changes by ≤ 1 per radian.
    assert worst < 4 / size, worst


# The OpenGL specification's cube map lookup, written out independently of cubemap.FACE_AXES:
# major axis → (face, index of the axis, sc, tc) with s = (sc/|ma| + 1)/2 to the right, t downwards.
GL_TABLE = {
    (0, 1): ("px", lambda x, y, z: (-z, -y)), (0, -1): ("nx", lambda x, y, z: (z, -y)),
    (1, 1): ("py", lambda x, y, z: (x, z)), (1, -1): ("ny", lambda x, y, z: (x, -z)),
    (2, 1): ("pz", lambda x, y, z: (x, -y)), (2, -1): ("nz", lambda x, y, z: (-x, -y)),
}


def nearest_face_pixel(engine_direction, size):
    """The face and pixel a GPU reads for an engine (Y up) direction, by the OpenGL specification."""
    axis = int(np.argmax(np.abs(engine_direction)))
    major = engine_direction[axis]
    face, coordinates = GL_TABLE[(axis, 1 if major > 0 else -1)]
    sc, tc = coordinates(*engine_direction)
    col, row = (min(size - 1, max(0, int((value / abs(major) + 1) / 2 * size))) for value in (sc, tc))
    return face, (row, col)


def test_save_cubemap_writes_six_faces_and_exr_faces_beside_the_png(tmp_path):
    pixels = (np.clip(smooth_world(64) * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    png = tmp_path / "world.png"
    image.save(png)
    written = output.save_cubemap(image, png, {"prompt": "a world"}, hdr_curve=(0.8, 32.0))
    assert sorted(path.name for path in written) == sorted(
        [f"world_{face}.png" for face in cubemap.FACES] + [f"world_{face}.exr" for face in cubemap.FACES])
    face = Image.open(tmp_path / "world_py.png")
    assert face.size == (32, 32) and face.text["cubemap_face"] == "py" and face.text["prompt"] == "a world"
    assert np.asarray(face)[16, 16, 2] > 240  # straight up: z = 1
    attributes = hdr.read_exr_attributes(tmp_path / "world_py.exr")
    assert attributes["cubemap_face"] == "py"
    with pytest.raises(BadInput, match="exists"):
        output.save_cubemap(image, png, {})
    assert len(output.save_cubemap(image, png, {}, overwrite=True)) == 6
    with pytest.raises(BadInput, match="2:1"):
        output.save_cubemap(Image.new("RGB", (96, 32)), tmp_path / "strip.png", {})
