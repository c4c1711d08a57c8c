"""A panorama as the world background.

Node layout (both kinds of panorama):

    Texture Coordinate (Generated: the view direction) → Mapping (Z rotation) → colour → Background
    → World Output

where "colour" is, for a 2:1 image (360° × 180°), an Environment Texture with EQUIRECTANGULAR
projection, looked up no nearer the poles than its first row (see _equirectangular_color), and for any
other aspect (a strip covering 360° horizontally, e.g. 4:1) a cylindrical projection built from nodes
that feeds UVs into an Image Texture (see _cylindrical_color). Both put the image's centre at +X and its
left edge at −X, the way Blender's equirectangular projection does.

The world is marked with the image it shows (world["msd_image"]), so applying the same image again
updates that world; the user's other worlds are never touched.

HDR: when a generated PNG has its linear OpenEXR beside it (same name, .exr, written with the HDR
option, msd_core.imageio.hdr) the colour comes from the EXR instead, so the sun and sky light the scene
with their expanded highlights; the world is still marked with the PNG. An EXR whose "settings"
attribute differs from the PNG's (a stale file from an earlier run) is ignored.
"""

from __future__ import annotations

import math
import os
import tempfile

import bpy
import imbuf
import numpy as np
from bpy.props import BoolProperty, FloatProperty
from mathutils import Color

from ..msd_core.imageio import hdr
from ..msd_core.imageio.pngmeta import SETTINGS_KEY
from .images import PanoramaFileOperator, absolute_path, load_panorama, metadata_of

SOURCE_PROPERTY = "msd_image"  # on worlds and backdrops: the panorama image they show
HDR_PROPERTY = "msd_hdr_image"  # on worlds: the HDR companion they are lit by, when there is one
EQUIRECTANGULAR_ASPECT = 2.0
ASPECT_TOLERANCE = 0.01  # relative: 2:1 within ±1 % is an equirectangular 360° × 180° panorama
COLUMN_WIDTH = 240
ROW_HEIGHT = 220
LINEAR_REC709 = "Linear Rec.709"  # the colour space our EXRs are written in (Blender 4.0+ names it so)


def apply_world(
    context,
    image: bpy.types.Image,
    *,
    strength: float = 1.0,
    rotation: float = 0.0,
    use_hdr: bool = True,
    world: bpy.types.World | None = None,
) -> bpy.types.World:
    """Show ``image`` as the scene's world and return the world.

    ``rotation`` (radians) turns the panorama about Z as Mapping's Z rotation does in any world:
    looking at azimuth a shows what was at a + rotation. With ``use_hdr`` the colour comes from the
    image's HDR companion when it has one (see hdr_companion). Applying the same image again
    rebuilds its world; ``world`` names the world to rebuild instead (the live preview's).
    Everything that reads files happens before the node tree is touched, so a failure leaves the
    world as it was.
    """
    companion = hdr_companion(image) if use_hdr else None
    shown = companion or image
    edge_colors = None if is_equirectangular(image) else edge_row_colors(shown)
    world = world or find_world(image)
    if world is None:
        world = bpy.data.worlds.new(image.name)
    world[SOURCE_PROPERTY] = image
    if companion is None:
        world.pop(HDR_PROPERTY, None)
    else:
        world[HDR_PROPERTY] = companion
    if world.node_tree is None:  # Blender < 5.0 makes worlds without nodes
        world.use_nodes = True
    tree = world.node_tree
    tree.nodes.clear()

    coordinates = tree.nodes.new("ShaderNodeTexCoord")
    mapping = tree.nodes.new("ShaderNodeMapping")
    mapping.inputs["Rotation"].default_value = (0.0, 0.0, rotation)
    tree.links.new(coordinates.outputs["Generated"], mapping.inputs["Vector"])
    direction = mapping.outputs["Vector"]
    if edge_colors is None:
        color = _equirectangular_color(tree, shown, direction)
    else:
        color = _cylindrical_color(tree, shown, direction, edge_colors)
    background = tree.nodes.new("ShaderNodeBackground")
    background.inputs["Strength"].default_value = strength
    tree.links.new(color, background.inputs["Color"])
    output = tree.nodes.new("ShaderNodeOutputWorld")
    tree.links.new(background.outputs["Background"], output.inputs["Surface"])
    arrange_nodes(output)

    set_world(context.scene, world)
    return world


def set_world(scene, world: bpy.types.World | None) -> None:
    """Make ``world`` the scene's world; the world it replaces is kept (see keep_if_unused)."""
    replaced = scene.world
    scene.world = world
    if replaced is not None and replaced != world:
        keep_if_unused(replaced)


def keep_if_unused(block: bpy.types.ID) -> None:
    """Give a datablock that nothing uses any more a fake user: Blender drops unused data on save,
    and the user's worlds (or an earlier panorama) must not vanish because we replaced them."""
    if block.users == 0:
        block.use_fake_user = True


def find_world(image: bpy.types.Image) -> bpy.types.World | None:
    """The world apply_world made for ``image``, if there is one."""
    return next((world for world in bpy.data.worlds if world.get(SOURCE_PROPERTY) == image), None)


def hdr_companion(image: bpy.types.Image) -> bpy.types.Image | None:
    """The linear EXR written beside the panorama file of ``image`` with the HDR option, loaded (once)
    as a Linear Rec.709 image; None when there is none or it belongs to another run."""
    settings = metadata_of(image).get(SETTINGS_KEY)
    if settings is None or not image.filepath:
        return None
    path = os.path.splitext(absolute_path(image.filepath, library=image.library))[0] + ".exr"
    if not os.path.isfile(path):
        return None
    try:
        if hdr.read_exr_attributes(path).get(SETTINGS_KEY) != settings:
            return None
        companion = load_panorama(path)
    except (OSError, ValueError):  # unreadable or damaged (PanoramaImageError is one): light with the PNG
        return None
    companion.name = f"{image.name} HDR"
    companion.colorspace_settings.name = LINEAR_REC709
    return companion


def is_equirectangular(image: bpy.types.Image) -> bool:
    width, height = image.size
    return abs(width - EQUIRECTANGULAR_ASPECT * height) <= ASPECT_TOLERANCE * EQUIRECTANGULAR_ASPECT * height


def _equirectangular_color(tree, image, direction):
    """An Environment Texture looked up no nearer a pole than its first row's centres.

    The texture wraps vertically as well as horizontally, so within half a row of a pole it would blend
    the first row with the other pole's (a dot of ground colour at the zenith). The lookup's elevation is
    kept within δ = half a row of arc from the pole: a direction (x, y, z) with r = √(x² + y²) keeps its
    azimuth and gets its height clamped to |z| ≤ r · cot δ. It is nudged off the exact pole first, where
    r = 0 and the azimuth is undefined.
    """
    nodes, links = tree.nodes, tree.links
    nudge = nodes.new("ShaderNodeVectorMath")
    nudge.operation = "ADD"
    links.new(direction, nudge.inputs[0])
    nudge.inputs[1].default_value = (1e-6, 0.0, 0.0)
    direction = nudge.outputs["Vector"]
    split = nodes.new("ShaderNodeSeparateXYZ")
    links.new(direction, split.inputs["Vector"])
    half_row = math.pi / (2 * image.size[1])
    height_limit = _math(tree, "MULTIPLY", _horizontal_radius(tree, direction), 1.0 / math.tan(half_row))
    clamp = nodes.new("ShaderNodeClamp")
    links.new(split.outputs["Z"], clamp.inputs["Value"])
    links.new(_math(tree, "MULTIPLY", height_limit, -1.0), clamp.inputs["Min"])
    links.new(height_limit, clamp.inputs["Max"])
    clamped = nodes.new("ShaderNodeCombineXYZ")
    links.new(split.outputs["X"], clamped.inputs["X"])
    links.new(split.outputs["Y"], clamped.inputs["Y"])
    links.new(clamp.outputs["Result"], clamped.inputs["Z"])

    texture = nodes.new("ShaderNodeTexEnvironment")
    texture.image = image
    texture.projection = "EQUIRECTANGULAR"
    texture.interpolation = "Linear"
    links.new(clamped.outputs["Vector"], texture.inputs["Vector"])
    return texture.outputs["Color"]


def _horizontal_radius(tree, direction):
    """√(x² + y²) of a direction socket."""
    horizontal = tree.nodes.new("ShaderNodeVectorMath")
    horizontal.operation = "MULTIPLY"
    tree.links.new(direction, horizontal.inputs[0])
    horizontal.inputs[1].default_value = (1.0, 1.0, 0.0)
    radius = tree.nodes.new("ShaderNodeVectorMath")
    radius.operation = "LENGTH"
    tree.links.new(horizontal.outputs["Vector"], radius.inputs[0])
    return radius.outputs["Value"]


def _cylindrical_color(tree, image, direction, edge_colors):
    """The image wrapped once around a vertical cylinder centred on the viewer, with square pixels.

    A w × h strip covers the full 360° horizontally: on the unit cylinder (radius 1, circumference
    2π) one pixel is 2π / w wide, so for square pixels it is 2π / w tall too and the strip is
    H = h · 2π / w = 2π / aspect tall, centred on the horizon. The view direction (x, y, z) meets
    the unit cylinder at azimuth atan2(y, x) and height t = z / √(x² + y²), hence
        u = 0.5 − atan2(y, x) / 2π     (the same orientation as Blender's equirectangular projection)
        v = 0.5 + t / H                (inside the strip while |t| ≤ H / 2).
    Above and below the strip the world is a plain colour: ``edge_colors``, the average of the
    bottom, resp. top, row (edge_row_colors).
    """
    width, height = image.size
    strip_height = 2.0 * math.pi * height / width
    nodes, links = tree.nodes, tree.links

    split = nodes.new("ShaderNodeSeparateXYZ")
    links.new(direction, split.inputs["Vector"])
    azimuth = _math(tree, "ARCTAN2", split.outputs["Y"], split.outputs["X"])
    u = _math(tree, "MULTIPLY_ADD", azimuth, -0.5 / math.pi, 0.5)

    t = _math(tree, "DIVIDE", split.outputs["Z"], _horizontal_radius(tree, direction))
    v = _math(tree, "MULTIPLY_ADD", t, 1.0 / strip_height, 0.5)
    # Texture wraps (REPEAT) so the 0/360° seam blends both edges; keeping v half a texel inside
    # [0, 1] stops the top and bottom rows from blending into each other.
    clamp = nodes.new("ShaderNodeClamp")
    links.new(v, clamp.inputs["Value"])
    clamp.inputs["Min"].default_value = 0.5 / height
    clamp.inputs["Max"].default_value = 1.0 - 0.5 / height

    uv = nodes.new("ShaderNodeCombineXYZ")
    links.new(u, uv.inputs["X"])
    links.new(clamp.outputs["Result"], uv.inputs["Y"])
    texture = nodes.new("ShaderNodeTexImage")
    texture.image = image
    texture.extension = "REPEAT"
    texture.interpolation = "Linear"
    links.new(uv.outputs["Vector"], texture.inputs["Vector"])

    bottom_color, top_color = edge_colors
    above = _math(tree, "GREATER_THAN", t, 0.0)
    outside = _mix_color(tree, above, bottom_color, top_color)
    inside = _math(tree, "COMPARE", t, 0.0, strip_height / 2.0)  # 1 where |t| ≤ H / 2
    return _mix_color(tree, inside, outside, texture.outputs["Color"])


def edge_row_colors(image: bpy.types.Image) -> tuple[tuple, tuple]:
    """The mean colour (scene linear RGBA) of the image's bottom row and of its top row."""
    rows, is_float = _edge_rows(image)
    if not is_float:  # 8-bit pixels are sRGB-encoded; average light, not code values
        rows = hdr.srgb_to_linear(rows)
    return tuple((*Color(mean).from_rec709_linear_to_scene_linear(), 1.0) for mean in rows.mean(axis=1))


def _edge_rows(image: bpy.types.Image) -> tuple[np.ndarray, bool]:
    """The bottom and top rows' RGB values as image.pixels gives them (2 × width × 3), and whether
    the pixels are float.

    image.pixels hands out every pixel as float (16 bytes a pixel: 1 GB for a 16384 × 4096 strip),
    so a file's rows are cut out of its decoded bytes instead (imbuf: 4 bytes a pixel, freed at
    once) and only those two rows are read as float.
    """
    decoded = _decode(image)
    if decoded is None:  # a generated or rendered image: only its pixels exist
        width, height = image.size
        pixels = np.empty(width * height * image.channels, dtype=np.float32)
        image.pixels.foreach_get(pixels)
        return pixels.reshape(height, width, image.channels)[[0, -1], :, :3], image.is_float
    width, height = decoded.size
    rows = []
    with tempfile.TemporaryDirectory(prefix="msd-rows-") as folder:
        for number, y in enumerate((0, height - 1)):  # ImBuf, like image.pixels, has the bottom row first
            row = decoded if number else decoded.copy()
            row.crop(min=(0, y), max=(width - 1, y))
            path = os.path.join(folder, f"row{number}")  # written in the file's own format, read by content
            imbuf.write(row, filepath=path)
            row_image = bpy.data.images.load(path, check_existing=False)
            try:
                values = np.empty(width * row_image.channels, dtype=np.float32)
                row_image.pixels.foreach_get(values)
                rows.append(values.reshape(width, row_image.channels)[:, :3])
                is_float = row_image.is_float
            finally:
                bpy.data.images.remove(row_image)
    return np.stack(rows), is_float


def _decode(image: bpy.types.Image):
    """A new ImBuf of the image's file or packed copy, None when it has neither."""
    try:
        if image.packed_file is not None:
            return imbuf.load_from_buffer(image.packed_file.data)
        if image.source == "FILE":
            return imbuf.load(bpy.path.abspath(image.filepath, library=image.library))
    except (OSError, ValueError):  # the file went away since the image was loaded
        pass
    return None


def _math(tree, operation, *operands):
    """A Math node; each operand is an output socket to link or a number."""
    node = tree.nodes.new("ShaderNodeMath")
    node.operation = operation
    for socket, operand in zip(node.inputs, operands):
        if isinstance(operand, bpy.types.NodeSocket):
            tree.links.new(operand, socket)
        else:
            socket.default_value = operand
    return node.outputs["Value"]


def _mix_color(tree, factor, first, second):
    """A Mix (colour) node: ``first`` where factor is 0, ``second`` where it is 1; colours are
    sockets to link or RGBA values."""
    node = tree.nodes.new("ShaderNodeMix")
    node.data_type = "RGBA"
    sockets = {socket.identifier: socket for socket in node.inputs}
    tree.links.new(factor, sockets["Factor_Float"])
    for socket, color in ((sockets["A_Color"], first), (sockets["B_Color"], second)):
        if isinstance(color, bpy.types.NodeSocket):
            tree.links.new(color, socket)
        else:
            socket.default_value = color
    return next(socket for socket in node.outputs if socket.identifier == "Result_Color")


def arrange_nodes(output: bpy.types.Node) -> None:
    """Lay out a node tree in columns, right to left by the longest path to ``output``."""
    depth = {output: 0}
    pending = [output]
    while pending:
        node = pending.pop()
        for socket in node.inputs:
            for link in socket.links:
                if depth.get(link.from_node, -1) < depth[node] + 1:
                    depth[link.from_node] = depth[node] + 1
                    pending.append(link.from_node)
    rows: dict[int, int] = {}
    for node, column in depth.items():
        row = rows[column] = rows.get(column, -1) + 1
        node.location = (-column * COLUMN_WIDTH, -row * ROW_HEIGHT)


class MSD_OT_apply_world(PanoramaFileOperator, bpy.types.Operator):
    """Use a panorama as the world background: a 2:1 image all around, a wider strip as a cylinder"""

    bl_idname = "msd.apply_world"
    bl_label = "Apply as World"
    bl_options = {"REGISTER", "UNDO"}

    strength: FloatProperty(
        name="Strength", description="Brightness of the background", default=1.0, min=0.0, soft_max=10.0
    )
    rotation: FloatProperty(
        name="Rotation", description="Turns the panorama about the vertical axis", default=0.0, subtype="ANGLE"
    )
    use_hdr: BoolProperty(
        name="Use HDR (EXR)",
        description="Light with the panorama's linear EXR (written beside it with the HDR option) when it has one",
        default=True,
    )

    def execute(self, context):
        image = self.load_image()
        if image is None:
            return {"CANCELLED"}
        world = apply_world(context, image, strength=self.strength, rotation=self.rotation, use_hdr=self.use_hdr)
        hdr_note = " and is lit by its HDR EXR" if HDR_PROPERTY in world else ""
        self.report({"INFO"}, f"World {world.name!r} shows {image.name!r}{hdr_note}")
        return {"FINISHED"}


classes = (MSD_OT_apply_world,)
