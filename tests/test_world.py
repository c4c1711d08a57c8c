"""A panorama as the world (operators/world.py): the node tree, re-applying, the user's own worlds,
and tiny Cycles renders that prove where each part of the image ends up."""

import math
import pathlib
import subprocess
import sys

import bpy
import numpy as np
import pytest
from PIL import Image

from blender_env import blender, extension  # noqa: F401  (fixtures)
from test_images import (
    BOTTOM_COLORS,
    TOP_COLORS,
    add_camera,
    generation_texts,
    linear_to_srgb,
    render,
    srgb_to_linear,
    write_panorama,
)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import poles  # noqa: E402  (bench/poles.py: the poles metric)

RED, GREEN, BLUE, YELLOW = TOP_COLORS
# Where each quarter of the image is seen: u = 0.5 − azimuth / 360°. The image's centre faces +X
# and its left edge −X, and turning left (counter-clockwise seen from above) moves left in the
# image, as for someone standing inside the panorama; Blender's own equirectangular projection.
QUARTER_AT_AZIMUTH = {135: 0, 45: 1, -45: 2, -135: 3}


def links_of(tree) -> set[tuple[str, str, str, str]]:
    return {
        (link.from_node.bl_idname, link.from_socket.identifier, link.to_node.bl_idname, link.to_socket.identifier)
        for link in tree.links
    }


def nodes_of(tree, bl_idname: str) -> list:
    return [node for node in tree.nodes if node.bl_idname == bl_idname]


def apply(extension, path, **options):
    image = extension.operators.images.load_panorama(str(path))
    return extension.operators.world.apply_world(bpy.context, image, **options)


def test_equirectangular_world_node_tree(extension, tmp_path):
    world = apply(extension, write_panorama(tmp_path / "pano.png", 64, 32), strength=2.5, rotation=0.75)

    tree = world.node_tree
    assert bpy.context.scene.world == world
    assert world.name == bpy.data.images[0].name
    assert sorted(node.bl_idname for node in tree.nodes) == sorted(
        ["ShaderNodeTexCoord", "ShaderNodeMapping", "ShaderNodeTexEnvironment"]
        + ["ShaderNodeBackground", "ShaderNodeOutputWorld"]
        # the lookup kept off the poles: nudge, |xy|, height limit and its negative, clamp
        + ["ShaderNodeVectorMath"] * 3 + ["ShaderNodeSeparateXYZ", "ShaderNodeCombineXYZ", "ShaderNodeClamp"]
        + ["ShaderNodeMath"] * 2
    )
    assert {
        ("ShaderNodeTexCoord", "Generated", "ShaderNodeMapping", "Vector"),
        ("ShaderNodeMapping", "Vector", "ShaderNodeVectorMath", "Vector"),
        ("ShaderNodeCombineXYZ", "Vector", "ShaderNodeTexEnvironment", "Vector"),
        ("ShaderNodeTexEnvironment", "Color", "ShaderNodeBackground", "Color"),
        ("ShaderNodeBackground", "Background", "ShaderNodeOutputWorld", "Surface"),
    } <= links_of(tree)
    (environment,) = nodes_of(tree, "ShaderNodeTexEnvironment")
    assert environment.projection == "EQUIRECTANGULAR"
    assert environment.image == bpy.data.images[0]
    assert tuple(nodes_of(tree, "ShaderNodeMapping")[0].inputs["Rotation"].default_value) == pytest.approx((0, 0, 0.75))
    assert nodes_of(tree, "ShaderNodeBackground")[0].inputs["Strength"].default_value == pytest.approx(2.5)


@pytest.mark.parametrize(
    "size, equirectangular",
    [((200, 100), True), ((202, 100), True), ((198, 100), True)]
    + [((206, 100), False), ((300, 100), False), ((400, 100), False)],
)
def test_only_two_to_one_images_within_one_percent_are_equirectangular(extension, tmp_path, size, equirectangular):
    tree = apply(extension, write_panorama(tmp_path / "pano.png", *size)).node_tree
    assert bool(nodes_of(tree, "ShaderNodeTexEnvironment")) == equirectangular
    assert bool(nodes_of(tree, "ShaderNodeTexImage")) != equirectangular


def test_strip_world_uses_cylindrical_mapping_into_an_image_texture(extension, tmp_path):
    tree = apply(extension, write_panorama(tmp_path / "strip.png", 128, 32)).node_tree

    assert not nodes_of(tree, "ShaderNodeTexEnvironment")
    (texture,) = nodes_of(tree, "ShaderNodeTexImage")
    assert texture.extension == "REPEAT"  # the 0/360° seam blends both edges
    assert texture.inputs["Vector"].links[0].from_node.bl_idname == "ShaderNodeCombineXYZ"
    links = links_of(tree)
    assert ("ShaderNodeTexCoord", "Generated", "ShaderNodeMapping", "Vector") in links
    assert ("ShaderNodeMapping", "Vector", "ShaderNodeSeparateXYZ", "Vector") in links
    assert ("ShaderNodeBackground", "Background", "ShaderNodeOutputWorld", "Surface") in links
    (atan2,) = [node for node in nodes_of(tree, "ShaderNodeMath") if node.operation == "ARCTAN2"]
    assert [socket.links[0].from_socket.name for socket in atan2.inputs[:2]] == ["Y", "X"]
    # Square pixels: a 4:1 strip around the unit cylinder is 2π/4 tall, so it spans |z/r| ≤ π/4.
    (inside,) = [node for node in nodes_of(tree, "ShaderNodeMath") if node.operation == "COMPARE"]
    assert inside.inputs[2].default_value == pytest.approx(math.pi / 4)
    background_input = nodes_of(tree, "ShaderNodeBackground")[0].inputs["Color"].links[0].from_node
    assert background_input.bl_idname == "ShaderNodeMix" and background_input.data_type == "RGBA"


def test_reapplying_updates_the_same_world_and_leaves_the_users_worlds_alone(extension, tmp_path):
    scene = bpy.context.scene
    mine = bpy.data.worlds.new("My Studio")
    if mine.node_tree is None:
        mine.use_nodes = True
    mine.node_tree.nodes.new("ShaderNodeTexSky")
    other = bpy.data.worlds.new("Other")
    other.use_fake_user = True
    scene.world = mine
    before = {world.name: sorted(node.bl_idname for node in world.node_tree.nodes) for world in (mine, other)}
    path = write_panorama(tmp_path / "pano.png", 64, 32, generation_texts())

    first = apply(extension, path, strength=1.0, rotation=0.0)
    built = len(first.node_tree.nodes)
    second = apply(extension, path, strength=3.0, rotation=1.0)

    assert second == first and len(bpy.data.worlds) == 3 and len(bpy.data.images) == 1
    assert scene.world == first
    assert nodes_of(first.node_tree, "ShaderNodeBackground")[0].inputs["Strength"].default_value == pytest.approx(3.0)
    assert nodes_of(first.node_tree, "ShaderNodeMapping")[0].inputs["Rotation"].default_value[2] == pytest.approx(1.0)
    assert len(first.node_tree.nodes) == built == 13  # rebuilt, not added to
    after = {world.name: sorted(node.bl_idname for node in world.node_tree.nodes) for world in (mine, other)}
    assert after == before


def test_operator_applies_the_world(extension, tmp_path):
    path = write_panorama(tmp_path / "pano.png", 64, 32, generation_texts())
    assert bpy.ops.msd.apply_world(filepath=str(path), strength=0.5, rotation=0.2) == {"FINISHED"}
    world = bpy.context.scene.world
    assert world.name == "MSD a misty alpine valley"
    assert nodes_of(world.node_tree, "ShaderNodeBackground")[0].inputs["Strength"].default_value == pytest.approx(0.5)


@pytest.mark.parametrize("name, message", [("missing.png", "not found"), ("notes.png", "not an image")])
def test_operator_refuses_a_bad_file_and_changes_nothing(extension, tmp_path, name, message):
    (tmp_path / "notes.png").write_text("no pixels here")
    scene = bpy.context.scene
    scene.world = bpy.data.worlds.new("Mine")
    # An operator that reports an error raises it in Python (its result is CANCELLED).
    with pytest.raises(RuntimeError, match=message):
        bpy.ops.msd.apply_world(filepath=str(tmp_path / name))
    assert scene.world.name == "Mine" and len(bpy.data.worlds) == 1 and len(bpy.data.images) == 0


# Renders: a 10° camera looking at a known direction sees exactly the expected part of the image.

@pytest.mark.parametrize("size", [(64, 32), (128, 32)], ids=["equirectangular-2x1", "cylindrical-4x1"])
def test_render_shows_the_expected_part_of_the_panorama(extension, tmp_path, size):
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "pano.png", *size))
    camera = add_camera(scene)
    for azimuth, quarter in QUARTER_AT_AZIMUTH.items():
        for elevation, colors in ((20, TOP_COLORS), (-20, BOTTOM_COLORS)):
            camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
            pixels = render(scene, 8, 8, tmp_path)
            assert (pixels == colors[quarter]).all(), (azimuth, elevation, pixels[4, 4])


def test_rotation_turns_the_panorama_about_z(extension, tmp_path):
    # Like Mapping's Z rotation in any world: looking at azimuth a shows what was at a + rotation.
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "pano.png", 64, 32), rotation=math.radians(90))
    add_camera(scene, azimuth=45, elevation=20)
    assert (render(scene, 8, 8, tmp_path) == TOP_COLORS[QUARTER_AT_AZIMUTH[135]]).all()


@pytest.mark.parametrize("size", [(64, 32), (128, 32)], ids=["equirectangular-2x1", "cylindrical-4x1"])
def test_seam_at_180_degrees_joins_both_edges_without_a_line(extension, tmp_path, size):
    # Looking at −X: the image's right edge (yellow) on the left, its left edge (red) on the right.
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "pano.png", *size))
    add_camera(scene, azimuth=180, elevation=20, lens=40)
    pixels = render(scene, 32, 8, tmp_path)
    assert (pixels[:, :4] == YELLOW).all() and (pixels[:, -4:] == RED).all()
    # Across the seam only red and yellow mix: full red, no blue, green falling from left to right.
    assert (pixels[..., 0] == 255).all() and (pixels[..., 2] == 0).all()
    assert (np.diff(pixels[..., 1], axis=1) <= 0).all()


def test_cylindrical_world_is_a_plain_colour_above_and_below_the_strip(extension, tmp_path):
    # A 4:1 strip reaches atan(π/4) ≈ 38° up and down; beyond, the mean (of light, not of sRGB
    # values) of the top row, resp. the bottom row.
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "strip.png", 128, 32))
    camera = add_camera(scene)
    for elevation, colors in ((60, TOP_COLORS), (-60, BOTTOM_COLORS)):
        expected = 255 * linear_to_srgb(srgb_to_linear(np.array(colors) / 255).mean(axis=0))
        for azimuth in (0, 100, -150):
            camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
            pixels = render(scene, 8, 8, tmp_path)
            assert np.abs(pixels - expected).max() <= 1, (elevation, azimuth, pixels[4, 4], expected)


def test_cylindrical_strip_edges_do_not_blend_into_each_other(extension, tmp_path):
    # Within half a texel of the strip's top (bottom) edge the top (bottom) row is shown as it is:
    # the texture repeats for the 0/360° seam, yet the top and bottom rows must not wrap into each other.
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "strip.png", 128, 32))
    edge = math.degrees(math.atan(math.pi / 4))  # a 4:1 strip reaches z/r = ±π/4
    camera = add_camera(scene, lens=20000)  # a 0.1° view: every pixel within the outer half texel
    for elevation, colors in ((edge - 0.15, TOP_COLORS), (-edge + 0.15, BOTTOM_COLORS)):
        for azimuth, quarter in QUARTER_AT_AZIMUTH.items():
            camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
            assert (render(scene, 8, 8, tmp_path) == colors[quarter]).all(), (elevation, azimuth)


def test_equirectangular_poles_show_their_own_first_row(extension, tmp_path):
    # The Environment Texture repeats vertically too: within half a row of a pole (2.8° here) it blended the
    # first row with the other pole's at that longitude. The lookup stops at the first row's centres.
    scene = bpy.context.scene
    apply(extension, write_panorama(tmp_path / "pano.png", 64, 32))
    camera = add_camera(scene, lens=20000)  # a 0.1° view
    for elevation, colors in ((89.0, TOP_COLORS), (-89.0, BOTTOM_COLORS)):
        for azimuth, quarter in QUARTER_AT_AZIMUTH.items():
            camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
            assert (render(scene, 8, 8, tmp_path) == colors[quarter]).all(), (elevation, azimuth)


def test_edge_colours_of_a_large_strip_match_the_mean_of_its_pixels(extension, tmp_path):
    # Only the two edge rows are read as float; the result is that of averaging image.pixels' rows.
    width, height = 4096, 1024
    rows = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rows[0] //= 4  # a darker top row
    path = tmp_path / "strip.png"
    Image.fromarray(rows).save(path)
    world_module = extension.operators.world
    image = extension.operators.images.load_panorama(str(path))
    pixels = np.empty(width * height * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    edges = srgb_to_linear(pixels.reshape(height, width, 4)[[0, -1], :, :3]).mean(axis=1)  # bottom row first

    bottom, top = world_module.edge_row_colors(image)

    assert np.allclose([bottom[:3], top[:3]], edges, atol=1e-6) and bottom[3] == top[3] == 1.0
    assert (np.array(top[:3]) < np.array(bottom[:3]) / 4).all()
    # The same from the packed copy once the file is gone, and from a generated image's pixels.
    path.unlink()
    assert np.allclose(world_module.edge_row_colors(image), (bottom, top), atol=1e-6)
    generated = bpy.data.images.new("generated", 8, 2)
    generated.pixels.foreach_set(np.repeat(np.float32([[0.2, 0.4, 0.6, 1], [0.8, 0.6, 0.4, 1]]), 8, axis=0).ravel())
    (low, high) = world_module.edge_row_colors(generated)
    assert np.allclose(low[:3], srgb_to_linear([0.2, 0.4, 0.6]), atol=1e-6)
    assert np.allclose(high[:3], srgb_to_linear([0.8, 0.6, 0.4]), atol=1e-6)


def test_a_replaced_world_is_kept_in_the_saved_file(extension, tmp_path):
    # Blender drops unused worlds on save: the user's world (and an earlier panorama's) must survive.
    scene = bpy.context.scene
    scene.world = bpy.data.worlds.new("My Studio")
    first = apply(extension, write_panorama(tmp_path / "a.png", 64, 32, generation_texts("first")))
    apply(extension, write_panorama(tmp_path / "b.png", 64, 32, generation_texts("second")))
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    name = first.name
    bpy.ops.wm.open_mainfile(filepath=str(tmp_path / "scene.blend"))
    assert {"My Studio", name} <= set(bpy.data.worlds.keys())
    assert bpy.data.worlds["My Studio"].use_fake_user and bpy.data.worlds[name].use_fake_user


# The poles (docs/poles.md): the world rendered straight up and down by Cycles, measured with bench/poles.py.

def render_poles(scene, directory, size=48):
    """Cycles renders (90° views, size × size) straight up, straight down and at four azimuths on the horizon."""
    camera = add_camera(scene)
    camera.data.angle = math.pi / 2
    views = {}
    for name, elevation, azimuth in [("up", 90, 0), ("down", -90, 0)] + [(f"h{a}", 0, a) for a in (0, 90, 180, 270)]:
        camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
        views[name] = render(scene, size, size, directory).astype(float)
    return views


def rendered_pole_metric(extension, tmp_path, pixels, name):
    path = tmp_path / f"{name}.png"
    Image.fromarray(pixels).save(path)
    apply(extension, path)
    views = render_poles(bpy.context.scene, tmp_path)
    return poles.rendered_metric(views["up"], views["down"], [views[f"h{a}"] for a in (0, 90, 180, 270)])


def as_pixels(image):
    return np.clip(128 + 40 * image, 0, 255).astype(np.uint8)


def test_cycles_renders_of_the_poles_read_like_the_metric_says(extension, tmp_path):
    # Calibration: a sphere-correct world looks the same up, down and ahead; a flat strip pinches.
    sphere = rendered_pole_metric(extension, tmp_path, as_pixels(poles.sphere_noise(64, 128, wavelength_rows=8)), "s")
    strip = rendered_pole_metric(extension, tmp_path, as_pixels(poles.strip_noise(64, 128, wavelength_rows=8)), "f")
    print("sphere-correct", poles.summary(sphere), "| flat strip", poles.summary(strip))
    for pole in ("zenith", "nadir"):
        assert 0.8 <= sphere[pole]["isotropy"] <= 1.2 and 0.8 <= sphere[pole]["detail"] <= 1.25, sphere
        assert strip[pole]["isotropy"] > 1.35 and strip[pole]["detail"] > 1.15, strip


def test_cycles_renders_of_a_sphere_poles_world_do_not_pinch(extension, tmp_path):
    # The tiny model's 360° worlds, flat and with --poles sphere, made by the command line as a user would.
    measured = {}
    for mode in ("flat", "sphere"):
        path = tmp_path / f"{mode}.png"
        subprocess.run([sys.executable, "-m", "msd_core.cli", "generate", "a valley", "-o", str(path), "-q",
                        "--model", "tiny", "--device", "cpu", "--width", "512", "--height", "256", "--steps", "10",
                        "--seed", "3", "--poles", mode], check=True, capture_output=True, timeout=600)
        pixels = np.asarray(Image.open(path))
        apply(extension, path)
        views = render_poles(bpy.context.scene, tmp_path, poles.view_size(256))  # the image's own resolution
        measured[mode] = poles.rendered_metric(views["up"], views["down"], [views[f"h{a}"] for a in (0, 90, 180, 270)])
        for pole, row in (("zenith", 0), ("nadir", -1)):
            measured[mode][pole]["row_spread"] = poles.row_spread(pixels, row)
    print("flat", poles.summary(measured["flat"]), "| sphere", poles.summary(measured["sphere"]))
    for pole in ("zenith", "nadir"):
        # Measured: flat 1.35 up, 1.23 down; sphere 1.11 up, 1.02 down (docs/poles.md).
        assert measured["flat"][pole]["isotropy"] > 1.15, measured
        assert measured["sphere"][pole]["isotropy"] <= 1.15, measured
        assert 0.4 <= measured["sphere"][pole]["detail"] <= 1.5, measured
        # The file's pole rows: each one point with the caps (≤ 8-bit rounding), spread around the pole flat.
        assert measured["flat"][pole]["row_spread"] > 0.3 and measured["sphere"][pole]["row_spread"] < 0.02, measured
