"""A panorama as a backdrop (operators/backdrop.py): shape, UVs, orientation, filling the camera's
view, placement behind the scene, material, and a tiny render of what the camera sees."""

import math

import bpy
import numpy as np
import pytest
from bpy_extras.object_utils import world_to_camera_view
from mathutils import Vector

from blender_env import blender, extension  # noqa: F401  (fixtures)
from test_images import BOTTOM_COLORS, TOP_COLORS, add_camera, render, write_panorama


def load(extension, tmp_path, width, height):
    return extension.operators.images.load_panorama(str(write_panorama(tmp_path / "pano.png", width, height)))


def add_backdrop(extension, image, **options):
    return extension.operators.backdrop.add_backdrop(bpy.context, image, **options)


def scene_camera(resolution=(1920, 1080), shift=(0.0, 0.0), lens=35.0):
    """A camera somewhere, turned and tilted, with the given frame."""
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = resolution
    camera = add_camera(scene, azimuth=70, elevation=-12, lens=lens, location=(1.0, -8.0, 2.0))
    camera.data.shift_x, camera.data.shift_y = shift
    return camera


def world_vertices(obj) -> list[Vector]:
    return [obj.matrix_world @ vertex.co for vertex in obj.data.vertices]


def corners_by_uv(obj) -> list[Vector]:
    """A flat backdrop's corners (world space) at UV (0, 0), (1, 0), (1, 1), (0, 1)."""
    vertices = world_vertices(obj)
    uvs = obj.data.uv_layers.active.data
    at_uv = {tuple(uv.uv): vertices[loop.vertex_index] for loop, uv in zip(obj.data.loops, uvs)}
    return [at_uv[corner] for corner in ((0, 0), (1, 0), (1, 1), (0, 1))]


def assert_uvs_cover_the_image_exactly_once(mesh):
    uvs = np.array([loop_uv.uv[:] for loop_uv in mesh.uv_layers.active.data])
    assert uvs.min(axis=0) == pytest.approx((0, 0)) and uvs.max(axis=0) == pytest.approx((1, 1))
    areas = []
    for polygon in mesh.polygons:
        corners = uvs[list(polygon.loop_indices)]
        x, y = corners[:, 0], corners[:, 1]
        areas.append(0.5 * (np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))  # shoelace, signed
    # Every face keeps the image's orientation and together they cover [0, 1]² once, no more.
    assert min(areas) > 0 and sum(areas) == pytest.approx(1.0)


def frame_hits(camera, backdrop) -> list[float | None]:
    """How far rays from the camera through the frame's corners, edges and centre meet the backdrop
    (None: it missed)."""
    scene = bpy.context.scene
    depsgraph = bpy.context.evaluated_depsgraph_get()
    frame = [camera.matrix_world @ corner for corner in camera.data.view_frame(scene=scene)]
    centre = sum(frame, Vector()) / 4
    # Near-midpoints (0.49), as a ray exactly along an edge between two faces may slip through;
    # and a hair inside the frame, so that a backdrop edge that exactly meets the frame counts as filling it.
    points = [a.lerp(b, t) for a, b in zip(frame, frame[1:] + frame[:1]) for t in (0.0, 0.49)]
    points.append(frame[0].lerp(frame[2], 0.49))
    origin = camera.matrix_world.translation
    hits = [scene.ray_cast(depsgraph, origin, (point.lerp(centre, 1e-4) - origin).normalized()) for point in points]
    return [(location - origin).length if hit and obj == backdrop else None for hit, location, _, _, obj, _ in hits]


@pytest.mark.parametrize(
    "image_size, resolution, shift",
    [((96, 32), (1920, 1080), (0, 0)), ((32, 32), (1920, 1080), (0, 0)), ((128, 32), (1000, 1000), (0.1, -0.05))],
    ids=["wider-than-frame", "narrower-than-frame", "shifted-lens"],
)
def test_flat_backdrop_faces_and_fills_the_camera_view(extension, tmp_path, image_size, resolution, shift):
    camera = scene_camera(resolution, shift)
    image = load(extension, tmp_path, *image_size)

    backdrop = add_backdrop(extension, image, shape="FLAT")

    mesh = backdrop.data
    assert len(mesh.polygons) == 1
    assert_uvs_cover_the_image_exactly_once(mesh)
    bottom_left, bottom_right, top_right, top_left = corners_by_uv(backdrop)
    width, height = (bottom_right - bottom_left).length, (top_left - bottom_left).length
    assert width / height == pytest.approx(image_size[0] / image_size[1])
    normal = backdrop.matrix_world.to_3x3() @ mesh.polygons[0].normal
    to_camera = camera.matrix_world.translation - backdrop.matrix_world @ mesh.polygons[0].center
    assert normal.normalized().dot(to_camera.normalized()) > 0.99

    # Fill: the image covers the frame, and meets it exactly on one axis (the other overflows).
    projected = [world_to_camera_view(bpy.context.scene, camera, corner) for corner in (bottom_left, top_right)]
    (x0, y0, _), (x1, y1, _) = projected
    assert x0 <= 1e-6 and y0 <= 1e-6 and x1 >= 1 - 1e-6 and y1 >= 1 - 1e-6
    assert (x0, x1) == pytest.approx((0, 1), abs=1e-5) or (y0, y1) == pytest.approx((0, 1), abs=1e-5)
    assert projected[0].x < projected[1].x and projected[0].y < projected[1].y  # upright, not mirrored
    assert None not in frame_hits(camera, backdrop)


@pytest.mark.parametrize("image_size, lens", [((96, 32), 35.0), ((128, 32), 18.0), ((128, 32), 100.0)])
def test_curved_backdrop_is_an_arc_around_the_camera_filling_its_view(extension, tmp_path, image_size, lens):
    camera = scene_camera(lens=lens)
    aspect = image_size[0] / image_size[1]

    backdrop = add_backdrop(extension, load(extension, tmp_path, *image_size), shape="CURVED")

    # In the camera's space the arc's axis is the camera's vertical (local Y) axis.
    to_camera = camera.matrix_world.inverted()
    points = [to_camera @ vertex for vertex in world_vertices(backdrop)]
    radii = [math.hypot(point.x, point.z) for point in points]
    assert max(radii) == pytest.approx(min(radii), rel=1e-6)
    azimuths = [math.atan2(point.x, -point.z) for point in points]
    heights = [point.y for point in points]
    span, height = max(azimuths) - min(azimuths), max(heights) - min(heights)
    assert radii[0] * span / height == pytest.approx(aspect, rel=1e-6)  # arc length / height = aspect
    assert max(azimuths) == pytest.approx(-min(azimuths))  # centred on the view direction

    mesh = backdrop.data
    assert_uvs_cover_the_image_exactly_once(mesh)
    for loop, loop_uv in zip(mesh.loops, mesh.uv_layers.active.data):
        index = loop.vertex_index
        assert loop_uv.uv[0] == pytest.approx((azimuths[index] - min(azimuths)) / span, abs=1e-6)  # left → right
        assert loop_uv.uv[1] == pytest.approx((heights[index] - min(heights)) / height, abs=1e-6)  # bottom → top

    normal_matrix = backdrop.matrix_world.to_3x3()
    axis = camera.matrix_world.to_3x3() @ Vector((0, 1, 0))
    for polygon in mesh.polygons:
        centre = backdrop.matrix_world @ polygon.center
        to_axis = camera.matrix_world.translation - centre
        to_axis -= to_axis.dot(axis) * axis
        assert (normal_matrix @ polygon.normal).normalized().dot(to_axis.normalized()) > 0.99
    assert None not in frame_hits(camera, backdrop)


def test_backdrop_stands_behind_the_scene_within_the_clip_range(extension, tmp_path):
    camera = scene_camera()
    forward = camera.matrix_world.to_3x3() @ Vector((0, 0, -1))
    bpy.ops.mesh.primitive_cube_add(size=4, location=camera.matrix_world.translation + 30 * forward)
    cube = bpy.context.active_object
    image = load(extension, tmp_path, 96, 32)

    flat = add_backdrop(extension, image, shape="FLAT")
    curved = add_backdrop(extension, image, shape="CURVED")

    # In the camera's space: the plane lies beyond the cube's depth, the arc around the camera's
    # vertical axis beyond the cube's distance from that axis; both within the clip range.
    to_camera = camera.matrix_world.inverted()
    cube_corners = [to_camera @ cube.matrix_world @ Vector(corner) for corner in cube.bound_box]
    flat_corners = [to_camera @ vertex for vertex in world_vertices(flat)]
    assert max(-p.z for p in cube_corners) < min(-p.z for p in flat_corners)
    arc_points = [to_camera @ vertex for vertex in world_vertices(curved)]
    assert max(math.hypot(p.x, p.z) for p in cube_corners) < min(math.hypot(p.x, p.z) for p in arc_points)
    assert bpy.context.active_object == curved and curved.select_get() and not flat.select_get()
    cube.hide_viewport = True  # the rays must reach the backdrops, not stop at the cube
    for backdrop, hidden in ((flat, curved), (curved, flat)):
        hidden.hide_viewport, backdrop.hide_viewport = True, False
        hits = frame_hits(camera, backdrop)
        assert None not in hits and max(hits) < camera.data.clip_end


@pytest.mark.parametrize("shape", ["FLAT", "CURVED"])
def test_backdrop_stays_within_a_short_clip_end(extension, tmp_path, shape):
    # The scene reaches beyond what the camera can see: the backdrop comes forward into view.
    camera = scene_camera(lens=24)
    camera.data.clip_end = 20.0
    forward = camera.matrix_world.to_3x3() @ Vector((0, 0, -1))
    bpy.ops.mesh.primitive_cube_add(size=4, location=camera.matrix_world.translation + 30 * forward)
    cube = bpy.context.active_object

    backdrop = add_backdrop(extension, load(extension, tmp_path, 96, 32), shape=shape)

    cube.hide_viewport = True  # the rays must reach the backdrop, not stop at the cube
    hits = frame_hits(camera, backdrop)
    assert None not in hits and max(hits) < camera.data.clip_end


def test_without_a_camera_the_backdrop_stands_at_the_origin_facing_minus_y(extension, tmp_path):
    image = load(extension, tmp_path, 96, 32)
    flat = add_backdrop(extension, image, shape="FLAT")
    curved = add_backdrop(extension, image, shape="CURVED")

    assert tuple(flat.matrix_world.translation) == pytest.approx((0, 0, 0), abs=1e-6)
    xs, ys, zs = zip(*world_vertices(flat))
    assert (max(xs) - min(xs), max(ys) - min(ys), max(zs) - min(zs)) == pytest.approx((12, 0, 4), abs=1e-6)
    assert tuple(flat.matrix_world.to_3x3() @ flat.data.polygons[0].normal) == pytest.approx((0, -1, 0), abs=1e-6)
    assert_uvs_cover_the_image_exactly_once(flat.data)
    heights = [vertex.z for vertex in world_vertices(curved)]
    assert max(heights) - min(heights) == pytest.approx(4)
    middle = min(curved.data.polygons, key=lambda polygon: abs((curved.matrix_world @ polygon.center).x))
    assert tuple(curved.matrix_world.to_3x3() @ middle.normal) == pytest.approx((0, -1, 0), abs=0.02)


def test_material_emits_the_image(extension, tmp_path):
    image = load(extension, tmp_path, 96, 32)
    backdrop = add_backdrop(extension, image, strength=2.5)

    tree = backdrop.active_material.node_tree
    node_types = sorted(node.bl_idname for node in tree.nodes)
    assert node_types == ["ShaderNodeEmission", "ShaderNodeOutputMaterial", "ShaderNodeTexImage"]
    assert {(link.from_node.bl_idname, link.to_node.bl_idname) for link in tree.links} == {
        ("ShaderNodeTexImage", "ShaderNodeEmission"),
        ("ShaderNodeEmission", "ShaderNodeOutputMaterial"),
    }
    texture = tree.nodes["Image Texture"]
    assert texture.image == image and image.colorspace_settings.name == "sRGB"
    assert tree.nodes["Emission"].inputs["Strength"].default_value == pytest.approx(2.5)
    assert backdrop["msd_image"] == image and not backdrop.visible_shadow


@pytest.mark.parametrize("shape", ["FLAT", "CURVED"])
def test_render_shows_the_image_upright_and_unmirrored(extension, tmp_path, shape):
    # A 4:1 image in a 4:1 frame. FLAT: the frame shows exactly the image. CURVED: a view ray at
    # x (frame at depth 1) meets the arc at azimuth atan(x): u = 0.5 + atan(x) / arc angle.
    scene = bpy.context.scene
    camera = add_camera(scene, azimuth=30, elevation=5, lens=50)
    scene.render.resolution_x, scene.render.resolution_y = 32, 8
    backdrop = add_backdrop(extension, load(extension, tmp_path, 128, 32), shape=shape)

    pixels = render(scene, 32, 8, tmp_path)

    frame = camera.data.view_frame(scene=scene)
    half_width = max(corner.x for corner in frame) / -frame[0].z
    x = half_width * ((np.arange(32) + 0.5) / 16 - 1)  # pixel centres
    if shape == "FLAT":
        u = (np.arange(32) + 0.5) / 32
    else:
        to_camera = camera.matrix_world.inverted()
        angle = np.ptp([math.atan2(p.x, -p.z) for p in (to_camera @ v for v in world_vertices(backdrop))])
        u = 0.5 + np.arctan(x) / angle
    for column in range(32):
        quarter_position = 4 * u[column]
        if abs(quarter_position - round(quarter_position)) < 0.1:  # a column on a border between quarters
            continue
        quarter = int(quarter_position)
        assert (pixels[:3, column] == TOP_COLORS[quarter]).all(), (column, pixels[:, column])
        assert (pixels[-3:, column] == BOTTOM_COLORS[quarter]).all(), (column, pixels[:, column])


def test_operator_adds_a_backdrop(extension, tmp_path):
    scene_camera()
    path = write_panorama(tmp_path / "pano.png", 96, 32)
    assert bpy.ops.msd.add_backdrop(filepath=str(path), shape="CURVED", strength=1.5) == {"FINISHED"}
    backdrop = bpy.context.active_object
    assert backdrop.name == "MSD pano Backdrop" and len(backdrop.data.polygons) > 1
    assert backdrop.active_material.node_tree.nodes["Emission"].inputs["Strength"].default_value == pytest.approx(1.5)


def datablock_names():
    kinds = ("objects", "meshes", "materials", "images", "worlds")
    return {kind: set(getattr(bpy.data, kind).keys()) for kind in kinds}


@pytest.mark.parametrize(
    "camera_type, shape, file, message",
    [
        ("PERSP", "FLAT", "missing.png", "not found"),
        ("PERSP", "CURVED", "notes.png", "not an image"),
        ("ORTHO", "CURVED", "pano.png", "orthographic"),
    ],
)
def test_operator_refuses_bad_input_and_changes_nothing(extension, tmp_path, camera_type, shape, file, message):
    camera = scene_camera()
    camera.data.type = camera_type
    (tmp_path / "notes.png").write_text("no pixels here")
    write_panorama(tmp_path / "pano.png", 96, 32)
    before = datablock_names()
    with pytest.raises(RuntimeError, match=message):  # an error report raises in Python; the result is CANCELLED
        bpy.ops.msd.add_backdrop(filepath=str(tmp_path / file), shape=shape)
    assert datablock_names() == before


def test_flat_backdrop_fills_an_orthographic_view(extension, tmp_path):
    camera = scene_camera()
    camera.data.type = "ORTHO"
    camera.data.ortho_scale = 7.0
    backdrop = add_backdrop(extension, load(extension, tmp_path, 96, 32), shape="FLAT")
    bottom_left, _, top_right, _ = corners_by_uv(backdrop)
    (x0, y0, _), (x1, y1, _) = (world_to_camera_view(bpy.context.scene, camera, p) for p in (bottom_left, top_right))
    assert (x0, x1) == pytest.approx((0, 1), abs=1e-5) or (y0, y1) == pytest.approx((0, 1), abs=1e-5)
    assert x0 <= 1e-6 and y0 <= 1e-6 and x1 >= 1 - 1e-6 and y1 >= 1 - 1e-6


def test_an_earlier_backdrop_the_user_renamed_and_moved_is_left_alone(extension, tmp_path):
    # Backdrops are recognised by the add-on's mark, not by name: a second one for the same file is
    # a new object placed as if the first were not there, and the first keeps the user's changes.
    add_camera(bpy.context.scene, azimuth=90)
    path = write_panorama(tmp_path / "pano.png", 96, 32)
    assert bpy.ops.msd.add_backdrop(filepath=str(path)) == {"FINISHED"}
    first = bpy.context.active_object
    placed = first.matrix_world.copy()
    first.name, first.location.z = "My Wall", 50.0
    assert bpy.ops.msd.add_backdrop(filepath=str(path)) == {"FINISHED"}
    second = bpy.context.active_object
    assert second != first and first.name == "My Wall" and first.location.z == 50.0
    assert np.allclose(np.array(second.matrix_world), np.array(placed))
    assert second["msd_image"] == first["msd_image"] and len(bpy.data.images) == 1
    bpy.data.objects.remove(first)  # deleting it leaves the other and the image alone
    assert second["msd_image"].users >= 2 and len(bpy.data.images) == 1
