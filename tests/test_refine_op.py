"""Refining from Blender: the source image it finds, the request it sends, its error reports, the
Refine sub-panel, and a real refine with the tiny model in a worker (installed from the zip)."""

import hashlib
import os
import re
import sys

import bpy
import numpy as np
import pytest
from PIL import Image

from msd_core import refine
from blender_env import MODULE, addon_module, blender, extension  # noqa: F401  (fixtures)
from test_extension import draw
from test_generate_op import addon, run_state, world_images  # noqa: F401  (fixtures)


def refine_module():
    return sys.modules[f"{MODULE}.operators.refine"]


def source_png(path, width=128, height=64):
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2] = (110, 160, 240)
    pixels[height // 2 :] = (70, 120, 40)
    Image.fromarray(pixels).save(path)
    return str(path)


def pixels_digest(image) -> str:
    pixels = np.empty(len(image.pixels), np.float32)
    image.pixels.foreach_get(pixels)
    return hashlib.sha256(pixels.tobytes()).hexdigest()


def test_the_source_is_the_active_backdrops_image_else_the_worlds(addon, tmp_path):
    refine = refine_module()
    assert refine.source_image(bpy.context) is None
    assert bpy.ops.msd.apply_world(filepath=source_png(tmp_path / "world.png")) == {"FINISHED"}
    world_image = refine.source_image(bpy.context)
    assert world_image is not None and world_image in world_images(bpy.context.scene.world)

    assert bpy.ops.msd.add_backdrop(filepath=source_png(tmp_path / "strip.png", 192, 64)) == {"FINISHED"}
    backdrop = bpy.context.active_object
    assert refine.source_image(bpy.context) == backdrop.material_slots[0].material.node_tree.nodes["Image Texture"].image
    bpy.context.view_layer.objects.active = None
    assert refine.source_image(bpy.context) == world_image

    # A world lit by another image (as by the HDR companion of its panorama) still refines its panorama.
    world = bpy.context.scene.world
    next(n for n in world.node_tree.nodes if n.type == "TEX_ENVIRONMENT").image = bpy.data.images.new("lit by", 8, 4)
    assert refine.source_image(bpy.context) == world_image

    # Any world of the user's own: the image of its Environment Texture.
    user_world = bpy.data.worlds.new("Mine")
    user_world.use_nodes = True
    environment = user_world.node_tree.nodes.new("ShaderNodeTexEnvironment")
    environment.image = bpy.data.images.load(source_png(tmp_path / "mine.png"))
    bpy.context.scene.world = user_world
    assert refine.source_image(bpy.context) == environment.image


def test_refine_upscales_the_world_and_never_touches_the_source(addon, tmp_path):
    bpy.ops.msd.apply_world(filepath=source_png(tmp_path / "draft.png"))
    source = refine_module().source_image(bpy.context)
    before = (source.name, source.filepath, tuple(source.size), pixels_digest(source), source["msd"].to_dict())
    group = bpy.context.scene.msd_panorama
    group.refine_scale, group.refine_strength = 2.0, 0.75

    assert bpy.ops.msd.refine(wait=True) == {"FINISHED"}, run_state().last_error
    result = bpy.data.images[run_state().last_image]
    assert tuple(result.size) == (256, 128)
    assert result["msd"]["source"] == "draft.png" and result["msd"]["strength"] == "0.75"
    assert result["msd"]["prompt"] == group.prompt and result["msd"]["wrap"] == "true"
    assert result in world_images(bpy.context.scene.world)
    after = (source.name, source.filepath, tuple(source.size), pixels_digest(source), source["msd"].to_dict())
    assert after == before and source.users > 0


def test_refine_from_a_file_sends_that_file_and_leaves_it_and_the_blend_alone(addon, tmp_path):
    """The History sub-panel's Refine: a panorama file, not the scene's, is the source."""
    bpy.ops.msd.apply_world(filepath=source_png(tmp_path / "shown.png", 192, 64))  # not the source
    path = source_png(tmp_path / "listed.png")
    before = open(path, "rb").read()
    images = set(bpy.data.images.keys())
    bpy.context.scene.msd_panorama.refine_scale = 2.0

    assert bpy.ops.msd.refine(wait=True, filepath=path) == {"FINISHED"}, run_state().last_error
    result = bpy.data.images[run_state().last_image]
    assert tuple(result.size) == (256, 128) and result["msd"]["wrap"] == "true"
    assert result["msd"]["source"] == "listed.png"
    assert open(path, "rb").read() == before
    assert set(bpy.data.images.keys()) - images == {result.name}  # the source's image was only borrowed

    with pytest.raises(RuntimeError, match="panorama file not found"):
        bpy.ops.msd.refine(wait=True, filepath=str(tmp_path / "gone.png"))
    assert not addon_module().operators.generate.session.busy


def test_a_packed_source_is_sent_as_a_copy_of_its_bytes(addon, tmp_path):
    path = source_png(tmp_path / "packed.png")
    image = bpy.data.images.load(path)
    image.pack()
    os.remove(path)
    sent = refine_module().source_file(image)
    assert sent != path and open(sent, "rb").read() == image.packed_file.data


def test_a_float_source_is_sent_as_a_tone_mapped_png(addon, tmp_path):
    """An HDRI world (EXR) reaches the worker as a PNG of its tone-mapped pixels; the worker needs no EXR reader."""
    hdr = bpy.data.images.new("sky", 16, 8, float_buffer=True)
    linear = np.linspace(0, 20, 16 * 8 * 4, dtype=np.float32)  # far above 1, like the sun in an HDRI
    hdr.pixels.foreach_set(linear)
    hdr.filepath_raw, hdr.file_format = str(tmp_path / "sky.exr"), "OPEN_EXR"
    hdr.save()
    bpy.data.images.remove(hdr)
    image = bpy.data.images.load(str(tmp_path / "sky.exr"))
    before = pixels_digest(image)

    sent = refine_module().source_file(image)
    assert os.path.basename(sent) == "sky.exr.png"
    with Image.open(sent) as png:
        assert png.mode == "RGB" and png.size == (16, 8)
        received = np.asarray(png, np.float32) / 255
    expected = addon_module().msd_core.imageio.tonemap.tone_map(linear.reshape(8, 16, 4)[::-1, :, :3])
    assert np.abs(received - expected).max() <= 0.5 / 255 + 1e-6
    assert pixels_digest(image) == before and image.filepath == str(tmp_path / "sky.exr")


@pytest.mark.parametrize("packed", [False, True])
def test_a_sixteen_bit_png_is_sent_as_it_is_not_tone_mapped(addon, tmp_path, packed):
    """Blender holds a 16-bit PNG as float, but its values are display values: white must stay white
    (tone-mapped as linear light it became 0.74)."""
    pixels = np.full((8, 16, 3), 65535, np.uint16)
    pixels[4:] = 20000
    path = tmp_path / "deep.png"
    write_png16(path, pixels)
    image = bpy.data.images.load(str(path))
    assert image.is_float
    if packed:
        image.pack()
    sent = refine_module().source_file(image)
    assert open(sent, "rb").read() == path.read_bytes()
    assert refine.read_source(sent)[0, 0] == pytest.approx([1.0, 1.0, 1.0])  # white, as the worker reads it


def write_png16(path, rgb16: np.ndarray) -> None:
    """An RGB PNG of 16 bits a channel (Pillow writes 16-bit PNGs only in grey)."""
    import struct
    import zlib

    height, width, _ = rgb16.shape
    rows = b"".join(b"\0" + rgb16[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda tmp: None, "there is no panorama to refine"),
        (lambda tmp: "no such image", "there is no image named 'no such image'"),
        (lambda tmp: bpy.data.images.new("Painted", 128, 64).name, "has no file (it was generated or rendered)"),
    ],
)
def test_refine_errors_are_reported_and_change_nothing(addon, tmp_path, setup, message):
    image_name = setup(tmp_path) or ""
    before = {kind: set(getattr(bpy.data, kind).keys()) for kind in ("images", "worlds", "objects")}
    with pytest.raises(RuntimeError, match=re.escape(message)):  # the operator's error report, as a script sees it
        bpy.ops.msd.refine(wait=True, image_name=image_name)
    assert message in run_state().last_error
    assert {kind: set(getattr(bpy.data, kind).keys()) for kind in before} == before
    assert not addon_module().operators.generate.session.busy


@pytest.mark.parametrize("kind, prefix", [(b"iCCP", b"icc\0\0"), (b"zTXt", b"Comment\0\0")])
def test_a_source_whose_chunk_inflates_beyond_pillows_limit_is_reported(addon, tmp_path, kind, prefix):
    """Blender reads the file (it ignores the chunk), the worker cannot: the refusal is a report, not a
    traceback, and nothing changes."""
    from test_refine import oversized_chunk_png

    path = oversized_chunk_png(tmp_path / "chunky.png", kind, prefix)
    before = {kind: set(getattr(bpy.data, kind).keys()) for kind in ("images", "worlds", "objects")}
    with pytest.raises(RuntimeError, match="cannot read the source image .*chunky.png: Decompressed data too large"):
        bpy.ops.msd.refine(wait=True, filepath=str(path))
    assert {kind: set(getattr(bpy.data, kind).keys()) for kind in before} == before
    assert "Decompressed data too large" in run_state().last_error


@pytest.mark.parametrize("scale", [float("inf"), 1e30, float("nan")])
def test_a_scale_without_a_usable_size_is_reported(addon, tmp_path, scale):
    """A script may set Scale to anything the property takes: the report says why, nothing changes."""
    path = source_png(tmp_path / "src.png")
    group = bpy.context.scene.msd_panorama
    group.refine_scale = scale
    before = {kind: set(getattr(bpy.data, kind).keys()) for kind in ("images", "worlds", "objects")}
    with pytest.raises(RuntimeError, match=r"Scale|[Ww]idth") as error:
        bpy.ops.msd.refine(wait=True, filepath=str(path))
    assert "Traceback" not in str(error.value) and str(error.value).strip().count("\n") == 0, str(error.value)
    assert {kind: set(getattr(bpy.data, kind).keys()) for kind in before} == before


def test_a_missing_source_file_is_reported(addon, tmp_path):
    path = source_png(tmp_path / "gone.png")
    image = bpy.data.images.load(path)
    os.remove(path)
    with pytest.raises(RuntimeError, match="the file of the image 'gone.png' is missing or unreadable"):
        bpy.ops.msd.refine(wait=True, image_name=image.name)


def test_refine_panel_shows_the_source_strength_scale_and_target_size(addon, tmp_path):
    empty = draw("MSD_PT_panorama_refine")
    assert ("label", "Show a panorama as the world, or select a") in empty
    assert not any(kind == "operator" for kind, _ in empty)
    bpy.ops.msd.apply_world(filepath=source_png(tmp_path / "draft.png"))
    bpy.context.scene.msd_panorama.refine_scale = 2.0
    log = draw("MSD_PT_panorama_refine")
    assert ("prop", "refine_strength") in log and ("prop", "refine_scale") in log
    assert ("label", "128×64 → 256×128") in log and ("operator", "msd.refine") in log
