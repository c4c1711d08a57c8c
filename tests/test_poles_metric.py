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
