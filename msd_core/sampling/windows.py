"""Window grids over a latent: the crops F_i, their inverse merge, and the matching coarse crops F'_i.

All sizes here are in latent pixels. A grid holds one level's windows at one step (dense grids are the
same every step, shifted ones move: ``plan.Plan.grids_at``); crop and merge are single indexed
gathers/scatters, so no Python loop runs over windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .plan import global_squeeze, window_starts

Factor = tuple[int, int]  # (rows, columns) reduction between two pyramid levels
HALF: Factor = (2, 2)


@dataclass(frozen=True)
class GuidedPart:
    """The blocks of the coarser level under windows that start between two coarse pixels (an odd start under
    halving): each window is compared with the coarser level on the blocks it holds whole (``whole``), and the
    blocks split between two windows are pulled after the merge (``WindowGrid.split_blocks``). So tiles may start
    anywhere, and their edges do not all fall on the coarser level's block edges (``plan.shifted_offsets``).

    Along an axis where any window starts off the grid, every window's region is one block longer than the window
    (one size per batch), from the block its first pixel lies in; what a window holds depends on it alone, so a
    batch of panoramas guides each as it would be alone.
    """

    firsts: torch.Tensor  # (N, 2): each window's region's first row and column, relative to the window (≤ 0)
    size: tuple[int, int]  # rows, columns of every window's region: whole blocks of ``factor``
    shape: tuple[int, int]  # the windows' rows, columns
    factor: Factor

    def __getitem__(self, batch: slice) -> GuidedPart:
        return GuidedPart(self.firsts[batch], self.size, self.shape, self.factor)

    def split(self, counts: list[int]) -> list[GuidedPart]:
        return [GuidedPart(firsts, self.size, self.shape, self.factor) for firsts in self.firsts.split(counts)]

    def _index(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices into windows padded by one block on every side."""
        firsts = self.firsts.to(device) + torch.tensor(self.factor, device=device)
        rows = firsts[:, 0, None] + torch.arange(self.size[0], device=device)
        cols = firsts[:, 1, None] + torch.arange(self.size[1], device=device)
        return torch.arange(len(firsts), device=device)[:, None, None], rows[:, :, None], cols[:, None, :]

    def take(self, windows: torch.Tensor) -> torch.Tensor:
        """(N, C, rows, columns) windows → (N, C, *size): each window's region, zero where the window is not."""
        fh, fw = self.factor
        window, rows, cols = self._index(windows.device)
        return F.pad(windows, (fw, fw, fh, fh))[window, :, rows, cols].permute(0, 3, 1, 2)

    def put(self, regions: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``take``: the regions' values at the windows' own pixels, shaped like the windows."""
        fh, fw = self.factor
        window, rows, cols = self._index(regions.device)
        padded = regions.new_zeros(regions.shape[0], regions.shape[1], self.shape[0] + 2 * fh, self.shape[1] + 2 * fw)
        padded[window, :, rows, cols] = regions.permute(0, 2, 3, 1)
        return padded[:, :, fh:fh + self.shape[0], fw:fw + self.shape[1]]

    def whole(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """(N, 1, size ÷ factor): 1 at the blocks that lie wholly in their window, else 0."""
        ones = torch.ones(len(self.firsts), 1, *self.shape, device=device, dtype=dtype)
        return (downsample(self.take(ones), self.factor) == 1).to(dtype)


def guided_part(offsets: list[tuple[int, int]], shape: tuple[int, int], factor: Factor) -> GuidedPart | None:
    """The ``GuidedPart`` of windows of ``shape`` at ``offsets`` (None: every one starts on the coarser grid)."""
    firsts = torch.tensor([(-(top % factor[0]), -(left % factor[1])) for top, left in offsets], dtype=torch.long).view(-1, 2)
    if not firsts.any():
        return None
    size = tuple(length + f if firsts[:, axis].any() else length for axis, (length, f) in enumerate(zip(shape, factor)))
    return GuidedPart(firsts, size, tuple(shape), tuple(factor))


@dataclass(frozen=True)
class WindowGrid:
    """Windows over a (height × width) latent; horizontal wrap-around when ``wrap``.

    Windows are ``window`` square, or ``window`` × ``window_width`` (the wide window of a ``plan.Plan`` whose
    global level keeps the world's aspect). They march by ``stride``, or start where ``starts`` = (row
    starts, column starts) says (the shifted tiles of ``plan.shifted_offsets``); column starts may run past
    the width when ``wrap``.
    """

    height: int
    width: int
    window: int
    stride: int
    wrap: bool = False
    starts: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    window_width: int | None = None  # None = square

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of every window."""
        return self.window, self.window_width or self.window

    @cached_property
    def offsets(self) -> list[tuple[int, int]]:
        """(top, left) of every window, row by row."""
        if self.starts is not None:
            rows, cols = self.starts
            window_h, window_w = self.shape
            if any(top < 0 or top + window_h > self.height for top in rows) or any(
                    left < 0 or (left + window_w > self.width and not self.wrap) for left in cols):
                raise ValueError(f"window starts {self.starts} do not fit a {self.height}×{self.width} latent")
        else:
            rows = window_starts(self.height, self.shape[0], self.stride)
            cols = window_starts(self.width, self.shape[1], self.stride, self.wrap)
        return [(top, left) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.offsets)

    @cached_property
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of every window pixel, shaped (N, rows, 1) and (N, 1, columns)."""
        return _window_index(self.offsets, self.shape, self.width)

    def crop(self, latents: torch.Tensor) -> torch.Tensor:
        """F_i for all i: (1, C, H, W) → (N, C, rows, columns) of the window ``shape``."""
        _check_latents(latents, self.height, self.width)
        rows, cols = (index.to(latents.device) for index in self._index)
        return latents[0][:, rows, cols].permute(1, 0, 2, 3)

    def guided_part(self, factor: Factor = HALF) -> GuidedPart | None:
        """The coarser level's blocks every window covers (``GuidedPart``); None when every window starts on the
        coarser level's grid (each covers the blocks of its own crop)."""
        return guided_part(self.offsets, self.shape, factor)

    def _coarse_index(self, factor: Factor, part: GuidedPart | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows (N, rows, 1) and columns (N, 1, columns) of the coarser level's pixels under each window's region."""
        fh, fw = factor
        firsts = part.firsts.tolist() if part is not None else [(0, 0)] * len(self)
        size = part.size if part is not None else self.shape
        scaled = [((top + first_row) // fh, (left + first_col) // fw)
                  for (top, left), (first_row, first_col) in zip(self.offsets, firsts)]
        rows, cols = _window_index(scaled, (size[0] // fh, size[1] // fw), self.width // fw)
        # A window on the grid in a region one block longer: its empty last block may lie past the bottom edge.
        return rows.clamp(max=self.height // fh - 1), cols

    def coarse_crop(self, coarse: torch.Tensor, factor: Factor = HALF, part: GuidedPart | None = None) -> torch.Tensor:
        """F'_i for all i: the region of the next coarser level (this level ds by ``factor``) under each window,
        (N, C, rows/fh, columns/fw) when the windows start on the coarser grid (``check_nested`` makes sure the sizes
        allow it: halving, or a column squeeze under ``global_level``); else the blocks of its ``guided_part``
        (``part``: that of a stack of grids this one belongs to).
        """
        fh, fw = factor
        _check_latents(coarse, self.height // fh, self.width // fw)
        part = self.guided_part(factor) if part is None else part
        rows, cols = (axis.to(coarse.device) for axis in self._coarse_index(factor, part))
        return coarse[0][:, rows, cols].permute(1, 0, 2, 3)

    def split_blocks(self, factor: Factor = HALF, part: GuidedPart | None = None) -> torch.Tensor | None:
        """(1, 1, height/fh, width/fw), 1 at the coarser level's blocks that no window holds whole, else 0; None
        when every window starts on the coarser grid (every block is some window's)."""
        part = self.guided_part(factor) if part is None else part
        if part is None:
            return None
        rows, cols = self._coarse_index(factor, part)
        whole = part.whole()[:, 0].bool()
        split = torch.ones(self.height // factor[0], self.width // factor[1])
        split[rows.expand_as(whole)[whole], cols.expand_as(whole)[whole]] = 0.0
        return split[None, None]

    def merge(self, windows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """F_i⁻¹ and the MultiDiffusion average: Σ W_i ⊗ F_i⁻¹(x_i) / Σ W_i, shaped (1, C, H, W).

        ``weights`` is one map of the window ``shape`` shared by all windows (None = uniform). Every pixel
        is covered, so the denominator is never zero.
        """
        count, channels = windows.shape[0], windows.shape[1]
        if count != len(self):
            raise ValueError(f"expected {len(self)} windows, got {count}")
        rows, cols = (index.to(windows.device) for index in self._index)
        flat = (rows * self.width + cols).expand(count, *self.shape).reshape(-1)
        if weights is None:
            weights = torch.ones(self.shape, device=windows.device, dtype=windows.dtype)
        weights = weights.to(windows.dtype).expand(count, *self.shape)
        value = windows.new_zeros(channels, self.height * self.width)
        value.index_add_(1, flat, (windows * weights[:, None]).permute(1, 0, 2, 3).reshape(channels, -1))
        total = windows.new_zeros(self.height * self.width)
        total.index_add_(0, flat, weights.reshape(-1))
        return (value / total).view(1, channels, self.height, self.width)

    def check_nested(self, factor: Factor = HALF) -> None:
        """Raise ValueError unless this grid's windows map onto whole pixels of the next coarser level (this one
        reduced by ``factor``: halved, or its columns squeezed under a ``global_level``): sizes divisible by the
        factor (a window may start between two coarse pixels: ``guided_part``)."""
        fh, fw = factor
        reduced = "halved" if factor == HALF else f"reduced by {fh}×{fw}"
        if self.height % fh or self.width % fw or self.shape[0] % fh or self.shape[1] % fw:
            raise ValueError(
                f"a pyramid level of {self.height}×{self.width} latent px with a {self.window} px window cannot be "
                f"{reduced} exactly; use a size divisible by a higher power of two or fewer levels"
            )


@dataclass(frozen=True)
class StackedGrids:
    """One level's grids of several panoramas of the same size, sampled together as a batch of latents
    (B, C, H, W): each panorama keeps its own windows (shifted tiles differ by seed), and crop gives all of
    them in one tensor, so the UNet denoises several panoramas' windows per call.

    Windows are panorama by panorama (the first panorama's, then the next's); the sampler only crops,
    steps and merges windows, each window on its own, so every panorama's result is what it would be alone
    (up to the UNet's batch-dependent rounding).
    """

    grids: tuple[WindowGrid, ...]

    def __post_init__(self):
        shapes = {(grid.height, grid.width, grid.shape, grid.wrap) for grid in self.grids}
        if len(shapes) != 1:
            raise ValueError(f"stacked grids must share height, width, window shape and wrap, got {sorted(shapes)}")

    height = property(lambda self: self.grids[0].height)
    width = property(lambda self: self.grids[0].width)
    window = property(lambda self: self.grids[0].window)
    wrap = property(lambda self: self.grids[0].wrap)

    def __len__(self) -> int:
        return sum(map(len, self.grids))

    def crop(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (Σ N_b, C, window, window): every panorama's windows, panorama by panorama."""
        return torch.cat([grid.crop(latents[index:index + 1]) for index, grid in enumerate(self._for(latents))])

    def guided_part(self, factor: Factor = HALF) -> GuidedPart | None:
        """One ``GuidedPart`` for every panorama's windows (one size for the batch)."""
        return guided_part([offset for grid in self.grids for offset in grid.offsets], self.grids[0].shape, factor)

    def coarse_crop(self, coarse: torch.Tensor, factor: Factor = HALF, part: GuidedPart | None = None) -> torch.Tensor:
        parts = self._parts(factor, part)
        return torch.cat([grid.coarse_crop(coarse[index:index + 1], factor, parts[index])
                          for index, grid in enumerate(self._for(coarse))])

    def split_blocks(self, factor: Factor = HALF, part: GuidedPart | None = None) -> torch.Tensor | None:
        """Each panorama's ``WindowGrid.split_blocks``, (B, 1, height/fh, width/fw); None when there are none."""
        parts = self._parts(factor, part)
        if all(part is None for part in parts):
            return None
        return torch.cat([grid.split_blocks(factor, part) for grid, part in zip(self.grids, parts)])

    def _parts(self, factor: Factor, part: GuidedPart | None = None) -> list[GuidedPart | None]:
        """Each panorama's share of ``part`` (None: the stack's own ``guided_part``)."""
        part = self.guided_part(factor) if part is None else part
        return [None] * len(self.grids) if part is None else part.split([len(grid) for grid in self.grids])

    def merge(self, windows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Each panorama's windows merged on its own grid: (B, C, H, W)."""
        if windows.shape[0] != len(self):
            raise ValueError(f"expected {len(self)} windows, got {windows.shape[0]}")
        parts = windows.split([len(grid) for grid in self.grids])
        return torch.cat([grid.merge(part, weights) for grid, part in zip(self.grids, parts)])

    def _for(self, latents: torch.Tensor) -> tuple[WindowGrid, ...]:
        if latents.shape[0] != len(self.grids):
            raise ValueError(f"expected latents of {len(self.grids)} panoramas, got {latents.shape[0]}")
        return self.grids


def _window_index(offsets, window: tuple[int, int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    window_h, window_w = window
    starts = torch.tensor(offsets, dtype=torch.long).view(-1, 2)
    rows = (starts[:, 0, None] + torch.arange(window_h))[:, :, None]
    cols = ((starts[:, 1, None] + torch.arange(window_w)) % width)[:, None, :]
    return rows, cols


def _check_latents(latents: torch.Tensor, height: int, width: int) -> None:
    if latents.dim() != 4 or latents.shape[0] != 1 or tuple(latents.shape[2:]) != (height, width):
        raise ValueError(f"expected latents of shape (1, C, {height}, {width}), got {tuple(latents.shape)}")


def feathered_weights(window: int | tuple[int, int], minimum: float = 0.05) -> torch.Tensor:
    """A weight map of a square window (or of (rows, columns)) that falls off linearly towards the edges
    (never below ``minimum``).

    Windows then blend smoothly into their neighbours instead of averaging with hard edges.
    """

    def ramp(length: int) -> torch.Tensor:
        values = torch.minimum(torch.arange(length) + 1.0, length - torch.arange(length, dtype=torch.float32))
        return (values / values.max()).clamp(min=minimum)

    rows, cols = window if isinstance(window, tuple) else (window, window)
    return ramp(rows)[:, None] * ramp(cols)[None, :]


def downsample(latents: torch.Tensor, factor: Factor = HALF) -> torch.Tensor:
    """ds: bilinear ×½ of even-sized latents (or the fh×fw block average for another ``factor``).

    For an exact factor of 2, bilinear interpolation (align_corners=False, no antialias) samples the
    centre of every 2×2 block, which is the 2×2 average: no pixel across the border is read, so the
    result is also correct for horizontally wrapping panoramas.
    """
    return F.avg_pool2d(latents, factor)


def downsample_transpose(coarse: torch.Tensor, factor: Factor = HALF) -> torch.Tensor:
    """dsᵀ, the adjoint of ``downsample``: each coarse value spread as 1/(fh·fw) over its block."""
    return F.interpolate(coarse, scale_factor=factor, mode="nearest") / (factor[0] * factor[1])


def level_factor(fine: WindowGrid, coarse: WindowGrid) -> Factor:
    """The (rows, columns) reduction from a level to the next coarser one: (2, 2) in the paper's pyramid."""
    return fine.height // coarse.height, fine.width // coarse.width


def global_level(coarsest: WindowGrid) -> WindowGrid | None:
    """A level above ``coarsest`` that squeezes it horizontally into (about) one window, or None
    (``plan.global_squeeze`` says by how much and why)."""
    squeeze = global_squeeze(coarsest.width, coarsest.window, coarsest.stride)
    if squeeze == 1:
        return None
    return WindowGrid(coarsest.height, coarsest.width // squeeze, coarsest.window, coarsest.stride, coarsest.wrap)
