"""Add to Batch from Blender (bpy.ops.msd.add_to_batch): each click appends the panel's settings as one
generate request to the picked .jsonl file, never touching the lines already there; `msd-panorama batch`
reads the lines back as the panel's settings."""

import json
import sys

import bpy
import pytest

from msd_core import batch
from msd_core.settings import GenerationSettings
from blender_env import MODULE, blender, extension  # noqa: F401  (fixtures)
from test_extension import draw
from test_generate_op import PROMPT, addon  # noqa: F401  (fixtures)


def test_add_to_batch_appends_the_panel_settings_and_keeps_other_lines(addon, tmp_path):
    jobs = tmp_path / "night.jsonl"
    mine = '{"settings": {"prompt": "written by hand"}, "output": "night_0002.png"}\nnot json, kept as it is'
    jobs.write_text(mine)  # no newline at the end: the new job still starts a line of its own
    group = bpy.context.scene.msd_panorama
    group.random_seed, group.seed, group.steps = False, 1234, 7
    assert bpy.ops.msd.add_to_batch(filepath=str(jobs)) == {"FINISHED"}
    group.prompt, group.seed = "a second sky", 99
    assert bpy.ops.msd.add_to_batch(filepath=str(jobs)) == {"FINISHED"}

    lines = jobs.read_text().splitlines()
    assert "\n".join(lines[:2]) == mine and len(lines) == 4
    first, second = (json.loads(line) for line in lines[2:])
    assert first["op"] == "generate" and first["output"] == "night_0003.png"  # night_0002.png is taken
    assert second["output"] == "night_0004.png"
    settings = GenerationSettings.from_dict(first["settings"]).validate()
    assert (settings.prompt, settings.seed, settings.steps, settings.model, settings.device) == (PROMPT, 1234, 7, "tiny", "cpu")
    assert second["settings"]["prompt"] == "a second sky" and second["settings"]["seed"] == 99
    # The batch runner reads the panel's lines as runnable requests (the outputs beside the file).
    requests = {line: request for line, request, problem in batch.read_requests(jobs)}
    assert requests[3]["output"] == str(tmp_path / "night_0003.png") and requests[4]["settings"] == second["settings"]


@pytest.mark.parametrize("name, message", [("night.txt", "must end in .jsonl"), ("missing/night.jsonl", "Could not write")])
def test_add_to_batch_reports_bad_files_and_writes_nothing(addon, tmp_path, name, message):
    path = tmp_path / name
    with pytest.raises(RuntimeError, match=message):
        bpy.ops.msd.add_to_batch(filepath=str(path))
    assert not path.exists()


def test_add_to_batch_refuses_invalid_settings_and_full_files(addon, tmp_path, monkeypatch):
    jobs = tmp_path / "night.jsonl"
    bpy.context.scene.msd_panorama.prompt = ""
    with pytest.raises(RuntimeError, match="prompt"):
        bpy.ops.msd.add_to_batch(filepath=str(jobs))
    assert not jobs.exists()
    bpy.context.scene.msd_panorama.prompt = PROMPT
    jobs.write_text('{"output": "a.png"}\n')
    monkeypatch.setattr(sys.modules[f"{MODULE}.msd_core.batch"], "MAX_JOBS", 1)  # the add-on's own copy
    with pytest.raises(RuntimeError, match="already has 1 jobs"):
        bpy.ops.msd.add_to_batch(filepath=str(jobs))
    assert jobs.read_text() == '{"output": "a.png"}\n'


def test_panel_shows_add_to_batch_beside_generate(addon):
    assert ("operator", "msd.add_to_batch") in draw("MSD_PT_panorama")


def test_all_gpus_device_runs_on_cuda_shared_by_every_gpu(addon):
    """Preferences' Device "All GPUs": the settings say cuda (valid anywhere, a batch line too) and the
    worker request asks for one rank per GPU (ranks 0)."""
    from blender_env import addon_module, addon_preferences

    properties = addon_module().properties
    prefs = addon_preferences()
    prefs.device = "all-gpus"
    try:
        assert properties.settings_from_scene(bpy.context.scene, prefs).device == "cuda"
        assert properties.request_ranks(prefs) == 0
    finally:
        prefs.device = "cpu"
    assert properties.request_ranks(prefs) == 1 and properties.settings_from_scene(bpy.context.scene, prefs).device == "cpu"
