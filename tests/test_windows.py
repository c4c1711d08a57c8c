"""Window grids: coverage, wrap-around, coarse alignment, crop/merge, downsampling."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from msd_core.sampling.plan import shifted_offsets, shifted_starts, window_starts
from msd_core.sampling.windows import (
    WindowGrid,
    downsample,
    downsample_transpose,
    feathered_weights,
    global_level,
    level_factor,
)


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


def test_check_nested_rejects_sizes_that_do_not_halve():
    with pytest.raises(ValueError, match="halved"):
        WindowGrid(15, 16, 4, 2).check_nested()
    with pytest.raises(ValueError, match="halved"):
        WindowGrid(16, 16, 3, 2).check_nested()
    WindowGrid(16, 16, 4, 3).check_nested()  # odd starts: guided on their whole blocks (GuidedPart)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(4, 16), w=st.integers(4, 30), half_window=st.integers(1, 4), shift_rows=st.integers(0, 7),
       shift_cols=st.integers(0, 7), wrap=st.booleans(), factor=st.sampled_from([(2, 2), (1, 2), (1, 4)]))
def test_tiles_starting_anywhere_are_guided_on_the_blocks_they_hold_whole(h, w, half_window, shift_rows, shift_cols,
                                                                          wrap, factor):
    """A window starting between two coarse pixels is compared with the coarser level on the blocks it holds whole:
    there F'_i(ds z) = ds(P_i F_i z), P_i its region (one size for every window); take and put are adjoint; the
    blocks no window holds whole are the split ones."""
    window, fh, fw = 2 * half_window, *factor
    height, width = fh * h, fw * w
    if min(height, width) < window or window % fw:
        return
    rows = shifted_starts(height, window, shift_rows % window)
    cols = shifted_starts(width, window, shift_cols % window, wrap)
    grid = WindowGrid(height, width, window, window, wrap, starts=(tuple(rows), tuple(cols)))
    grid.check_nested(factor)
    fine = torch.randn(1, 2, height, width)
    part = grid.guided_part(factor)
    if all(top % fh == 0 and left % fw == 0 for top, left in grid.offsets):
        assert part is None and grid.split_blocks(factor) is None
        return
    crops = grid.crop(fine)
    taken, whole = part.take(crops), part.whole()
    assert all(size in (length, length + f) for size, length, f in zip(part.size, grid.shape, factor))
    for (top, left), (first_row, first_col) in zip(grid.offsets, part.firsts.tolist()):
        assert (top + first_row) % fh == 0 and (left + first_col) % fw == 0 and -fh < first_row <= 0 and -fw < first_col <= 0
    assert torch.allclose(grid.coarse_crop(downsample(fine, factor), factor) * whole,
                          downsample(taken, factor) * whole, atol=1e-6)
    other = torch.randn_like(taken)
    assert torch.allclose((taken * other).sum(), (crops * part.put(other)).sum(), atol=1e-4)
    # A window holds (its rows ÷ fh, less one if it starts off the grid) × (the same for columns) blocks whole.
    expected = [((window - (top % fh > 0) * fh) // fh) * ((window - (left % fw > 0) * fw) // fw) for top, left in grid.offsets]
    assert whole.sum((1, 2, 3)).tolist() == expected
    split = grid.split_blocks(factor)
    held = torch.zeros_like(split)
    rows_index, cols_index = grid._coarse_index(factor, part)
    for index in range(len(grid)):
        mask = whole[index, 0].bool()
        held[0, 0][rows_index[index].expand(-1, cols_index.shape[-1])[mask], cols_index[index].expand(rows_index.shape[1], -1)[mask]] = 1
    assert torch.equal(split, 1 - held)


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
    assert global_level(WindowGrid(16, 32, 16, 4, wrap=True)) == WindowGrid(16, 16, 16, 4, wrap=True)
    assert global_level(WindowGrid(16, 64, 16, 4)) == WindowGrid(16, 16, 16, 4)
    # 3:1 with SD's 8-latent stride: a factor of 3 would misalign the coarse crops, so 2 (1.5 windows wide).
    assert global_level(WindowGrid(64, 192, 64, 8)) == WindowGrid(64, 96, 64, 8)
    assert global_level(WindowGrid(16, 16, 16, 4)) is None  # already one window
    assert global_level(WindowGrid(16, 24, 16, 4)) is None  # no whole factor keeps a window's width


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("factor", [(1, 2), (1, 4), (2, 2)])
def test_coarse_crops_align_under_any_reduction(factor, wrap):
    grid = WindowGrid(16, 64, 8, 4, wrap)
    coarse = WindowGrid(16 // factor[0], 64 // factor[1], 8, 4, wrap)
    assert level_factor(grid, coarse) == factor
    fine = torch.randn(1, 2, 16, 64)
    # F'_i(ds z) = ds(F_i z), windows crossing the 0/360° edge included.
    assert torch.allclose(grid.coarse_crop(downsample(fine, factor), factor), downsample(grid.crop(fine), factor))
    y = torch.randn(1, 2, 16 // factor[0], 64 // factor[1])
    assert torch.allclose((downsample(fine, factor) * y).sum(), (fine * downsample_transpose(y, factor)).sum(), atol=1e-4)


@settings(max_examples=200, deadline=None)
@given(window=st.integers(1, 12), extra=st.integers(0, 60), shift=st.integers(0, 11), wrap=st.booleans(),
       even=st.booleans())
def test_shifted_tiles_cover_every_position_with_aligned_starts(window, extra, shift, wrap, even):
    multiple = 2 if even else 1
    length, window, shift = (window + extra, window, shift % window)
    if even:  # the pipeline's finer levels: even sizes, even shifts
        length, window, shift = 2 * length, 2 * window, 2 * shift
    starts = shifted_starts(length, window, shift, wrap, multiple)
    covered = torch.zeros(length, dtype=torch.int)
    for start in starts:
        covered[(torch.arange(window) + start) % length] += 1
    assert (covered > 0).all()
    assert all(start % multiple == 0 for start in starts)
    assert len(starts) <= -(-length // window) + (0 if wrap else 1)  # one tile more than a tiling at most
    if wrap and length % window == 0:
        assert (covered == 1).all()  # non-overlapping tiles
    if not wrap:
        assert all(0 <= start <= length - window for start in starts)


def test_shifted_offsets_are_reproducible_from_the_seed_and_move_every_step():
    def offsets(step, seed, level=1):
        return shifted_offsets(32, 64, 8, step, seed, wrap=True, level=level, multiple=2)

    assert offsets(3, 7) == offsets(3, 7)
    assert len({str(offsets(step, 7)) for step in range(10)}) > 5  # a new offset (almost) every step
    assert offsets(3, 7) != offsets(3, 8) or offsets(4, 7) != offsets(4, 8)
    rows, cols = offsets(0, 7)
    assert len(cols) == 8 and all(c % 2 == 0 for c in rows + cols)  # 64 / 8 tiles around the circle


@pytest.mark.parametrize("wrap", [True, False])
def test_shifted_grid_crops_merge_and_map_onto_the_coarser_level(wrap):
    rows, cols = shifted_offsets(24, 40, 8, 5, 1, wrap, level=1, multiple=2)
    grid = WindowGrid(24, 40, 8, 8, wrap, starts=(tuple(rows), tuple(cols)))
    grid.check_nested()
    latents = torch.randn(1, 3, 24, 40)
    assert torch.allclose(grid.merge(grid.crop(latents)), latents, atol=1e-6)
    assert torch.allclose(grid.coarse_crop(downsample(latents)), downsample(grid.crop(latents)), atol=1e-6)


def test_explicit_starts_outside_the_latent_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        WindowGrid(16, 16, 8, 8, wrap=False, starts=((0,), (12,))).offsets
    assert WindowGrid(16, 16, 8, 8, wrap=True, starts=((0,), (12,))).offsets == [(0, 12)]  # wraps


@settings(max_examples=60, deadline=None)
@given(h=st.integers(4, 20), w=st.integers(8, 60), window=st.integers(2, 6), wide=st.integers(2, 4),
       stride=st.integers(1, 6), wrap=st.booleans(), feather=st.booleans())
def test_wide_windows_merge_their_crops_back_and_cover_every_pixel(h, w, window, wide, stride, wrap, feather):
    if window * wide > w or window > h:
        return
    grid = WindowGrid(h, w, window, min(stride, window), wrap, window_width=window * wide)
    latents = torch.randn(1, 3, h, w)
    crops = grid.crop(latents)
    assert crops.shape == (len(grid), 3, window, window * wide) and grid.shape == (window, window * wide)
    weights = feathered_weights(grid.shape) if feather else None
    assert torch.allclose(grid.merge(crops, weights), latents, atol=1e-5)
    covered = torch.zeros(h, w)
    for top, left in grid.offsets:
        covered[top:top + window, (torch.arange(window * wide) + left) % w] += 1
    assert (covered > 0).all()


def test_a_wide_window_is_the_slice_it_covers_across_the_seam_and_weighs_its_edges_down():
    latents = torch.arange(2 * 8 * 24, dtype=torch.float32).view(1, 2, 8, 24)
    grid = WindowGrid(8, 24, 8, 8, wrap=True, starts=((0,), (10,)), window_width=16)
    (crop,) = grid.crop(latents)
    assert torch.equal(crop, torch.cat([latents[0, :, :, 10:], latents[0, :, :, :2]], dim=-1))  # 10…23, 0…1
    grid.check_nested()
    assert torch.equal(grid.coarse_crop(downsample(latents))[0], downsample(crop[None])[0])
    weights = feathered_weights((8, 16))
    assert weights.shape == (8, 16) and weights[4, 8] > weights[4, 0] and weights[0, 8] < weights[4, 8]
    assert torch.equal(feathered_weights((6, 6)), feathered_weights(6))
    with pytest.raises(ValueError, match="do not fit"):
        WindowGrid(8, 24, 8, 8, wrap=False, starts=((0,), (10,)), window_width=16).offsets


def test_stacked_grids_crop_and_merge_each_panorama_on_its_own_grid():
    from msd_core.sampling.windows import StackedGrids

    first = WindowGrid(8, 16, 4, 4, wrap=True, starts=((0, 4), (1, 5, 9, 13)))
    second = WindowGrid(8, 16, 4, 4, wrap=True, starts=((0, 2, 4), (3, 7, 11, 15)))
    stacked = StackedGrids((first, second))
    latents = torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(0))
    windows = stacked.crop(latents)
    assert windows.shape == (8 + 12, 3, 4, 4) and len(stacked) == 20
    assert torch.equal(windows[:8], first.crop(latents[:1])) and torch.equal(windows[8:], second.crop(latents[1:]))
    assert torch.allclose(stacked.merge(windows), latents)  # every pixel covered: the merge inverts the crop
    coarse = torch.randn(2, 3, 4, 8)
    assert torch.equal(stacked.coarse_crop(coarse)[8:], second.coarse_crop(coarse[1:]))
    with pytest.raises(ValueError, match="latents of 2 panoramas"):
        stacked.crop(latents[:1])
    with pytest.raises(ValueError, match="expected 20 windows"):
        stacked.merge(windows[:8])
    with pytest.raises(ValueError, match="share height, width"):
        StackedGrids((first, WindowGrid(8, 8, 4, 4)))


def test_stacked_grids_share_one_guided_part_size_when_one_panoramas_tiles_start_off_the_grid():
    from msd_core.sampling.windows import StackedGrids

    even = WindowGrid(8, 16, 4, 4, wrap=True, starts=((0, 4), (2, 6, 10, 14)))
    odd = WindowGrid(8, 16, 4, 4, wrap=True, starts=((0, 4), (3, 7, 11, 15)))
    stacked = StackedGrids((even, odd))
    assert even.guided_part() is None and odd.guided_part().size == (4, 6)
    part = stacked.guided_part()
    assert part.size == (4, 6) and part.firsts[:8, 1].eq(0).all() and part.firsts[8:, 1].eq(-1).all()
    whole = part.whole()
    # The even panorama's windows hold their own two blocks whole, as alone; the odd one's its middle block.
    assert whole[:8, 0, :, :2].all() and not whole[:8, 0, :, 2].any() and whole[8:, 0].sum(-1).eq(1).all()
    fine = torch.randn(2, 3, 8, 16, generator=torch.Generator().manual_seed(1))
    taken = part.take(stacked.crop(fine))
    assert torch.allclose(stacked.coarse_crop(downsample(fine)) * whole, downsample(taken) * whole, atol=1e-6)
    assert stacked.split_blocks()[0].sum() == 0 and stacked.split_blocks()[1, 0].sum(0).tolist() == [0, 4] * 4
