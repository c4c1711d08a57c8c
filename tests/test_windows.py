"""Window grids: coverage, wrap-around, coarse alignment, crop/merge, downsampling."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msd_core.windows import WindowGrid, downsample, downsample_transpose, feathered_weights, window_starts


@settings(max_examples=200, deadline=None)
@given(
    window=st.integers(1, 24),
    extra=st.integers(0, 80),
    stride_fraction=st.floats(0.01, 1.0),
    wrap=st.booleans(),
)
def test_window_starts_cover_every_position(window, extra, stride_fraction, wrap):
    length = window + extra
    stride = max(1, int(window * stride_fraction))
    starts = window_starts(length, window, stride, wrap)
    covered = torch.zeros(length, dtype=torch.int)
    for start in starts:
        covered[(torch.arange(window) + start) % length] += 1
    assert (covered > 0).all()
    assert starts == sorted(set(starts))
    if not wrap:
        assert starts[0] == 0 and starts[-1] == length - window  # snapped to the edge, nothing left over
        assert all(start + window <= length for start in starts)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 40), w=st.integers(8, 60), window=st.integers(2, 8), stride=st.integers(1, 8), wrap=st.booleans())
def test_merge_of_crops_is_identity_and_covers_all(h, w, window, stride, wrap):
    stride = min(stride, window)
    grid = WindowGrid(h, w, window, stride, wrap)
    latents = torch.randn(1, 3, h, w)
    assert torch.allclose(grid.merge(grid.crop(latents)), latents, atol=1e-6)
    assert torch.allclose(grid.merge(grid.crop(latents), feathered_weights(window)), latents, atol=1e-5)


def test_crop_matches_slices_and_wrap_windows_cross_the_edge():
    latents = torch.arange(2 * 6 * 20, dtype=torch.float32).view(1, 2, 6, 20)
    grid = WindowGrid(6, 20, window=4, stride=2, wrap=True)
    crops = grid.crop(latents)
    assert crops.shape == (len(grid), 2, 4, 4)
    crossing = [i for i, (_, left) in enumerate(grid.offsets) if left + 4 > 20]
    assert crossing, "a wrapping grid must have windows that cross the right edge"
    top, left = grid.offsets[crossing[0]]
    expected = torch.cat([latents[0, :, top:top + 4, left:], latents[0, :, top:top + 4, : left + 4 - 20]], dim=-1)
    assert torch.equal(crops[crossing[0]], expected)
    plain = WindowGrid(6, 20, window=4, stride=3, wrap=False)
    for crop, (top, left) in zip(plain.crop(latents), plain.offsets):
        assert torch.equal(crop, latents[0, :, top:top + 4, left:left + 4])


def test_wrap_merge_averages_across_the_seam():
    grid = WindowGrid(4, 8, window=4, stride=2, wrap=True)
    windows = torch.zeros(len(grid), 1, 4, 4)
    windows[-1] = 1.0  # the last window starts at column 6 and covers columns 6, 7, 0, 1
    merged = grid.merge(windows)[0, 0]
    assert torch.all(merged[:, [0, 1, 6, 7]] > 0) and torch.all(merged[:, 2:6] == 0)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(4, 16), w=st.integers(4, 30), half_window=st.integers(1, 4), half_stride=st.integers(1, 4), wrap=st.booleans())
def test_coarse_crops_align_with_fine_windows(h, w, half_window, half_stride, wrap):
    window, stride = 2 * half_window, 2 * min(half_stride, half_window)
    grid = WindowGrid(2 * h, 2 * w, window, stride, wrap)
    if min(2 * h, 2 * w) < window:
        return
    grid.check_nested()
    fine = torch.randn(1, 2, 2 * h, 2 * w)
    # The coarse crop of ds(z) is ds of the fine crop: F'_i(ds z) = ds(F_i z).
    assert torch.allclose(grid.coarse_crop(downsample(fine)), downsample(grid.crop(fine)), atol=1e-6)


def test_check_nested_rejects_odd_strides_and_sizes():
    with pytest.raises(ValueError, match="odd"):
        WindowGrid(16, 16, 4, 3).check_nested()
    with pytest.raises(ValueError, match="halved"):
        WindowGrid(15, 16, 4, 2).check_nested()


def test_downsample_is_the_papers_bilinear_half_and_transpose_is_its_adjoint():
    x = torch.randn(1, 4, 12, 20)
    bilinear = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(downsample(x), bilinear, atol=1e-6)
    y = torch.randn(1, 4, 6, 10)
    assert torch.allclose((downsample(x) * y).sum(), (x * downsample_transpose(y)).sum(), atol=1e-4)


def test_window_starts_rejects_impossible_grids():
    with pytest.raises(ValueError, match="smaller than the window"):
        window_starts(4, 8, 2)
    with pytest.raises(ValueError, match="larger than the window"):
        window_starts(40, 8, 9)


def test_global_level_squeezes_the_coarsest_level_into_one_window():
    from msd_core.windows import global_level

    assert global_level(WindowGrid(16, 32, 16, 4, wrap=True)) == WindowGrid(16, 16, 16, 4, wrap=True)
    assert global_level(WindowGrid(16, 64, 16, 4)) == WindowGrid(16, 16, 16, 4)
    # 3:1 with SD's 8-latent stride: a factor of 3 would misalign the coarse crops, so 2 (1.5 windows wide).
    assert global_level(WindowGrid(64, 192, 64, 8)) == WindowGrid(64, 96, 64, 8)
    assert global_level(WindowGrid(16, 16, 16, 4)) is None  # already one window
    assert global_level(WindowGrid(16, 24, 16, 4)) is None  # no whole factor keeps a window's width


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("factor", [(1, 2), (1, 4), (2, 2)])
def test_coarse_crops_align_under_any_reduction(factor, wrap):
    from msd_core.windows import level_factor

    grid = WindowGrid(16, 64, 8, 4, wrap)
    coarse = WindowGrid(16 // factor[0], 64 // factor[1], 8, 4, wrap)
    assert level_factor(grid, coarse) == factor
    fine = torch.randn(1, 2, 16, 64)
    # F'_i(ds z) = ds(F_i z), windows crossing the 0/360° edge included.
    assert torch.allclose(grid.coarse_crop(downsample(fine, factor), factor), downsample(grid.crop(fine), factor))
    y = torch.randn(1, 2, 16 // factor[0], 64 // factor[1])
    assert torch.allclose((downsample(fine, factor) * y).sum(), (fine * downsample_transpose(y, factor)).sum(), atol=1e-4)
