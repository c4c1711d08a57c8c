"""DPM-Solver++ (2M) as a pure step: oracle against diffusers, its slope and gradients, the exact merge."""

import dataclasses

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from test_pipeline import BASE, diffusers_latents, pipe, pipe_v  # noqa: F401  (fixtures)
from test_sampler import SmoothDenoiser

from msd_core import cli
from msd_core.sampling import sampler
from msd_core.errors import BadInput
from msd_core.models.loading import sd_ddim_scheduler
from msd_core.sampling.sampler import DPMTimestep, cross_scale_discrepancy, dpm_solver_schedule, dpm_solver_step
from msd_core.settings import QUALITY, GenerationSettings
from msd_core.sampling.windows import WindowGrid, downsample

DPM = dataclasses.replace(BASE, scheduler="dpmpp-2m", steps=12)


def diffusers_dpm(prediction_type="epsilon", steps=12):
    reference = DPMSolverMultistepScheduler.from_config(sd_ddim_scheduler(prediction_type).config)
    reference.set_timesteps(steps)
    return reference


def second_order_step(steps=20, index=6, prediction_type="epsilon") -> DPMTimestep:
    step = dpm_solver_schedule(sd_ddim_scheduler(prediction_type).config, steps)[index]
    assert step.ratio is not None
    return step


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_step_equals_diffusers(prediction_type, steps):
    """Every step of a run against diffusers' stateful scheduler, from the same sample each time; the
    memory is the x₀ our previous step returned."""
    schedule = dpm_solver_schedule(sd_ddim_scheduler(prediction_type).config, steps)
    reference = diffusers_dpm(prediction_type, steps)
    assert [step.t for step in schedule] == reference.timesteps.tolist()
    assert schedule[0].t == 999  # SD's config names no spacing: DPM's own "linspace", not DDIM's "leading"
    assert [step.ratio is None for step in schedule] == [True] + [False] * (steps - 2) + [True]
    generator = torch.Generator().manual_seed(0)
    sample, previous_x0 = torch.randn(2, 4, 8, 8, generator=generator), None
    for step in schedule:
        output = torch.randn(2, 4, 8, 8, generator=generator)
        ours, previous_x0 = dpm_solver_step(sample, output, step, prediction_type, previous_x0)
        sample = reference.step(output, step.t, sample).prev_sample
        assert torch.allclose(ours, sample, atol=1e-5), float((ours - sample).abs().max())


def test_first_order_dpm_step_is_ddim():
    """DPM-Solver++ of order 1 is DDIM: same x_next for the same pair of timesteps."""
    step = dpm_solver_schedule(sd_ddim_scheduler().config, 10)[0]
    alphas_cumprod = sd_ddim_scheduler().alphas_cumprod
    ddim = sampler.DDIMTimestep(step.t, step.alpha**2, step.alpha_next**2)
    assert step.alpha**2 == pytest.approx(float(alphas_cumprod[step.t]), rel=1e-6)
    x, output = torch.randn(3, 4, 4, dtype=torch.float64), torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.allclose(dpm_solver_step(x, output, step)[0], sampler.ddim_step(x, output, ddim)[0], atol=1e-10)
    assert step.jacobian() == pytest.approx(ddim.jacobian())


def test_second_order_step_needs_the_memory():
    with pytest.raises(ValueError, match="previous step's x₀"):
        dpm_solver_step(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), second_order_step())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("index", [0, 6, 19])
def test_dpm_jacobian_matches_autograd(prediction_type, index):
    step = dpm_solver_schedule(sd_ddim_scheduler(prediction_type).config, 20)[index]
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    output, memory = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(dpm_solver_step(x, output, step, prediction_type, memory)[0].sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, step.jacobian(prediction_type)))


def test_second_order_slope_is_not_ddims():
    step = second_order_step()
    assert step.jacobian() > 1.05 * step.alpha_next / step.alpha


def test_fast_gradient_equals_autograd_for_the_solver():
    step = second_order_step()
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    output, memory = torch.randn_like(x), torch.randn_like(x)
    target = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    scale, omega = 0.37, 3.0
    prev, _ = dpm_solver_step(x, output, step, previous_x0=memory)
    fast = sampler.guided_windows_fast(x, prev, target, step, omega, scale)
    leaf = x.clone().requires_grad_(True)
    loss = sampler.cross_scale_loss(dpm_solver_step(leaf, output, step, previous_x0=memory)[0], target, scale)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(fast, x - omega * grad, atol=1e-10)


def test_tiles_off_the_coarse_grid_are_pulled_on_the_blocks_they_hold_whole_in_both_gradient_modes():
    """A window starting between two coarse pixels: the fast gradient is autograd's with the model output held,
    the exact one autograd's through the model (whose 3×3 reach moves the pixels next to the blocks too); the fast
    one moves nothing outside the whole blocks, and still removes ω/10 of the gap there."""
    step, denoiser = second_order_step(), SmoothDenoiser()
    grid = WindowGrid(12, 16, 6, 6, starts=((0, 5), (1, 7)))
    part = grid.guided_part()
    x = grid.crop(torch.randn(1, 2, 12, 16, dtype=torch.float64))
    output, memory = torch.randn_like(x), torch.randn_like(x)
    target = torch.randn(len(grid), 2, part.size[0] // 2, part.size[1] // 2, dtype=torch.float64)
    scale, omega = sampler.guidance_scale("projection", target[0].numel(), step.jacobian()), 10.0
    prev, _ = dpm_solver_step(x, output, step, previous_x0=memory)
    fast = sampler.guided_windows_fast(x, prev, target, step, omega, scale, part=part)
    leaf = x.clone().requires_grad_(True)
    loss = sampler.cross_scale_loss(dpm_solver_step(leaf, output, step, previous_x0=memory)[0], target, scale, part=part)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(fast, x - omega * grad, atol=1e-10)
    whole = part.whole(dtype=torch.float64)
    outside = (part.put(whole.repeat_interleave(2, -2).repeat_interleave(2, -1)) == 0).expand_as(x)
    assert outside.any() and torch.equal(fast[outside], x[outside])
    after, _ = dpm_solver_step(fast, output, step, previous_x0=memory)
    assert torch.allclose(downsample(part.take(after)) * whole, target * whole, atol=1e-10)  # ω = 10 closes the gap
    with torch.no_grad():
        exact = sampler.guided_windows_exact(x, target, step, denoiser, 1.0, scale, previous_x0=memory, part=part)
    leaf = x.clone().requires_grad_(True)
    through = dpm_solver_step(leaf, denoiser(leaf, step.t), step, previous_x0=memory)[0]
    (grad,) = torch.autograd.grad(sampler.cross_scale_loss(through, target, scale, part=part), leaf)
    assert torch.allclose(exact, x - grad, atol=1e-12) and not torch.equal(exact[outside], x[outside])


@pytest.mark.parametrize("factor", [(2, 2), (1, 3)])  # halving, and a global level's column squeeze
def test_exact_gradient_through_the_solver_agrees_with_finite_differences(factor):
    denoiser, step = SmoothDenoiser(), second_order_step(index=9)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    memory = torch.randn_like(x)
    target = torch.randn(1, 2, 6 // factor[0], 6 // factor[1], dtype=torch.float64)
    scale, omega = 0.5, 1.0
    with torch.no_grad():
        x_hat = sampler.guided_windows_exact(x, target, step, denoiser, omega, scale, previous_x0=memory, factor=factor)
    grad = (x - x_hat) / omega

    def loss(z):
        with torch.no_grad():
            prev, _ = dpm_solver_step(z, denoiser(z, step.t), step, previous_x0=memory)
            return float(sampler.cross_scale_loss(prev, target, scale, factor))

    eps = 1e-6
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 0, 5, 5)]:
        bump = torch.zeros_like(x)
        bump[index] = eps
        assert grad[index].item() == pytest.approx((loss(x + bump) - loss(x - bump)) / (2 * eps), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("factor", [(2, 2), (1, 4)])
@pytest.mark.parametrize("omega,fraction", [(10.0, 1.0), (5.0, 0.5)])
def test_projection_keeps_its_meaning_with_the_solver(omega, fraction, factor):
    """ω/10 of the cross-scale gap is removed by one fast step, with the solver's own slope, also under a
    global level's column squeeze."""
    step = second_order_step()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    output, memory = torch.randn_like(x), torch.randn_like(x)
    target = torch.randn(2, 4, 8 // factor[0], 8 // factor[1], dtype=torch.float64)
    scale = sampler.guidance_scale("projection", target[0].numel(), step.jacobian(), area=factor[0] * factor[1])
    prev, _ = dpm_solver_step(x, output, step, previous_x0=memory)
    x_hat = sampler.guided_windows_fast(x, prev, target, step, omega, scale, factor=factor)
    after, _ = dpm_solver_step(x_hat, output, step, previous_x0=memory)
    gap_before, gap_after = downsample(prev, factor) - target, downsample(after, factor) - target
    assert torch.allclose(gap_after, (1 - fraction) * gap_before, atol=1e-10)


def test_merge_is_exact_whatever_the_windows():
    """With a per-pixel denoiser every window sees what the whole latent sees, so MultiDiffusion with the
    merged memory must equal the solver run on the whole latent, even when the grid changes every step."""

    def pointwise(x, t):
        return torch.tanh(1.5 * x) * (1 + t / 1000)

    schedule = dpm_solver_schedule(sd_ddim_scheduler().config, 6)
    latents = torch.randn(1, 2, 12, 20, dtype=torch.float64)
    whole, whole_x0 = latents, None
    merged, merged_x0 = latents, None
    grids = [WindowGrid(12, 20, 8, 2), WindowGrid(12, 20, 8, 5, wrap=True), WindowGrid(12, 20, 6, 3)]
    for index, step in enumerate(schedule):
        whole, whole_x0 = dpm_solver_step(whole, pointwise(whole, step.t), step, previous_x0=whole_x0)
        merged, merged_x0 = sampler.multidiffusion_step(
            merged, grids[index % 3], step, pointwise, view_batch=4, previous_x0=merged_x0
        )
    assert torch.allclose(merged, whole, atol=1e-12)


def test_msd_step_keeps_one_memory_per_level():
    denoiser = SmoothDenoiser()
    schedule = dpm_solver_schedule(sd_ddim_scheduler().config, 5)
    grids = [WindowGrid(8, 16, 4, 2), WindowGrid(16, 32, 4, 2)]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    msd, md, history, md_x0 = latents, latents, [None, None], None
    for step in schedule:
        msd = sampler.msd_step(msd, grids, step, denoiser, 0.0, view_batch=5, x0_history=history)
        md, md_x0 = sampler.multidiffusion_step(md, grids[1], step, denoiser, view_batch=5, previous_x0=md_x0)
        # At ω = 0 the coarser level is never denoised, so only the finest keeps a memory.
        assert history[0] is None and tuple(history[1].shape) == (1, 2, 16, 32)
    assert torch.equal(msd, md) and torch.equal(history[1], md_x0)
    guided = [None, None]
    sampler.msd_step(latents, grids, schedule[0], denoiser, 10.0, view_batch=5, x0_history=guided)
    assert [tuple(x0.shape) for x0 in guided] == [(1, 2, 8, 16), (1, 2, 16, 32)]
    with pytest.raises(ValueError, match="previous step's x₀"):
        sampler.msd_step(latents, grids, schedule[1], denoiser, 10.0)


@pytest.mark.parametrize("fixture", ["pipe", "pipe_v"])
def test_single_window_run_equals_diffusers_with_dpm_solver(request, fixture):
    """A whole 12-step run on one window with the tiny UNet against StableDiffusionPipeline."""
    pipe = request.getfixturevalue(fixture)
    settings = dataclasses.replace(DPM, width=64, height=64, method="multidiffusion")
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    ours = pipe(settings, latents=initial, decode=False).latents
    c = pipe.components
    reference = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
        scheduler=DPMSolverMultistepScheduler.from_config(c.scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = reference(
            settings.prompt, height=64, width=64, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            latents=initial.clone(), output_type="latent",
        ).images
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_multidiffusion_equals_diffusers_panorama_with_dpm_solver(pipe):
    """diffusers' panorama pipeline keeps one scheduler state per batch of views (each window's own x₀);
    the merge is affine, so that equals our per-level merged memory."""
    settings = dataclasses.replace(DPM, method="multidiffusion")
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    result = pipe(settings, latents=initial, decode=False)
    ours = result.latents
    assert result.metadata["scheduler"] == "dpmpp-2m"
    theirs = diffusers_latents(pipe, settings, initial, DPMSolverMultistepScheduler.from_config(pipe.components.scheduler.config))
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


@pytest.mark.parametrize("gradient", ["exact", "refresh", "fast"])
def test_msd_with_the_solver_follows_the_coarse_level(pipe, gradient):
    """Every gradient mode runs with DPM-Solver++ and pulls the finer level towards the coarser one."""

    def mean_gap(omega):
        levels, gaps = {}, []

        def record(info):
            levels[info.level] = info.latents
            if info.level == info.levels:
                gaps.append(cross_scale_discrepancy(levels[2], levels[1]))

        pipe(dataclasses.replace(DPM, height=256, steps=6, omega=omega, gradient=gradient), callback=record, decode=False)
        return sum(gaps) / len(gaps)

    # ω = 1e-9: both levels are denoised, the pull too weak to matter (at ω = 0 the coarser one is skipped).
    assert mean_gap(10.0) < 0.8 * mean_gap(1e-9)


def test_unknown_scheduler_is_refused_with_the_choices():
    with pytest.raises(BadInput, match="ddim, dpmpp-2m.*DPM-Solver"):
        GenerationSettings(prompt="x", scheduler="euler-a").validate()


def test_cli_scheduler_option_reaches_the_settings():
    args = cli.build_parser().parse_args(["generate", "a fjord", "-o", "x.png", "--scheduler", "dpmpp-2m", "--steps", "20"])
    settings = cli.settings_from_args(args)
    assert (settings.scheduler, settings.steps) == ("dpmpp-2m", 20)
    default = cli.settings_from_args(cli.build_parser().parse_args(["generate", "a fjord", "-o", "x.png"]))
    assert default.scheduler == QUALITY["standard"][0]["scheduler"]  # the quality preset's, unless given
    best = cli.build_parser().parse_args(["generate", "a fjord", "-o", "x.png", "--quality", "best"])
    assert cli.settings_from_args(best).scheduler == "ddim"
