"""Pole caps (msd_core.sampling.sphere): the geometry round-trips, resampling keeps a noisy latent's noise, the caps
make each pole one point, and the pipeline runs them behind --poles sphere."""

import dataclasses
import json
import math

import numpy
import pytest
import torch

from msd_core.sampling import sphere
from msd_core.sampling.plan import cap_size, make_plan
from msd_core.errors import BadInput
from msd_core.settings import GenerationSettings


def test_view_and_equirect_directions_round_trip():
    axes = sphere.axes_for("zenith")
    directions = sphere.view_directions(16, axes)
    rows, cols = sphere.view_coords(directions, 16, axes)
    expected_rows, expected_cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    assert torch.allclose(rows, expected_rows.double(), atol=1e-9) and torch.allclose(cols, expected_cols.double(), atol=1e-9)
    rows, cols = sphere.equirect_coords(sphere.equirect_directions(8, 16), 8, 16)
    assert torch.allclose(rows, torch.arange(8.0).double()[:, None].expand(8, 16), atol=1e-9)
    assert torch.allclose(cols, torch.arange(16.0).double()[None].expand(8, 16), atol=1e-9)
    # Blender's convention: the image's centre faces +X, its top row is near the zenith.
    directions = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    rows, cols = sphere.equirect_coords(directions, 8, 16)
    assert rows.tolist() == pytest.approx([3.5, 3.5, -0.5]) and cols[:2].tolist() == pytest.approx([7.5, 3.5])
    # The view centre looks straight up (down) with +X at the top of the view.
    assert sphere.view_directions(3, axes)[1, 1].tolist() == pytest.approx([0, 0, 1])
    assert sphere.view_directions(3, sphere.axes_for("nadir"))[0, 1, 0] > 0


def test_resampling_keeps_the_noise_of_a_noisy_latent():
    generator = torch.Generator().manual_seed(0)
    height, width = 64, 128
    x0 = torch.nn.functional.avg_pool2d(torch.randn(4, height * 4, width * 4, generator=generator)[None], 4)[0] * 4
    eps = torch.randn(4, height, width, generator=generator)
    alpha = 0.3
    latents = math.sqrt(alpha) * x0 + math.sqrt(1 - alpha) * eps
    projection = sphere.CapProjection(height, width, cap_size(height, 8))
    rows, cols = projection.to_view["zenith"]
    kept = sphere.resample(latents, x0, alpha, rows, cols, wrap=True)
    mixed = sphere.sample_bilinear(latents, rows, cols, wrap=True)
    noise_kept = (kept - math.sqrt(alpha) * sphere.sample_bilinear(x0, rows, cols, True)) / math.sqrt(1 - alpha)
    noise_mixed = (mixed - math.sqrt(alpha) * sphere.sample_bilinear(x0, rows, cols, True)) / math.sqrt(1 - alpha)
    assert float(noise_kept.var()) == pytest.approx(1.0, abs=0.05)
    assert float(noise_mixed.var()) < 0.8  # plain interpolation loses noise: the latent looks less noisy
    # White where the view is not finer than the strip (within 30° of the pole): neighbours uncorrelated.
    centre = noise_kept[:, 12:-12, 12:-12]
    correlation = float((centre[:, :, 1:] * centre[:, :, :-1]).mean() / centre.var())
    assert abs(correlation) < 0.05


def test_caps_make_each_pole_one_point_and_round_trip_inside_the_cap():
    height, width = 32, 64
    projection = sphere.CapProjection(height, width, cap_size(height, 8))
    generator = torch.Generator().manual_seed(1)
    # Views smooth at the scale of a few pixels: a row's circle around the pole is one pixel across.
    smooth = torch.nn.functional.interpolate(torch.randn(2, 4, 4, 4, generator=generator), size=projection.size,
                                             mode="bilinear", align_corners=True)
    views = {pole: (smooth[[index]],) * 2 for index, pole in enumerate(sphere.POLES)}
    strip = torch.randn(1, 4, height, width, generator=generator)
    latents, x0 = projection.blend(strip, strip.clone(), views, alpha=1.0)
    for row in (0, -1):  # the rows nearest the poles: one point each (interpolated at the view's centre)
        assert float(latents[0, :, row].std(dim=-1).max()) < 0.2 * float(strip[0, :, row].std(dim=-1).min())
    middle = slice(int(height * 0.3), int(height * 0.7))  # beyond the caps: the strip's own
    assert torch.equal(latents[..., middle, :], strip[..., middle, :])
    # Projecting a view to the strip and back gives the view near the pole again.
    back = projection.views(latents, x0, 1.0)["zenith"]
    centre = slice(projection.size // 2 - 3, projection.size // 2 + 3)
    assert torch.allclose(back[..., centre, centre], views["zenith"][0][..., centre, centre], atol=0.35)


def test_weights_cover_the_caps_and_fade_out():
    weights = sphere.cap_weights(180)
    assert weights[:30].eq(1).all() and weights[-30:].eq(1).all()  # within 30° of each pole (1° per row)
    assert weights[42:138].eq(0).all()
    assert (weights[30:42].diff() < 0).all()


def test_plan_counts_the_cap_windows_only_for_worlds_with_poles():
    base = GenerationSettings(prompt="p", width=2048, height=1024, window=512, poles="sphere")
    plan = make_plan(base, 8, 512)
    # 2·128/π = 81.5 px would make the view's centre pixel one latent row; the nearest whole number of windows
    # is one, so each cap is one window a step (shifted tiles over 82 px took 4–9), over the last quarter of the steps.
    assert plan.caps == 64 and plan.cap_windows_per_step() == [0] * 18 + [2] * 7
    flat = make_plan(GenerationSettings(prompt="p", width=2048, height=1024, window=512, poles="flat"), 8, 512)
    assert plan.work()["forwards"] == flat.work()["forwards"] + sum(plan.cap_windows_per_step())
    assert plan.describe()["pole_caps"]["size"] == 512 and "pole_caps" not in flat.describe()
    # Standard's UNet work grows by ≤ 25 % (issue 17): 964.68 → 984.68 forward-equivalents.
    assert sum(plan.step_costs()) <= 1.25 * sum(flat.step_costs())
    assert cap_size(256, 64) == 192 and cap_size(32, 8) == 24  # 163 px → 3 windows; 20.4 → 3
    strip = make_plan(GenerationSettings(prompt="p", width=4096, height=1024, window=512, wrap=True, poles="sphere"), 8, 512)
    assert strip.caps == 0  # a 4:1 strip is mapped on a cylinder: no poles


@pytest.fixture(scope="module")
def pipe():
    from msd_core.pipeline import MSDPanoramaPipeline

    return MSDPanoramaPipeline.from_settings(GenerationSettings(prompt="p", model="tiny", device="cpu"))


def counted_unet_windows(pipe):
    """Windows through the UNet's forward (a classifier-free-guidance pair counts once)."""
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, result: calls.append(args[0].shape[0] // 2))
    return calls, handle


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_sphere_poles_make_one_point_at_the_poles_for_the_work_the_plan_counts(pipe, scheduler):
    settings = GenerationSettings(prompt="a valley", width=256, height=128, model="tiny", device="cpu", steps=4,
                                  seed=5, scheduler=scheduler, view_batch=8)
    flat = pipe(dataclasses.replace(settings, poles="flat"))
    calls, handle = counted_unet_windows(pipe)
    try:
        result = pipe(dataclasses.replace(settings, poles="sphere"))
    finally:
        handle.remove()
    assert sum(calls) == result.plan.work()["forwards"] > flat.plan.work()["forwards"]
    # The latent's top and bottom rows: at 16 rows tall the first is 5.6° from the pole and the tiny model's
    # texture changes at every latent pixel, so they are far from one point here (bench/poles.py measures the
    # images at 512×256 and 1024×512), yet clearly less spread than the strip's.
    for row in (0, -1):
        spread = [float(latents[0, :, row].std(dim=-1).mean()) for latents in (result.latents, flat.latents)]
        assert spread[0] < 0.75 * spread[1], spread
    assert torch.isfinite(result.latents).all()
    # The strip runs untouched and the caps are blended over the polar rows at the end: beyond them (42° from
    # either pole) the world is the flat method's, bit for bit, so its layout and seams are too.
    reach = int((sphere.cap_weights(result.plan.height) > 0).sum()) // 2
    assert torch.equal(result.latents[..., reach:-reach, :], flat.latents[..., reach:-reach, :])
    assert not torch.equal(result.latents[..., :reach, :], flat.latents[..., :reach, :])
    assert json.loads(result.metadata["settings"])["poles"] == "sphere"
    assert json.loads(result.metadata["pole_caps"]) == {"size": 64, "windows_per_step": max(result.plan.cap_windows_per_step())}


def test_poles_setting_is_checked():
    with pytest.raises(BadInput, match="unknown poles 'round'; choose one of: sphere, flat"):
        GenerationSettings(prompt="p", poles="round").validate()


def test_caps_keep_the_strips_layout_and_leave_the_strip_alone():
    # A denoiser that draws its own layout (+3 everywhere): the caps' low frequencies are still the strip's,
    # their finest texture their own, and the strip is returned untouched (the caps reach it at the end).
    height, width = 32, 64
    projection = sphere.CapProjection(height, width, cap_size(height, 8))
    generator = torch.Generator().manual_seed(2)
    strip = torch.nn.functional.interpolate(torch.randn(1, 4, 4, 8, generator=generator), size=(height, width),
                                            mode="bilinear")
    from msd_core.sampling.sampler import DDIMTimestep
    from msd_core.sampling.windows import WindowGrid

    step = DDIMTimestep(500, 0.3, 0.4)
    grid = WindowGrid(projection.size, projection.size, 8, 8, False)

    def denoise(windows, t):  # ε that makes x₀ = x/√ᾱ − 3·… : a layout of its own
        return torch.full_like(windows, -3.0)

    before = strip.clone()
    caps = sphere.pole_cap_step(strip, strip, strip, strip, projection, grid, step, denoise)
    assert torch.equal(strip, before)
    for pole, (view, view_x0) in caps.items():
        layout_x0 = sphere.sample_bilinear(strip[0], *projection.to_view[pole], True)[None]
        free = sphere.pole_cap_step(strip, strip, strip, strip, projection, grid, step, denoise,
                                    layout_sigma=0)[pole][1]  # nothing kept: the denoiser's own layout

        def low_gap(image):  # what differs from the strip's view at the scale of a few pixels
            return float(sphere.gaussian_blur(image - layout_x0, 2.0).abs().mean())

        assert low_gap(free) > 3 and low_gap(view_x0) < 0.1 * low_gap(free)
        assert float((view_x0 - layout_x0).abs().mean()) > 0.01  # the finest texture is the cap's own


def test_pole_rows_are_low_passed_the_first_is_one_point_and_the_rest_is_the_views():
    height, width = 64, 128
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(1, 3, height, width, generator=generator)
    size = cap_size(height, 8)
    views = {pole: torch.rand(1, 3, size, size, generator=generator) for pole in sphere.POLES}  # pixel noise
    sharp = sphere.blend_decoded_caps(images, views, pole_rows=0)
    soft = sphere.blend_decoded_caps(images, views)
    for first, second in ((0, 1), (-1, -2)):
        assert float(soft[0, :, first].std(-1).max()) < 1e-6  # one point: Blender's disc there is flat
        assert 0 < float(soft[0, :, second].std(-1).mean()) < 0.5 * float(sharp[0, :, second].std(-1).mean())
    # A gradient across the pole: the point is the pole's value, and the next rows keep the gradient.
    ramp = torch.linspace(-1, 1, size).view(1, 1, 1, size).expand(1, 3, size, size)
    tilted = sphere.blend_decoded_caps(images, {pole: 0.5 + 0.2 * ramp for pole in sphere.POLES})
    for first, second in ((0, 1), (-1, -2)):
        assert torch.allclose(tilted[0, :, first], torch.full_like(tilted[0, :, first], 0.5), atol=1e-5)
        assert float(tilted[0, :, second].std(-1).min()) > 0.01
    rows = slice(sphere.POLE_ROWS, height - sphere.POLE_ROWS)
    assert torch.equal(soft[..., rows, :], sharp[..., rows, :])


def test_a_change_to_the_strip_reaches_the_caps_views():
    projection = sphere.CapProjection(32, 64, cap_size(32, 8))
    views = {pole: (torch.zeros(1, 4, projection.size, projection.size),) * 2 for pole in sphere.POLES}
    change = torch.zeros(1, 4, 32, 64)
    change[:, :, :16] = 1.0  # the northern half moved by one
    moved = projection.shift_views(views, change)
    assert torch.equal(moved["zenith"][0], torch.ones_like(moved["zenith"][0]))  # the whole zenith view is north
    assert torch.equal(moved["nadir"][0], torch.zeros_like(moved["nadir"][0]))
    assert moved["zenith"][1] is views["zenith"][1]  # x₀ left alone, as the strip's is
