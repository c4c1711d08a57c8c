"""The poles metric (bench/poles.py): ~1 on a sphere-correct image, a pinch on a flat strip, and a flat-filled
cap has no detail."""

import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
import poles  # noqa: E402

HEIGHT = 128


@pytest.fixture(scope="module")
def sphere_image():
    return poles.sphere_noise(HEIGHT, 2 * HEIGHT, wavelength_rows=8, seed=1)


def test_a_sphere_correct_image_reads_about_one(sphere_image):
    metric = poles.pole_metric(sphere_image)
    for pole in ("zenith", "nadir"):
        assert 0.85 <= metric[pole]["isotropy"] <= 1.15, metric
        assert 0.85 <= metric[pole]["detail"] <= 1.15, metric
        # The top row is a circle one row across around the pole: a wave 8 rows long varies a little on it.
        assert metric[pole]["row_spread"] < 0.35, metric


def test_a_flat_strip_reads_as_a_pinch():
    metric = poles.pole_metric(poles.strip_noise(HEIGHT, 2 * HEIGHT, wavelength_rows=8, seed=1))
    for pole in ("zenith", "nadir"):
        assert metric[pole]["isotropy"] > 1.4, metric  # squeezed across the radii near the pole
        assert metric[pole]["detail"] > 1.15, metric
        assert metric[pole]["row_spread"] > 0.8, metric  # the top row varies like the whole image


def test_a_flat_filled_cap_has_no_detail(sphere_image):
    filled = sphere_image.copy()
    filled[: HEIGHT // 4] = filled[: HEIGHT // 4].mean(axis=(0, 1))
    metric = poles.pole_metric(filled)
    assert metric["zenith"]["detail"] < 0.5 and metric["zenith"]["row_spread"] == pytest.approx(0, abs=1e-9)
    assert metric["nadir"]["detail"] > 0.85  # the other pole is untouched


def test_view_energy_undoes_the_perspective_stretch():
    # A view of a sphere-correct image looking anywhere measures the same per radian, whatever its size.
    image = poles.sphere_noise(HEIGHT, 2 * HEIGHT, wavelength_rows=8, seed=2)
    small = poles.view_energy(poles.render_view(image, poles.horizon_frame(1.0), 64))["total"]
    large = poles.view_energy(poles.render_view(image, poles.horizon_frame(1.0), 128))["total"]
    assert math.sqrt(large / small) == pytest.approx(1, abs=0.1)


def test_views_follow_blenders_equirectangular_mapping():
    # Blender: the image's centre column faces +X; the top row is the zenith.
    image = np.zeros((64, 128, 1))
    image[:, 64 - 8: 64 + 8] = 1  # a band around the centre column
    ahead = poles.render_view(image, poles.horizon_frame(0.0), 32)
    behind = poles.render_view(image, poles.horizon_frame(math.pi), 32)
    assert ahead[16, 16, 0] == 1 and behind[16, 16, 0] == 0
    image = np.zeros((64, 128, 1))
    image[:4] = 1
    assert poles.render_view(image, poles.ZENITH, 32)[16, 16, 0] == 1
    assert poles.render_view(image, poles.NADIR, 32)[16, 16, 0] == 0


def test_the_equator_reference_predicts_a_sphere_correct_images_pole_rows():
    # On a sphere every point is a pole: the row spread a pole reads is one draw of what the equator's points
    # read (no pole-row low-pass here, so none in the reference); a flat strip's poles read far above it.
    spreads, references = [], []
    for seed in range(1, 5):
        image = poles.sphere_noise(HEIGHT, 2 * HEIGHT, wavelength_rows=8, seed=seed)
        metric = poles.pole_metric(image)
        spreads += [metric[pole]["row_spread"] for pole in ("zenith", "nadir")]
        references.append(poles.equator_row_spread(image, blur_rows=0)["rms"])
    assert math.sqrt(np.mean(np.square(spreads))) / np.mean(references) == pytest.approx(1, abs=0.25)
    strip = poles.strip_noise(HEIGHT, 2 * HEIGHT, wavelength_rows=8, seed=1)
    assert poles.pole_metric(strip)["zenith"]["row_spread"] > 4 * poles.equator_row_spread(strip, blur_rows=0)["rms"]
    # The low-pass the caps' pole rows get lowers the reference as it lowers the poles' rows.
    blurred = poles.equator_row_spread(image)
    assert blurred["rms"] < 0.8 * references[-1] and 0 <= blurred["over"] <= 1 and blurred["p90"] > 0


def test_window_seams_beyond_the_caps_ignore_smoother_polar_rows_and_find_a_real_seam():
    import torch

    from msd_core.sampling.sphere import cap_weights
    from msd_core.sampling.windows import WindowGrid

    height, width = 32, 64
    grid = WindowGrid(height, width, 16, 8, True)  # row edges every 8 rows: 8, 16, 24 lie beyond the caps
    weights = cap_weights(height)
    images = torch.randn(8, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = poles.seam_rows_beyond_caps(images, grid, 2, weights)
    smooth_caps = images.clone()
    smooth_caps[:, weights > 0] *= 0.3  # the caps' rows: smaller differences between neighbours
    from common import window_seam_ratio

    assert window_seam_ratio(smooth_caps, grid, 2)["rows"] > 1.3 * window_seam_ratio(images, grid, 2)["rows"]
    assert poles.seam_rows_beyond_caps(smooth_caps, grid, 2, weights) == pytest.approx(plain)
    seam = images.clone()
    seam[:, 16:] += 6.0  # a step at the edge on row 16
    assert poles.seam_rows_beyond_caps(seam, grid, 2, weights) > 1.5 * plain


def test_the_360_seam_by_band_finds_a_seam_in_the_caps_rows_only_there():
    import torch

    from msd_core.sampling.sphere import cap_weights

    height, width = 32, 64
    weights = cap_weights(height)
    images = torch.randn(64, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    images[:, weights > 0] += torch.linspace(0, 4, width, dtype=torch.float64)  # jumps back by 4 at 0/360°
    bands = poles.seam_360_by_band(images, weights)
    assert bands["caps"] > 2.5 and bands["beyond"] == pytest.approx(1, abs=0.1)
    assert poles.polar_rows_left_out(images).shape == (64, height - 4, width)


def test_pair_ratios_in_caps_tell_a_0_360_seam_from_the_other_longitudes():
    import torch

    from msd_core.sampling.sphere import cap_weights

    height, width = 32, 64
    weights = cap_weights(height)
    images = torch.randn(64, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    even = poles.pair_ratios_in_caps(images, weights)
    assert all(value == pytest.approx(1, abs=0.12) for value in even.values()), even
    images[:, weights > 0] += torch.linspace(0, 4, width, dtype=torch.float64)  # jumps back by 4 at 0/360° only
    seam = poles.pair_ratios_in_caps(images, weights)
    assert seam["0°"] > 2 and all(seam[k] < 1.2 for k in seam if k != "0°"), seam
