"""The layout benchmark's analytic horizon prior (bench/horizon.py): its denoiser is the exact posterior
mean, the sampler pieces it is built from compose into msd_step, and MSD with it keeps one horizon where
MultiDiffusion does not."""

import dataclasses
import importlib.util
import math
import pathlib
import sys

import pytest
import torch

from msd_core.models.loading import sd_ddim_scheduler
from msd_core.sampling.sampler import ddim_schedule, msd_step, x0_weight

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_horizon():
    spec = importlib.util.spec_from_file_location("bench_horizon", ROOT / "bench" / "horizon.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


horizon = _load_horizon()
sys.path.insert(0, str(ROOT / "bench"))  # priors.py imports horizon by name, as the bench scripts do
import priors  # noqa: E402


def mixture_log_density(prior, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p_t(x) of the noised prior, written out independently: a full multivariate normal per component
    (means and weights from ``components()``, which the fast structured denoisers do not use)."""
    means, log_weights = prior.components()
    assert means.shape[1:] == (prior.window, prior.width)
    assert torch.allclose(log_weights.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    covariance = (alpha * prior.texture**2 + 1 - alpha) * torch.eye(means[0].numel(), dtype=torch.float64)
    component = torch.distributions.MultivariateNormal(
        math.sqrt(alpha) * means.reshape(len(means), -1), covariance_matrix=covariance
    )
    log_probs = component.log_prob(x.reshape(x.shape[0], 1, -1))  # (batch, K)
    return torch.logsumexp(log_probs + log_weights, dim=1)


SMALL_PRIORS = {
    "horizon": lambda: horizon.HorizonPrior(window=4, horizons=range(-1, 6), texture=0.3),
    "sun": lambda: priors.SunPrior(window=4, sizes=(1, 2, 3, 6), empty=0.3),
    "river": lambda: priors.RiverPrior(window=4, widths=(1, 2, 6), empty=0.3),
    "skyline": lambda: priors.SkylinePrior(window=4, heights=range(-1, 6), slopes=(-0.5, 0.0, 1.0)),
}


@pytest.mark.parametrize("name", SMALL_PRIORS)
@pytest.mark.parametrize("alpha", [0.05, 0.5, 0.97])
@pytest.mark.parametrize("shape", ["square", "2:1", "2:1 circular"])
def test_posterior_mean_is_tweedies_formula_on_the_full_mixture(name, alpha, shape):
    # Tweedie: E[x0 | x_t] = (x_t + (1 − ᾱ) ∇ log p_t(x_t)) / √ᾱ, with p_t the exact noised mixture; also for
    # the 2:1 version a wide global window is denoised with (placements along, or around, twice the columns).
    prior = SMALL_PRIORS[name]()
    if shape != "square" and name == "skyline":
        with pytest.raises(NotImplementedError, match="no wider version"):
            prior.widened(2 * prior.window, circular=shape.endswith("circular"))
        return
    if shape != "square":
        prior = prior.widened(2 * prior.window, circular=shape.endswith("circular"))
    generator = torch.Generator().manual_seed(0)
    x0 = prior.sample(64, generator)
    x = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x.requires_grad_(True)
    (score,) = torch.autograd.grad(mixture_log_density(prior, x, alpha).sum(), x)
    expected = (x.detach() + (1 - alpha) * score) / math.sqrt(alpha)
    actual = prior.posterior_mean(x.detach(), alpha)
    assert torch.allclose(actual, expected, atol=1e-9), float((actual - expected).abs().max())
    eps = prior.eps(x.detach(), alpha)
    assert torch.allclose(math.sqrt(alpha) * actual + math.sqrt(1 - alpha) * eps, x.detach(), atol=1e-9)


def test_posterior_mean_beats_neighbouring_estimators_in_squared_error():
    # The posterior mean minimises E‖x0 − f(x_t)‖²: perturbing it (shrinking or sharpening) does worse.
    prior = horizon.HorizonPrior(window=8, horizons=range(-2, 11))
    generator = torch.Generator().manual_seed(1)
    alpha = 0.3
    x0 = prior.sample(4000, generator)
    x = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    estimate = prior.posterior_mean(x, alpha)
    error = (estimate - x0).pow(2).mean()
    for factor in (0.9, 1.1):
        assert (factor * estimate - x0).pow(2).mean() > error
    assert (prior.posterior_mean(x, alpha * 0.8) - x0).pow(2).mean() > error


def test_literal_pyramid_step_is_msd_step():
    prior = horizon.HorizonPrior()
    grids = horizon.make_grids(32, 64, 16, 4, wrap=True)
    step = ddim_schedule(sd_ddim_scheduler(), 20)[5]
    latents = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = horizon.pyramid_step(latents, grids, step, prior, 7.0, noise="literal", gradient="exact")
    reference = msd_step(latents, grids, step, prior.denoiser(), 7.0, gradient="exact", view_batch=64)
    assert torch.allclose(ours, reference, atol=1e-12)
    # The SNR-matched variant changes only the coarse levels' treatment, so it differs.
    assert not torch.allclose(horizon.pyramid_step(latents, grids, step, prior, 7.0, noise="snr"), reference)


@pytest.mark.parametrize("gradient", ["exact", "fast"])
@pytest.mark.parametrize("global_view", [False, True])
def test_msd_cores_matched_coarse_noise_equals_the_benchs_own_snr_step(gradient, global_view):
    """Two independent implementations of SNR-matched coarse levels: the bench rescales ᾱ inside the
    analytic denoiser, msd_core hands the model a fractional timestep and a scaled latent."""
    prior = horizon.HorizonPrior()
    grids = horizon.make_grids(32, 64, 16, 4, wrap=True, global_view=global_view)
    assert len(grids) == (3 if global_view else 2)
    latents = torch.randn(1, 2, 32, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for step in [ddim_schedule(sd_ddim_scheduler(), 20)[index] for index in (0, 5, 12)]:
        bench = horizon.pyramid_step(latents, grids, step, prior, 7.0, noise="snr", gradient=gradient)
        ours = msd_step(latents, grids, step, prior.denoiser(), 7.0, gradient=gradient, view_batch=64,
                        coarse_noise="matched", train_alphas=prior.alphas_cumprod)
        assert torch.allclose(ours, bench, atol=1e-10)
        literal = msd_step(latents, grids, step, prior.denoiser(), 7.0, gradient=gradient, view_batch=64)
        assert (ours - literal).abs().max() > 1e-3


def test_sun_components_are_every_square_that_overlaps_the_window():
    prior = priors.SunPrior(window=4, sizes=(2,), empty=0.25)
    means, log_weights = prior.components()
    assert len(means) == 1 + 5 * 5  # no sun, and 5 row × 5 column placements of a 2-pixel square
    bright = (means > 0).sum((1, 2))
    assert bright[0] == 0 and set(bright[1:].tolist()) == {1, 2, 4}  # clipped at corners, edges, whole
    assert math.isclose(log_weights[0].exp().item(), 0.25)


def test_sun_and_river_scores():
    sky = -torch.ones(16, 40)
    one_sun = sky.clone()
    one_sun[2:8, 37:] = 1.0
    one_sun[2:8, :3] = 1.0  # the same sun, across the 0/360° edge
    assert priors.SunPrior().score(one_sun, wrap=True) == {"coherent": True, "collapsed": False, "objects": 1, "aspect": 1.0}
    assert priors.SunPrior().score(one_sun, wrap=False)["objects"] == 2
    assert priors.SunPrior().score(sky)["collapsed"]
    river = sky.clone()
    river[:, 10:14] = 1.0
    river[5, 30] = 1.0  # a lone texture outlier is no second river
    assert priors.RiverPrior().score(river) == {"coherent": True, "collapsed": False, "runs": 1.0}
    broken = river.clone()
    broken[6:9, 10:14] = -1.0  # the band stops and starts again
    assert not priors.RiverPrior().score(broken)["coherent"]
    shifted = river.clone()
    shifted[8:, 10:14], shifted[8:, 20:24] = -1.0, 1.0  # two pieces that do not touch
    assert not priors.RiverPrior().score(shifted)["coherent"]


def test_a_river_on_a_world_whose_poles_the_caps_draw_is_also_scored_without_the_polar_rows():
    # docs/poles.md: a sphere-correct cap cannot draw a meridian river's wedge in the rows nearest the pole, so the
    # layout table also scores it without the rows within 10° of each pole; a break beyond them still counts.
    import layout
    from msd_core.settings import GenerationSettings

    assert [layout.polar_rows(height) for height in (16, 32, 64, 128)] == [1, 2, 4, 7]
    short_of_the_poles = -torch.ones(32, 64, dtype=torch.float64)
    short_of_the_poles[2:30, 10:14] = 1.0
    broken = short_of_the_poles.clone()
    broken[12:15, 10:14] = -1.0
    images = torch.stack([short_of_the_poles, broken])
    river = priors.RiverPrior()
    assert [river.score(image, True)["coherent"] for image in images] == [False, False]
    world = GenerationSettings(prompt="bench", width=64 * horizon.PRIOR_FACTOR, height=32 * horizon.PRIOR_FACTOR,
                               wrap=True)
    assert world.poles == "sphere" and layout.coherent_on_sphere(river, images, world) == 1
    assert layout.coherent_on_sphere(river, images, dataclasses.replace(world, poles="flat")) is None
    assert layout.coherent_on_sphere(river, images, dataclasses.replace(world, width=world.width * 2)) is None
    assert layout.coherent_on_sphere(priors.SunPrior(), images, world) is None


def test_skyline_components_and_score():
    prior = priors.SkylinePrior()
    rows = torch.arange(16)[:, None]
    # Slope ½ through height 8 at the centre: rows 4 … 11 from the left to the right column.
    tilted = torch.where(rows < torch.round(8 + 0.5 * (torch.arange(16) - 7.5)), 1.0, -1.0).double()
    assert any(torch.equal(mean, tilted) for mean in prior.components()[0])
    assert prior.components()[1].exp().sum().item() == pytest.approx(1.0)
    # A smooth wrapped skyline (up, then down again) is coherent; a jump of two rows is not; nor is a
    # straight tilted one across the 0/360° edge (it jumps back by its whole rise there).
    heights = torch.cat([torch.arange(8, 24), torch.arange(24, 8, -1)])
    smooth = torch.where(torch.arange(40)[:, None] < heights[None, :], 1.0, -1.0)
    assert prior.score(smooth, wrap=True)["coherent"] and prior.score(smooth, wrap=True)["spread"] == 16
    jump = smooth.clone()
    jump[:, 10:] = torch.where(torch.arange(40)[:, None] < heights[None, 10:] + 2, 1.0, -1.0)
    assert not prior.score(jump)["coherent"]
    ramp = torch.where(torch.arange(40)[:, None] < torch.arange(8, 40)[None, :], 1.0, -1.0)
    assert prior.score(ramp)["coherent"] and not prior.score(ramp, wrap=True)["coherent"]
    assert prior.score(torch.ones(16, 32))["collapsed"]


def test_layout_score():
    sky_over_ground = torch.where(torch.arange(32)[:, None] < 12, 1.0, -1.0).expand(32, 48).clone()
    sky_over_ground[20, 5] = 1.0  # a lone texture outlier is not a transition
    score = horizon.score_layout(sky_over_ground)
    assert score.coherent and not score.uniform and score.transitions == 1 and score.horizon_spread == 0
    two_horizons = sky_over_ground.clone()
    two_horizons[24:, :] = 1.0
    assert not horizon.score_layout(two_horizons).coherent
    assert horizon.score_layout(-sky_over_ground).coherent is False  # ground above sky
    assert horizon.score_layout(torch.ones(32, 48)).uniform


@pytest.fixture
def one_thread():
    """Small float64 tensors: one thread is many times faster than two fighting over a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_msd_keeps_one_horizon_where_multidiffusion_does_not(one_thread):
    prior = horizon.HorizonPrior(horizons=range(-1, 18))
    seeds = [0, 1, 2, 3]
    scores = {}
    for name, omega in (("md", 0.0), ("msd", 10.0)):
        images, trajectory = horizon.sample_panoramas(prior, 64, 64, seeds, omega=omega, gradient="fast", steps=20)
        scores[name] = [horizon.score_layout(image) for image in images]
        scores[name + "_gap"] = sum(trajectory.discrepancy) / len(trajectory.discrepancy)
    coherent = {name: sum(s.coherent for s in scores[name]) for name in ("md", "msd")}
    transitions = {name: sum(s.transitions for s in scores[name]) / len(seeds) for name in ("md", "msd")}
    assert coherent["msd"] >= 3 > coherent["md"], coherent
    assert transitions["md"] > 1.5 and abs(transitions["msd"] - 1) < 0.25, transitions
    assert scores["msd_gap"] < scores["md_gap"] / 2  # the levels agree along the whole trajectory


def test_window_seam_ratio_compares_tile_edges_with_pairs_of_the_same_parity():
    from common import window_seam_ratio
    from msd_core.sampling.windows import WindowGrid

    grid = WindowGrid(32, 32, 8, 8, starts=((0, 8, 16, 24), (0, 8, 16, 24)))
    rows, columns = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
    # Content that changes more at every even row (as content following 2×2 blocks does): no seam.
    blocky = (torch.where(rows % 2 == 0, rows, rows - 0.5) + 0.1 * columns)[None]
    assert window_seam_ratio(blocky, grid)["rows"] > 1.5  # tile edges (even) against every other pair
    assert window_seam_ratio(blocky, grid, multiple=2)["rows"] == pytest.approx(1.0)
    # A real seam: a jump at the tile edges only.
    seam = blocky + 3 * (rows // 8)[None]
    assert window_seam_ratio(seam, grid, multiple=2)["rows"] > 2


@pytest.mark.parametrize("circular", [False, True])
def test_widened_priors_place_their_objects_along_the_wider_columns(circular):
    sun = priors.SunPrior(window=4, sizes=(2,), empty=0.25)
    wide = sun.widened(8, circular)
    means, log_weights = wide.components()
    columns = 8 if circular else 9  # placements of a 2-pixel side along 8 columns: around them, or overlapping them
    assert means.shape == (1 + 5 * columns, 4, 8) and math.isclose(log_weights.exp().sum().item(), 1.0)
    across = ((means[:, :, 0] > 0).any(1) & (means[:, :, -1] > 0).any(1)).sum().item()
    assert across == (5 if circular else 0)  # suns that cross the 0/360° edge: one column placement × 5 rows
    river = priors.RiverPrior(window=4, widths=(2,)).widened(8, circular)
    assert river.components()[0].shape[1:] == (4, 8)
    # The denoiser hands each window to the prior of its width; an unknown width is an error, not a guess.
    denoise = sun.denoiser()
    x = torch.randn(3, 1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(denoise(x, 500), wide.eps(x, horizon.alpha_at(sun.alphas_cumprod, 500)))
    assert denoise(x[..., :4], 500).shape == (3, 1, 4, 4)
    assert sun.work["forwards"] == 3 * 2 + 3  # a 2:1 window is two windows' work
    with pytest.raises(ValueError, match="no 4×12 version"):
        denoise(torch.zeros(1, 1, 4, 12, dtype=torch.float64), 500)


def test_window_seam_ratio_within_class_ignores_a_boundary_on_an_edge_but_not_a_texture_seam():
    from common import window_seam_ratio
    from msd_core.sampling.windows import WindowGrid

    grid = WindowGrid(32, 32, 8, 8, starts=((0, 8, 16, 24), (0, 8, 16, 24)))
    texture = 0.3 * torch.randn(6, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = torch.arange(32)[:, None]
    # Sky (+1) above ground (−1), the horizon on a tile edge (row 16) in every panorama: a boundary, not a seam.
    horizon = torch.where(rows < 16, 1.0, -1.0).double() + texture
    assert window_seam_ratio(horizon, grid, multiple=2)["rows"] > 2
    assert window_seam_ratio(horizon, grid, multiple=2, within_class=True)["rows"] == pytest.approx(1.0, abs=0.15)
    # The texture shifted tile by tile: a seam inside each class too.
    seam = horizon + 0.8 * (rows // 8 % 2)
    assert window_seam_ratio(seam, grid, multiple=2, within_class=True)["rows"] > 2



def test_a_rolled_global_level_leaves_no_0_360_seam_where_the_fixed_one_cuts_the_world(one_thread):
    # The river prior on the 360° world's shape (32×64 wrap: a 16×16 global level), Draft: the fixed global window's
    # two borders meet at 0/360°, so its rivers' banks pile up there; rolled, the edge looks like any other column.
    from msd_core.settings import QUALITY, GenerationSettings

    world = GenerationSettings(prompt="bench", width=512, height=256, **QUALITY["draft"][0])
    seams = {}
    for move in ("fixed", "roll"):
        top = []
        images, plan = horizon.sample_with_settings(
            priors.RiverPrior(), dataclasses.replace(world, global_move=move), list(range(72)),
            on_step=lambda index, levels: top.append(levels[0].latents[0]) if len(levels) == 3 else None)
        assert plan.level_shape(0) == (16, 16) and plan.roll == (move == "roll")
        seams[move] = (horizon.seam_ratio(top[-1]), horizon.seam_ratio(images))
    assert min(seams["fixed"]) > 2, seams  # the global level's and the panorama's (72 seeds: 2.9 and 2.5)
    assert max(seams["roll"]) < 1.6, seams  # 1.25 and 1.47


# ------------------------------------------------------------------ detail: band powers and block edges (spectrum.py)
import spectrum  # noqa: E402


def test_band_power_reads_a_fields_spectral_slope_and_a_blurs_missing_high_bands():
    generator = torch.Generator().manual_seed(0)
    slopes = {exponent: spectrum.spectral_slope(spectrum.band_power(
        priors.GaussianPrior(texture=0.05, exponent=exponent).sample(2000, generator), 16)) for exponent in (2.0, 4.0)}
    assert slopes[2.0] == pytest.approx(-2.0, abs=0.25) and slopes[4.0] == pytest.approx(-4.0, abs=0.3), slopes
    white = torch.randn(500, 32, 32, generator=generator, dtype=torch.float64)
    flat = spectrum.band_power(white, 16)
    # Unit power per band (ring 1 loses a little to each crop's mean, removed after the taper).
    assert flat.shape == (8,) and torch.allclose(flat[1:], torch.ones(7, dtype=torch.float64), atol=0.05) and flat[0] > 0.85, flat
    blurred = spectrum.band_power(torch.nn.functional.avg_pool2d(white[:, None], 3, 1, 1)[:, 0], 16) / flat
    assert blurred[0] > 0.7 and (blurred[4:] < 0.05).all(), blurred  # a 3×3 box keeps the low bands only
    with pytest.raises(ValueError, match="smaller than a 16×16 patch"):
        spectrum.band_power(white[:, :8], 16)


def test_block_edge_ratio_shows_a_nearest_upsampled_level_on_its_own_grid_only():
    generator = torch.Generator().manual_seed(1)
    white = torch.randn(200, 32, 32, generator=generator, dtype=torch.float64)
    assert spectrum.block_edge_ratio(white, (2, 2)) == pytest.approx(1.0, abs=0.02)
    blocks = torch.nn.functional.interpolate(white[:, None, ::2, ::2], scale_factor=2, mode="nearest")[:, 0] + 0.3 * white
    assert spectrum.block_edge_ratio(blocks, (2, 2)) > 3
    assert spectrum.block_edge_ratio(blocks, (1, 2)) > 3  # columns only
    assert spectrum.block_edge_ratio(blocks.roll((1, 1), (-2, -1)), (2, 2)) < 0.5  # its edges now fall within blocks
    with pytest.raises(ValueError, match="no edges"):
        spectrum.block_edge_ratio(white, (1, 1))


def test_the_power_law_gaussian_prior_is_stationary_and_its_denoiser_the_posterior_mean():
    prior = priors.GaussianPrior(texture=0.1, exponent=2.0)
    assert torch.allclose(prior.covariance, prior.covariance.T) and prior.eigenvalues.min() > 0
    assert torch.allclose(prior.covariance.diagonal(), torch.full((256,), 1.01, dtype=torch.float64))  # 1 + texture²
    # Stationary and isotropic: the same covariance one pixel right or one pixel down, anywhere in the window.
    pixel = lambda row, column: row * 16 + column  # noqa: E731
    right = torch.stack([prior.covariance[pixel(r, c), pixel(r, c + 1)] for r in range(16) for c in range(15)])
    down = torch.stack([prior.covariance[pixel(r, c), pixel(r + 1, c)] for r in range(15) for c in range(16)])
    assert torch.allclose(right, right[0].expand_as(right)) and torch.allclose(down, right[0].expand_as(down))
    assert 0.5 < right[0] < 1.0  # neighbours correlate, as in a natural image
    x, alpha = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 0.3
    expected = math.sqrt(alpha) * prior.covariance @ torch.linalg.solve(
        alpha * prior.covariance + (1 - alpha) * torch.eye(256, dtype=torch.float64), x.flatten(1).T)
    assert torch.allclose(prior.posterior_mean(x, alpha), expected.T.view(3, 16, 16))


def test_the_detail_measure_tells_a_deterministic_late_join_from_every_level_and_the_stochastic_join_keeps_the_detail(one_thread):
    # A 1/f² Gaussian prior (its exact denoiser is linear: the sampler alone sets the output's spectrum), Draft, 64×64.
    # Every level from the first step keeps each band within 25 % of the prior's (the Draft solver's own loss: one
    # window alone ends at 0.72 of it in ring 8) and the 2×2 blocks faint. The finest level joining after 60 % of the
    # steps refines the level above's upsampled state: stepped deterministically (v0.6) it ends short in the high bands,
    # its blocks showing (48 seeds: 0.89–0.93 of every level's in rings 3–8; block edges 1.09 → 1.24; docs/layout.md
    # 6.7); its stochastic join gives the bands back and most of the blocks' edges (docs/layout.md 6.8).
    from msd_core.settings import QUALITY, GenerationSettings

    prior = priors.GaussianPrior(texture=0.1, exponent=2.0)
    reference = spectrum.band_power(prior.sample(2000, torch.Generator().manual_seed(0)), 16)
    world = GenerationSettings(prompt="bench", width=512, height=512, wrap=False,  # v0.7's Draft, where 6.7-6.8 measured
                               **{**QUALITY["draft"][0], "omega": 10.0, "tile_starts": "even"})
    bands, edges = {}, {}
    for fine_start, join in ((0.0, "stochastic"), (0.6, "deterministic"), (0.6, "stochastic")):
        images, plan = horizon.sample_with_settings(
            prior, dataclasses.replace(world, fine_start=fine_start, fine_join=join), list(range(8)))
        assert plan.levels == 3 and plan.level_starts == ((0, 0, 9) if fine_start else ())
        assert plan.stochastic_at(9) == (fine_start > 0 and join == "stochastic") and not plan.stochastic_at(8)
        bands[join, fine_start] = spectrum.band_power(images, 16)
        edges[join, fine_start] = spectrum.block_edge_ratio(images, (2, 2))
    every, held, joined = ("stochastic", 0.0), ("deterministic", 0.6), ("stochastic", 0.6)
    assert ((bands[every] / reference - 1).abs() < 0.25).all() and edges[every] < 1.15, (bands[every] / reference, edges)
    assert (bands[held][2:] / bands[every][2:] < 0.96).all() and edges[held] > edges[every] + 0.08, (bands, edges)
    assert ((bands[joined][2:] / bands[every][2:] - 1).abs() < 0.06).all(), bands
    assert edges[every] < edges[joined] < edges[held] - 0.05, edges


def test_the_fine_start_screen_samples_the_landed_setting_as_the_bench_does(one_thread):
    # bench/fine_start_screen.py keeps its own copy of the sampling loop (for knobs the sampler lacks); its landed
    # setting (staged, 0.6) must stay the bench's --fine-start 0.6 with v0.6's deterministic join bit for bit: a 360°
    # world (rolled global level, drawn start, pole caps) and a 4:1 strip.
    import fine_start_screen

    from msd_core.settings import QUALITY, GenerationSettings

    for name, (height, width, wrap) in (("sun", (32, 64, True)), ("river", (32, 128, False))):
        prior = priors.SunPrior() if name == "sun" else priors.RiverPrior()
        settings = GenerationSettings(prompt="bench", width=width * horizon.PRIOR_FACTOR,
                                      height=height * horizon.PRIOR_FACTOR, wrap=wrap,
                                      **{**QUALITY["standard"][0], "steps": 10, "fine_steps": "deterministic"})  # v0.10's
        screened, plan = fine_start_screen.sample(prior, settings, [0, 1], fine_start=0.6, staged=True)
        landed, _ = horizon.sample_with_settings(
            prior, dataclasses.replace(settings, fine_start=0.6, fine_join="deterministic"), [0, 1])
        assert plan.start_steps > 0 and (plan.caps > 0) == wrap
        assert torch.equal(screened, landed), name


def test_a_paired_global_level_adds_its_twin_half_a_turn_on_and_the_plan_counts_it(one_thread):
    # Screened and not taken (docs/layout.md section 7), bench only: the global level of a 360° world as two windows
    # half a turn apart, so every column lies away from one window's edge (its cut is the middle of its twin).
    from msd_core.sampling.plan import make_plan
    from msd_core.sampling.windows import feathered_weights
    from msd_core.settings import QUALITY, GenerationSettings

    assert horizon.paired_starts([3], 16) == [3, 11] and horizon.paired_starts([12], 16) == [4, 12]
    assert horizon.paired_starts([0, 8], 16) == [0, 4, 8, 12]  # two tiles: each twin halfway between them
    world = GenerationSettings(prompt="bench", width=512, height=256, **QUALITY["draft"][0])
    rolled = make_plan(world, horizon.PRIOR_FACTOR, 16 * horizon.PRIOR_FACTOR)
    paired = horizon.PairedPlan.of(rolled, 4)
    assert rolled.level_shape(0) == (16, 16) and rolled.start_steps == 3
    for index in range(-rolled.start_steps, rolled.steps):  # the drawn start's steps, then the run's
        (rows, columns), *finer = rolled.starts_at(index)
        assert paired.starts_at(index) == [(rows, horizon.paired_starts(columns, 16) if index < 4 else columns), *finer]
    assert paired.start_starts() == [(rows, horizon.paired_starts(columns, 16)) for rows, columns in rolled.start_starts()]
    with pytest.raises(ValueError, match="one window to pair"):
        horizon.PairedPlan.of(make_plan(dataclasses.replace(world, wrap=False), horizon.PRIOR_FACTOR, 128), 4)
    # Feathered, a twin's weights add up to the same in every column: each counts by its distance from its own cut.
    ramp = feathered_weights((1, 16))[0]
    assert torch.allclose(ramp + ramp.roll(8), torch.full((16,), float(ramp.max() + ramp.min())))
    # The plan counts the twin, one window forward more at each paired step and the drawn start's, as the prior
    # measures the work it does (one forward per window denoised, a backward per differentiated one).
    for pair, twins in ((None, 0), ({"weights": "feathered", "steps": 4}, 4 + 3)):
        prior = priors.RiverPrior()
        _, used = horizon.sample_with_settings(prior, world, [0, 1], pair=pair)
        assert used.work() == prior.work
        assert used.work()["forwards"] == rolled.work()["forwards"] + twins


def test_the_trained_prior_is_a_learned_denoiser_of_dead_leaves_images_that_the_bench_can_sample_with(one_thread):
    # bench/trained_prior.py (docs/layout.md 6.8): the data are dead leaves (flat discs over each other: most
    # neighbouring pixels equal, unit variance, no preferred 2×2 grid); the stored weights load into the network
    # exactly and predict the noise far better than chance at every noise level; the bench's interface denoises each
    # stacked seed (channel) on its own.
    import trained_prior

    images = trained_prior.dead_leaves(2000, torch.Generator().manual_seed(3))
    assert images.shape == (2000, 16, 16) and 0.9 < float(images.std()) < 1.1
    assert float((images[:, :, 1:] == images[:, :, :-1]).float().mean()) > 0.6
    assert 0.95 < spectrum.block_edge_ratio(images.double(), (2, 2)) < 1.06
    prior = trained_prior.TrainedPrior.stored()
    denoise, alphas = prior.denoiser(), prior.alphas_cumprod
    generator = torch.Generator().manual_seed(4)
    for t, bound in ((100, 0.45), (500, 0.25), (900, 0.05)):
        clean = trained_prior.dead_leaves(64, generator).double()[None]  # 64 seeds as channels of one window
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            predicted = denoise(alphas[t].sqrt() * clean + (1 - alphas[t]).sqrt() * noise, t)
        assert float((predicted - noise).pow(2).mean()) < bound, t  # chance: 1
    with torch.no_grad():
        together = denoise(clean[:, :3], 500)
        alone = torch.cat([denoise(clean[:, index:index + 1], 500) for index in range(3)], 1)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_the_presets_stronger_pull_keeps_one_sun_more_often_than_v07s_with_fewer_block_edges(one_thread):
    # docs/layout.md 6.10: Draft and Standard pull with ω 14 and start the finer levels' tiles anywhere. On the sun
    # prior at 64×64 (4×4 windows; 72 seeds: 12 → 21 coherent) the finest level's windows add fewer extra suns than
    # with v0.7's ω 10 on the 2×2 grid, and on the 1/f² Gaussian prior the 2×2 block edges do not rise.
    from msd_core.settings import QUALITY, GenerationSettings

    v07 = {"omega": 10.0, "tile_starts": "even"}
    sun = priors.SunPrior()
    world = GenerationSettings(prompt="bench", width=32 * horizon.PRIOR_FACTOR, height=32 * horizon.PRIOR_FACTOR,
                               wrap=False, **QUALITY["standard"][0])
    suns = {}
    for name, changes in (("v0.7", v07), ("v0.8", {})):
        images, plan = horizon.sample_with_settings(sun, dataclasses.replace(world, **changes), list(range(12)))
        assert (plan.tile_starts, plan.levels) == (changes.get("tile_starts", "any"), 3)
        suns[name] = [sun.score(image)["objects"] for image in images]
    assert sum(suns["v0.8"]) < 0.85 * sum(suns["v0.7"]), suns
    assert sum(n == 1 for n in suns["v0.8"]) > sum(n == 1 for n in suns["v0.7"]), suns
    gaussian = priors.GaussianPrior(texture=0.1, exponent=2.0)
    field = dataclasses.replace(world, width=64 * horizon.PRIOR_FACTOR, height=64 * horizon.PRIOR_FACTOR)
    edges = {name: spectrum.block_edge_ratio(horizon.sample_with_settings(
        gaussian, dataclasses.replace(field, **changes), list(range(8)))[0], (2, 2)) for name, changes in
        (("v0.7", v07), ("v0.8", {}))}
    assert edges["v0.8"] < edges["v0.7"] + 0.005, edges


def test_the_bilinear_pull_spread_moves_a_blocks_mean_without_a_block_edge_and_puts_the_sampler_back():
    # bench/pull_spread.py (docs/layout.md 6.15, screened): the pull's dsᵀ replaced by a bilinear spread, in the
    # fast gradient's closed form and in the exact gradient's backward pass alike.
    import pull_spread
    from msd_core.sampling import sampler

    original = sampler.downsample, sampler.downsample_transpose
    step = ddim_schedule(sd_ddim_scheduler(), 10)[3]
    window = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    target = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    target[..., 1, 1] = 1.0  # the level above is brighter in one block

    def pulls():
        fast = sampler.guided_windows_fast(window, window, target, step, 1.0, 1.0)
        exact = sampler.guided_windows_exact(window, target, step, lambda x, t: torch.zeros_like(x), 1.0, 1.0)
        return fast, exact

    block = pulls()
    with pull_spread.bilinear_spread():
        bilinear = pulls()
    assert (sampler.downsample, sampler.downsample_transpose) == original
    for spread in (block, bilinear):
        torch.testing.assert_close(spread[1], spread[0])  # the model held constant: both gradients agree
    moved_block, moved_bilinear = block[0][0, 0], bilinear[0][0, 0]
    assert float(moved_block.sum()) == pytest.approx(float(moved_bilinear.sum()))  # the same total pull
    assert float(moved_block[2:4, 2:4].mean()) > float(moved_bilinear[2:4, 2:4].mean()) > 0  # less of it in its block
    edge = lambda moved: float((moved[2:4, 3] - moved[2:4, 4]).abs().max())  # across the block's right edge
    assert edge(moved_bilinear) < 0.5 * edge(moved_block)


def test_dilated_views_see_every_kth_pixel_and_move_x0_by_their_weight():
    # bench/dilated_views.py (docs/layout.md 6.18, screened): the views' geometry, the x₀ they read and the mix.
    import dilated_views

    assert dilated_views.dilation_stride(64, 128, 16) == 4 and dilated_views.dilation_stride(24, 64, 16) == 1
    views = dilated_views.dilated_grids(34, 64, 4, 8, wrap=True)
    assert [(a, b) for a, b, _ in views] == [(a, b) for a in range(4) for b in range(4)]
    assert sum(grid.height * grid.width for _, _, grid in views) == 34 * 64  # every pixel in exactly one view
    assert {grid.height for _, _, grid in views} == {9, 8} and all(grid.wrap for _, _, grid in views)
    assert not any(grid.wrap for _, _, grid in dilated_views.dilated_grids(32, 66, 4, 8, wrap=True))  # 66 % 4
    with pytest.raises(ValueError, match="stride must be ≥ 2"):
        dilated_views.dilated_grids(32, 64, 1, 8, wrap=False)

    # A denoiser whose ε is its window's mean: a pixel's x₀ tells which pixels its window held.
    step = ddim_schedule(sd_ddim_scheduler(), 10)[3]
    alpha_bar = float(sd_ddim_scheduler().alphas_cumprod[int(step.t)])
    latents = torch.randn(2, 3, 16, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = dilated_views.dilated_x0(latents, 2, 8, False, step, lambda x, t: x.mean((-2, -1), keepdim=True).expand_as(x),
                                  view_batch=3)
    for a, b, left in ((0, 0, 0), (1, 0, 8), (1, 1, 0)):
        view = latents[..., a::2, b::2][..., left:left + 8]  # one 8×8 tile of the view: every other pixel
        expected = (view - math.sqrt(1 - alpha_bar) * view.mean((-2, -1), keepdim=True)) / math.sqrt(alpha_bar)
        torch.testing.assert_close(x0[..., a::2, b::2][..., left:left + 8], expected)

    prev, estimate, whole = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    whole[..., 0, 0], whole[..., 1, 1] = 8.0, 0.5
    moved_prev, moved = dilated_views.mix_dilated(prev, estimate, whole, 0.25, step)
    torch.testing.assert_close(moved, 0.25 * whole)
    torch.testing.assert_close(moved_prev, 0.25 * whole * x0_weight(step))
    _, vetoed = dilated_views.mix_dilated(prev, estimate, whole, 1.0, step, shrink=1.0)
    rms = float(whole.pow(2).mean().sqrt())
    assert float(vetoed[..., 0, 0]) == pytest.approx(8.0 - rms) and float(vetoed.abs().sum()) == float(vetoed[..., 0, 0])


def test_dilated_views_leave_fewer_extra_suns_and_put_the_sampling_loop_back(one_thread):
    # docs/layout.md 6.18: on the sun prior at 64×64 (32×32 in its 8 px windows: views of every 4th pixel), the views
    # remove over a quarter of its suns (72 seeds: 2.14 → 1.51 per panorama); at weight 0 nothing changes.
    import dilated_views
    from msd_core.settings import QUALITY, GenerationSettings

    sample, step_function = dilated_views.horizon.sample_with_settings, dilated_views.horizon.msd_step
    sun = priors.SunPrior()
    world = GenerationSettings(prompt="bench", width=32 * horizon.PRIOR_FACTOR, height=32 * horizon.PRIOR_FACTOR,
                               wrap=False, **QUALITY["standard"][0])
    seeds = list(range(24))
    plain, _ = sample(sun, world, seeds)
    runs = {}
    for weight in (0.0, 0.5):
        dilated_views.WORK["forwards"] = 0
        with dilated_views.dilated_views(weight, "exact"):
            runs[weight], _ = dilated_views.horizon.sample_with_settings(sun, world, seeds)
        assert dilated_views.horizon.sample_with_settings is sample and dilated_views.horizon.msd_step is step_function
        assert dilated_views.WORK["forwards"] == 16 * 18  # 16 views of one window, the 18 exact steps of 25
    torch.testing.assert_close(runs[0.0], plain)
    suns = {name: sum(sun.score(image)["objects"] for image in images) for name, images in
            (("plain", plain), ("views", runs[0.5]))}
    assert suns["views"] < 0.8 * suns["plain"], suns
