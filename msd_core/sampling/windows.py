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

    def coarse_crop(self, coarse: torch.Tensor, factor: Factor = HALF) -> torch.Tensor:
        """F'_i for all i: the region of the next coarser level (this level ds by ``factor``) under each window.

        (N, C, rows/fh, columns/fw). Needs offsets and window divisible by the factor, which
        ``check_nested`` (halving) and ``global_level`` (a column squeeze) guarantee.
        """
        fh, fw = factor
        _check_latents(coarse, self.height // fh, self.width // fw)
        scaled = [(top // fh, left // fw) for top, left in self.offsets]
        index = _window_index(scaled, (self.shape[0] // fh, self.shape[1] // fw), self.width // fw)
        rows, cols = (part.to(coarse.device) for part in index)
        return coarse[0][:, rows, cols].permute(1, 0, 2, 3)

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
        """Raise ValueError unless this grid's windows map exactly onto the next coarser level (this one
        reduced by ``factor``: halved, or its columns squeezed under a ``global_level``)."""
        fh, fw = factor
        reduced = "halved" if factor == HALF else f"reduced by {fh}×{fw}"
        if self.height % fh or self.width % fw or self.shape[0] % fh or self.shape[1] % fw:
            raise ValueError(
                f"a pyramid level of {self.height}×{self.width} latent px with a {self.window} px window cannot be "
                f"{reduced} exactly; use a size divisible by a higher power of two or fewer levels"
            )
        if any(top % fh or left % fw for top, left in self.offsets):
            odd = "odd" if factor == HALF else f"not multiples of {fh}×{fw}"
            raise ValueError(f"window offsets are {odd}: coarse crops would not align; use an even stride")


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

    def coarse_crop(self, coarse: torch.Tensor, factor: Factor = HALF) -> torch.Tensor:
        return torch.cat([grid.coarse_crop(coarse[index:index + 1], factor) for index, grid in enumerate(self._for(coarse))])

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
