"""The panel's LoRA list in Blender (headless): the list and its operators, the mapping to the settings the
worker gets, and Use Settings restoring a panorama's LoRAs (found at the stored path, in the LoRA folder
or beside the PNG; named in a warning when not found)."""

import json
import os
import shutil

import bpy
import pytest
from PIL import Image

from blender_env import addon_module, addon_preferences, blender, extension  # noqa: F401  (fixtures)
from test_extension import CheckingLayout

from msd_core.models import lora_files
from msd_core.imageio import output, pngmeta
from msd_core.settings import GenerationSettings


class ListLayout(CheckingLayout):
    """CheckingLayout that also checks template_list: a registered UIList over real collection properties."""

    def _child(self, *args, **kwargs):
        return ListLayout(self.log)

    row = column = box = split = _child

    def template_list(self, list_type, list_id, data, collection, active_data, active_name, **kwargs):
        assert hasattr(bpy.types, list_type), list_type
        assert data.bl_rna.properties[collection].type == "COLLECTION"
        assert active_data.bl_rna.properties[active_name].type == "INT"
        self.log.append(("list", collection))


def draw(panel_name: str) -> list:
    log = []
    getattr(bpy.types, panel_name).draw(type("FakePanel", (), {"layout": ListLayout(log)})(), bpy.context)
    return log


@pytest.fixture
def panel(extension):
    group = bpy.context.scene.msd_panorama
    group.prompt = "a valley"
    group.loras.clear()
    prefs = addon_preferences()
    kept = prefs.model, prefs.device, prefs.worker_python
    prefs.model, prefs.device, prefs.lora_folder = "tiny", "cpu", ""
    yield group
    bpy.context.scene.msd_panorama.loras.clear()
    prefs.model, prefs.device, prefs.worker_python = kept
    prefs.lora_folder = ""


@pytest.fixture
def lora_file(tmp_path):
    """Any file will do here: Blender's side only finds and hashes LoRAs; the worker loads them."""
    path = tmp_path / "loras" / "style.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"not really a LoRA, but hashed like one")
    return path


def settings():
    return addon_module().properties.settings_from_scene(bpy.context.scene, addon_preferences())


def test_the_lora_subpanel_draws_a_list_with_add_and_remove(panel, lora_file):
    drawn = draw("MSD_PT_panorama_loras")
    assert ("list", "loras") in drawn and ("operator", "msd.lora_add") in drawn
    assert ("operator", "msd.lora_remove") in drawn
    assert bpy.ops.msd.lora_add(filepath=str(lora_file)) == {"FINISHED"}
    row = []
    bpy.types.MSD_UL_loras.draw_item(None, bpy.context, ListLayout(row), panel, panel.loras[0], 0, panel,
                                     "lora_index", 0)
    assert row == [("prop", "path"), ("prop", "weight")]


def test_added_loras_reach_the_settings_with_their_weights_and_remove_takes_them_out(panel, lora_file, tmp_path):
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x")
    assert bpy.ops.msd.lora_add(filepath=str(lora_file)) == {"FINISHED"}
    assert bpy.ops.msd.lora_add(filepath=str(other)) == {"FINISHED"}
    panel.loras[1].weight = -0.35
    assert settings().loras == [{"path": str(lora_file), "weight": 1.0}, {"path": str(other), "weight": -0.35}]
    assert panel.lora_index == 1
    assert bpy.ops.msd.lora_remove() == {"FINISHED"}
    assert settings().loras == [{"path": str(lora_file), "weight": 1.0}] and panel.lora_index == 0
    assert bpy.ops.msd.lora_remove() == {"FINISHED"}
    assert settings().loras == [] and not bpy.ops.msd.lora_remove.poll()


def test_a_blend_relative_lora_path_is_made_absolute_for_the_worker(panel, lora_file, tmp_path):
    bpy.ops.wm.save_as_mainfile(filepath=str(lora_file.parent.parent / "scene.blend"))
    bpy.ops.msd.lora_add(filepath="//loras/style.safetensors")
    assert settings().loras == [{"path": str(lora_file), "weight": 1.0}]


def test_an_empty_or_missing_lora_is_refused_naming_the_lora_section(panel, tmp_path):
    properties = addon_module().properties
    BadInput = addon_module().msd_core.errors.BadInput
    bpy.ops.msd.lora_add()
    with pytest.raises(BadInput, match="entry 1 has an empty path") as caught:
        settings()
    assert properties.setting_label(caught.value.field) == ("LoRAs", "the Panorama panel's LoRAs section")
    panel.loras[0].path = str(tmp_path / "gone.safetensors")
    with pytest.raises(BadInput, match="does not exist"):
        settings()
    assert properties.in_panel_terms("--lora 'x:y': bad weight").startswith("LoRAs 'x:y'")


def test_generate_refuses_a_missing_lora_before_starting_anything(panel, tmp_path):
    panel.loras.add().path = str(tmp_path / "gone.safetensors")
    addon_preferences().worker_python = "/nonexistent/python"  # would fail later: validation comes first
    with pytest.raises(RuntimeError, match="the LoRA file .*gone.safetensors does not exist; set LoRAs in the "
                                           "Panorama panel's LoRAs section"):
        bpy.ops.msd.generate(wait=True)
    assert "gone.safetensors does not exist" in addon_module().properties.run_state.last_error


def _panorama_png(path, loras, records):
    """A PNG with the metadata a run with ``loras`` writes (the pixels do not matter here)."""
    settings = GenerationSettings(prompt="a misty valley", model="tiny", seed=11, loras=loras)
    metadata = output.generation_metadata(settings, {"loras": records} if records else {})
    return output.save_png(Image.new("RGB", (64, 32)), path, metadata)


def test_use_settings_restores_the_loras_found_where_they_were(panel, lora_file, tmp_path):
    record = {"name": "style.safetensors", "sha256": lora_files.sha256_of(lora_file), "weight": 0.6}
    png = _panorama_png(tmp_path / "pano.png", [{"path": str(lora_file), "weight": 0.6}], [record])
    assert bpy.ops.msd.restore_settings(filepath=str(png)) == {"FINISHED"}
    assert [(slot.path, round(slot.weight, 6)) for slot in panel.loras] == [(str(lora_file), 0.6)]
    assert settings().loras == [{"path": str(lora_file), "weight": 0.6}]


def test_use_settings_finds_a_moved_lora_in_the_lora_folder_or_beside_the_png(panel, lora_file, tmp_path):
    restore = addon_module().operators.settings_restore
    record = {"name": "style.safetensors", "sha256": lora_files.sha256_of(lora_file), "weight": 1.5}
    png = _panorama_png(tmp_path / "pano.png", [{"path": "/gone/style.safetensors", "weight": 1.5}], [record])
    library = tmp_path / "library"
    library.mkdir()
    shutil.move(lora_file, library / "style.safetensors")
    addon_preferences().lora_folder = str(library)
    assert bpy.ops.msd.restore_settings(filepath=str(png)) == {"FINISHED"}
    assert [slot.path for slot in panel.loras] == [str(library / "style.safetensors")]

    addon_preferences().lora_folder = ""
    shutil.move(library / "style.safetensors", tmp_path / "style.safetensors")  # beside the PNG
    missing = []
    restored = restore.settings_of_file(str(png), [], missing)
    assert restored.loras == [{"path": str(tmp_path / "style.safetensors"), "weight": 1.5}] and missing == []


def test_use_settings_without_the_lora_restores_the_rest_and_names_it(panel, lora_file, tmp_path):
    restore = addon_module().operators.settings_restore
    record = {"name": "style.safetensors", "sha256": lora_files.sha256_of(lora_file), "weight": 0.8}
    png = _panorama_png(tmp_path / "pano.png", [{"path": str(lora_file), "weight": 0.8}], [record])
    os.remove(lora_file)
    missing = []
    restored = restore.settings_of_file(str(png), [], missing)
    assert restored.loras == [] and restored.seed == 11
    assert len(missing) == 1 and "LoRA style.safetensors (weight 0.8) was not found" in missing[0]
    panel.loras.add().path = "left from before"
    assert bpy.ops.msd.restore_settings(filepath=str(png)) == {"FINISHED"}
    assert len(panel.loras) == 0 and bpy.context.scene.msd_panorama.seed == 11


def test_a_png_without_loras_restores_as_before_and_clears_the_list(panel, lora_file, tmp_path):
    png = _panorama_png(tmp_path / "plain.png", [], None)
    assert pngmeta.LORAS_KEY not in pngmeta.read_text_chunks(png)
    bpy.ops.msd.lora_add(filepath=str(lora_file))
    assert bpy.ops.msd.restore_settings(filepath=str(png)) == {"FINISHED"}
    assert len(panel.loras) == 0 and settings().loras == []


def test_damaged_lora_records_are_one_clear_error(panel, lora_file, tmp_path):
    restore = addon_module().operators.settings_restore
    settings_text = json.dumps(GenerationSettings(prompt="x", loras=[{"path": str(lora_file), "weight": 1.0}]).to_dict())
    with pytest.raises(addon_module().msd_core.errors.BadInput, match="LoRA records stored in test are damaged"):
        restore._parse(settings_text, "test", "[{not json")
