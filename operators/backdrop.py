"""A panorama as a backdrop: an emissive mesh with the image, standing behind the scene and filling
the active camera's view.

FLAT: a plane with the image's aspect, facing the camera, centred on its frame (lens shift
included) and scaled to fill it: the image covers the whole frame and the frame crops the side
that overflows (Blender's "Import Images as Planes" calls this Fill; its operator is not reused
because it places the plane at the 3D cursor and has no curved shape).
CURVED: an arc of a cylinder whose axis is the camera's vertical (local Y) axis through the camera,
so every point of the image is as far from the camera; its angle follows the aspect
(arc length / height = image aspect) and it is sized to fill the view.

Both are placed just behind the scene: 10 % beyond the farthest bounding-box corner of the scene's
visible objects (along the view axis for FLAT, from the arc's axis for CURVED), at least 10 m, and
close enough for the camera's clip end.
Without a camera they are placed as if seen from 10 m in front (−Y) of the origin looking +Y: the
flat plane stands at the origin facing −Y, 4 m tall; the arc passes through the origin.

UVs span the image exactly once: u 0 → 1 from left to right, v 0 → 1 from bottom to top.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import bpy
from bpy.props import EnumProperty, FloatProperty
from mathutils import Euler, Matrix, Vector

from ..msd_core.errors import BadInput
from .images import PanoramaFileOperator
from .world import SOURCE_PROPERTY, arrange_nodes

SHAPES = (
    ("FLAT", "Flat", "A plane facing the camera, filling its view"),
    ("CURVED", "Curved", "A cylinder arc around the camera, filling its view"),
)
DEFAULT_DISTANCE = 10.0  # m: nearest placement, and the viewpoint's distance without a camera
DEFAULT_HEIGHT = 4.0  # m: height without a camera
DEPTH_MARGIN = 1.1  # the backdrop stands 10 % behind the farthest object
CLIP_MARGIN = 0.9  # … but well inside the camera's clip end, or it would not render
ARC_SEGMENTS_PER_TURN = 128
NON_GEOMETRY = {"CAMERA", "LIGHT", "LIGHT_PROBE", "SPEAKER", "EMPTY", "ARMATURE"}


class View(NamedTuple):
    """Where the backdrop is seen from."""

    matrix: Matrix  # location and rotation of the viewpoint: it looks along local −Z, up is local +Y
    frame: tuple[float, float, float, float]  # x_min, x_max, y_min, y_max of the view at depth 1
    orthographic: bool  # then frame is in metres at any depth
    distance: float  # of the backdrop: the plane's depth, the arc's radius


def add_backdrop(context, image: bpy.types.Image, *, shape: str = "FLAT", strength: float = 1.0) -> bpy.types.Object:
    """Add a backdrop object showing ``image`` (shape FLAT or CURVED, emission ``strength``); returns it."""
    check_shape(context, shape)
    camera = context.scene.camera
    view = _camera_view(context.scene, camera, shape) if camera else _default_view()
    width, height = image.size
    name = f"{image.name} Backdrop"
    if shape == "FLAT":
        mesh, placement = _flat_mesh(name, width / height, view)
    else:
        mesh, placement = _arc_mesh(name, width / height, view), Matrix.Identity(4)
    mesh.materials.append(_emission_material(name, image, strength))

    backdrop = bpy.data.objects.new(name, mesh)
    backdrop.matrix_world = view.matrix @ placement
    backdrop[SOURCE_PROPERTY] = image
    backdrop.visible_shadow = False  # it stands behind the scene: it must not shade it
    _link_and_select(context, backdrop)
    return backdrop


def check_shape(context, shape: str) -> None:
    """Raise BadInput when a backdrop of ``shape`` cannot be made for the scene's camera."""
    if shape not in {identifier for identifier, _, _ in SHAPES}:
        raise BadInput(f"unknown backdrop shape {shape!r}; choose FLAT or CURVED")
    camera = context.scene.camera
    if shape == "CURVED" and camera is not None and camera.data.type == "ORTHO":
        raise BadInput(f"a curved backdrop wraps around a perspective camera, and {camera.name!r} is orthographic")


def _camera_view(scene, camera, shape: str) -> View:
    location, rotation, _scale = camera.matrix_world.decompose()
    matrix = Matrix.LocRotScale(location, rotation, None)
    orthographic = camera.data.type == "ORTHO"
    corners = camera.data.view_frame(scene=scene)
    depth = 1.0 if orthographic else -corners[0].z
    xs, ys = [corner.x / depth for corner in corners], [corner.y / depth for corner in corners]
    # The ray through the frame's farthest corner is √(1 + x² + y²) times as long as the depth it reaches.
    corner_ray = 1.0 if orthographic else math.hypot(1.0, max(map(abs, xs)), max(map(abs, ys)))
    distance = min(_distance_behind_scene(scene, matrix, shape), CLIP_MARGIN * camera.data.clip_end / corner_ray)
    return View(matrix, (min(xs), max(xs), min(ys), max(ys)), orthographic, distance)


def _default_view() -> View:
    matrix = Matrix.LocRotScale(Vector((0.0, -DEFAULT_DISTANCE, 0.0)), Euler((math.pi / 2, 0.0, 0.0)), None)
    half_height = DEFAULT_HEIGHT / 2 / DEFAULT_DISTANCE
    return View(matrix, (0.0, 0.0, -half_height, half_height), False, DEFAULT_DISTANCE)


def _distance_behind_scene(scene, view_matrix: Matrix, shape: str) -> float:
    """Beyond every visible object: along the view axis for a plane, from the vertical axis for an arc."""
    to_view = view_matrix.inverted()
    corners = [
        to_view @ obj.matrix_world @ Vector(corner)
        for obj in scene.objects
        if obj.type not in NON_GEOMETRY and SOURCE_PROPERTY not in obj and obj.visible_get()
        for corner in obj.bound_box
    ]
    depths = [math.hypot(p.x, p.z) if shape == "CURVED" else -p.z for p in corners]
    return max(DEFAULT_DISTANCE, DEPTH_MARGIN * max(depths, default=0.0))


def _flat_mesh(name: str, aspect: float, view: View) -> tuple[bpy.types.Mesh, Matrix]:
    """A plane filling the frame at the view's distance, and where it goes in the view's space."""
    scale = 1.0 if view.orthographic else view.distance
    x_min, x_max, y_min, y_max = (scale * bound for bound in view.frame)
    frame_width, frame_height = x_max - x_min, y_max - y_min
    height = frame_height if aspect * frame_height >= frame_width else frame_width / aspect
    width = aspect * height
    mesh = _strip_mesh(name, [(-width / 2, 0.0), (width / 2, 0.0)], height)
    return mesh, Matrix.Translation(((x_min + x_max) / 2, (y_min + y_max) / 2, -view.distance))


def _arc_mesh(name: str, aspect: float, view: View) -> bpy.types.Mesh:
    """An arc of radius view.distance around the view's vertical axis, centred on the view direction.

    A view ray (x, y, −1) meets the cylinder x² + z² = r² at height r·y / √(1 + x²) ≤ r·y, so the
    arc fills the view when it is 2·r·half_height tall and spans 2·atan(half_width) radians. Its
    angle is arc length / radius = aspect · height / r; a full turn at most.
    """
    x_min, x_max, y_min, y_max = view.frame
    half_width, half_height = max(-x_min, x_max), max(-y_min, y_max)
    radius = view.distance
    height = radius * max(2 * half_height, 2 * math.atan(half_width) / aspect)
    angle = min(aspect * height / radius, 2 * math.pi)
    height = radius * angle / aspect
    segments = max(1, math.ceil(angle / (2 * math.pi) * ARC_SEGMENTS_PER_TURN))
    columns = []
    for index in range(segments + 1):
        azimuth = angle * (index / segments - 0.5)  # left (−X) to right (+X) as the viewer sees it
        columns.append((radius * math.sin(azimuth), -radius * math.cos(azimuth)))
    return _strip_mesh(name, columns, height)


def _strip_mesh(name: str, columns: list[tuple[float, float]], height: float) -> bpy.types.Mesh:
    """A band of quads through the (x, z) columns, left to right, from y = −height/2 to +height/2;
    faces wind so that their normals face a viewer on the +z side; u follows the columns 0 → 1."""
    segments = len(columns) - 1
    vertices = [(x, y, z) for x, z in columns for y in (-height / 2, height / 2)]  # bottom, top per column
    faces = [(2 * i, 2 * i + 2, 2 * i + 3, 2 * i + 1) for i in range(segments)]
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(vertices, [], faces)
    uv_layer = mesh.uv_layers.new(name="UVMap")
    for loop in mesh.loops:
        column, is_top = divmod(loop.vertex_index, 2)
        uv_layer.data[loop.index].uv = (column / segments, float(is_top))
    mesh.validate()
    return mesh


def _emission_material(name: str, image: bpy.types.Image, strength: float) -> bpy.types.Material:
    """Image Texture (UVs, edges extended) → Emission → Material Output: the image as it is, unlit."""
    material = bpy.data.materials.new(name)
    if material.node_tree is None:  # Blender < 5.0 makes materials without nodes
        material.use_nodes = True
    tree = material.node_tree
    tree.nodes.clear()
    texture = tree.nodes.new("ShaderNodeTexImage")
    texture.image = image
    texture.extension = "EXTEND"
    texture.interpolation = "Linear"
    emission = tree.nodes.new("ShaderNodeEmission")
    emission.inputs["Strength"].default_value = strength
    output = tree.nodes.new("ShaderNodeOutputMaterial")
    tree.links.new(texture.outputs["Color"], emission.inputs["Color"])
    tree.links.new(emission.outputs["Emission"], output.inputs["Surface"])
    arrange_nodes(output)
    return material


def _link_and_select(context, backdrop: bpy.types.Object) -> None:
    """Into the active collection, the only selected object and the active one, as Blender's Add menu
    does; into the scene's root collection when the context's view layer is another scene's."""
    scene, view_layer = context.scene, context.view_layer
    if view_layer not in scene.view_layers.values():
        scene.collection.objects.link(backdrop)
        return
    view_layer.active_layer_collection.collection.objects.link(backdrop)
    for other in view_layer.objects.selected:
        other.select_set(False)
    backdrop.select_set(True)
    view_layer.objects.active = backdrop


class MSD_OT_add_backdrop(PanoramaFileOperator, bpy.types.Operator):
    """Add a panorama as a backdrop filling the camera's view: a flat plane or an arc around the camera"""

    bl_idname = "msd.add_backdrop"
    bl_label = "Add Backdrop"
    bl_options = {"REGISTER", "UNDO"}

    shape: EnumProperty(name="Shape", items=SHAPES, default="FLAT")
    strength: FloatProperty(
        name="Strength", description="Brightness of the backdrop", default=1.0, min=0.0, soft_max=10.0
    )

    def execute(self, context):
        try:
            check_shape(context, self.shape)  # before loading anything: a refusal changes nothing
        except BadInput as error:
            self.report({"ERROR"}, str(error))
            return {"CANCELLED"}
        image = self.load_image()
        if image is None:
            return {"CANCELLED"}
        backdrop = add_backdrop(context, image, shape=self.shape, strength=self.strength)
        self.report({"INFO"}, f"Added backdrop {backdrop.name!r}")
        return {"FINISHED"}


classes = (MSD_OT_add_backdrop,)
