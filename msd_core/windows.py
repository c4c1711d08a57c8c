"""Window grids over a latent: the crops F_i, their inverse merge, and the matching coarse crops F'_i.

All sizes here are in latent pixels. A grid is computed once per level and reused every step; crop and
merge are single indexed gathers/scatters, so no Python loop runs over windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

Factor = tuple[int, int]  # (rows, columns) reduction between two pyramid levels
HALF: Factor = (2, 2)


def window_starts(length: int, window: int, stride: int, wrap: bool = False) -> list[int]:
    """Start offsets of windows along one axis that cover every position.

    Without wrap the windows march by ``stride`` and the last one is snapped to the edge, so no strip at
    the end is left undenoised (diffusers' MultiDiffusion leaves one when (length − window) is not a
    multiple of the stride). With wrap (360° panoramas) windows start every ``stride`` around the whole
    circle and those near the end continue across the edge into the start.
    """
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be ≥ 1")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than the window {window}: positions would be skipped")
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}")
    if wrap:
        return list(range(0, length, stride))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


@dataclass(frozen=True)
class WindowGrid:
    """Square windows over a (height × width) latent; horizontal wrap-around when ``wrap``."""

    height: int
    width: int
    window: int
    stride: int
    wrap: bool = False

    @cached_property
    def offsets(self) -> list[tuple[int, int]]:
        """(top, left) of every window, row by row."""
        rows = window_starts(self.height, self.window, self.stride)
        cols = window_starts(self.width, self.window, self.stride, self.wrap)
        return [(top, left) for top in rows for left in cols]

    def __len__(self) -> int:
        return len(self.offsets)

    @cached_property
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column indices of every window pixel, shaped (N, window, 1) and (N, 1, window)."""
        return _window_index(self.offsets, self.window, self.width)

    def crop(self, latents: torch.Tensor) -> torch.Tensor:
        """F_i for all i: (1, C, H, W) → (N, C, window, window)."""
        _check_latents(latents, self.height, self.width)
        rows, cols = (index.to(latents.device) for index in self._index)
        return latents[0][:, rows, cols].permute(1, 0, 2, 3)

    def coarse_crop(self, coarse: torch.Tensor, factor: Factor = HALF) -> torch.Tensor:
        """F'_i for all i: the region of the next coarser level (this level ds by ``factor``) under each window.

        (N, C, window/fh, window/fw). Needs offsets and window divisible by the factor, which
        ``check_nested`` (halving) and ``global_level`` (a column squeeze) guarantee.
        """
        fh, fw = factor
        _check_latents(coarse, self.height // fh, self.width // fw)
        scaled = [(top // fh, left // fw) for top, left in self.offsets]
        index = _window_index(scaled, (self.window // fh, self.window // fw), self.width // fw)
        rows, cols = (part.to(coarse.device) for part in index)
        return coarse[0][:, rows, cols].permute(1, 0, 2, 3)

    def merge(self, windows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """F_i⁻¹ and the MultiDiffusion average: Σ W_i ⊗ F_i⁻¹(x_i) / Σ W_i, shaped (1, C, H, W).

        ``weights`` is one (window × window) map shared by all windows (None = uniform). Every pixel is
        covered, so the denominator is never zero.
        """
        count, channels = windows.shape[0], windows.shape[1]
        if count != len(self):
            raise ValueError(f"expected {len(self)} windows, got {count}")
        rows, cols = (index.to(windows.device) for index in self._index)
        flat = (rows * self.width + cols).expand(count, self.window, self.window).reshape(-1)
        if weights is None:
            weights = torch.ones(self.window, self.window, device=windows.device, dtype=windows.dtype)
        weights = weights.to(windows.dtype).expand(count, self.window, self.window)
        value = windows.new_zeros(channels, self.height * self.width)
        value.index_add_(1, flat, (windows * weights[:, None]).permute(1, 0, 2, 3).reshape(channels, -1))
        total = windows.new_zeros(self.height * self.width)
        total.index_add_(0, flat, weights.reshape(-1))
        return (value / total).view(1, channels, self.height, self.width)

    def check_nested(self) -> None:
        """Raise ValueError unless this grid's windows map exactly onto the next coarser (halved) level."""
        if self.height % 2 or self.width % 2 or self.window % 2:
            raise ValueError(
                f"a pyramid level of {self.height}×{self.width} latent px with a {self.window} px window cannot be "
                "halved exactly; use a size divisible by a higher power of two or fewer levels"
            )
        if any(top % 2 or left % 2 for top, left in self.offsets):
            raise ValueError(f"stride {self.stride} is odd: coarse crops would not align; use an even stride")


def _window_index(offsets, window: int | tuple[int, int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    window_h, window_w = window if isinstance(window, tuple) else (window, window)
    starts = torch.tensor(offsets, dtype=torch.long).view(-1, 2)
    rows = (starts[:, 0, None] + torch.arange(window_h))[:, :, None]
    cols = ((starts[:, 1, None] + torch.arange(window_w)) % width)[:, None, :]
    return rows, cols


def _check_latents(latents: torch.Tensor, height: int, width: int) -> None:
    if latents.dim() != 4 or latents.shape[0] != 1 or tuple(latents.shape[2:]) != (height, width):
        raise ValueError(f"expected latents of shape (1, C, {height}, {width}), got {tuple(latents.shape)}")


def feathered_weights(window: int, minimum: float = 0.05) -> torch.Tensor:
    """A (window × window) weight map that falls off linearly towards the edges (never below ``minimum``).

    Windows then blend smoothly into their neighbours instead of averaging with hard edges.
    """
    ramp = torch.minimum(torch.arange(window) + 1.0, window - torch.arange(window, dtype=torch.float32))
    ramp = (ramp / ramp.max()).clamp(min=minimum)
    return ramp[:, None] * ramp[None, :]


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
    """A level above ``coarsest`` that squeezes it horizontally into (about) one window, or None.

    The paper's pyramid stops once the short side fits a window, so a 2:1 or 1:4 panorama's coarsest level
    is still several windows wide and runs plain MultiDiffusion: it can hold two horizons or two suns.
    This level averages groups of f columns, with f the largest divisor of the width, window and stride
    (so coarse crops stay aligned) that keeps it at least a window wide; the next level is guided through
    the same f-column average. None when no such f > 1 exists (the coarsest level already is one window).
    """
    for factor in range(coarsest.width // coarsest.window, 1, -1):
        if not (coarsest.width % factor or coarsest.window % factor or coarsest.stride % factor):
            return WindowGrid(coarsest.height, coarsest.width // factor, coarsest.window, coarsest.stride, coarsest.wrap)
    return None
