"""Drafts and variations: the draft size rule, the worker's variations request with the tiny real model
(files, seeds, events, cancel, bad input), and the Blender side (operator, thumbnails, using one)."""

import dataclasses
import os
import sys

import bpy
import pytest
from PIL import Image

from msd_core import variations
from msd_core.imageio import pngmeta
from msd_core.worker import protocol
from msd_core.worker.client import WorkerClient
from msd_core.errors import BadInput
from msd_core.settings import QUALITY, GenerationSettings

from blender_env import MODULE, addon_module, addon_preferences, blender, extension  # noqa: F401  (fixtures)
from test_extension import draw
from test_generate_op import PROMPT, addon, datablocks, generate_module, run_state, wait, world_images  # noqa: F401
from test_worker import REPO_ROOT, finished, of, tiny, wait_for, worker_env  # noqa: F401  (fixture)

# -- the draft size rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, window, draft",
    [
        ((2048, 1024), 512, (1024, 512)),  # 360° world on SD 2 base: one window tall
        ((4096, 1024), 512, (2048, 512)),  # strip keeps 4:1
        ((3072, 1024), 512, (1536, 512)),
        ((1024, 3072), 512, (512, 1536)),  # portrait: the width is the short side
        ((600, 512), 512, (600, 512)),  # already one window tall: unchanged
        ((256, 128), 64, (128, 64)),  # the tiny model
        ((1000, 700), 512, (728, 512)),  # long side rounded to the VAE's 8 px
    ],
)
def test_draft_size_is_one_window_tall_and_keeps_the_aspect(size, window, draft):
    assert variations.draft_size(*size, window) == draft


def test_draft_settings_keep_everything_but_size_levels_and_hdr():
    settings = GenerationSettings(prompt="dunes", width=2048, height=1024, scales=3, hdr=True, seed=5, steps=30)
    draft = variations.draft_settings(settings, model_window=512)
    assert (draft.width, draft.height, draft.scales, draft.hdr) == (1024, 512, None, False)
    assert (draft.prompt, draft.seed, draft.steps, draft.wrap) == ("dunes", 5, 30, True)
    draft.validate()
    # An explicit window wins over the model's.
    assert variations.draft_settings(settings.__class__(**{**settings.to_dict(), "window": 256}), 512).height == 256


def test_variation_paths_and_count_bounds():
    assert variations.variation_path("/d/msd_x.png", 0) == "/d/msd_x_v01.png"
    assert variations.variation_path("/d/msd_x.png", 15) == "/d/msd_x_v16.png"
    for bad in (0, 17, 2.0, True, "3", None):
        with pytest.raises(BadInput, match="from 1 to 16"):
            variations.check_count(bad)
    with pytest.raises(BadInput, match="largest seed"):
        variations.check_seeds(2**63 - 2, 3)


def test_drafts_are_batched_as_one_unet_call_holds_them_on_an_accelerator_only():
    from msd_core.sampling.plan import make_plan

    # The 360° world's drafts (1024×512), with pole caps (the default) and without.
    draft = variations.draft_settings(GenerationSettings(prompt="dunes", poles="flat"), 512)
    plan = make_plan(draft, 8, 512, free_bytes=80e9, dtype="float16")
    assert plan.view_batch == 32 and max(plan.describe()["windows_per_level"]) == 2
    assert variations.batch_size(plan, accelerator=True) == 16
    assert variations.batch_size(plan, accelerator=False) == 1  # the CPU: the first draft is not held back
    small = make_plan(draft, 8, 512, free_bytes=10e9, dtype="float16")  # the exact gradient's memory rule
    assert variations.batch_size(small, accelerator=True) == small.view_batch // 2 < 16
    world = make_plan(dataclasses.replace(draft, poles="sphere"), 8, 512, free_bytes=80e9, dtype="float16")
    assert world.caps and variations.batch_size(world, accelerator=True) == 16
    assert variations.draft_groups(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert variations.draft_groups(3, 16) == [range(0, 3)]


# -- the worker --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(worker_env):  # noqa: F811  (worker_env is a fixture)
    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT, env=worker_env).start()
    wait_for(client, lambda event: event["event"] == "ready")
    yield client
    assert client.stop(timeout=30) == 0  # a clean exit (torch takes seconds to unload on a busy machine)


def test_variations_write_drafts_with_consecutive_seeds_and_report_each_in_order(worker, tmp_path):
    output = tmp_path / "draft.png"
    request_id = worker.variations(tiny(width=256, height=128, seed=40, steps=2, hdr=True), output, count=3)
    events = of(wait_for(worker, finished(request_id)), request_id)

    names = [event["event"] for event in events]
    assert names[:2] == ["accepted", "loading"] and names[-1] == "done"
    reported = [event for event in events if event["event"] == "variation"]
    assert [(e["index"], e["seed"]) for e in reported] == [(0, 40), (1, 41), (2, 42)]
    paths = [str(tmp_path / f"draft_v{n:02d}.png") for n in (1, 2, 3)]
    assert [e["path"] for e in reported] == paths == events[-1]["outputs"]
    # Each variation is reported right after its own last step, before the next one's first.
    steps = [(e["event"], e.get("variation", e.get("index")), e.get("step")) for e in events[2:-1]]
    expected = [(("progress", v, 1), ("progress", v, 2), ("variation", v, None)) for v in range(3)]
    assert steps == [item for per_variation in expected for item in per_variation]
    progress = [e for e in events if e["event"] == "progress"]
    assert all(e["count"] == 3 and e["total"] == 2 for e in progress)
    assert progress[-1]["eta"] == 0 and progress[0]["eta"] > 0  # the eta covers all three

    images = [Image.open(path) for path in paths]
    assert {image.size for image in images} == {(128, 64)}  # draft size: one 64 px window tall
    assert {(e["width"], e["height"]) for e in reported} == {(128, 64)}
    pixels = [image.convert("RGB").tobytes() for image in images]
    assert len(set(pixels)) == 3  # three different seeds, three different pictures
    for path, seed in zip(paths, (40, 41, 42)):
        stored = pngmeta.read_settings(path)
        assert (stored["seed"], stored["width"], stored["height"], stored["hdr"]) == (seed, 128, 64, False)
        assert pngmeta.read_text_chunks(path)["prompt"] == "a misty alpine valley"
    assert not (tmp_path / "draft.png").exists() and not list(tmp_path.glob("*.exr"))


def test_variations_in_batches_write_what_one_at_a_time_writes(tmp_path, monkeypatch):
    """The worker's accelerator path (batches of drafts through the UNet), run on the CPU by setting the batch
    size the way a GPU's view batch would: the same files, each reported after its batch's last step."""
    import io
    import json

    import numpy as np
    import torch

    from msd_core.worker.process import EventWriter, Worker, parse_variations

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stream = io.StringIO()
    worker = Worker(EventWriter(stream), tmp_path / "previews")
    # A 360° world's drafts with pole caps (the default), denoised over the last of the four steps.
    settings = tiny(**{**QUALITY["draft"][0], "width": 256, "height": 128, "seed": 40, "steps": 4})

    def run(name, size):
        monkeypatch.setattr(variations, "batch_size", lambda plan, accelerator: size)
        request = protocol.request("variations", name, settings=settings, count=3, output=str(tmp_path / f"{name}.png"))
        worker.run_job(parse_variations(request))
        return [event for event in map(json.loads, stream.getvalue().splitlines()) if event["id"] == name]

    try:
        alone, batched = run("alone", 1), run("batched", 2)
    finally:
        torch.set_num_threads(threads)
    steps = [(e["event"], e.get("variation", e.get("index")), e.get("step")) for e in batched
             if e["event"] in ("progress", "variation")]
    assert steps == [("progress", 0, 1), ("progress", 0, 2), ("progress", 0, 3), ("progress", 0, 4),
                     ("variation", 0, None), ("variation", 1, None), ("progress", 2, 1), ("progress", 2, 2),
                     ("progress", 2, 3), ("progress", 2, 4), ("variation", 2, None)]
    assert [e["seed"] for e in batched if e["event"] == "variation"] == [40, 41, 42]
    etas = [e["eta"] for e in batched if e["event"] == "progress"]
    assert etas[-1] == 0 and etas[2] > 0  # after the first batch, the second is still to come
    for index in range(3):
        made = [np.asarray(Image.open(tmp_path / f"{name}_v{index + 1:02d}.png"), dtype=int) for name in ("alone", "batched")]
        assert np.abs(made[0] - made[1]).max() <= 1  # float rounding at most flips one 8-bit level
        assert pngmeta.read_text_chunks(tmp_path / f"batched_v{index + 1:02d}.png")["seed"] == str(40 + index)


def test_a_variation_is_the_draft_a_generate_request_makes_with_its_seed(worker, tmp_path):
    settings = tiny(width=256, height=128, seed=41, steps=2)
    request_id = worker.variations(settings, tmp_path / "v.png", count=2)
    wait_for(worker, finished(request_id))
    single = worker.generate({**settings, "width": 128, "height": 64}, tmp_path / "single.png", preview_every=0)
    wait_for(worker, finished(single))
    first, second, single = (Image.open(tmp_path / name).convert("RGB").tobytes()
                             for name in ("v_v01.png", "v_v02.png", "single.png"))
    # Variation 0 of a request from seed 41 is a plain 128×64 run with seed 41; variation 1 is another.
    assert first == single and second != single


def test_cancel_stops_the_remaining_variations_and_keeps_the_finished_ones(worker, tmp_path):
    request_id = worker.variations(tiny(width=256, height=128, seed=3, steps=60), tmp_path / "c.png", count=4)
    first = wait_for(worker, lambda e: e["id"] == request_id and e["event"] == "variation")[-1]
    worker.cancel(request_id)
    events = of(wait_for(worker, finished(request_id)), request_id)
    assert (events[-1]["event"], events[-1]["kind"]) == ("error", "cancelled")
    made = sorted(p.name for p in tmp_path.glob("c_v*.png"))
    indices = [first["index"]] + [e["index"] for e in events if e["event"] == "variation"]
    assert indices[0] == 0 and len(made) == len(indices) < 4
    assert made == [f"c_v{i + 1:02d}.png" for i in indices]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"count": 0}, "'count' must be a whole number from 1 to 16"),
        ({"count": 17}, "from 1 to 16"),
        ({"count": 2.0}, "from 1 to 16"),
        ({"count": None}, "the variations request has no 'count'"),
        ({"settings": None}, "the variations request has no 'settings'"),
        ({"preview_every": 5}, "unknown field(s) in the variations request: preview_every"),
        ({"settings": tiny(seed=2**63 - 1)}, "largest seed"),
    ],
)
def test_bad_variations_requests_are_refused_with_one_clear_error(worker, tmp_path, fields, message):
    request = {"op": "variations", "id": "bad", "settings": tiny(), "count": 2, "output": str(tmp_path / "b.png"),
               **fields}  # fmt: skip
    worker.send(request)
    error = wait_for(worker, lambda e: e["id"] == "bad")[-1]
    assert (error["event"], error["kind"]) == ("error", "bad_input") and message in error["message"]
    assert not list(tmp_path.iterdir())


def test_an_existing_variation_file_is_refused_unless_overwrite(worker, tmp_path):
    (tmp_path / "o_v02.png").write_bytes(b"mine")
    request_id = worker.variations(tiny(steps=1), tmp_path / "o.png", count=2)
    error = wait_for(worker, finished(request_id))[-1]
    assert error["kind"] == "bad_input" and "o_v02.png" in error["message"]
    assert (tmp_path / "o_v02.png").read_bytes() == b"mine" and not (tmp_path / "o_v01.png").exists()


def test_protocol_documents_the_variations_request_and_event():
    assert "variations" in protocol.REQUEST_OPS and "variation" in protocol.EVENTS
    assert '"op": "variations"' in protocol.__doc__ and "variation  {index, seed, path" in protocol.__doc__


# -- Blender: the operator, the thumbnails and using a draft ------------------------------------------


@pytest.fixture
def drafts_addon(addon):  # noqa: F811  (addon is a fixture of test_generate_op)
    """The add-on on the tiny model (see test_generate_op.addon), 256×128 px, 2 steps, seed 7."""
    bpy.context.scene.msd_panorama.steps = 2
    addon.operators.variations.variation_state.begin(None, 0)  # no drafts from an earlier test
    return addon.operators.variations


def thumbnail_loaded(state, variation) -> bool:
    preview = state.previews[variation.icon_key]
    return tuple(preview.image_size) == Image.open(variation.path).size and any(preview.image_pixels)


def test_variations_operator_shows_thumbnails_and_changes_nothing_until_one_is_used(drafts_addon, tmp_path):
    blocks = datablocks()
    assert bpy.ops.msd.generate_variations(count=3, wait=True) == {"FINISHED"}

    state = drafts_addon.variation_state
    assert [(v.index, v.seed) for v in state.variations] == [(0, 7), (1, 8), (2, 9)]
    drafts_dir = tmp_path / "out" / "drafts"
    assert [os.path.dirname(v.path) for v in state.variations] == [str(drafts_dir)] * 3
    assert all(Image.open(v.path).size == (128, 64) for v in state.variations)  # drafts: one window tall
    # Thumbnails: one preview per draft, read from its file (headless Blender makes no icons, so
    # icon_id stays 0 here; the preview's pixels are there).
    assert sorted(state.previews.keys()) == sorted(v.icon_key for v in state.variations)
    assert all(thumbnail_loaded(state, v) for v in state.variations)
    assert datablocks() == blocks and bpy.context.scene.world is None  # the scene is untouched so far
    assert run_state().status == "READY" and not generate_module().session.busy

    # Using one applies it as the world and keeps its seed and settings, at full size, for the next run.
    group = bpy.context.scene.msd_panorama
    group.prompt, group.seed, group.random_seed, group.steps = "something else", 1, True, 9
    assert bpy.ops.msd.use_variation(index=1) == {"FINISHED"}
    world = bpy.context.scene.world
    assert world is not None and [image.filepath_raw for image in world_images(world)] == [state.variations[1].path]
    assert (group.seed, group.random_seed, group.prompt, group.steps) == (8, False, PROMPT, 2)
    assert (group.width, group.height) == (256, 128)

    # Trying another leaves only the one in use: the first one's world and image are gone.
    assert bpy.ops.msd.use_variation(index=2) == {"FINISHED"}
    assert len(bpy.data.worlds) == 1
    assert world_images(bpy.context.scene.world)[0].filepath_raw == state.variations[2].path
    assert [image.filepath_raw for image in bpy.data.images] == [state.variations[2].path]

    with pytest.raises(RuntimeError, match="there is no variation 5; generate variations first"):
        bpy.ops.msd.use_variation(index=5)


def test_use_variation_adds_a_backdrop_when_the_panel_says_so(drafts_addon):
    assert bpy.ops.msd.generate_variations(count=2, wait=True) == {"FINISHED"}
    users_mesh = bpy.data.meshes.new("mine")
    bpy.context.scene.collection.objects.link(bpy.data.objects.new("my plane", users_mesh))
    bpy.context.scene.msd_panorama.target = "BACKDROP"
    assert bpy.ops.msd.use_variation(index=0) == {"FINISHED"}
    assert bpy.ops.msd.use_variation(index=1) == {"FINISHED"}  # replaces the first draft's backdrop
    backdrops = [o for o in bpy.data.objects if o.type == "MESH" and o.name != "my plane"]
    assert len(backdrops) == 1 and bpy.context.scene.world is None
    state = drafts_addon.variation_state
    assert backdrops[0]["msd_image"].filepath_raw == state.variations[1].path
    assert "my plane" in bpy.data.objects and len(bpy.data.meshes) == 2 and len(bpy.data.materials) == 1


def test_two_drafts_runs_in_the_same_second_get_different_names(drafts_addon, tmp_path):
    unique = generate_module().unique_output_path
    first = unique(str(tmp_path), 7, variations=3)
    for index in range(3):
        open(drafts_addon.drafts.variation_path(first, index), "wb").close()
    second = unique(str(tmp_path), 7, variations=3)
    assert second != first and not any(
        os.path.exists(drafts_addon.drafts.variation_path(second, index)) for index in range(3)
    )


def test_thumbnails_arrive_as_drafts_finish_and_cancel_keeps_the_finished_ones(drafts_addon, tmp_path):
    generate = generate_module()
    bpy.context.scene.msd_panorama.steps = 40
    state = drafts_addon.variation_state
    drafts_addon.start_variations(bpy.context, 4)
    assert wait(generate, bpy.context, until=lambda: len(state.variations) == 1) == "RUNNING"
    assert 0.25 <= run_state().progress < 0.5 and thumbnail_loaded(state, state.variations[0])
    assert generate.cancel_generation()
    assert wait(generate, bpy.context) == "CANCELLED"
    made = sorted(str(p) for p in (tmp_path / "out" / "drafts").glob("*.png"))
    assert 1 <= len(state.variations) < 4 and made == [v.path for v in state.variations]
    assert bpy.ops.msd.use_variation(index=0) == {"FINISHED"}  # a finished draft is still usable


def test_a_random_seed_near_the_top_keeps_every_draft_seed_in_the_panel_field(drafts_addon):
    group = bpy.context.scene.msd_panorama
    group.seed = drafts_addon.SEED_MAX
    assert bpy.ops.msd.generate_variations(count=2, wait=True) == {"FINISHED"}
    seeds = [v.seed for v in drafts_addon.variation_state.variations]
    assert seeds == [drafts_addon.SEED_MAX - 1, drafts_addon.SEED_MAX]
    assert bpy.ops.msd.use_variation(index=1) == {"FINISHED"} and group.seed == drafts_addon.SEED_MAX


def test_disabling_the_add_on_frees_the_thumbnails(drafts_addon):
    assert bpy.ops.msd.generate_variations(count=1, wait=True) == {"FINISHED"}
    previews = drafts_addon.variation_state.previews
    assert len(previews) == 1
    bpy.ops.preferences.addon_disable(module=MODULE)
    try:
        assert len(previews) == 0 and drafts_addon.variation_state.previews is None
    finally:
        bpy.ops.preferences.addon_enable(module=MODULE)
    assert len(sys.modules[f"{MODULE}.operators.variations"].variation_state.previews) == 0


def test_drafts_panel_draws_a_thumbnail_and_a_use_button_per_draft(drafts_addon):
    group = bpy.context.scene.msd_panorama
    group.variation_count = 3
    before = draw("MSD_PT_panorama_variations")
    assert ("prop", "variation_count") in before and ("operator", "msd.generate_variations") in before
    assert ("operator", "msd.use_variation") not in before
    assert bpy.ops.msd.generate_variations(count=group.variation_count, wait=True) == {"FINISHED"}
    after = draw("MSD_PT_panorama_variations")
    assert [entry for entry in after if entry[0] in ("icon", "operator")][1:] == [
        item for v in drafts_addon.variation_state.variations
        for item in (("icon", drafts_addon.variation_state.icon_id(v)), ("operator", "msd.use_variation"))
    ]
