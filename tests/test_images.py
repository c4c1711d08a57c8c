"""Loading a panorama into Blender (operators/images.py), and what the .blend keeps of it.

Also holds the helpers test_world.py and test_backdrop.py share: a synthetic test panorama, tiny
Cycles renders and cameras looking in known directions.
"""

import json
import math
import shutil
from pathlib import Path

import bpy
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from blender_env import blender, extension  # noqa: F401  (fixtures)

# The test panorama: four vertical quarters, left to right; each one colour above its middle row and
# another below. 8-bit sRGB values.
TOP_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))  # red, green, blue, yellow
BOTTOM_COLORS = ((0, 255, 255), (255, 0, 255), (255, 255, 255), (128, 128, 128))  # cyan, magenta, white, grey
PROMPT = "a misty alpine valley at dawn with pine trees"


def panorama_pixels(width: int, height: int, top=TOP_COLORS, bottom=BOTTOM_COLORS) -> np.ndarray:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)  # top row first
    for quarter in range(4):
        columns = slice(quarter * width // 4, (quarter + 1) * width // 4)
        pixels[: height // 2, columns] = top[quarter]
        pixels[height // 2 :, columns] = bottom[quarter]
    return pixels


def write_panorama(path: Path, width: int, height: int, texts: dict | None = None, **colors) -> Path:
    """The test panorama as a PNG, with ``texts`` as its text chunks (the generator's metadata)."""
    info = PngInfo()
    for key, value in (texts or {}).items():
        info.add_itxt(key, value)
    Image.fromarray(panorama_pixels(width, height, **colors)).save(path, pnginfo=info)
    return path


def generation_texts(prompt: str = PROMPT, seed: int = 42) -> dict[str, str]:
    settings = {"prompt": prompt, "seed": seed, "width": 64, "height": 32, "steps": 3}
    return {"prompt": prompt, "seed": str(seed), "width": "64", "height": "32", "settings": json.dumps(settings)}


def srgb_to_linear(value):
    value = np.asarray(value, dtype=float)
    return np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(value):
    value = np.asarray(value, dtype=float)
    return np.where(value <= 0.0031308, value * 12.92, 1.055 * value ** (1 / 2.4) - 0.055)


def add_camera(scene, azimuth: float = 0.0, elevation: float = 0.0, lens: float = 200.0, location=(0, 0, 0)):
    """A perspective camera looking horizontally at ``azimuth`` degrees (0 = +X, 90 = +Y), tilted up by
    ``elevation`` degrees; the scene's active camera. 200 mm: a 10° view."""
    camera = bpy.data.objects.new("Camera", bpy.data.cameras.new("Camera"))
    camera.data.lens = lens
    camera.location = location
    camera.rotation_euler = (math.radians(90 + elevation), 0.0, math.radians(azimuth - 90))
    scene.collection.objects.link(camera)
    scene.camera = camera
    bpy.context.view_layer.update()  # matrix_world follows the new transform
    return camera


def render(scene, width: int, height: int, directory: Path) -> np.ndarray:
    """Render with Cycles (CPU, 1 sample through each pixel's centre, Standard view transform, so an
    emitted image comes back as its own sRGB values); pixels top row first, 0–255 RGB integers."""
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 1
    scene.cycles.use_denoising = False
    scene.cycles.filter_width = 0.01
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    scene.render.dither_intensity = 0.0
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    if scene.world is not None:  # only camera rays matter here; the world's importance map would dominate the time
        scene.world.cycles.sampling_method = "NONE"
    scene.render.image_settings.file_format = "PNG"
    scene.render.filepath = str(directory / "render.png")
    bpy.ops.render.render(write_still=True)
    return np.asarray(Image.open(directory / "render.png").convert("RGB"), dtype=int)


def image_pixel(image, x: int, y_from_top: int) -> tuple[int, int, int]:
    """One pixel of a Blender image as 0–255 sRGB (Blender stores the bottom row first)."""
    width, height = image.size
    start = ((height - 1 - y_from_top) * width + x) * image.channels
    return tuple(round(value * 255) for value in image.pixels[start : start + 3])


def test_load_stores_metadata_names_image_and_packs_it(extension, tmp_path):
    path = write_panorama(tmp_path / "valley.png", 64, 32, generation_texts())
    images = extension.operators.images

    image = images.load_panorama(str(path))

    assert image.name == "MSD a misty alpine valley"  # the prompt's first five words, not ending on "at"
    assert tuple(image.size) == (64, 32)
    assert image.colorspace_settings.name == "sRGB"
    assert images.metadata_of(image) == generation_texts()
    assert image["msd"]["seed"] == "42"
    assert json.loads(image["msd"]["settings"])["prompt"] == PROMPT
    assert image.packed_file is not None  # the .blend is not saved yet: the image travels inside it
    assert image_pixel(image, 0, 0) == TOP_COLORS[0] and image_pixel(image, 63, 31) == BOTTOM_COLORS[3]


@pytest.mark.parametrize("prompt,name", [
    ("a misty alpine valley at dawn with pine trees", "MSD a misty alpine valley"),
    ("panoramic snowcapped mountainscape overlooking glaciers", "MSD panoramic snowcapped mountainscape"),
    ("a quiet harbour at", "MSD a quiet harbour"),
    ("Pneumonoultramicroscopicsilicovolcanoconiosis-like dust storm", "MSD " + "Pneumonoultramicroscopicsilicovolcanoco…"),
    ("the", "MSD the"),
])  # fmt: skip
def test_names_keep_whole_words(extension, prompt, name):
    assert extension.operators.images.panorama_name({"prompt": prompt}, "/x/file.png") == name


def test_image_without_prompt_is_named_after_its_file(extension, tmp_path):
    image = extension.operators.images.load_panorama(str(write_panorama(tmp_path / "harbour_dusk.png", 64, 32)))
    assert image.name == "MSD harbour_dusk"
    assert extension.operators.images.metadata_of(image) == {}


def test_other_image_formats_load_without_metadata(extension, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(panorama_pixels(64, 32)).save(path, quality=95)
    image = extension.operators.images.load_panorama(str(path))
    assert tuple(image.size) == (64, 32) and extension.operators.images.metadata_of(image) == {}


def test_loading_the_same_file_again_returns_its_image_and_a_rewritten_file_is_a_new_one(extension, tmp_path):
    images = extension.operators.images
    path = write_panorama(tmp_path / "pano.png", 64, 32, generation_texts())
    first = images.load_panorama(str(path))
    # Another spelling of the same path, and a copy of the file: the image made for those bytes.
    shutil.copy(path, tmp_path / "copy.png")
    assert images.load_panorama(str(tmp_path / "." / "sub" / ".." / "pano.png")) == first
    assert images.load_panorama(str(tmp_path / "copy.png")) == first and len(bpy.data.images) == 1

    # The file is made again with another prompt and other colours: another generation, another
    # image; the first one keeps its pixels and settings.
    write_panorama(path, 64, 32, generation_texts("a red desert", 7), top=BOTTOM_COLORS, bottom=TOP_COLORS)
    second = images.load_panorama(str(path))

    assert second != first and len(bpy.data.images) == 2
    assert images.metadata_of(second) == generation_texts("a red desert", 7)
    assert image_pixel(second, 0, 0) == BOTTOM_COLORS[0] and second.packed_file is not None
    assert images.metadata_of(first) == generation_texts()
    assert image_pixel(first, 0, 0) == TOP_COLORS[0] and first.packed_file is not None


def paint(image, color=(0.25, 0.5, 0.75, 1.0)) -> None:
    """Unsaved edits, as Texture Paint leaves them."""
    pixels = np.empty(len(image.pixels), dtype=np.float32)
    pixels.reshape(-1, 4)[:] = color
    image.pixels.foreach_set(pixels)
    assert image.is_dirty


def test_an_edited_panorama_is_not_reused(extension, tmp_path):
    images = extension.operators.images
    path = write_panorama(tmp_path / "pano.png", 64, 32, generation_texts())
    first = images.load_panorama(str(path))
    paint(first)
    second = images.load_panorama(str(path))
    assert second != first and image_pixel(second, 0, 0) == TOP_COLORS[0]
    assert first.is_dirty and image_pixel(first, 0, 0) == (64, 128, 191)


@pytest.mark.parametrize("disk_copy", ["readable", "unreadable"])
def test_the_users_own_image_of_the_file_is_never_touched(extension, tmp_path, disk_copy):
    # The user loaded the file themselves, packed it and painted on it; then the file is applied.
    path = write_panorama(tmp_path / "pano.png", 64, 32, generation_texts())
    mine = bpy.data.images.load(str(path))
    mine.pack()
    paint(mine)
    if disk_copy == "unreadable":
        path.write_text("the disk copy is gone")
        with pytest.raises(RuntimeError, match="not an image Blender can read"):
            bpy.ops.msd.apply_world(filepath=str(path))
        assert list(bpy.data.images) == [mine] and bpy.context.scene.world is None
    else:
        assert bpy.ops.msd.apply_world(filepath=str(path)) == {"FINISHED"}
        assert len(bpy.data.images) == 2
        shown = bpy.context.scene.world["msd_image"]
        assert shown != mine and image_pixel(shown, 0, 0) == TOP_COLORS[0]
    assert mine.packed_file is not None and mine.is_dirty and "msd" not in mine
    assert tuple(mine.size) == (64, 32) and image_pixel(mine, 0, 0) == (64, 128, 191)


def test_a_failed_reapply_leaves_the_world_and_its_image_as_they_were(extension, tmp_path):
    path = write_panorama(tmp_path / "strip.png", 128, 32, generation_texts())
    assert bpy.ops.msd.apply_world(filepath=str(path), strength=2.0) == {"FINISHED"}
    world = bpy.context.scene.world
    image = world["msd_image"]
    nodes = sorted((node.bl_idname, node.name) for node in world.node_tree.nodes)
    path.write_text("the file was overwritten since")

    with pytest.raises(RuntimeError, match="not an image Blender can read"):
        bpy.ops.msd.apply_world(filepath=str(path), strength=5.0)

    assert bpy.context.scene.world == world and list(bpy.data.images) == [image]
    assert sorted((node.bl_idname, node.name) for node in world.node_tree.nodes) == nodes
    assert world.node_tree.nodes["Background"].inputs["Strength"].default_value == pytest.approx(2.0)
    assert image.packed_file is not None and image_pixel(image, 0, 0) == TOP_COLORS[0]


def test_only_the_add_ons_own_text_entries_are_kept_and_the_rest_is_reported(extension, tmp_path, capfd):
    texts = {**generation_texts(), "Comment": "x" * 100_000, "Software": "elsewhere", "evil": "{}"}
    path = write_panorama(tmp_path / "pano.png", 64, 32, texts)
    warnings = []
    image = extension.operators.images.load_panorama(str(path), warnings)
    assert extension.operators.images.metadata_of(image) == generation_texts()
    assert set(image["msd"].keys()) == set(generation_texts())
    assert warnings == ["pano.png: ignored 3 text entries that are not MSD Panorama settings ('Comment', 'Software', 'evil')"]

    # The operator reports it (as a warning: the world is applied all the same).
    bpy.data.images.remove(image)
    capfd.readouterr()
    assert bpy.ops.msd.apply_world(filepath=str(path)) == {"FINISHED"}
    assert "ignored 3 text entries" in "".join(capfd.readouterr())


def test_saved_blend_refers_to_the_image_by_relative_path(extension, tmp_path):
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    (tmp_path / "renders").mkdir()
    path = write_panorama(tmp_path / "renders" / "pano.png", 64, 32)

    image = extension.operators.images.load_panorama(str(path))

    assert image.filepath == "//renders/pano.png"
    assert image.packed_file is None
    name = image.name
    # The .blend and its images move together (say, to another disk): the relative path still finds it.
    extension.operators.world.apply_world(bpy.context, image)  # a user: Blender saves no unused image
    bpy.ops.wm.save_mainfile()
    moved = tmp_path.parent / f"{tmp_path.name}-moved"
    shutil.move(tmp_path, moved)
    bpy.ops.wm.open_mainfile(filepath=str(moved / "scene.blend"))
    image = bpy.data.images[name]
    assert tuple(image.size) == (64, 32) and image_pixel(image, 0, 0) == TOP_COLORS[0]
    assert extension.operators.images.load_panorama(str(moved / "renders" / "pano.png")) == image


def test_save_and_reload_keeps_world_backdrop_image_and_metadata(extension, tmp_path):
    source = tmp_path / "made" / "pano.png"
    source.parent.mkdir()
    write_panorama(source, 128, 32, generation_texts())
    context = bpy.context
    image = extension.operators.images.load_panorama(str(source))
    world = extension.operators.world.apply_world(context, image, strength=1.5, rotation=0.25)
    backdrop = extension.operators.backdrop.add_backdrop(context, image, shape="CURVED", strength=2.0)
    names = image.name, world.name, backdrop.name
    node_types = sorted(node.bl_idname for node in world.node_tree.nodes)
    vertex_count = len(backdrop.data.vertices)
    blend = tmp_path / "saved" / "scene.blend"
    blend.parent.mkdir()
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))
    shutil.rmtree(source.parent)  # the image was packed: the .blend alone must be enough

    bpy.ops.wm.open_mainfile(filepath=str(blend))

    image, world, backdrop = bpy.data.images[names[0]], bpy.data.worlds[names[1]], bpy.data.objects[names[2]]
    assert bpy.context.scene.world == world
    assert sorted(node.bl_idname for node in world.node_tree.nodes) == node_types
    assert world.node_tree.nodes["Background"].inputs["Strength"].default_value == pytest.approx(1.5)
    assert world.node_tree.nodes["Mapping"].inputs["Rotation"].default_value[2] == pytest.approx(0.25)
    assert world["msd_image"] == image and backdrop["msd_image"] == image
    assert len(backdrop.data.vertices) == vertex_count
    assert backdrop.active_material.node_tree.nodes["Image Texture"].image == image
    assert image.packed_file is not None and tuple(image.size) == (128, 32)
    assert image_pixel(image, 0, 0) == TOP_COLORS[0]
    assert extension.operators.images.metadata_of(image) == generation_texts()


@pytest.mark.parametrize(
    "make_file, message",
    [
        (lambda path: None, "not found"),
        (lambda path: path.write_text("not a picture"), "not an image Blender can read"),
        (lambda path: path.write_bytes(write_panorama(path, 64, 32, generation_texts()).read_bytes()[:120]), "damaged"),
        (lambda path: path.mkdir(), "not found"),
    ],
    ids=["missing", "not-an-image", "truncated-png", "folder"],
)
def test_bad_file_raises_a_clear_error_and_loads_nothing(extension, tmp_path, make_file, message):
    path = tmp_path / "pano.png"
    make_file(path)
    with pytest.raises(extension.operators.images.PanoramaImageError, match=message):
        extension.operators.images.load_panorama(str(path))
    assert len(bpy.data.images) == 0


# -- Use Settings of Panorama: all fields or none, one clean message ---------------------------------


def panel_values() -> dict:
    group = bpy.context.scene.msd_panorama
    return {name: getattr(group, name) for name in group.bl_rna.properties.keys() if name != "rna_type"}


NESTED = '{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}"


@pytest.mark.parametrize(
    "settings_text, message",
    [
        ('{"prompt": "x", "width": 1099511627776}', "[Ww]idth"),
        ('{"prompt": "x", "steps": 1099511627776}', "[Ss]teps"),
        ('{"prompt": "x", "scales": 1099511627776}', "Levels|scales"),
        ('{"prompt": "x", "seed": 9223372036854775808}', "[Ss]eed"),  # 2^63: no seed of ours (up to 2^63−1 restore)
        ('{"prompt": "x", "seed": 1' + "0" * 5000 + "}", "5001 digits"),
        ('{"prompt": "x", "omega": 1e300}', "[Oo]mega"),
        ('{"prompt": "x", "omega": NaN}', "NaN is not a setting value"),
        (NESTED, "nested too deeply"),
        ('{"prompt": "' + "x" * 70_000 + '"}', "more than settings ever take"),
        ('{"prompt": "x", "width": ', "damaged"),
        ('{"prompt": "x", "negative_prompt": "y", "model": "m\\ud800"}', "not valid Unicode"),
        ('{"prompt": "x\\udc80 y"}', "not valid Unicode"),
    ],
    ids=["width-2^40", "steps-2^40", "scales-2^40", "seed-2^63", "5000-digits", "omega-1e300", "nan", "nested",
         "too-long", "cut-short", "surrogate-model", "surrogate-prompt"],
)  # fmt: skip
def test_bad_stored_settings_change_nothing_and_give_one_clean_error(extension, tmp_path, settings_text, message):
    group = bpy.context.scene.msd_panorama
    group.prompt, group.aspect, group.steps = "my own prompt", "STRIP", 33
    before = panel_values()
    path = write_panorama(tmp_path / "pano.png", 64, 32, {"settings": settings_text})
    with pytest.raises(RuntimeError, match=message) as error:
        bpy.ops.msd.restore_settings(filepath=str(path))
    assert "Traceback" not in str(error.value) and str(error.value).count("\n") <= 1
    assert panel_values() == before

    image = bpy.data.images.new("stored", 8, 8)  # the same text stored on an image
    image["msd"] = {"settings": settings_text}
    with pytest.raises(RuntimeError, match=message):
        bpy.ops.msd.restore_settings(image_name=image.name)
    assert panel_values() == before


def test_settings_restore_writes_every_field(extension, tmp_path):
    settings = {"prompt": "a red desert", "negative_prompt": "people", "width": 512, "height": 128, "wrap": False,
                "steps": 12, "omega": 3.5, "guidance": 5.0, "scales": 2, "seed": 99, "method": "msd", "gradient": "fast"}  # fmt: skip
    group = bpy.context.scene.msd_panorama
    group.pyramid, group.coarse_noise, group.global_move, group.fine_join = "global", "drawn", "roll", "stochastic"
    group.fine_steps = "stochastic"
    path = write_panorama(tmp_path / "pano.png", 64, 32, {"settings": json.dumps(settings)})
    assert bpy.ops.msd.restore_settings(filepath=str(path)) == {"FINISHED"}
    values = panel_values()
    assert {name: values[name] for name in settings} == pytest.approx(settings)
    # An older PNG stores neither: it was made with the paper's pyramid and coarse noise, so those come back.
    assert (values["pyramid"], values["coarse_noise"]) == ("halving", "literal")
    assert values["global_move"] == "fixed"  # and no global level that moves (v0.6)
    assert values["fine_join"] == "deterministic"  # nor a stochastic join (v0.7)
    assert values["fine_steps"] == "deterministic"  # nor stochastic finest steps (v0.11)
    assert values["aspect"] == "CUSTOM" and values["random_seed"] is False
