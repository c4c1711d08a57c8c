"""HDR for lighting (msd_core.imageio.hdr, output.save_exr, the --hdr option, the world lit by the EXR), tested
as a lighter would: the curve's shape, an EXR that Blender's own reader reads back equal to the PNG below
the knee, the files a run writes, and a Cycles render in which the EXR world lights an object brighter
and casts a directional shadow where the PNG world does not."""

import io
import json
import math
import os
import re

import bpy
import numpy as np
import pytest
from PIL import Image

from blender_env import addon_module, addon_preferences, blender, extension  # noqa: F401  (fixtures)
from msd_core import cli
from msd_core.imageio import hdr, output, pngmeta
from msd_core.worker import protocol
from msd_core.errors import BadInput
from msd_core.settings import GenerationSettings
from test_cli import SMALL
from test_extension import draw
from test_generate_op import addon, run_state  # noqa: F401  (fixture)
from test_images import srgb_to_linear
from test_world import nodes_of

HALF_PRECISION = 2.0**-11  # relative rounding of a half float
KNEE, PEAK = 0.8, 32.0
CURVES = [(0.8, 32.0), (0.8, 16.0), (0.5, 64.0), (0.1, 1000.0), (0.99, 1000.0), (0.99, 1.001), (0.6, 1.0)]


def luminance(rgb):
    return np.asarray(rgb, dtype=float) @ np.array(hdr.REC709_LUMINANCE)


def blender_pixels(path) -> np.ndarray:
    """An image file as Blender's own reader sees it: (H, W, 3) float, top row first."""
    image = bpy.data.images.load(str(path))
    try:
        width, height = image.size
        pixels = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
        assert image.is_float and image.colorspace_settings.name == "Linear Rec.709"
        return pixels.reshape(height, width, image.channels)[::-1, :, :3]
    finally:
        bpy.data.images.remove(image)


def sky_with_sun(width=256, height=128, sun_azimuth=0.0, sun_elevation=45.0, sun_radius=4.0) -> np.ndarray:
    """A synthetic 2:1 panorama (8-bit sRGB, top row first): a sky gradient from a pale horizon to a
    blue zenith, a plain brown ground, and a white sun disc (angles in degrees; azimuth 0 = the image's
    centre, which Blender's equirectangular projection puts at +X)."""
    elevation = 90.0 - (np.arange(height) + 0.5) / height * 180.0
    azimuth = (0.5 - (np.arange(width) + 0.5) / width) * 360.0
    up = np.clip(elevation / 90.0, 0.0, 1.0)[:, None, None]
    sky = (1 - up) * np.array([0.75, 0.82, 0.9]) + up * np.array([0.35, 0.5, 0.8])
    pixels = np.where((elevation > 0)[:, None, None], sky, np.array([0.45, 0.4, 0.35])) * np.ones((1, width, 1))
    az, el = np.meshgrid(np.radians(azimuth), np.radians(elevation))
    sun_az, sun_el = math.radians(sun_azimuth), math.radians(sun_elevation)
    cos_angle = np.sin(el) * np.sin(sun_el) + np.cos(el) * np.cos(sun_el) * np.cos(az - sun_az)
    pixels[cos_angle > math.cos(math.radians(sun_radius))] = 1.0
    return (pixels * 255).round().astype(np.uint8)


def write_pair(folder, pixels: np.ndarray, metadata=None, knee=KNEE, peak=PEAK):
    """A panorama PNG and its EXR, written the way a run writes them."""
    metadata = {"prompt": "a sunny meadow", "settings": json.dumps({"prompt": "a sunny meadow"})} if metadata is None else metadata
    image = Image.fromarray(pixels)
    png = output.save_png(image, folder / "pano.png", metadata)
    return png, output.save_exr(image, png, metadata, knee=knee, peak=peak)


# -- the curve -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("knee, peak", CURVES)
def test_curve_is_the_identity_below_the_knee_c1_at_it_increasing_and_reaches_the_peak_at_white(knee, peak):
    below = np.linspace(0.0, knee, 1001)
    assert np.array_equal(hdr.inverse_tonemap(below, knee, peak), below)
    assert hdr.inverse_tonemap(1.0, knee, peak) == pytest.approx(peak, rel=1e-9)
    x = np.linspace(0.0, 1.0, 100_001)
    values = hdr.inverse_tonemap(x, knee, peak)
    assert np.all(np.diff(values) > 0)  # strictly increasing: brighter stays brighter
    step = 1e-7  # slopes on both sides of the knee are 1: no kink where expansion starts
    right_slope = (hdr.inverse_tonemap(knee + step, knee, peak) - knee) / step
    assert right_slope == pytest.approx(1.0, abs=1e-4)
    assert np.all(values >= x - 1e-12)  # never darker than the PNG


def test_default_curve_expands_only_the_last_codes_and_by_stops():
    codes = np.arange(256)
    expanded = hdr.inverse_tonemap(srgb_to_linear(codes / 255), KNEE, PEAK)
    changed = codes[expanded > srgb_to_linear(codes / 255)]
    assert changed.min() == 232 and changed.max() == 255  # linear 0.8 is sRGB code 231.4
    assert expanded[255] == pytest.approx(32.0) and 10 < expanded[254] < expanded[255]


def test_expansion_is_keyed_on_luminance_keeping_hue_and_dim_pixels():
    rgb = np.array([[0.2, 0.4, 1.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [1.0, 1.0, 1.0], [1.0, 0.9, 0.7], [0.9, 0.85, 0.8]])
    expanded = hdr.expand_highlights(rgb, KNEE, PEAK)
    dim = luminance(rgb) <= KNEE
    assert np.array_equal(expanded[dim], rgb[dim])  # a saturated blue sky with B = 1 is no light source
    assert expanded[3] == pytest.approx([PEAK] * 3)
    gains = expanded[~dim] / rgb[~dim]
    assert np.allclose(gains, gains[:, :1]) and np.all(gains > 1)  # one gain per pixel: the hue is kept
    assert luminance(expanded[~dim]) == pytest.approx(hdr.inverse_tonemap(luminance(rgb[~dim]), KNEE, PEAK))


def test_srgb_to_linear_matches_the_standard_at_known_points():
    assert hdr.srgb_to_linear(np.array([0.0, 0.04045, 0.5, 1.0])) == pytest.approx([0.0, 0.0031308, 0.2140411, 1.0], rel=1e-5)


# -- the EXR file --------------------------------------------------------------------------------------


def test_exr_reads_back_in_blender_equal_to_the_png_below_the_knee_and_expanded_above(blender, tmp_path):
    ramp = np.repeat(np.repeat(np.arange(256, dtype=np.uint8), 2)[None, :, None], 3, axis=2)  # 512 grey codes
    pixels = np.concatenate([np.repeat(ramp, 200, axis=0), sky_with_sun(512, 56)], axis=0)  # 512×256, 16 ZIP blocks
    metadata = {"prompt": "déjà vu: a sunny meadow", "seed": "7", "settings": json.dumps({"prompt": "a sunny meadow"})}
    png, exr = write_pair(tmp_path, pixels, metadata)

    assert exr == tmp_path / "pano.exr"
    linear_png = srgb_to_linear(np.asarray(Image.open(png).convert("RGB")) / 255)
    read = blender_pixels(exr)
    assert read.shape == pixels.shape
    dim = luminance(linear_png) <= KNEE
    assert dim.mean() > 0.9
    assert np.allclose(read[dim], linear_png[dim], rtol=HALF_PRECISION, atol=1e-7)
    expected = hdr.expand_highlights(linear_png[~dim], KNEE, PEAK)
    assert np.allclose(read[~dim], expected, rtol=HALF_PRECISION)
    greys = read[0, ::2, 0]  # the ramp: code 0..255
    assert np.all(np.diff(greys) > 0) and greys[-1] == pytest.approx(PEAK)
    # The generation metadata travels as string attributes, as in the PNG's text chunks, with the curve.
    attributes = hdr.read_exr_attributes(exr)
    assert {key: attributes[key] for key in metadata} == metadata == pngmeta.read_text_chunks(png)
    assert (json.loads(attributes["hdr_knee"]), json.loads(attributes["hdr_peak"])) == (KNEE, PEAK)
    assert attributes["envmap"] == b"\0" and attributes["compression"] == bytes([hdr.ZIP_COMPRESSION])  # lat-long map


def test_exr_of_any_size_incompressible_blocks_and_long_names_reads_back_exactly(blender, tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.uniform(0, 60000, (37, 23, 3)).astype(np.float16).astype(np.float32)  # noise: ZIP blocks stored raw
    rgb[:5] = 1.5  # and a few compressible lines
    long_name = "a_metadata_key_longer_than_thirty_one_bytes"  # needs the long-names flag
    with open(tmp_path / "noise.exr", "wb") as file:
        hdr.write_exr(file, rgb, {long_name: "kept"})
    assert np.array_equal(blender_pixels(tmp_path / "noise.exr"), rgb)
    attributes = hdr.read_exr_attributes(tmp_path / "noise.exr")
    assert attributes[long_name] == "kept" and "envmap" not in attributes


@pytest.mark.parametrize(
    "rgb, attributes, message",
    [
        (np.zeros((4, 4)), {}, "needs an (H, W, 3) image"),
        (np.full((2, 2, 3), np.nan), {}, "finite values within the half-float range"),
        (np.full((2, 2, 3), 1e6), {}, "finite values within the half-float range"),
        (np.zeros((2, 2, 3)), {"compression": "none"}, "reserved by OpenEXR: compression"),
        (np.zeros((2, 2, 3)), {"x" * 256: "long"}, "1–255 bytes"),
        (np.zeros((2, 2, 3)), {"": "nameless"}, "1–255 bytes"),
    ],
)
def test_write_exr_refuses_what_it_cannot_store(rgb, attributes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        hdr.write_exr(io.BytesIO(), rgb, attributes)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n....", "not an OpenEXR file"),
        (b"v/1\x01\x02\x00\x00\x00channels\0chlist\0\x40\x00\x00\x00ab", "malformed"),
        (b"v/1\x01\x02\x00\x00\x00" + b"n" * 300, "malformed"),
    ],
    ids=["png", "cut-short", "no-terminator"],
)
def test_reading_attributes_of_a_damaged_file_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "bad.exr").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        hdr.read_exr_attributes(tmp_path / "bad.exr")


def test_exr_is_never_overwritten_without_overwrite_and_no_temporary_file_stays(tmp_path):
    pixels = sky_with_sun(64, 32)
    (tmp_path / "pano.exr").write_bytes(b"precious")
    with pytest.raises(BadInput, match="pano.exr exists; to replace it, turn on overwrite"):
        output.check_output_path(tmp_path / "pano.png", overwrite=False, exr=True)
    output.check_output_path(tmp_path / "pano.png", overwrite=False)  # without HDR the EXR is no concern
    png = output.save_png(Image.fromarray(pixels), tmp_path / "pano.png", {})
    with pytest.raises(BadInput, match="exists"):
        output.save_exr(Image.fromarray(pixels), png, {}, knee=KNEE, peak=PEAK)
    assert (tmp_path / "pano.exr").read_bytes() == b"precious"
    output.save_exr(Image.fromarray(pixels), png, {}, knee=KNEE, peak=PEAK, overwrite=True)
    assert hdr.read_exr_attributes(tmp_path / "pano.exr")["hdr_peak"] == "32.0"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pano.exr", "pano.png"]


# -- settings, CLI and worker --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"hdr": "yes"}, "hdr must be true or false"),
        ({"hdr_knee": 1.0}, "hdr_knee must be a number from 0.1 to 0.99"),
        ({"hdr_knee": float("nan")}, "hdr_knee must be a number"),
        ({"hdr_peak": 0.5}, "hdr_peak must be a number from 1 to 1000 (the linear value white becomes; 1 = no expansion)"),
        ({"hdr_peak": float("inf")}, "hdr_peak must be a number"),
        ({"hdr_peak": "32"}, "hdr_peak must be a number"),
    ],
)
def test_hdr_settings_are_validated(changes, message):
    with pytest.raises(BadInput, match=re.escape(message)):
        GenerationSettings(prompt="a meadow", **changes).validate()


def test_cli_bad_hdr_peak_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    assert cli.main(["generate", "a lake", "-o", str(tmp_path / "out.png"), "-q", *SMALL, "--hdr-peak", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("msd-panorama: error: --hdr-peak must be a number from 1 to 1000")
    assert list(tmp_path.iterdir()) == []


def test_cli_hdr_refuses_an_existing_exr_before_generating(tmp_path, capsys):
    (tmp_path / "out.exr").write_bytes(b"precious")
    assert cli.main(["generate", "a lake", "-o", str(tmp_path / "out.png"), "-q", *SMALL, "--hdr"]) == 2
    assert "out.exr exists; to replace it, turn on --overwrite" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["out.exr"]


def test_cli_hdr_writes_the_png_and_its_exr_with_the_same_metadata(tmp_path, capsys):
    out = tmp_path / "pano.png"
    code = cli.main(["generate", "a sunny meadow", "-o", str(out), "-q", "--width", "128", "--height", "64", *SMALL,
                     "--hdr", "--hdr-knee", "0.7", "--hdr-peak", "20"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "pano.exr")]
    texts = pngmeta.read_text_chunks(out)
    attributes = hdr.read_exr_attributes(tmp_path / "pano.exr")
    assert {key: attributes[key] for key in texts} == texts
    assert (attributes["hdr_knee"], attributes["hdr_peak"]) == ("0.7", "20.0")
    assert json.loads(texts["settings"])["hdr"] is True
    with Image.open(out) as image:
        linear_png = srgb_to_linear(np.asarray(image.convert("RGB")) / 255)
    read = blender_pixels(tmp_path / "pano.exr")
    assert np.allclose(read, hdr.expand_highlights(linear_png, 0.7, 20.0), rtol=HALF_PRECISION, atol=1e-7)


def test_worker_done_event_lists_the_png_and_the_exr(tmp_path):
    from msd_core.worker.process import EventWriter, Worker, parse_generate

    stream = io.StringIO()
    worker = Worker(EventWriter(stream), tmp_path / "previews")
    for request_id, with_hdr in (("hdr", True), ("plain", False)):
        settings = GenerationSettings(prompt="a sunny meadow", model="tiny", width=128, height=64, steps=2,
                                      gradient="fast", device="cpu", hdr=with_hdr).to_dict()  # fmt: skip
        request = protocol.request("generate", request_id, settings=settings, output=str(tmp_path / f"{request_id}.png"),
                                   preview_every=0)  # fmt: skip
        worker.run_job(parse_generate(request))
    done = {event["id"]: event for event in map(json.loads, stream.getvalue().splitlines()) if event["event"] == "done"}
    assert (done["hdr"]["output"], done["hdr"]["exr"]) == (str(tmp_path / "hdr.png"), str(tmp_path / "hdr.exr"))
    assert hdr.read_exr_attributes(done["hdr"]["exr"])["settings"] == done["hdr"]["metadata"]["settings"]
    assert done["plain"]["exr"] is None and not (tmp_path / "plain.exr").exists()


# -- Blender: the world lit by the EXR ---------------------------------------------------------------------


def apply(extension, png, **options):
    image = extension.operators.images.load_panorama(str(png))
    return image, extension.operators.world.apply_world(bpy.context, image, **options)


def environment_image(world):
    (node,) = nodes_of(world.node_tree, "ShaderNodeTexEnvironment")
    return node.image


def test_world_uses_the_exr_beside_the_png_and_the_png_without_hdr(extension, tmp_path):
    png, exr = write_pair(tmp_path, sky_with_sun(64, 32))
    image, world = apply(extension, png)
    lit_by = environment_image(world)
    assert lit_by != image and lit_by == world["msd_hdr_image"] and world["msd_image"] == image
    assert extension.operators.images.absolute_path(lit_by.filepath) == str(exr)
    assert lit_by.is_float and lit_by.colorspace_settings.name == "Linear Rec.709"
    assert lit_by.name == f"{image.name} HDR" and lit_by.packed_file is not None  # kept with the unsaved .blend

    assert apply(extension, png, use_hdr=False)[1] == world  # the same world, rebuilt
    assert environment_image(world) == image and "msd_hdr_image" not in world
    assert apply(extension, png)[1] == world and environment_image(world) == lit_by  # loaded once, reused
    assert len(bpy.data.images) == 2


def test_a_saved_blend_keeps_the_world_lit_by_the_packed_exr(extension, tmp_path):
    made = tmp_path / "made"
    made.mkdir()
    _, exr = write_pair(made, sky_with_sun(64, 32))
    image, world = apply(extension, made / "pano.png")
    names = image.name, world.name, environment_image(world).name
    blend = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    for path in made.iterdir():  # packed: the .blend alone must be enough
        path.unlink()

    bpy.ops.wm.open_mainfile(filepath=str(blend))

    image, world, lit_by = (bpy.data.images[names[0]], bpy.data.worlds[names[1]], bpy.data.images[names[2]])
    assert environment_image(world) == lit_by == world["msd_hdr_image"] and world["msd_image"] == image
    assert lit_by.packed_file is not None and lit_by.is_float
    pixels = np.empty(64 * 32 * 4, dtype=np.float32)
    lit_by.pixels.foreach_get(pixels)
    assert pixels.max() == pytest.approx(PEAK)  # the sun, still expanded


@pytest.mark.parametrize("case", ["stale", "damaged", "no-settings"])
def test_world_ignores_an_exr_that_is_not_this_pngs(extension, tmp_path, case):
    metadata = {"settings": json.dumps({"prompt": "a sunny meadow"})}
    if case == "no-settings":  # a PNG made elsewhere: nothing says the EXR belongs to it
        metadata = {}
    png, exr = write_pair(tmp_path, sky_with_sun(64, 32), metadata)
    if case == "stale":  # the PNG was regenerated without HDR; the EXR is from the run before
        output.save_exr(Image.open(png), png, {"settings": "{}"}, knee=KNEE, peak=PEAK, overwrite=True)
    elif case == "damaged":
        exr.write_bytes(exr.read_bytes()[:40])
    image, world = apply(extension, png)
    assert environment_image(world) == image and "msd_hdr_image" not in world
    assert list(bpy.data.images) == [image]


def test_apply_world_operator_says_it_is_lit_by_the_exr(extension, tmp_path):
    png, _ = write_pair(tmp_path, sky_with_sun(64, 32))
    assert bpy.ops.msd.apply_world(filepath=str(png)) == {"FINISHED"}
    assert environment_image(bpy.context.scene.world).is_float
    assert bpy.ops.msd.apply_world(filepath=str(png), use_hdr=False) == {"FINISHED"}
    assert not environment_image(bpy.context.scene.world).is_float


def render_luminance(scene, folder, name: str) -> np.ndarray:
    """A small, quick Cycles render (CPU, 8 samples, no denoiser) as linear luminance, top row first."""
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 8
    scene.cycles.use_denoising = False
    scene.cycles.max_bounces = 2
    scene.render.resolution_x = scene.render.resolution_y = 64
    scene.render.resolution_percentage = 100
    scene.world.cycles.sample_map_resolution = 256  # importance sampling finds the sun
    scene.render.image_settings.file_format = "OPEN_EXR"
    scene.render.filepath = str(folder / f"{name}.exr")
    bpy.ops.render.render(write_still=True)
    return luminance(blender_pixels(folder / f"{name}.exr"))


def test_exr_world_lights_brighter_with_a_shadow_away_from_the_sun(extension, tmp_path):
    """A 1 m cube on a ground plane, lit only by a sky with a sun 45° up at +X, seen from above by an
    orthographic camera 4 m wide (16 px per metre). The cube's shadow falls on the −X side."""
    png, _ = write_pair(tmp_path, sky_with_sun(sun_azimuth=0.0, sun_elevation=45.0))
    scene = bpy.context.scene
    bpy.ops.mesh.primitive_plane_add(size=20)
    bpy.ops.mesh.primitive_cube_add(size=1, location=(0, 0, 0.5))
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.type, camera.data.ortho_scale = "ORTHO", 4.0
    camera.location = (0, 0, 10)
    scene.collection.objects.link(camera)
    scene.camera = camera

    def measure(use_hdr: bool) -> dict[str, float]:
        apply(extension, png, use_hdr=use_hdr)
        pixels = render_luminance(scene, tmp_path, f"hdr-{use_hdr}")
        rows = slice(28, 36)  # y from −0.25 to 0.25 m
        return {
            "top": pixels[rows, 28:36].mean(),  # the cube's top face
            "shadow": pixels[rows, 10:18].mean(),  # ground at x −1.4 to −0.9 m: in the cube's shadow
            "lit": pixels[rows, 46:54].mean(),  # ground at x 0.9 to 1.4 m, facing the sun's side
        }

    flat, expanded = measure(use_hdr=False), measure(use_hdr=True)
    assert 0.95 < flat["lit"] / flat["shadow"] < 1.05  # an 8-bit sun barely lights: no shadow to speak of
    assert expanded["lit"] / expanded["shadow"] > 1.2  # the expanded sun casts a shadow away from it
    assert expanded["top"] > 1.2 * flat["top"]  # and the object is brighter
    assert expanded["shadow"] == pytest.approx(flat["shadow"], rel=0.06)  # the sky alone is unchanged


# -- Blender: the panel and a run ------------------------------------------------------------------------


def test_panel_shows_the_hdr_checkbox_and_the_curve_in_the_sampler(extension):
    assert ("prop", "hdr") in draw("MSD_PT_panorama")
    sampler = draw("MSD_PT_panorama_sampler")
    assert ("prop", "hdr_knee") in sampler and ("prop", "hdr_peak") in sampler


def test_panel_hdr_settings_map_both_ways(addon):
    group = bpy.context.scene.msd_panorama
    properties = addon_module().properties
    group.hdr, group.hdr_knee, group.hdr_peak = True, 0.7, 48.0
    settings = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert (settings.hdr, settings.hdr_knee, settings.hdr_peak) == (True, pytest.approx(0.7), 48.0)
    group.hdr, group.hdr_knee, group.hdr_peak = False, 0.9, 2.0
    properties.settings_to_scene(settings, bpy.context.scene)
    assert (group.hdr, group.hdr_knee, group.hdr_peak) == (True, pytest.approx(0.7), 48.0)


def test_a_run_with_hdr_writes_both_files_and_lights_the_world_with_the_exr(addon):
    bpy.context.scene.msd_panorama.hdr = True
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    state = run_state()
    exr = os.path.splitext(state.last_output)[0] + ".exr"
    assert os.path.isfile(state.last_output) and os.path.isfile(exr)
    world = bpy.context.scene.world
    assert world["msd_image"] == bpy.data.images[state.last_image]
    lit_by = environment_image(world)
    assert lit_by.is_float and addon.operators.images.absolute_path(lit_by.filepath) == exr
    settings = hdr.read_exr_attributes(exr)["settings"]
    assert settings == bpy.data.images[state.last_image]["msd"]["settings"] and json.loads(settings)["hdr"] is True

