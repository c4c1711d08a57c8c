"""Sampler math on tensors: DDIM step, gradients, guidance normalisation, MSD vs MultiDiffusion."""

import dataclasses

import pytest
import torch

from msd_core.sampling import plan, sampler
from msd_core.models.loading import sd_ddim_scheduler
from msd_core.sampling.sampler import DDIMTimestep, ddim_jacobian, ddim_schedule, ddim_step
from msd_core.sampling.windows import WindowGrid, downsample, feathered_weights
from msd_core.settings import GenerationSettings


class SmoothDenoiser(torch.nn.Module):
    """A small nonlinear, t-dependent stand-in for a UNet (per-sample, like a real one)."""

    def __init__(self, channels=2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1, dtype=torch.float64)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t / 1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_diffusers(prediction_type):
    scheduler = sd_ddim_scheduler(prediction_type)
    schedule = ddim_schedule(scheduler, 10)
    reference = sd_ddim_scheduler(prediction_type)
    reference.set_timesteps(10)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for step in schedule:
        ours, x0 = ddim_step(sample, output, step, prediction_type)
        theirs = reference.step(output, step.t, sample)
        assert torch.allclose(ours, theirs.prev_sample, atol=1e-5)
        assert torch.allclose(x0, theirs.pred_original_sample, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_jacobian_matches_autograd(prediction_type):
    step = ddim_schedule(sd_ddim_scheduler(prediction_type), 20)[3]
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    output = torch.randn(3, dtype=torch.float64)
    (grad,) = torch.autograd.grad(ddim_step(x, output, step, prediction_type)[0].sum(), x)
    assert torch.allclose(grad, torch.full_like(grad, ddim_jacobian(step, prediction_type)))


def test_fast_gradient_equals_autograd_with_output_held_constant():
    step = ddim_schedule(sd_ddim_scheduler(), 20)[5]
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    output = torch.randn_like(x)
    target = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    scale, omega = 0.37, 3.0
    prev, _ = ddim_step(x, output, step)
    fast = sampler.guided_windows_fast(x, prev, target, step, omega, scale)
    leaf = x.clone().requires_grad_(True)
    loss = sampler.cross_scale_loss(ddim_step(leaf, output, step)[0], target, scale)
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.allclose(fast, x - omega * grad, atol=1e-10)


def test_exact_gradient_agrees_with_finite_differences():
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 20)[8]
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    target = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    scale, omega = 0.5, 1.0
    with torch.no_grad():
        x_hat = sampler.guided_windows_exact(x, target, step, denoiser, omega, scale)
    grad = (x - x_hat) / omega

    def loss(z):
        with torch.no_grad():
            return float(sampler.cross_scale_loss(ddim_step(z, denoiser(z, step.t), step)[0], target, scale))

    eps = 1e-6
    for index in [(0, 0, 0, 0), (0, 1, 2, 3), (0, 0, 5, 5), (0, 1, 4, 1)]:
        bump = torch.zeros_like(x)
        bump[index] = eps
        numeric = (loss(x + bump) - loss(x - bump)) / (2 * eps)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    # The model output depends on x, so the exact gradient differs from the fast one.
    prev, _ = ddim_step(x, denoiser(x, step.t), step)
    fast = sampler.guided_windows_fast(x, prev.detach(), target, step, omega, scale)
    assert not torch.allclose(fast, x_hat, atol=1e-6)


@pytest.mark.parametrize(
    "omega_loss,omega,fraction,alpha",
    [("projection", 10.0, 1.0, 0.05), ("projection", 5.0, 0.5, 0.3), ("sum", 2.0, 1.0, 0.5), ("sum", 2.0, 2.0, 0.25)],
)
def test_guidance_scale_means_what_it_says(omega_loss, omega, fraction, alpha):
    """One fast step removes the fraction ω·k·c²/2 of the cross-scale gap: ω = 10 in "projection"
    units closes it at any step; ω = 2 on a plain sum only when c = 1 (here c² = ᾱ_prev/ᾱ_t)."""
    step = DDIMTimestep(t=500, alpha=alpha, alpha_prev=0.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    output = torch.randn_like(x)
    target = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    scale = sampler.guidance_scale(omega_loss, 4 * 4 * 4, ddim_jacobian(step))
    prev, _ = ddim_step(x, output, step)
    x_hat = sampler.guided_windows_fast(x, prev, target, step, omega, scale)
    after, _ = ddim_step(x_hat, output, step)
    gap_before, gap_after = downsample(prev) - target, downsample(after) - target
    assert torch.allclose(gap_after, (1 - fraction) * gap_before, atol=1e-10)


def test_mean_reduction_is_a_negligible_pull_at_omega_10():
    numel = 4 * 32 * 32  # one SD coarse crop
    removed = 10 * sampler.guidance_scale("mean", numel) / 2
    assert removed < 0.002


def test_cosine_decay_endpoints():
    assert sampler.cosine_decay(1000, 1000) == pytest.approx(1.0)
    assert sampler.cosine_decay(500, 1000) == pytest.approx(0.5)
    assert sampler.cosine_decay(0, 1000) == pytest.approx(0.0, abs=1e-12)


def _two_level_grids(wrap=False):
    return [WindowGrid(8, 16, 4, 2, wrap), WindowGrid(16, 32, 4, 2, wrap)]


@pytest.mark.parametrize("gradient", ["exact", "fast"])
def test_msd_with_omega_zero_is_multidiffusion(gradient):
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[2]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    grids = _two_level_grids()
    md, _ = sampler.multidiffusion_step(latents, grids[1], step, denoiser, view_batch=5)
    calls, levels = [], []

    def counting(windows, t):
        calls.append(windows.shape[0])
        return denoiser(windows, t)

    msd = sampler.msd_step(latents, grids, step, counting, 0.0, gradient=gradient, view_batch=5,
                           on_level=lambda result: levels.append(result.level))
    assert torch.equal(msd, md)
    # Nothing guides the finest level, so the coarser one is not denoised at all.
    assert sum(calls) == len(grids[1]) and levels == [2]


@pytest.mark.parametrize("gradient", ["exact", "fast"])
def test_guidance_lowers_the_cross_scale_discrepancy(gradient):
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[2]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    grids = _two_level_grids(wrap=True)
    levels = {}

    def record(result):
        levels[result.level] = result.latents

    sampler.msd_step(latents, grids, step, denoiser, 10.0, gradient=gradient, on_level=record)
    guided = sampler.cross_scale_discrepancy(levels[2], levels[1])
    # Unguided: each level denoised on its own (MultiDiffusion at both).
    coarse, _ = sampler.multidiffusion_step(sampler.downsample(latents), grids[0], step, denoiser)
    fine, _ = sampler.multidiffusion_step(latents, grids[1], step, denoiser)
    assert guided < 0.5 * sampler.cross_scale_discrepancy(fine, coarse)


def test_view_batch_does_not_change_the_result():
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[4]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    results = [sampler.msd_step(latents, _two_level_grids(), step, denoiser, 10.0, view_batch=vb) for vb in (1, 7, 1000)]
    assert torch.allclose(results[0], results[1], atol=1e-12) and torch.allclose(results[0], results[2], atol=1e-12)


def test_interrupt_stops_at_the_next_batch():
    from msd_core.errors import Cancelled

    calls = []

    class AfterTwoCalls:
        def is_set(self):
            return len(calls) >= 2

    def denoise(x, t):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    step = ddim_schedule(sd_ddim_scheduler(), 10)[0]
    with pytest.raises(Cancelled):
        sampler.msd_step(torch.randn(1, 2, 16, 32), _two_level_grids(), step, denoise, 10.0, view_batch=3, interrupt=AfterTwoCalls())
    assert len(calls) == 2


def test_refresh_denoises_the_fast_guided_windows_again():
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[3]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)
    coarse = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    grid = WindowGrid(16, 32, 4, 2)
    with torch.no_grad():
        refreshed, _ = sampler.msd_level_step(latents, coarse, grid, step, denoiser, 10.0, gradient="refresh", view_batch=5)
        fast, _ = sampler.msd_level_step(latents, coarse, grid, step, denoiser, 10.0, gradient="fast", view_batch=5)
        x, y = grid.crop(latents), grid.coarse_crop(coarse)
        scale = sampler.guidance_scale("projection", y[0].numel(), ddim_jacobian(step))
        x_hat = sampler.guided_windows_fast(x, ddim_step(x, denoiser(x, step.t), step)[0], y, step, 10.0, scale)
        expected = grid.merge(ddim_step(x_hat, denoiser(x_hat, step.t), step)[0])
    assert torch.allclose(refreshed, expected, atol=1e-12)
    assert not torch.allclose(refreshed, fast, atol=1e-6)


def _global_grids(wrap):
    from msd_core.sampling.windows import global_level

    grids = [WindowGrid(8, 32, 8, 4, wrap), WindowGrid(16, 64, 8, 4, wrap)]
    return [global_level(grids[0]), *grids]


@pytest.mark.parametrize("wrap", [False, True])
def test_global_level_with_omega_zero_is_still_multidiffusion(wrap):
    grids = _global_grids(wrap)
    assert [(g.height, g.width) for g in grids] == [(8, 8), (8, 32), (16, 64)]
    denoiser = SmoothDenoiser()
    latents = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    step = ddim_schedule(sd_ddim_scheduler(), 10)[3]
    assert torch.equal(sampler.msd_step(latents, grids, step, denoiser, 0.0),
                       sampler.multidiffusion_step(latents, grids[-1], step, denoiser)[0])
    # With ω > 0 the squeezed level's layout reaches the finest level through the (1, 4) column average.
    guided = sampler.msd_step(latents, grids, step, denoiser, 10.0, gradient="fast")
    assert not torch.allclose(guided, sampler.msd_step(latents, grids[1:], step, denoiser, 10.0, gradient="fast"))


def test_projection_omega_10_closes_the_gap_to_a_squeezed_level():
    # Under a (1, 4) column average the "projection" loss keeps its meaning: ω = 10 with the output held
    # constant puts ds(Φ(x̂)) exactly on the coarser level's crop.
    grid, factor = WindowGrid(8, 32, 8, 4, wrap=True), (1, 4)
    step = ddim_schedule(sd_ddim_scheduler(), 10)[2]
    generator = torch.Generator().manual_seed(1)
    windows = grid.crop(torch.randn(1, 2, 8, 32, generator=generator))
    targets = grid.coarse_crop(torch.randn(1, 2, 8, 8, generator=generator), factor)
    output = torch.randn(windows.shape, generator=generator)
    prev, _ = sampler.ddim_step(windows, output, step)
    scale = sampler.guidance_scale("projection", targets[0].numel(), ddim_jacobian(step), area=4)
    guided = sampler.guided_windows_fast(windows, prev, targets, step, 10.0, scale, factor=factor)
    after, _ = sampler.ddim_step(guided, output, step)
    assert torch.allclose(downsample(after, factor), targets, atol=1e-5)
    assert not torch.allclose(downsample(prev, factor), targets, atol=1e-2)


# -- coarse levels at their matched noise level ----------------------------------------------------


def test_matched_alpha_has_the_snr_of_the_averaged_latent():
    for alpha in (0.01, 0.3, 0.9):
        for gain in (4, 16, 32):
            matched = sampler.matched_alpha(alpha, gain)
            assert matched / (1 - matched) == pytest.approx(gain * alpha / (1 - alpha))


def test_matched_timestep_inverts_alpha_at_and_clamps_to_the_schedule():
    train_alphas = sd_ddim_scheduler().alphas_cumprod
    for t in (0, 1, 17, 500, 999):
        assert sampler.alpha_at(train_alphas, t) == pytest.approx(float(train_alphas[t]), rel=1e-9)
        assert sampler.matched_timestep(train_alphas, float(train_alphas[t])) == pytest.approx(t, abs=1e-6)
    for t in (0.25, 3.5, 640.75, 998.9):
        assert sampler.matched_timestep(train_alphas, sampler.alpha_at(train_alphas, t)) == pytest.approx(t, abs=1e-6)
    between = sampler.alpha_at(train_alphas, 300.5)
    assert float(train_alphas[301]) < between < float(train_alphas[300])
    assert sampler.matched_timestep(train_alphas, 0.99999) == 0.0  # less noisy than timestep 0
    assert sampler.matched_timestep(train_alphas, 1e-6) == 999.0


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_a_matched_step_sees_an_averaged_latent_in_the_variance_preserving_form_of_its_timestep(solver):
    train = sd_ddim_scheduler()
    step = sampler.solver_schedule(solver, train, 10)[3]
    gain = 16  # two halving levels above the finest
    matched = sampler.snr_matched(step, gain, train.alphas_cumprod)
    assert sampler.snr_matched(step, 1, train.alphas_cumprod) is step
    alpha, _ = sampler.alphas_cumprod(step)
    signal, noise = torch.ones(1, 1, 256, 256, dtype=torch.float64), torch.randn(1, 1, 256, 256, dtype=torch.float64)
    level = downsample(alpha**0.5 * signal + (1 - alpha) ** 0.5 * noise, (4, 4))  # ds², noise averaged over 16 px
    scaled = matched.scale * level
    matched_alpha, _ = sampler.alphas_cumprod(matched.matched)
    assert matched_alpha == pytest.approx(sampler.matched_alpha(alpha, gain))
    assert sampler.alpha_at(train.alphas_cumprod, matched.t) == pytest.approx(matched_alpha)
    assert matched.t < step.t
    # The scaled level is √ᾱ' x₀ + √(1−ᾱ') ε: its signal part and its noise's variance.
    assert matched.scale * alpha**0.5 == pytest.approx(matched_alpha**0.5)
    assert (scaled - matched_alpha**0.5).var().item() == pytest.approx(1 - matched_alpha, rel=0.05)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_a_matched_steps_slope_is_its_jacobian_and_it_keeps_the_solvers_ratio(solver):
    train = sd_ddim_scheduler()
    step = sampler.solver_schedule(solver, train, 10)[4]
    matched = sampler.snr_matched(step, 8, train.alphas_cumprod)
    generator = torch.Generator().manual_seed(3)
    sample, output, memory = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    memory = memory if solver == "dpmpp-2m" else None
    base, x0 = matched.apply(sample, output, previous_x0=memory)
    moved, _ = matched.apply(sample + 1e-3, output, previous_x0=memory)
    assert ((moved - base) / 1e-3).mean().item() == pytest.approx(matched.jacobian(), rel=1e-6)
    # x₀ is the same in the level's units and in the matched form (the signal is not rescaled).
    inner_prev, inner_x0 = matched.matched.apply(matched.scale * sample, output, previous_x0=memory)
    assert torch.allclose(x0, inner_x0) and torch.allclose(base, inner_prev / matched.scale_next)
    if solver == "dpmpp-2m":
        assert matched.matched.ratio == step.ratio


def test_matched_ddim_equals_a_matched_first_order_dpm_step():
    # A first-order DPM-Solver++ step is DDIM; matching the noise level keeps them equal.
    train = sd_ddim_scheduler()
    ddim = ddim_schedule(train, 10)[2]
    dpm = sampler.DPMTimestep(ddim.t, ddim.alpha**0.5, (1 - ddim.alpha) ** 0.5, ddim.alpha_prev**0.5,
                              (1 - ddim.alpha_prev) ** 0.5, None)
    sample, output = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64)
    ours = [sampler.snr_matched(step, 4, train.alphas_cumprod) for step in (ddim, dpm)]
    assert ours[0].t == pytest.approx(ours[1].t)
    for a, b in zip(ours[0].apply(sample, output), ours[1].apply(sample, output)):
        assert torch.allclose(a, b, atol=1e-12)


def test_matched_coarse_noise_steps_only_the_coarse_levels_and_omega_zero_is_still_multidiffusion():
    train = sd_ddim_scheduler()
    step = ddim_schedule(train, 10)[2]
    grids = _global_grids(wrap=True)  # (1, 4) then (2, 2): the top level averages 16 px, the middle one 4
    factors = [(1, 4), (2, 2)]
    steps = sampler.level_steps(step, factors, "matched", train.alphas_cumprod)
    assert steps[-1] is step and [s.scale for s in steps[:2]] == [
        pytest.approx((sampler.matched_alpha(step.alpha, gain) / step.alpha) ** 0.5) for gain in (16, 4)]
    assert sampler.level_steps(step, factors) == [step] * 3
    seen = []
    denoiser = SmoothDenoiser()

    def recording(x, t):
        seen.append(t)
        return denoiser(x, t)

    latents = torch.randn(1, 2, 16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    md = sampler.multidiffusion_step(latents, grids[-1], step, denoiser)[0]
    assert torch.equal(sampler.msd_step(latents, grids, step, denoiser, 0.0, coarse_noise="matched",
                                        train_alphas=train.alphas_cumprod), md)
    guided = sampler.msd_step(latents, grids, step, recording, 10.0, gradient="fast", coarse_noise="matched",
                              train_alphas=train.alphas_cumprod)
    assert list(dict.fromkeys(seen)) == [steps[0].t, steps[1].t, step.t]  # coarsest first, less noisy above
    assert steps[0].t < steps[1].t < step.t
    assert not torch.allclose(guided, sampler.msd_step(latents, grids, step, denoiser, 10.0, gradient="fast"))
    with pytest.raises(ValueError, match="drawn, matched or literal"):
        sampler.level_steps(step, factors, "snr", train.alphas_cumprod)
    with pytest.raises(ValueError, match="train_alphas"):
        sampler.level_steps(step, factors, "matched")


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_a_start_schedule_runs_evenly_in_log_snr_from_the_first_noise_level_to_the_matched_one(solver):
    train = sd_ddim_scheduler()
    first = sampler.alphas_cumprod(sampler.solver_schedule(solver, train, 25)[0])[0]
    steps = sampler.start_schedule(solver, first, 32, 6, train.alphas_cumprod)
    alphas = [sampler.alphas_cumprod(step) for step in steps]
    assert alphas[0][0] == pytest.approx(first) and alphas[-1][1] == pytest.approx(sampler.matched_alpha(first, 32))
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(alphas, alphas[1:]))
    log_snr = [torch.tensor(a[0] / (1 - a[0])).log().item() for a in alphas]
    assert torch.allclose(torch.tensor(log_snr).diff(), torch.tensor(torch.log(torch.tensor(32.0)).item() / 6),
                          atol=1e-9)
    assert [sampler.alpha_at(train.alphas_cumprod, step.t) for step in steps] == pytest.approx([a[0] for a in alphas])
    if solver == "dpmpp-2m":  # equal log-SNR steps: ratio 1, the first one first order
        assert [step.ratio for step in steps] == [None] + [1.0] * 5
    with pytest.raises(ValueError, match="gain above 1"):
        sampler.start_schedule(solver, first, 1, 3, train.alphas_cumprod)


def test_with_block_means_replaces_only_the_block_means():
    latents = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    means = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = sampler.with_block_means(latents, means, (4, 8))
    assert torch.allclose(downsample(result, (4, 8)), means, atol=1e-12)
    detail = result - torch.nn.functional.interpolate(means, scale_factor=(4, 8))
    assert torch.allclose(detail, latents - torch.nn.functional.interpolate(downsample(latents, (4, 8)),
                                                                               scale_factor=(4, 8)), atol=1e-12)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp-2m"])
def test_a_drawn_start_changes_only_the_coarsest_levels_content_and_nothing_for_a_model_that_sees_none(solver):
    train = sd_ddim_scheduler()
    first = sampler.alphas_cumprod(sampler.solver_schedule(solver, train, 10)[0])[0]
    steps = sampler.start_schedule(solver, first, 32, 4, train.alphas_cumprod)
    noise = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = WindowGrid(8, 8, 8, 8)
    factor = (4, 8)

    def empty(x, t):  # predicts x₀ = 0: ε is the whole sample
        return x / (1 - sampler.alpha_at(train.alphas_cumprod, t)) ** 0.5

    assert torch.allclose(sampler.drawn_start(noise, [grid] * 4, factor, steps, empty), noise, atol=1e-10)
    seen = []

    def constant(x, t):  # an x₀ = 1 model: the coarsest level is pulled towards 1 by the start
        seen.append(t)
        alpha = sampler.alpha_at(train.alphas_cumprod, t)
        return (x - alpha**0.5) / (1 - alpha) ** 0.5

    drawn = sampler.drawn_start(noise, [grid] * 4, factor, steps, constant)
    assert seen == [step.t for step in steps]  # one window per step, noisiest first
    up = lambda z: torch.nn.functional.interpolate(downsample(z, factor), scale_factor=factor)  # noqa: E731
    assert torch.allclose(drawn - up(drawn), noise - up(noise), atol=1e-12)  # the detail is the noise's
    # Exact for a constant x₀ (the solver then follows the ODE exactly): the block means gain the signal a
    # level at the matched noise level holds, √ᾱ_first · x₀, less the part the start's noise already counted.
    gap = downsample(drawn, factor) - downsample(noise, factor)
    assert torch.allclose(gap, torch.full_like(gap, first**0.5 * (1 - 32**-0.5)), atol=1e-10)


def test_a_drawn_start_merges_its_windows_with_the_weights_it_is_given():
    # Two windows half a turn apart round a wrapped 8×8 coarsest level (bench/horizon.py's paired global level),
    # merged with weights that fall off towards each window's own edge: each start step is that weighted merge.
    train = sd_ddim_scheduler()
    steps = sampler.start_schedule("ddim", 0.05, 32, 3, train.alphas_cumprod)
    noise = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pair = WindowGrid(8, 8, 8, 8, wrap=True, starts=((0,), (1, 5)))
    weights = feathered_weights((1, 8))

    def denoise(x, t):  # sees where its window's edges are
        return torch.tanh(x) + 0.1 * x.cumsum(-1) + t * 1e-4

    coarse = downsample(noise, (4, 8)) * 32**0.5
    for step in steps:
        coarse, _ = sampler.multidiffusion_step(coarse, pair, step, denoise, weights=weights)
    first, last = sampler.alphas_cumprod(steps[0])[0], sampler.alphas_cumprod(steps[-1])[1]
    expected = sampler.with_block_means(noise, coarse * (first / last) ** 0.5, (4, 8))
    weighted = sampler.drawn_start(noise, [pair] * 3, (4, 8), steps, denoise, weights=weights)
    assert torch.allclose(weighted, expected, atol=1e-12)
    assert (weighted - sampler.drawn_start(noise, [pair] * 3, (4, 8), steps, denoise)).abs().max() > 1e-3


def test_a_step_that_holds_the_finest_level_runs_only_the_levels_above_and_keeps_its_noise_beneath_their_state():
    """--fine-start: the finest level has not joined yet; the step denoises the two levels above it exactly as a
    full step does, and the finest latent becomes their state plus its own noise carried to the next noise level."""
    train = sd_ddim_scheduler()
    step = sampler.ddim_schedule(train, 10)[2]
    latents = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grids = [WindowGrid(8, 8, 8, 8), WindowGrid(16, 16, 8, 8), WindowGrid(32, 32, 8, 8)]
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return torch.tanh(x) + 0.1 * x.roll(1, -1)

    def run(levels_run):
        calls.clear()
        seen, history = [], [None] * 3
        out = sampler.msd_step(latents, grids, step, model, 5.0, gradient="fast", on_level=seen.append,
                               x0_history=history, levels_run=levels_run)
        return out, seen, history, sum(calls)

    full, full_levels, _, full_windows = run(None)
    held, levels, history, windows = run(2)
    assert (full_windows, windows) == (1 + 4 + 16, 1 + 4)  # the finest level's 16 windows are not denoised
    for mine, theirs in zip(levels[:2], full_levels[:2]):  # the levels that ran: as in a full step
        assert torch.equal(mine.latents, theirs.latents) and torch.equal(mine.pred_x0, theirs.pred_x0)
    assert torch.allclose(downsample(held), levels[1].latents, atol=1e-12)  # the level above's state exactly
    up = lambda z: torch.nn.functional.interpolate(downsample(z), scale_factor=2)  # noqa: E731
    carried = ((1 - step.alpha_prev) / (1 - step.alpha)) ** 0.5  # σ_{t−1}/σ_t: DDIM for x₀ = 0 beneath the blocks
    assert torch.allclose(held - up(held), carried * (latents - up(latents)), atol=1e-12)
    assert torch.allclose(sampler.held_latents(latents, levels[1].latents, 2, 2, step), held, atol=0)
    # The held level is reported (the caps' guidance reads it) and remembers the level above's x₀ for its first step.
    assert [result.level for result in levels] == [1, 2, 3] and torch.equal(levels[2].latents, held)
    assert torch.equal(history[2], torch.nn.functional.interpolate(history[1], scale_factor=2))
    with pytest.raises(ValueError, match="all of them at ω = 0"):
        sampler.msd_step(latents, grids, step, model, 0.0, levels_run=2)
    with pytest.raises(ValueError, match="1 to 3 levels"):
        sampler.msd_step(latents, grids, step, model, 5.0, levels_run=0)
@pytest.mark.parametrize("solver, steps", [("dpmpp-2m", 25), ("ddim", 50)])  # the presets' and Best's solver
def test_stochastic_steps_keep_the_marginal_and_give_back_a_signal_the_state_lacks(solver, steps):
    """``stochastic_increment`` on a scalar Gaussian signal x₀ ~ N(0, s²) with its exact denoiser, over the last 40 %
    of the steps: from a state drawn from the true marginal the stochastic steps end with the signal's variance as
    the deterministic ones do (DDIM's first-order stochastic steps lose a little more to their step size), so the
    formula is the solver's SDE form; from a state that holds the right noise but none of the signal (a held level
    at its join) the deterministic steps keep the deficit to the end and the stochastic ones give much of it back
    (a half of it in the limit of small steps, for a signal whose SNR is 1 at the join)."""
    schedule = sampler.solver_schedule(solver, sd_ddim_scheduler(), steps)[steps * 3 // 5:]
    if solver == "dpmpp-2m":  # no memory before the join: first order, as the solver starts
        schedule[0] = dataclasses.replace(schedule[0], ratio=None)
    alpha = sampler.alphas_cumprod(schedule[0])[0] ** 0.5
    sigma = (1 - alpha**2) ** 0.5
    signal = sigma / alpha  # a scale whose SNR is 1 at the join: half the state is signal
    generator = torch.Generator().manual_seed(0)
    count = 200_000

    def run(start, stochastic):
        x, memory = start.clone(), None
        for step in schedule:
            a = sampler.alphas_cumprod(step)[0] ** 0.5
            x0 = a * signal**2 * x / (a**2 * signal**2 + 1 - a**2)  # E[x₀ | x], exact
            output = (x - a * x0) / (1 - a**2) ** 0.5  # the ε a perfect model predicts
            new, x0 = step.apply(x, output, "epsilon", memory)
            if stochastic:
                new = new + sampler.stochastic_increment(new, sampler.solver_data(step, x0, memory), step,
                                                         torch.randn(count, generator=generator, dtype=torch.float64))
            x, memory = new, x0
        return x.var().item() / signal**2

    faithful = alpha * signal * torch.randn(count, generator=generator, dtype=torch.float64) + sigma * torch.randn(
        count, generator=generator, dtype=torch.float64)
    noise_only = sigma * torch.randn(count, generator=generator, dtype=torch.float64)
    kept = run(faithful, False), run(faithful, True)
    assert min(kept) > 0.9 and kept[1] > kept[0] - 0.06, kept
    regained = run(noise_only, False), run(noise_only, True)
    assert regained[0] < 0.52 and regained[1] > regained[0] + 0.15, regained
    last = schedule[-1]  # the last step (to σ = 0, or DDIM's ᾱ ≈ 1) draws next to nothing afresh
    assert sampler.stochastic_increment(torch.zeros(1), torch.zeros(1), last, torch.ones(1)).abs().item() < 0.05


def test_a_stochastic_step_draws_afresh_only_what_lies_beneath_the_top_two_levels():
    """``msd_step`` with ``fresh_noise``: the finest latent's block means at the second level's resolution (what
    every guided level sees) are the deterministic step's exactly; beneath them it differs, by the step's
    ``stochastic_increment`` with those block means taken out, at a guided step and at one that runs the finest
    level alone. Two levels (none below the top two): nothing changes."""
    train = sd_ddim_scheduler()
    schedule = sampler.solver_schedule("dpmpp-2m", train, 10)
    latents = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(1, 2, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grids = [WindowGrid(8, 8, 8, 8), WindowGrid(16, 16, 8, 8), WindowGrid(32, 32, 8, 8)]

    def model(x, t):
        return torch.tanh(x) + 0.1 * x.roll(1, -1)

    history = [torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 16, 16), 0.1 * latents]
    memory = [None if h is None else h.clone() for h in history]
    plain = sampler.msd_step(latents, grids, schedule[6], model, 5.0, gradient="fast", x0_history=memory)
    memory = [h.clone() for h in history]
    fresh = sampler.msd_step(latents, grids, schedule[6], model, 5.0, gradient="fast", x0_history=memory,
                             fresh_noise=lambda: noise)
    assert torch.allclose(downsample(fresh), downsample(plain), atol=1e-12)
    up = lambda z: torch.nn.functional.interpolate(downsample(z), scale_factor=2)  # noqa: E731
    increment = sampler.stochastic_increment(plain, sampler.solver_data(schedule[6], memory[2], 0.1 * latents),
                                             schedule[6], noise)
    assert torch.allclose(fresh - plain, increment - up(increment), atol=1e-12)
    assert (fresh - plain).abs().mean() > 0.05 * plain.abs().mean()
    # A step that guides nothing (ω = 0: the finest level alone, after a join under late_gradient "none") too.
    plain, fresh = (sampler.msd_step(latents, grids, schedule[6], model, 0.0, fresh_noise=noisy,
                                     x0_history=[h.clone() for h in history]) for noisy in (None, lambda: noise))
    assert torch.allclose(downsample(fresh), downsample(plain), atol=1e-12) and not torch.allclose(fresh, plain)
    two = [sampler.msd_step(latents, grids[1:], schedule[6], model, 5.0, gradient="fast", fresh_noise=fresh,
                            x0_history=[h.clone() for h in history[1:]]) for fresh in (lambda: noise, None)]
    assert torch.equal(*two)


def test_stochastic_finest_steps_draw_afresh_only_within_the_finest_levels_own_blocks():
    """``fresh_scope`` "finest" (``--fine-steps stochastic``): with four levels the finest latent's 2×2 block means,
    all that the pull from the level above sees, are the deterministic step's, and within them it differs by the
    step's ``stochastic_increment`` less its 2×2 block means, where "join" keeps the 4×4 blocks beneath the top two
    levels. With two levels it still applies (a join has none below the top two). At ω = 0 it draws nothing, so
    the step stays MultiDiffusion's."""
    train = sd_ddim_scheduler()
    step = sampler.solver_schedule("dpmpp-2m", train, 10)[6]
    latents = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grids = [WindowGrid(size, size, 8, 8) for size in (8, 16, 32, 64)]

    def model(x, t):
        return torch.tanh(x) + 0.1 * x.roll(1, -1)

    def run(grids_, omega, scope=None):
        memory = [torch.zeros(1, 2, grid.height, grid.width, dtype=torch.float64) for grid in grids_[:-1]] + [0.1 * latents]
        return sampler.msd_step(latents, grids_, step, model, omega, gradient="fast", x0_history=memory,
                                fresh_noise=None if scope is None else lambda: noise,
                                fresh_scope=scope or "join"), memory[-1]

    (plain, x0), (finest, _), (join, _) = run(grids, 5.0), run(grids, 5.0, "finest"), run(grids, 5.0, "join")
    assert torch.allclose(downsample(finest), downsample(plain), atol=1e-12)
    increment = sampler.stochastic_increment(plain, sampler.solver_data(step, x0, 0.1 * latents), step, noise)
    up = lambda z: torch.nn.functional.interpolate(downsample(z), scale_factor=2)  # noqa: E731
    assert torch.allclose(finest - plain, increment - up(increment), atol=1e-12)
    assert (finest - plain).abs().mean() > 0.05 * plain.abs().mean()
    quarter = lambda z: downsample(downsample(z))  # noqa: E731
    assert torch.allclose(quarter(join), quarter(plain), atol=1e-12)
    assert not torch.allclose(downsample(join), downsample(plain), atol=1e-6)  # the join's blocks are 4×4
    two = [run(grids[2:], 5.0, scope)[0] for scope in (None, "finest", "join")]
    assert not torch.allclose(two[1], two[0]) and torch.equal(two[2], two[0])
    assert torch.equal(run(grids, 0.0, "finest")[0], run(grids, 0.0)[0])
    with pytest.raises(ValueError, match="fresh_scope"):
        run(grids, 5.0, "coarse")


def _rolled_grids(grids, columns):
    """``grids`` (coarsest first) with every window moved ``columns`` finest-level columns to the left."""
    finest = grids[-1].width
    return [dataclasses.replace(grid, starts=(grid.starts[0], tuple((left - columns * grid.width // finest) % grid.width
                                                                   for left in grid.starts[1])))
            for grid in grids]


@pytest.mark.parametrize("gradient", ["exact", "fast"])
def test_a_rolled_global_level_is_the_fixed_one_on_the_world_rolled_by_its_offset(gradient):
    # A 360° world (32×64 latents at 8 px windows: global 8×8 over 8×16, 16×32, 32×64) at a step whose global
    # window starts at column d ≠ 0: the step equals rolling the world by d·8 finest columns, stepping it with the
    # global window at 0 (v0.5's fixed one) and the finer tiles moved alike, and rolling back. So every level below
    # is guided towards the global level's result in the world's own columns (the same unrolled picture).
    world = plan.make_plan(GenerationSettings(prompt="x", width=512, height=256, model="tiny", seed=7), 8, 64)
    step_index = next(index for index in range(25) if world.starts_at(index)[0][1] != [0])
    grids = world.grids_at(step_index)
    shift = grids[0].starts[1][0] * world.width // grids[0].width
    latents = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    step = DDIMTimestep(600, 0.3, 0.35)

    def denoise(x, t):  # any model that sees only its window: nonlinear, and it knows where the window's edges are
        return torch.tanh(x) * 0.6 + 0.2 * x.cumsum(-1) / x.shape[-1] + t * 1e-4

    rolled = sampler.msd_step(latents, grids, step, denoise, 10.0, gradient=gradient)
    fixed_grids = _rolled_grids(grids, shift)
    assert fixed_grids[0].starts == ((0,), (0,))
    on_rolled_world = sampler.msd_step(latents.roll(-shift, dims=-1), fixed_grids, step, denoise, 10.0, gradient=gradient)
    assert torch.allclose(rolled, on_rolled_world.roll(shift, dims=-1), atol=1e-12)
    # …and it is not the fixed window on the world as it is.
    fixed = sampler.msd_step(latents, [fixed_grids[0], *grids[1:]], step, denoise, 10.0, gradient=gradient)
    assert (rolled - fixed).abs().max() > 1e-3


def test_blocks_split_between_two_tiles_are_pulled_after_the_merge_keeping_their_detail():
    """Tiles starting off the coarse grid: a block no window's guided part holds moves by the guidance's share of its
    gap to the coarser level, every pixel alike (the difference between its pixels stays); blocks held whole stay."""
    grid = WindowGrid(8, 12, 4, 4, wrap=True, starts=((0, 4), (1, 5, 9)))
    split = grid.split_blocks()
    assert split.shape == (1, 1, 4, 6) and split[0, 0].sum(0).tolist() == [4, 0, 4, 0, 4, 0]  # columns 0-1, 4-5, 8-9
    merged = torch.randn(1, 2, 8, 12, generator=torch.Generator().manual_seed(0))
    coarse = torch.randn(1, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    pulled = sampler.close_split_blocks(merged, coarse, split, 0.25)
    gap_before, gap_after = coarse - downsample(merged), coarse - downsample(pulled)
    assert torch.allclose(gap_after, gap_before * (1 - 0.25 * split), atol=1e-6)
    moved = pulled - merged
    assert torch.equal(moved[..., 2:4], torch.zeros_like(moved[..., 2:4]))  # a block held whole
    assert torch.allclose(moved[..., 0::2, 0], moved[..., 1::2, 1], atol=1e-6)  # one shift per block
    assert grid.split_blocks() is not None and WindowGrid(8, 12, 4, 4, wrap=True, starts=((0, 4), (0, 4, 8))).split_blocks() is None


def _three_level_grids():
    return [WindowGrid(4, 8, 4, 2, False), WindowGrid(8, 16, 4, 2, False), WindowGrid(16, 32, 4, 2, False)]


@pytest.mark.parametrize("gradient", ["exact", "fast"])
def test_the_coarse_gradient_changes_only_the_second_level_of_an_exact_step(gradient):
    # v0.9's Draft and Standard: the level the coarsest guides takes the refresh gradient (no backward pass) where the
    # step's gradient is exact; the finest keeps the exact one, and nothing changes with two levels or a fast step.
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[2]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)

    def run(grids, coarse_gradient):
        seen, levels = [], {}

        def recording(windows, t):
            seen.append(torch.is_grad_enabled())  # a call the backward pass goes through
            return denoiser(windows, t)

        def record(result):
            levels[result.level] = result.latents
            calls[result.level] = list(seen)
            seen.clear()

        calls = {}
        with torch.no_grad():  # as the pipeline runs it: only the exact gradient turns autograd on
            out = sampler.msd_step(latents, grids, step, recording, 10.0, gradient=gradient,
                                   coarse_gradient=coarse_gradient, view_batch=64, on_level=record)
        return out, levels, calls

    paper, paper_levels, paper_calls = run(_three_level_grids(), None)
    spared, spared_levels, spared_calls = run(_three_level_grids(), "refresh")
    assert torch.equal(spared_levels[1], paper_levels[1])
    if gradient == "fast":
        assert torch.equal(spared, paper) and spared_calls == paper_calls
    else:
        # Level 2: a forward the backward goes through, then a plain one; now two plain forwards (refresh).
        assert paper_calls[2] == [True, False] and spared_calls[2] == [False, False]
        # The finest keeps the exact gradient (its windows in two batches).
        assert spared_calls[3] == paper_calls[3] == [True, False] * 2
        with torch.no_grad():
            refresh = sampler.msd_level_step(sampler.downsample(latents), spared_levels[1], _three_level_grids()[1],
                                             step, denoiser, 10.0, gradient="refresh", view_batch=64)[0]
        assert torch.allclose(spared_levels[2], refresh, atol=1e-12)
        assert not torch.allclose(spared, paper)
    two = _three_level_grids()[1:]
    assert torch.equal(run(two, "refresh")[0], run(two, None)[0])  # the second level is the finest: exact
    assert (sampler.level_gradient(1, 3, "exact", "refresh"), sampler.level_gradient(2, 3, "exact", "refresh")) == (
        "refresh", "exact")


def _solver_steps():
    """One step of each kind the sampler meets: DDIM (ε and v), DPM-Solver++ with and without its memory, and both
    at a coarse level's matched noise."""
    train = sd_ddim_scheduler()
    ddim, dpm = sampler.solver_schedule("ddim", train, 10), sampler.solver_schedule("dpmpp-2m", train, 10)
    matched = [sampler.snr_matched(step, 8, train.alphas_cumprod) for step in (ddim[3], dpm[4])]
    return [(ddim[3], "epsilon", False), (ddim[3], "v_prediction", False), (dpm[0], "epsilon", False),
            (dpm[4], "epsilon", True), (matched[0], "epsilon", False), (matched[1], "v_prediction", True)]


@pytest.mark.parametrize("case", range(6))
def test_every_solver_step_is_affine_in_the_models_x0_with_the_weight_x0_weight_reads(case):
    step, prediction_type, memory = _solver_steps()[case]
    generator = torch.Generator().manual_seed(case)
    sample, one, other, last = (torch.randn(2, 3, 4, 4, generator=generator, dtype=torch.float64) for _ in range(4))
    last = last if memory else None
    weight = sampler.x0_weight(step, prediction_type, memory)
    prev, x0 = step.apply(sample, one, prediction_type, last)
    prev_other, x0_other = step.apply(sample, other, prediction_type, last)
    assert torch.allclose(prev - prev_other, weight * (x0 - x0_other), atol=1e-12)
    if isinstance(step, DDIMTimestep) and prediction_type == "epsilon":  # Φ = √ᾱ' x̂₀ + √(1−ᾱ') ε̂, ε̂ = (x − √ᾱ x̂₀)/√(1−ᾱ)
        a, a_next = step.alpha, step.alpha_prev
        assert weight == pytest.approx(a_next**0.5 - ((1 - a_next) / (1 - a)) ** 0.5 * a**0.5)


def test_pulled_through_x0_with_the_model_held_is_the_papers_held_pull():
    # A model that does not see its input has ∂x̂₀/∂x = c₀·I: the direction through x̂₀ is then dsᵀ of the residual,
    # and at the paper's length it is the fast (held) pull exactly, window by window and channel by channel.
    step = ddim_schedule(sd_ddim_scheduler(), 20)[5]
    generator = torch.Generator().manual_seed(1)
    x, output = (torch.randn(3, 2, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    target = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    prev, _ = ddim_step(x, output, step)
    held = sampler.guided_windows_fast(x, prev, target, step, 14.0, 0.37)
    through_x0 = sampler.guided_windows_exact(x, target, step, lambda windows, t: output, 14.0, 0.37, through="x0")
    assert torch.allclose(through_x0, held, atol=1e-10)
    with pytest.raises(ValueError, match="unknown pull_through 'z'"):
        sampler.guided_windows_exact(x, target, step, lambda windows, t: output, 14.0, 0.37, through="z")


def _blur(latents):
    """A symmetric 3×3 blur (zero beyond the window): a linear operator equal to its transpose."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=latents.dtype) / 16
    channels = latents.shape[1]
    return torch.nn.functional.conv2d(latents, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)


def test_pulled_through_x0_a_blocks_pull_goes_where_the_model_couples_its_pixels():
    # A linear model whose x₀ estimate is a blur of its input: ∂x̂₀/∂x is that blur, so the pull through x̂₀ is the
    # paper's block-wise pull blurred, at the paper's length in each window and channel, and no longer even in a block.
    step = ddim_schedule(sd_ddim_scheduler(), 20)[5]
    alpha, sigma = step.alpha**0.5, (1 - step.alpha) ** 0.5

    def blurring(windows, t):  # the ε whose x₀ estimate is the blur
        return (windows - alpha * _blur(windows)) / sigma

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 8, 8, generator=generator, dtype=torch.float64)
    target = torch.randn(3, 2, 4, 4, generator=generator, dtype=torch.float64)
    prev, _ = ddim_step(x, blurring(x, step.t), step)
    held = x - sampler.guided_windows_fast(x, prev, target, step, 14.0, 0.37)
    pulled = x - sampler.guided_windows_exact(x, target, step, blurring, 14.0, 0.37, through="x0")

    def length(latents):
        return latents.flatten(2).norm(dim=2)

    expected = _blur(held) * (length(held) / length(_blur(held)))[..., None, None]
    assert torch.allclose(pulled, expected, atol=1e-10)
    assert torch.allclose(length(pulled), length(held))
    within = (held - torch.nn.functional.interpolate(downsample(held), scale_factor=2)).abs().max()
    assert within < 1e-12 < (pulled - torch.nn.functional.interpolate(downsample(pulled), scale_factor=2)).abs().max()
    # The paper's direction through Φ differs from both: most of it is the block-wise pull.
    paper = x - sampler.guided_windows_exact(x, target, step, blurring, 14.0, 0.37)
    assert not torch.allclose(paper, pulled, atol=1e-6) and not torch.allclose(paper, held, atol=1e-6)


@pytest.mark.parametrize("gradient", ["exact", "fast"])
def test_pull_through_changes_only_the_finest_levels_exact_direction_at_the_same_model_calls(gradient):
    # Three levels, all exact: the level between keeps the paper's direction (it hands the layout down), the finest
    # takes the one through x̂₀; the fast gradient holds the model, where both are one.
    denoiser = SmoothDenoiser()
    step = ddim_schedule(sd_ddim_scheduler(), 10)[2]
    latents = torch.randn(1, 2, 16, 32, dtype=torch.float64)

    def run(pull_through):
        seen, levels = [], {}

        def recording(windows, t):
            seen.append(torch.is_grad_enabled())
            return denoiser(windows, t)

        with torch.no_grad():
            out = sampler.msd_step(latents, _three_level_grids(), step, recording, 10.0, gradient=gradient,
                                   view_batch=64, pull_through=pull_through,
                                   on_level=lambda result: levels.update({result.level: result.latents}))
        return out, levels, seen

    paper, paper_levels, paper_calls = run("step")
    through_x0, x0_levels, x0_calls = run("x0")
    assert x0_calls == paper_calls  # the same forwards, and the same backwards through them
    assert torch.equal(x0_levels[1], paper_levels[1]) and torch.equal(x0_levels[2], paper_levels[2])
    if gradient == "fast":
        assert torch.equal(through_x0, paper)
    else:
        assert not torch.allclose(through_x0, paper, atol=1e-6)
        assert torch.isfinite(through_x0).all()
