"""The pipeline on the tiny model: peer oracle against diffusers, MSD behaviour, wrap, determinism."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPanoramaPipeline

from msd_core.imageio import pngmeta
from msd_core.sampling import sampler
from msd_core.errors import BadInput, Cancelled
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.sampling.plan import default_levels
from msd_core.sampling.sampler import cross_scale_discrepancy
from msd_core.settings import QUALITY, GenerationSettings

BASE = GenerationSettings(  # the paper's pyramid and coarse noise; the defaults are tested against it below
    prompt="a quiet lake under mountains", width=256, height=128, wrap=False, model="tiny",
    steps=4, seed=3, stride=32, windows="dense", device="cpu", view_batch=8, pyramid="halving",
    coarse_noise="literal", scheduler="ddim", guided_fraction=1.0, late_gradient="none",
)


@pytest.fixture(scope="module")
def pipe():
    return MSDPanoramaPipeline.from_settings(BASE)


@pytest.fixture(scope="module")
def pipe_v():
    return MSDPanoramaPipeline.from_settings(dataclasses.replace(BASE, model="tiny-v"))


def run(pipe, **changes):
    return pipe(dataclasses.replace(BASE, **changes), decode=False)


class TinyWindowPanorama(StableDiffusionPanoramaPipeline):
    """diffusers' MultiDiffusion with the tiny model's window (it hard-codes 64 latents and stride 8)."""

    window_stride = 4

    def get_views(self, panorama_height, panorama_width, window_size=64, stride=8, circular_padding=False):
        return super().get_views(
            panorama_height, panorama_width, self.unet.config.sample_size, self.window_stride, circular_padding
        )


def diffusers_latents(pipe, settings, latents, scheduler=None):
    """diffusers' MultiDiffusion on the same components (and ``scheduler``, default the model's own)."""
    c = pipe.components
    reference = TinyWindowPanorama(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=scheduler or c.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return reference(
            settings.prompt, height=settings.height, width=settings.width, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance, latents=latents.clone(), output_type="latent", view_batch_size=3,
        ).images


@pytest.mark.parametrize("fixture", ["pipe", "pipe_v"])
@pytest.mark.parametrize("changes", [{"method": "multidiffusion"}, {"method": "msd", "omega": 0.0, "scales": 1}])
def test_peer_oracle_equals_diffusers_multidiffusion(request, fixture, changes):
    pipe = request.getfixturevalue(fixture)
    settings = dataclasses.replace(BASE, **changes)
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    ours = pipe(settings, latents=initial, decode=False).latents
    theirs = diffusers_latents(pipe, settings, initial)
    assert ours.shape == theirs.shape == (1, 4, 16, 32)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


def test_msd_differs_from_multidiffusion_and_omega_zero_equals_it(pipe):
    md = run(pipe, method="multidiffusion", height=256).latents
    assert torch.allclose(run(pipe, method="msd", omega=0.0, height=256).latents, md, atol=1e-5)
    msd = run(pipe, method="msd", gradient="fast", height=256).latents
    assert (msd - md).abs().max() > 1e-2


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_global_pyramid_guides_from_a_squeezed_level_and_omega_zero_is_still_multidiffusion(pipe, scheduler):
    # 256×128 px = 16×32 latents: halving gives 8×16 (two windows wide) on top; global adds 8×8.
    md = run(pipe, method="multidiffusion", scheduler=scheduler).latents
    assert torch.allclose(run(pipe, pyramid="global", omega=0.0, scheduler=scheduler).latents, md, atol=1e-5)
    levels = []
    result = pipe(dataclasses.replace(BASE, pyramid="global", gradient="fast", scheduler=scheduler), decode=False,
                  callback=lambda info: levels.append((info.level, tuple(info.latents.shape[2:]))))
    assert levels[:3] == [(1, (8, 8)), (2, (8, 16)), (3, (16, 32))]
    assert (result.latents - run(pipe, gradient="fast", scheduler=scheduler).latents).abs().max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_matched_coarse_levels_reach_the_unet_at_their_own_fractional_timestep(pipe, scheduler):
    """The default: every coarse level is denoised at the timestep whose SNR matches its averaged noise
    (the global level averages 2×2·(1×2) = 8 latent px here, the halving level 4), the finest at t."""
    timesteps = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    try:
        matched = run(pipe, pyramid="global", coarse_noise="matched", gradient="fast", scheduler=scheduler, steps=3)
    finally:
        hook.remove()
    # Per step: one call for the global level, one for the halving level, three for the finest (21 windows).
    per_step = [timesteps[index:index + 5] for index in range(0, len(timesteps), 5)]
    assert len(per_step) == 3
    for global_t, halving_t, *finest in per_step:
        assert len(set(finest)) == 1 and finest[0] == int(finest[0])
        assert global_t <= halving_t < finest[0]  # both 0 at the last step: less noisy than the schedule goes
    assert per_step[0][0] < per_step[0][1] and any(t != int(t) for t in timesteps)
    literal = run(pipe, pyramid="global", coarse_noise="literal", gradient="fast", scheduler=scheduler, steps=3)
    assert torch.isfinite(matched.latents).all() and (matched.latents - literal.latents).abs().max() > 1e-3
    # MultiDiffusion's finest level is never matched: ω = 0 is still exactly MultiDiffusion.
    md = run(pipe, method="multidiffusion", scheduler=scheduler, steps=3).latents
    assert torch.allclose(run(pipe, pyramid="global", coarse_noise="matched", omega=0.0, scheduler=scheduler,
                              steps=3).latents, md, atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_a_drawn_start_runs_the_global_level_first_from_the_first_timestep_down_to_its_matched_one(pipe, scheduler):
    """The default: before the first step the global level (8 latent px averaged) runs its own steps, one window
    each, from the schedule's first noise level down to the one it has there; then the loop runs as "matched"."""
    timesteps = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: timesteps.append(float(args[1])))
    changes = {"pyramid": "global", "gradient": "fast", "scheduler": scheduler, "steps": 8}
    try:
        drawn = run(pipe, coarse_noise="drawn", **changes)
    finally:
        hook.remove()
    planned = pipe.check_inputs(dataclasses.replace(BASE, coarse_noise="drawn", **changes))
    start, first_step = timesteps[:planned.start_steps], timesteps[planned.start_steps]
    assert planned.start_steps == 2 and planned.coarsest_factor == (2, 4)
    assert start[0] == pytest.approx(sampler.solver_schedule(scheduler, pipe.scheduler, 8)[0].t, abs=1e-6)
    assert start[0] > start[1] > first_step  # noisiest first, down to the global level's matched timestep
    matched = run(pipe, coarse_noise="matched", **changes)
    assert torch.isfinite(drawn.latents).all() and (drawn.latents - matched.latents).abs().max() > 1e-3
    # MultiDiffusion draws nothing first: ω = 0 is still exactly MultiDiffusion.
    md = run(pipe, method="multidiffusion", scheduler=scheduler, steps=8).latents
    assert torch.allclose(run(pipe, coarse_noise="drawn", **{**changes, "omega": 0.0}).latents, md, atol=1e-5)


@pytest.mark.parametrize("gradient,at_most", [("fast", 0.5), ("exact", 0.8)])
def test_guidance_lowers_cross_scale_discrepancy_along_the_trajectory(pipe, gradient, at_most):
    """ω = 10 ("projection") closes the gap exactly in the fast mode's model; the exact gradient also
    follows the random UNet's own dependence on x, so it pulls less predictably."""
    def mean_discrepancy(omega):
        levels, values = {}, []

        def record(info):
            levels[info.level] = info.latents
            if info.level == info.levels:
                values.append(cross_scale_discrepancy(levels[2], levels[1]))

        pipe(dataclasses.replace(BASE, height=256, omega=omega, gradient=gradient), callback=record, decode=False)
        return float(np.mean(values))

    # ω = 1e-9: both levels are denoised, the pull too weak to matter (at ω = 0 the coarser one is skipped).
    assert mean_discrepancy(10.0) < at_most * mean_discrepancy(1e-9)


def test_levels_and_windows_resolved_from_the_model(pipe):
    paper = pipe.check_inputs(dataclasses.replace(BASE, height=256, width=512, stride=None))
    assert paper.window == 8 and paper.levels == 3 and paper.stride == 2  # 32×64 latents → 16×32 → 8×16
    assert [(g.height, g.width) for g in paper.grids] == [(8, 16), (16, 32), (32, 64)]
    # The global pyramid adds a level that squeezes the two-window-wide 8×16 into one window.
    plan = pipe.check_inputs(dataclasses.replace(BASE, height=256, width=512, stride=None, pyramid="global"))
    assert plan.levels == 4 and plan.grids[1:] == paper.grids and (plan.grids[0].height, plan.grids[0].width) == (8, 8)
    assert plan.describe()["windows_per_level"][0] == len(plan.grids[0])
    assert default_levels(128, 512, 64) == 2 and default_levels(256, 512, 64) == 3  # the paper's sizes with SD-2
    assert pipe.check_inputs(dataclasses.replace(BASE, method="multidiffusion", height=256)).levels == 1


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"width": 48, "height": 48}, "smaller than one 64 px window"),
        ({"scales": 4}, "fewer --scales"),
        ({"stride": 24, "height": 256}, "stride 24 px: with more than one pyramid level the stride must be a multiple of 16 px"),
        ({"width": 250}, "nearest valid: 248 or 256"),
    ],
)
def test_bad_plans_are_refused_with_a_reason(pipe, changes, message):
    with pytest.raises(BadInput, match=message):
        pipe.check_inputs(dataclasses.replace(BASE, **changes))


def test_determinism_and_seed(pipe):
    first, again, other = (run(pipe, seed=seed, gradient="fast") for seed in (11, 11, 12))
    assert torch.equal(first.latents, again.latents)
    assert not torch.allclose(first.latents, other.latents)


def seam_ratio(image) -> float:
    """Mean |first − last column| over the mean difference of interior neighbouring columns."""
    pixels = np.asarray(image, dtype=np.float64)
    seam = np.abs(pixels[:, 0] - pixels[:, -1]).mean()
    interior = np.abs(np.diff(pixels, axis=1)).mean()
    return seam / interior


def test_wrap_makes_the_360_seam_continuous(pipe):
    wrapped = pipe(dataclasses.replace(BASE, wrap=True, steps=6, gradient="fast")).image
    plain = pipe(dataclasses.replace(BASE, wrap=False, steps=6, gradient="fast")).image
    assert wrapped.size == plain.size == (256, 128)
    assert seam_ratio(wrapped) < 1.4  # the seam looks like any other pair of neighbouring columns
    assert seam_ratio(plain) > 1.6 * seam_ratio(wrapped)


def test_image_and_metadata(pipe):
    result = pipe(dataclasses.replace(BASE, negative_prompt="blurry"))
    assert result.image.size == (256, 128) and result.image.mode == "RGB"
    meta = result.metadata
    assert meta["prompt"] == BASE.prompt and meta["negative_prompt"] == "blurry"
    assert meta["method"] == "msd" and meta["gradient"] == "exact" and meta["scales"] == "2" and meta["pyramid"] == "halving"
    assert meta["window"] == "64" and meta["stride"] == "32" and meta["model"] == "tiny"
    # Every entry is one the add-on knows as its own: applying the PNG in Blender warns of none.
    assert set(meta) <= set(pngmeta.OWN_KEYS)
    assert np.isfinite(np.asarray(result.image)).all()


def test_callback_reports_every_level_of_every_step_and_interrupt_cancels(pipe):
    seen = []
    pipe(BASE, callback=lambda info: seen.append((info.step, info.level)), decode=False)
    assert seen == [(step, level) for step in range(1, 5) for level in (1, 2)]

    class CancelAfterFirstStep:
        def is_set(self):
            return len(seen) > 8

    with pytest.raises(Cancelled):
        pipe(BASE, callback=lambda info: seen.append(info.step),
             interrupt=CancelAfterFirstStep(), decode=False)


def test_drafts_sampled_as_one_batch_equal_each_sampled_alone(pipe):
    # Draft's settings on a draft-sized world (one window tall, 2:1 wrapping: a global level above the strip);
    # every seed has its own shifted tiles, and view batch 3 makes UNet calls that mix two drafts' windows.
    draft = GenerationSettings(prompt="dunes at dusk", width=256, height=64, wrap=True, model="tiny", device="cpu",
                               view_batch=3, seed=11, **{**QUALITY["draft"][0], "steps": 6})
    batch = [dataclasses.replace(draft, seed=draft.seed + index) for index in range(3)]
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        together = pipe.sample_batch(batch, decode=False)
        batched_calls = len(calls)
        alone = [pipe(settings, decode=False) for settings in batch]
    finally:
        hook.remove()
    plans = [result.plan for result in alone]
    assert any(len({tuple(plan.starts_at(step)[-1][1]) for plan in plans}) > 1 for step in range(6))  # own tiles
    assert batched_calls < 0.7 * (len(calls) - batched_calls)  # calls with several drafts' windows: 42 against 72
    for batched, single in zip(together, alone):
        # float32 rounding of other batch sizes, carried through six steps: ~1e-6 of the latents' scale
        scale = float(single.latents.abs().max())
        torch.testing.assert_close(batched.latents, single.latents, rtol=1e-5, atol=1e-5 * scale)
        assert batched.metadata["seed"] == single.metadata["seed"]
        assert batched.plan.describe() == single.plan.describe()
    assert not torch.allclose(together[0].latents, together[1].latents, atol=0.1)


def test_a_stochastic_join_draws_its_fresh_noise_from_each_seed_alone(pipe):
    # --fine-start on a 360° Draft world with pole caps (three levels: the finest joins at step 3 of 6). The stochastic
    # join draws its fresh noise from each panorama's seed after its initial noise: the same seed gives the same
    # world, a batch of drafts what each gives alone; until the join it is v0.6's deterministic run step for step,
    # and from the join on the two differ.
    world = GenerationSettings(prompt="dunes at dusk", width=256, height=128, wrap=True, model="tiny", device="cpu",
                               seed=5, fine_start=0.5, **{**QUALITY["draft"][0], "steps": 6})
    plan_ = pipe.check_inputs(world)
    assert plan_.level_starts == (0, 0, 3) and plan_.caps and [plan_.stochastic_at(i) for i in (2, 3)] == [False, True]

    def run(settings):
        states = {}
        result = pipe(settings, decode=False, callback=lambda info: states.__setitem__((info.step, info.level),
                                                                                        info.latents.clone()))
        return result.latents, states

    joined, states = run(world)
    assert torch.equal(joined, run(world)[0])
    held, held_states = run(dataclasses.replace(world, fine_join="deterministic"))
    # Steps are reported 1-based, each level's merged result before the fresh noise: the join's own step (4) too.
    assert all(torch.equal(states[key], held_states[key]) for key in states if key[0] <= 4)
    # After it the levels above see the same block means (to float32 rounding), the finest level differs beneath them.
    for level, (low, high) in ((1, (0, 1e-4)), (2, (0, 1e-4)), (3, (0.05, None))):
        change = float((states[5, level] - held_states[5, level]).abs().max() / held_states[5, level].abs().max())
        assert change >= low and (high is None or change < high), (level, change)
    together = pipe.sample_batch([world, dataclasses.replace(world, seed=6)], decode=False)
    alone = [joined, pipe(dataclasses.replace(world, seed=6), decode=False).latents]
    for batched, single in zip(together, alone):
        torch.testing.assert_close(batched.latents, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))


def test_tiles_starting_anywhere_sample_a_world_alone_and_in_a_batch_with_a_seed_of_another_parity(pipe):
    # --tile-starts any on a 360° world: its finer levels' tiles start off the coarse grid at some steps (each seed
    # draws its own), so a batch stacks grids with and without guided parts; each world is what it is alone, the
    # same seed gives the same world, and it is another world than the even tiles' (the default, v0.7's).
    world = GenerationSettings(prompt="dunes at dusk", width=256, height=128, wrap=True, model="tiny", device="cpu",
                               seed=5, tile_starts="any", steps=4)
    plan_ = pipe.check_inputs(world)
    assert any(start % 2 for step in range(4) for rows, cols in plan_.starts_at(step)[1:] for start in rows + cols)
    anywhere = pipe(world, decode=False).latents
    assert torch.isfinite(anywhere).all() and torch.equal(anywhere, pipe(world, decode=False).latents)
    even = pipe(dataclasses.replace(world, tile_starts="even"), decode=False).latents
    assert float((anywhere - even).abs().max()) > 1e-3 * float(even.abs().max())
    together = pipe.sample_batch([world, dataclasses.replace(world, seed=8)], decode=False)
    alone = [anywhere, pipe(dataclasses.replace(world, seed=8), decode=False).latents]
    for batched, single in zip(together, alone):
        torch.testing.assert_close(batched.latents, single, rtol=1e-5, atol=1e-5 * float(single.abs().max()))
    assert together[0].metadata["tile_starts"] == "any"


def test_a_batch_differs_only_in_seeds(pipe):
    settings = dataclasses.replace(BASE, steps=1)
    with pytest.raises(ValueError, match="only in the seed"):
        pipe.sample_batch([settings, dataclasses.replace(settings, seed=4, steps=2)])


def test_a_batch_of_360_worlds_with_pole_caps_equals_each_world_sampled_alone(pipe):
    # A 360° world's draft (one window tall, pole caps over the last steps): the strip is batched, each draft's
    # caps are its own views, blended over its own poles and kept for its decode.
    world = GenerationSettings(prompt="dunes at dusk", width=128, height=64, wrap=True, model="tiny", device="cpu",
                               seed=21, poles="sphere", **{**QUALITY["draft"][0], "steps": 4})
    batch = [world, dataclasses.replace(world, seed=22)]
    assert pipe.check_inputs(world).caps_at(3)
    together = pipe.sample_batch(batch, decode=False)
    alone = [pipe(settings, decode=False) for settings in batch]
    for batched, single in zip(together, alone):
        scale = float(single.latents.abs().max())
        torch.testing.assert_close(batched.latents, single.latents, rtol=1e-5, atol=1e-5 * scale)
        assert batched.caps.keys() == single.caps.keys() == {"zenith", "nadir"}
        for pole in single.caps:
            torch.testing.assert_close(batched.caps[pole][0], single.caps[pole][0], rtol=1e-5, atol=1e-5 * scale)
    assert not torch.allclose(together[0].caps["zenith"][0], together[1].caps["zenith"][0], atol=0.1)


def test_stochastic_finest_steps_run_the_same_unet_calls_draw_from_each_seed_alone_and_are_stored(pipe):
    # Standard's default on a small 360° world (three levels, pole caps): the finest level's 2×2 blocks take fresh
    # noise from each seed's own generator every guided step; the UNet sees the same windows as deterministic steps.
    world = GenerationSettings(prompt="dunes at dusk", width=256, height=128, wrap=True, model="tiny", device="cpu",
                               view_batch=3, seed=5, **{**QUALITY["standard"][0], "steps": 6})
    assert world.fine_steps == "stochastic" and pipe.check_inputs(world).levels == 3
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        fresh = pipe(world, decode=False)
        fresh_calls, calls[:] = list(calls), []
        plain = pipe(dataclasses.replace(world, fine_steps="deterministic"), decode=False)
        plain_calls = list(calls)
    finally:
        hook.remove()
    assert fresh_calls == plain_calls
    assert torch.isfinite(fresh.latents).all() and not torch.allclose(fresh.latents, plain.latents, atol=1e-3)
    scale = float(fresh.latents.abs().max())
    torch.testing.assert_close(pipe(world, decode=False).latents, fresh.latents, rtol=0, atol=0)
    batch = pipe.sample_batch([dataclasses.replace(world, seed=6), world], decode=False)
    torch.testing.assert_close(batch[1].latents, fresh.latents, rtol=1e-5, atol=1e-5 * scale)
    assert fresh.metadata["fine_steps"] == "stochastic"
    assert GenerationSettings.from_stored(json.loads(fresh.metadata[pngmeta.SETTINGS_KEY])).fine_steps == "stochastic"


def test_pulling_through_x0_runs_the_same_unet_calls_batches_seeds_apart_and_is_stored(pipe):
    # Standard on a small 360° world, each seed's windows pulled through the tiny UNet's x₀ estimate.
    world = GenerationSettings(prompt="dunes at dusk", width=256, height=128, wrap=True, model="tiny", device="cpu",
                               view_batch=3, seed=5, **{**QUALITY["standard"][0], "steps": 6})
    through_x0 = dataclasses.replace(world, pull_through="x0")
    calls = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        paper = pipe(world, decode=False)
        paper_calls, calls[:] = list(calls), []
        pulled = pipe(through_x0, decode=False)
        pulled_calls = list(calls)
        batch = pipe.sample_batch([through_x0, dataclasses.replace(through_x0, seed=6)], decode=False)
    finally:
        hook.remove()
    assert pulled_calls == paper_calls  # the same windows through the UNet, step by step
    assert torch.isfinite(pulled.latents).all() and not torch.allclose(pulled.latents, paper.latents, atol=1e-3)
    scale = float(pulled.latents.abs().max())
    torch.testing.assert_close(batch[0].latents, pulled.latents, rtol=1e-5, atol=1e-5 * scale)
    assert GenerationSettings.from_stored(json.loads(pulled.metadata[pngmeta.SETTINGS_KEY])).pull_through == "x0"
