"""Generating from Blender: the operators and the polling functions behind them, with the tiny real
model in a real worker process (this Python), installed from the extension's zip."""

import os
import signal
import subprocess
import sys
import time
from importlib.metadata import version

import bpy
import pytest

from blender_env import MODULE, addon_module, addon_preferences, blender, extension  # noqa: F401  (fixtures)

PROMPT = "a quiet harbour at dusk"
POLL_TIMEOUT = 120.0  # seconds; a tiny run takes a few


@pytest.fixture
def addon(extension, tmp_path):
    """The add-on set up for the tiny model on CPU, writing into tmp_path/out; an empty scene."""
    prefs = addon_preferences()
    prefs.worker_python = sys.executable
    prefs.model = "tiny"
    prefs.model_config = ""
    prefs.device = "cpu"
    prefs.precision = "float32"
    prefs.keep_worker_warm = True
    prefs.output_folder = str(tmp_path / "out")
    group = bpy.context.scene.msd_panorama
    group.prompt = PROMPT
    group.aspect = "CUSTOM"
    group.width, group.height = 256, 128
    group.wrap = True
    group.steps = 3
    group.random_seed = False
    group.seed = 7
    group.target = "WORLD"
    state = addon_module().properties.run_state
    state.last_error = ""
    state.status = "READY"
    yield extension
    generate = extension.operators.generate
    if generate.session.busy:  # a failed test must not leave a run behind for the next one
        generate.cancel_generation()
        wait(generate, bpy.context)


def generate_module():
    return sys.modules[f"{MODULE}.operators.generate"]


def run_state():
    return addon_module().properties.run_state


def datablocks() -> dict[str, set[str]]:
    return {kind: set(getattr(bpy.data, kind).keys()) for kind in ("images", "worlds", "objects", "meshes", "materials")}


def wait(generate, context, until=None) -> str:
    """Poll like the modal timer does, until the run ends or ``until()`` holds; returns the last outcome."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        outcome = generate.poll_worker(context)
        if outcome != "RUNNING" or (until is not None and until()):
            return outcome
        time.sleep(0.02)
    raise AssertionError("the run did not end in time")


def start_long_run(generate, until) -> None:
    """Start a 50-step run and poll it until ``until(run_state)`` holds, with the run still going."""
    bpy.context.scene.msd_panorama.steps = 50
    generate.start_generation(bpy.context)
    assert wait(generate, bpy.context, until=lambda: until(run_state())) == "RUNNING"


def write_test_png(path, width, height):
    image = bpy.data.images.new("source", width, height)
    image.filepath_raw, image.file_format = str(path), "PNG"
    image.save()
    bpy.data.images.remove(image)
    return path


def world_images(world) -> list:
    return [node.image for node in world.node_tree.nodes if node.type == "TEX_ENVIRONMENT"]


# -- the operator, as a script uses it ---------------------------------------------------------------


def test_generate_wait_makes_the_world_from_a_panorama_with_its_settings(addon, tmp_path):
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}

    state = run_state()
    assert state.status == "READY" and state.last_error == ""
    assert os.path.dirname(state.last_output) == str(tmp_path / "out")
    assert os.path.basename(state.last_output).startswith("msd_") and state.last_output.endswith("_7.png")
    image = bpy.data.images[state.last_image]
    assert tuple(image.size) == (256, 128)
    assert image["msd"]["prompt"] == PROMPT
    assert image["msd"]["seed"] == "7"
    assert image["msd"]["model"] == "tiny"
    world = bpy.context.scene.world
    assert world is not None and image in world_images(world)
    assert state.preview_image_uid is None and "MSD Preview" not in bpy.data.images  # previews live only during a run

    # Restoring fills the panel from the image's stored settings.
    group = bpy.context.scene.msd_panorama
    group.prompt, group.steps, group.seed = "something else", 40, 1
    group.aspect = "STRIP"
    assert bpy.ops.msd.restore_settings(image_name=image.name) == {"FINISHED"}
    assert (group.prompt, group.steps, group.seed, group.random_seed) == (PROMPT, 3, 7, False)
    assert (group.aspect, group.width, group.height, group.wrap) == ("CUSTOM", 256, 128, True)
    assert bpy.ops.msd.restore_settings(filepath=state.last_output, vary_seed=True) == {"FINISHED"}
    assert group.prompt == PROMPT and group.seed != 7


def test_second_run_reuses_the_worker_and_never_overwrites(addon):
    generate = generate_module()
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    first_output, client = run_state().last_output, generate.session.client
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    assert run_state().last_output != first_output and os.path.isfile(first_output)
    assert generate.session.client is client and client.alive


def test_unregister_stops_the_worker(addon):
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    client = generate_module().session.client
    assert client.alive
    addon.unregister()
    try:
        assert not client.alive and generate_module().session.client is None
    finally:
        addon.register()


def test_worker_stops_after_a_run_unless_kept_warm(addon):
    addon_preferences().keep_worker_warm = False
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    assert generate_module().session.client is None


# -- the polling function, as the modal timer drives it --------------------------------------------


def test_polling_by_hand_reports_progress_shows_previews_and_applies_the_target(addon):
    generate = generate_module()
    group = bpy.context.scene.msd_panorama
    group.width, group.height = 128, 64  # one level under the global one: the previews are of the whole panorama
    group.steps = 11  # previews after steps 1, 5 and 10
    group.target = "BACKDROP"
    objects_before = set(bpy.data.objects)
    generate.start_generation(bpy.context)
    assert not bpy.ops.msd.generate.poll()  # one run at a time

    state = run_state()
    progress, preview_paths = [], set()
    outcome = "RUNNING"
    deadline = time.monotonic() + POLL_TIMEOUT
    while outcome == "RUNNING" and time.monotonic() < deadline:
        outcome = generate.poll_worker(bpy.context)
        if outcome == "RUNNING":
            progress.append(state.progress)
            image = generate.preview_image()
            if image is not None:
                assert tuple(image.size) == (128, 64)
                preview_paths.add(image.filepath)
        time.sleep(0.01)

    assert outcome == "FINISHED"
    assert progress == sorted(progress) and 0 < progress[-1] <= 1
    written = sorted(name for name in os.listdir(addon_module().preferences.user_folder("previews")))
    assert [name[-13:] for name in written] == ["step-0001.png", "step-0005.png", "step-0010.png"]
    assert preview_paths and {os.path.basename(path) for path in preview_paths} <= set(written)
    assert "MSD Preview" not in bpy.data.images and state.preview_image_uid is None
    new_objects = set(bpy.data.objects) - objects_before
    assert len(new_objects) == 1  # the backdrop
    assert bpy.ops.msd.generate.poll()


def test_a_world_target_shows_the_previews_live_then_the_result(addon):
    generate = generate_module()
    studio = bpy.data.worlds.new("Studio")
    bpy.context.scene.world = studio
    bpy.context.scene.msd_panorama.steps = 6  # previews after steps 1 and 5
    generate.start_generation(bpy.context)
    state = run_state()
    assert wait(generate, bpy.context, until=lambda: state.preview_image_uid is not None) == "RUNNING"
    preview = generate.preview_image()
    assert world_images(bpy.context.scene.world) == [preview] and bpy.context.scene.world != studio

    assert wait(generate, bpy.context) == "FINISHED"
    world = bpy.context.scene.world
    assert [image.name for image in world_images(world)] == [state.last_image]
    assert set(bpy.data.worlds.keys()) == {"Studio", world.name}  # the preview's world is gone


def test_cancelling_a_live_world_preview_gives_the_scene_its_world_back(addon):
    generate = generate_module()
    studio = bpy.data.worlds.new("Studio")
    bpy.context.scene.world = studio
    before = datablocks()
    start_long_run(generate, until=lambda state: state.preview_image_uid is not None)
    assert bpy.context.scene.world != studio
    generate.cancel_generation()
    assert wait(generate, bpy.context) == "CANCELLED"
    assert bpy.context.scene.world == studio and datablocks() == before


# -- the live preview never costs the user their world ----------------------------------------------


@pytest.fixture
def studio(addon):
    """The user's own world, assigned to the scene and used by nothing else."""
    world = bpy.data.worlds.new("Studio")
    world.node_tree.nodes.new("ShaderNodeTexSky")
    bpy.context.scene.world = world
    return world


def start_live_preview(generate) -> None:
    start_long_run(generate, until=lambda state: state.preview_image_uid is not None)
    assert bpy.context.scene.world["msd_image"] == generate.preview_image()


def assert_studio_is_back(studio, name="Studio") -> None:
    scene = bpy.context.scene
    assert scene.world == studio and studio.name == name and not studio.use_fake_user
    assert [node.bl_idname for node in studio.node_tree.nodes if node.bl_idname == "ShaderNodeTexSky"]
    assert list(bpy.data.worlds) == [studio] and "MSD Preview" not in bpy.data.images


def cancel_and_wait(generate) -> None:
    generate.cancel_generation()
    assert wait(generate, bpy.context) == "CANCELLED"


def test_the_users_world_keeps_a_user_while_the_preview_shows(addon, studio):
    generate = generate_module()
    start_live_preview(generate)
    assert studio.users >= 1 and studio.use_fake_user
    bpy.data.orphans_purge(do_recursive=True)  # Outliner › Purge: removes whatever has no user
    assert "Studio" in bpy.data.worlds
    cancel_and_wait(generate)
    assert_studio_is_back(studio)


def test_a_save_mid_run_stores_the_users_world_and_nothing_of_the_preview(addon, studio, tmp_path):
    generate = generate_module()
    start_live_preview(generate)
    blend = tmp_path / "mid-run.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(blend))  # runs save_pre and save_post
    # The run goes on and the preview is the world again.
    assert generate.session.busy and bpy.context.scene.world["msd_image"] == generate.preview_image()
    assert studio.use_fake_user

    bpy.ops.wm.open_mainfile(filepath=str(blend))  # load_pre ends the run

    assert not generate.session.busy and run_state().preview_image_uid is None
    world = bpy.context.scene.world
    assert world is not None and world.name == "Studio" and not world.use_fake_user
    assert list(bpy.data.worlds) == [world] and list(bpy.data.images) == []
    assert bpy.ops.msd.generate.poll()  # and the next run can start


def test_renaming_the_users_world_mid_run_then_cancelling_restores_it(addon, studio):
    generate = generate_module()
    start_live_preview(generate)
    studio.name = "Renamed"
    cancel_and_wait(generate)
    assert_studio_is_back(studio, name="Renamed")


def test_a_failed_run_restores_the_users_world(addon, studio):
    generate = generate_module()
    start_live_preview(generate)
    os.kill(generate.session.client.ready_info["pid"], signal.SIGKILL)
    assert wait(generate, bpy.context) == "CANCELLED" and "SIGKILL" in run_state().last_error
    assert_studio_is_back(studio)


def test_deleting_the_preview_world_gives_the_users_world_back(addon, studio):
    generate = generate_module()
    start_live_preview(generate)
    bpy.data.worlds.remove(bpy.context.scene.world)
    state = run_state()
    step = state.step
    assert wait(generate, bpy.context, until=lambda: state.step >= step + 5) == "RUNNING"  # another preview came
    assert bpy.context.scene.world == studio and list(bpy.data.worlds) == [studio]
    cancel_and_wait(generate)
    assert_studio_is_back(studio)


def test_a_world_chosen_mid_run_stands(addon, studio, tmp_path):
    # Applying a panorama (or picking any world) while the preview shows: the user's choice wins,
    # and their earlier world is kept for them.
    generate = generate_module()
    start_live_preview(generate)
    source = write_test_png(tmp_path / "other.png", 64, 32)
    assert bpy.ops.msd.apply_world(filepath=str(source)) == {"FINISHED"}
    chosen = bpy.context.scene.world
    state = run_state()
    step = state.step
    assert wait(generate, bpy.context, until=lambda: state.step >= step + 5) == "RUNNING"
    assert bpy.context.scene.world == chosen
    cancel_and_wait(generate)
    assert bpy.context.scene.world == chosen and set(bpy.data.worlds) == {studio, chosen}
    assert studio.use_fake_user  # unused now, but not lost on save


def test_undo_after_the_run_never_brings_the_preview_back(addon, studio):
    generate = generate_module()
    start_live_preview(generate)
    bpy.ops.ed.undo_push(message="something the user did mid-run")
    cancel_and_wait(generate)
    bpy.ops.ed.undo_push(message="after the run")
    bpy.ops.ed.undo()  # back to the state with the preview as the world
    studio = bpy.data.worlds["Studio"]  # references do not survive an undo
    assert_studio_is_back(studio)


def test_the_result_goes_to_the_scene_the_run_was_for_even_renamed(addon, studio):
    generate = generate_module()
    scene = bpy.context.scene
    scene.msd_panorama.steps = 8  # a preview after step 1 and 5, and an end soon
    generate.start_generation(bpy.context)
    assert wait(generate, bpy.context, until=lambda: run_state().preview_image_uid is not None) == "RUNNING"
    scene.name = "Renamed Scene"
    other = bpy.data.scenes.new("Other")
    with bpy.context.temp_override(scene=other):  # the user switched to another scene
        assert wait(generate, bpy.context) == "FINISHED"
    assert other.world is None
    assert scene.world["msd_image"] == bpy.data.images[run_state().last_image]
    assert set(bpy.data.worlds) == {studio, scene.world} and studio.use_fake_user


def test_opening_another_file_mid_run_ends_it_cleanly(addon):
    generate = generate_module()
    start_long_run(generate, until=lambda state: state.step >= 1)
    bpy.ops.wm.read_homefile(use_empty=True)
    assert not generate.session.busy and run_state().status == "READY"
    addon_module().properties  # the add-on is still enabled in the new file
    group = bpy.context.scene.msd_panorama
    group.prompt, group.aspect, group.width, group.height, group.steps = PROMPT, "CUSTOM", 256, 128, 3
    group.random_seed = False
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}  # the old run's late events are ignored
    assert run_state().last_error == ""


def test_the_preview_image_is_one_datablock_updated_in_place(addon, tmp_path):
    generate = generate_module()
    paths = []
    for number, size in enumerate(((32, 16), (64, 32))):
        image = bpy.data.images.new(f"source {number}", *size)
        image.filepath_raw = str(tmp_path / f"preview-{number}.png")
        image.file_format = "PNG"
        image.save()
        paths.append(image.filepath_raw)
    before = len(bpy.data.images)
    generate._show_preview(paths[0])
    preview = generate.preview_image()
    name = preview.name
    generate._show_preview(paths[1])
    assert generate.preview_image() == preview and len(bpy.data.images) == before + 1
    assert preview.filepath == paths[1] and tuple(preview.size) == (64, 32)
    generate._remove_preview()
    assert name not in bpy.data.images and run_state().preview_image_uid is None


def test_cancel_leaves_the_scene_as_it_was(addon, tmp_path):
    generate = generate_module()
    before = datablocks()
    start_long_run(generate, until=lambda state: state.step >= 1)
    state = run_state()
    assert bpy.ops.msd.cancel() == {"FINISHED"}
    assert wait(generate, bpy.context) == "CANCELLED"

    assert state.last_error == "" and state.status == "READY"
    assert datablocks() == before and bpy.context.scene.world is None
    assert not os.listdir(tmp_path / "out")
    assert not generate.session.busy and generate.session.client.alive


@pytest.mark.parametrize("when", ["before the request is sent", "once it is sent"])
def test_ctrl_c_while_a_script_starts_a_run_cancels_it_without_a_traceback(addon, tmp_path, monkeypatch, when):
    """Ctrl+C raises wherever Python is: a script's wait=True run can take it while the worker starts, not only
    while it waits (the demo's Ctrl+C test met it there). The operator cancels as it does during the wait."""
    generate = generate_module()
    bpy.context.scene.msd_panorama.steps = 50
    before = datablocks()
    state = run_state()
    pressed = []

    def ctrl_c(*args, **kwargs):
        if not pressed:
            pressed.append(True)
            raise KeyboardInterrupt

    if when == "before the request is sent":
        monkeypatch.setattr(generate.session, "client_for", ctrl_c)
    else:  # start_generation resets the progress right after it records the job it sent
        reset = state.reset_progress
        monkeypatch.setattr(state, "reset_progress", lambda: (ctrl_c(), reset()))
    assert bpy.ops.msd.generate(wait=True) == {"CANCELLED"}

    assert pressed and state.last_error == "" and not generate.session.busy
    assert datablocks() == before and bpy.context.scene.world is None
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    monkeypatch.undo()
    bpy.context.scene.msd_panorama.steps = 3
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}  # the next run works


# -- failures ---------------------------------------------------------------------------------------


def test_a_missing_worker_python_is_reported_and_changes_nothing(addon, tmp_path):
    addon_preferences().worker_python = "/nonexistent/bin/python3"
    before = datablocks()
    with pytest.raises(RuntimeError, match="'/nonexistent/bin/python3' does not exist"):
        bpy.ops.msd.generate(wait=True)
    state = run_state()
    assert "/nonexistent/bin/python3" in state.last_error and state.status == "ERROR"
    assert datablocks() == before and not generate_module().session.busy
    assert not (tmp_path / "out").exists()


def test_a_killed_worker_is_reported_changes_nothing_and_the_next_run_works(addon, tmp_path):
    generate = generate_module()
    before = datablocks()
    start_long_run(generate, until=lambda state: state.step >= 1)
    state = run_state()
    os.kill(generate.session.client.ready_info["pid"], signal.SIGKILL)
    assert wait(generate, bpy.context) == "CANCELLED"

    assert "killed by SIGKILL" in state.last_error and state.status == "ERROR"
    assert datablocks() == before and bpy.context.scene.world is None
    assert not os.listdir(tmp_path / "out")
    assert generate.session.client is None

    bpy.context.scene.msd_panorama.steps = 3
    assert bpy.ops.msd.generate(wait=True) == {"FINISHED"}
    assert state.last_error == "" and state.status == "READY"


def test_a_failed_import_removes_what_it_had_added(addon, tmp_path):
    generate = generate_module()
    source = bpy.data.images.new("source", 64, 32)
    source.filepath_raw, source.file_format = str(tmp_path / "pano.png"), "PNG"
    source.save()
    bpy.data.images.remove(source)
    before = datablocks()
    job = generate.Job(
        request_id="r1", settings=addon_module().msd_core.settings.GenerationSettings(prompt=PROMPT),
        output=str(tmp_path / "pano.png"), scene_uid=bpy.context.scene.session_uid, scene_name=bpy.context.scene.name,
        target="BACKDROP",
        backdrop_shape="WAVY", world_strength=1.0, world_rotation=0.0, backdrop_strength=1.0,
    )  # fmt: skip
    assert generate._import_result(bpy.context, job, job.output) == "CANCELLED"
    assert run_state().last_error.startswith(f"the panorama was saved to {job.output} but could not be imported")
    assert "WAVY" in run_state().last_error
    assert datablocks() == before  # the image it had loaded is gone again


def test_invalid_settings_are_reported_before_anything_starts(addon, tmp_path):
    generate = generate_module()
    generate.session.stop()
    group = bpy.context.scene.msd_panorama
    group["width"] = 250  # as a script or an old file could set it, bypassing the panel's rounding
    with pytest.raises(RuntimeError, match="width 250 is not a multiple of 8.*nearest valid: 248 or 256"):
        bpy.ops.msd.generate(wait=True)
    assert generate.session.client is None and not (tmp_path / "out").exists()

    group.width, group.prompt = 256, "   "
    with pytest.raises(RuntimeError, match="the prompt is empty"):
        bpy.ops.msd.generate(wait=True)
    assert "prompt is empty" in run_state().last_error


def test_worker_not_installed_is_reported(addon, monkeypatch):
    addon_preferences().worker_python = ""
    monkeypatch.setattr(addon_module().preferences, "managed_worker_python", lambda: "/nonexistent/worker/python")
    with pytest.raises(RuntimeError, match="the worker is not installed: click Install Worker"):
        bpy.ops.msd.generate(wait=True)
    assert generate_module().worker_status(addon_preferences()) == "NOT_INSTALLED"


# -- panel values → GenerationSettings --------------------------------------------------------------


def test_presets_set_size_and_wrap_and_keep_sizes_multiples_of_8(addon):
    group = bpy.context.scene.msd_panorama
    properties = addon_module().properties
    group.aspect = "WORLD_360"
    assert (group.width, group.height, properties.effective_wrap(group)) == (2048, 1024, True)
    group.aspect = "STRIP"
    assert (group.width, group.height, properties.effective_wrap(group)) == (4096, 1024, False)
    group.width = 2001  # a preset keeps its ratio, both sides multiples of 8
    assert (group.width, group.height) == (2000, 504)
    group.aspect = "BACKDROP"
    group.height = 517
    assert (group.width, group.height) == (1560, 520)
    group.aspect = "CUSTOM"
    group.width, group.height = 250, 125
    assert (group.width, group.height) == (248, 128)


def test_settings_from_scene_maps_the_panel_and_preferences(addon):
    group = bpy.context.scene.msd_panorama
    group.negative_prompt = "people"
    group.scales, group.omega, group.method, group.gradient, group.guidance = 0, 4.0, "msd", "fast", 5.0
    settings = addon_module().properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert (settings.prompt, settings.negative_prompt) == (PROMPT, "people")
    assert (settings.width, settings.height, settings.wrap) == (256, 128, True)
    assert (settings.model, settings.model_config, settings.device, settings.dtype) == ("tiny", None, "cpu", "float32")
    assert (settings.scales, settings.omega, settings.gradient, settings.guidance, settings.steps, settings.seed) == (
        None, 4.0, "fast", 5.0, 3, 7,
    )  # fmt: skip
    group.random_seed = True
    seeds = {addon_module().properties.settings_from_scene(bpy.context.scene, addon_preferences()).seed for _ in range(5)}
    assert len(seeds) > 1


def test_the_pyramid_and_coarse_noise_are_drawn_in_the_sampler_and_map_both_ways(addon):
    from test_extension import draw

    group, properties = bpy.context.scene.msd_panorama, addon_module().properties
    drawn = draw("MSD_PT_panorama_sampler")
    pyramid = drawn.index(("prop", "pyramid"))
    assert [drawn.index(("prop", name)) for name in ("global_window", "global_move", "coarse_noise")] == [
        pyramid + 1, pyramid + 2, pyramid + 3]
    assert (group.pyramid, group.global_window, group.global_move, group.coarse_noise) == ("global", "square", "roll", "drawn")
    group.pyramid, group.coarse_noise = "halving", "literal"  # the paper's
    settings = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert (settings.pyramid, settings.coarse_noise) == ("halving", "literal")
    group.pyramid, group.coarse_noise = "global", "matched"
    properties.settings_to_scene(settings, bpy.context.scene)
    assert (group.pyramid, group.coarse_noise) == ("halving", "literal")
    group.pyramid, group.global_window = "global", "wide"  # a 360° model's whole-world window
    wide = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert (wide.pyramid, wide.global_window) == ("global", "wide")
    group.global_window = "square"
    properties.settings_to_scene(wide, bpy.context.scene)
    assert group.global_window == "wide"
    assert properties.setting_label("pyramid") == ("Pyramid", "the Panorama panel's Sampler section")
    assert properties.setting_label("global_window") == ("Global Window", "the Panorama panel's Sampler section")
    group.global_move = "fixed"  # v0.5's global level, which never moves
    fixed = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert fixed.global_move == "fixed"
    group.global_move = "roll"
    properties.settings_to_scene(fixed, bpy.context.scene)
    assert group.global_move == "fixed"
    assert properties.setting_label("global_move") == ("Global Move", "the Panorama panel's Sampler section")
    assert properties.setting_label("coarse_noise") == ("Coarse Noise", "the Panorama panel's Sampler section")
    group.pyramid, group.global_window, group.global_move, group.coarse_noise = "global", "square", "roll", "drawn"
    # --fine-start: drawn under the coarse noise, read through Blender's float32 as the number it shows
    assert drawn.index(("prop", "fine_start")) == drawn.index(("prop", "coarse_noise")) + 1
    group.fine_start = 0.6
    late = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert late.fine_start == 0.6
    group.fine_start = 0.0
    properties.settings_to_scene(late, bpy.context.scene)
    assert round(group.fine_start, 6) == 0.6
    assert properties.setting_label("fine_start") == ("Finest Level Joins", "the Panorama panel's Sampler section")
    # --fine-join: beside it (its menu is what the row shows), stochastic by default, v0.6's deterministic join kept
    assert drawn.index(("prop", "fine_join")) == drawn.index(("prop", "fine_start")) + 1
    assert group.fine_join == "stochastic"
    group.fine_join = "deterministic"
    held = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert (held.fine_start, held.fine_join) == (0.6, "deterministic")
    group.fine_join = "stochastic"
    properties.settings_to_scene(held, bpy.context.scene)
    assert group.fine_join == "deterministic"
    assert properties.setting_label("fine_join") == ("Late Join", "the Panorama panel's Sampler section")
    group.fine_join = addon_module().msd_core.settings.GenerationSettings.fine_join
    group.fine_start = addon_module().msd_core.settings.GenerationSettings.fine_start
    # --tile-starts: after the late join, any pixel by default (Standard's), v0.7's even tiles on request, both ways
    assert drawn.index(("prop", "tile_starts")) == drawn.index(("prop", "fine_join")) + 1
    _choice_maps_both_ways(group, properties, "tile_starts", "any", "even", "Tile Starts")
    # --fine-steps: under the tile starts, stochastic within the finest blocks by default (Standard's), deterministic too
    assert drawn.index(("prop", "fine_steps")) == drawn.index(("prop", "tile_starts")) + 1
    _choice_maps_both_ways(group, properties, "fine_steps", "stochastic", "deterministic", "Finest Steps")
    # --coarse-gradient: under the late gradient, refresh by default (Standard's), the paper's exact on request
    assert drawn.index(("prop", "coarse_gradient")) == drawn.index(("prop", "late_gradient")) + 1
    _choice_maps_both_ways(group, properties, "coarse_gradient", "refresh", "exact", "Coarse Gradient")
    # --pull-through: under it, the paper's direction through the solver step by default, through x̂₀ on request
    assert drawn.index(("prop", "pull_through")) == drawn.index(("prop", "coarse_gradient")) + 1
    _choice_maps_both_ways(group, properties, "pull_through", "step", "x0", "Pull Through")


def _choice_maps_both_ways(group, properties, name, default, other, label):
    """A Sampler menu: ``default`` as the field's default; ``other`` reaches the settings, comes back from them, and
    the menu is named by its label in reports."""
    assert getattr(group, name) == default
    setattr(group, name, other)
    chosen = properties.settings_from_scene(bpy.context.scene, addon_preferences())
    assert getattr(chosen, name) == other
    setattr(group, name, default)
    properties.settings_to_scene(chosen, bpy.context.scene)
    assert getattr(group, name) == other
    assert properties.setting_label(name) == (label, "the Panorama panel's Sampler section")
    setattr(group, name, getattr(addon_module().msd_core.settings.GenerationSettings, name))


def test_output_files_get_new_names(addon, tmp_path):
    unique_output_path = generate_module().unique_output_path
    first = unique_output_path(str(tmp_path / "new"), 3)
    open(first, "wb").close()
    second = unique_output_path(str(tmp_path / "new"), 3)
    assert first != second and second.endswith("_3_2.png") and not os.path.exists(second)


def test_output_folder_is_beside_the_blend_once_saved(addon, tmp_path):
    preferences = addon_module().preferences
    prefs = addon_preferences()
    prefs.output_folder = "//panoramas/"
    unsaved = preferences.output_folder(prefs)
    assert unsaved.startswith(bpy.utils.extension_path_user(MODULE))
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    assert preferences.output_folder(prefs) == str(tmp_path / "panoramas")


# -- the worker's environment -----------------------------------------------------------------------


def worker_env_module():
    return sys.modules[f"{MODULE}.operators.worker_env"]


def test_check_worker_finds_torch_and_the_device(addon):
    assert bpy.ops.msd.check_worker() == {"FINISHED"}
    message = worker_env_module().install_state.message
    assert f"torch {version('torch')}, diffusers {version('diffusers')}, device cpu; models: SD 1.x/2.x, SDXL" in message


def test_check_worker_names_what_is_wrong(addon, tmp_path):
    check_worker = worker_env_module().check_worker
    result = check_worker("/nonexistent/bin/python3")
    assert not result.ok and result.message == "worker Python not found: /nonexistent/bin/python3"
    assert "not installed" in check_worker("").message

    bare = tmp_path / "bare"  # a real Python without torch
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    result = check_worker(str(bare / "bin" / "python"))
    assert not result.ok
    assert "torch is missing (ModuleNotFoundError: No module named 'torch')" in result.message

    addon_preferences().worker_python = "/nonexistent/bin/python3"
    with pytest.raises(RuntimeError, match="worker Python not found"):
        bpy.ops.msd.check_worker()


def test_install_is_refused_without_online_access(addon):
    assert not bpy.app.online_access  # headless Blender's default; the user must allow it
    worker_folder = os.path.join(bpy.utils.extension_path_user(MODULE), "worker")
    with pytest.raises(RuntimeError, match="online access is disabled.*Preferences › System › Network"):
        bpy.ops.msd.install_worker()
    assert worker_env_module().install_state.job is None and not os.path.exists(worker_folder)


def test_install_steps_make_a_venv_and_install_the_worker_requirements(addon):
    steps = worker_env_module().install_commands("/usr/bin/python3", "/x/worker", "/x/worker/bin/python")
    commands = [command for _, command in steps]
    assert commands[0] == ["/usr/bin/python3", "-m", "venv", "--clear", "/x/worker"]
    assert commands[-1][:4] == ["/x/worker/bin/python", "-m", "pip", "install"]
    assert tuple(commands[-1][4:]) == addon_module().msd_core.worker.requirements.WORKER_REQUIREMENTS


def test_command_sequence_runs_steps_in_order_and_stops_at_a_failure(addon, tmp_path):
    CommandSequence = worker_env_module().CommandSequence
    marker = tmp_path / "third-ran"

    def python(code):
        return [sys.executable, "-c", code]

    def run(steps):
        sequence = CommandSequence(steps, str(tmp_path / "install.log"))
        deadline = time.monotonic() + 60
        while (outcome := sequence.poll()) == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.02)
        return sequence, outcome

    sequence, outcome = run([("First", python("print('one')")), ("Second", python("print('two')"))])
    assert outcome == "FINISHED" and sequence.error == "" and sequence.progress == 1.0
    log = (tmp_path / "install.log").read_text()
    assert log.index("one") < log.index("two")

    sequence, outcome = run([
        ("First", python("print('one')")),
        ("Second", python("import sys; print('no space left'); sys.exit(3)")),
        ("Third", python(f"open({str(marker)!r}, 'w')")),
    ])
    assert outcome == "FAILED" and sequence.error == "Second failed (exit status 3): no space left"
    assert not marker.exists()

    sequence, outcome = run([("Missing", ["/nonexistent/bin/python3", "-V"])])
    assert outcome == "FAILED" and "cannot run /nonexistent/bin/python3" in sequence.error


def test_find_base_python(addon):
    worker_env = worker_env_module()
    found = worker_env.find_base_python()
    assert worker_env.python_version(found) >= (3, 10)
    with pytest.raises(addon_module().msd_core.errors.BadInput, match="/nonexistent/python does not run"):
        worker_env.find_base_python("/nonexistent/python")


# -- messages speak the panel's language ------------------------------------------------------------


def test_a_missing_model_says_where_to_set_it_in_blender(addon, tmp_path):
    addon_preferences().model = str(tmp_path / "no-such-model")
    with pytest.raises(RuntimeError, match="set Model in the add-on preferences"):
        bpy.ops.msd.generate(wait=True)
    state = run_state()
    assert state.last_error_kind == "model_not_found" and "--" not in state.last_error
    assert str(tmp_path / "no-such-model") in state.last_error


def test_settings_and_flags_in_messages_become_panel_labels(addon):
    in_panel_terms = addon_module().properties.in_panel_terms
    assert in_panel_terms("steps 5000 is more than the scheduler's 1000", "steps") == (
        "steps 5000 is more than the scheduler's 1000; set Steps in the Panorama panel's Sampler section"
    )
    assert in_panel_terms("no such folder; pass --model-config or --dtype") == (
        "no such folder; pass Model Config or Precision; set Model Config in the add-on preferences"
    )
    assert in_panel_terms("scales 9 is too many", "scales").endswith("set Levels in the Panorama panel's Sampler section")
    assert in_panel_terms("the model is missing", None, "model").endswith("; set Model in the add-on preferences")
    assert in_panel_terms("window 100 is odd", "window") == "window 100 is odd"  # not in the panel
