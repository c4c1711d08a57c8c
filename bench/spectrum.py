"""Detail measures: how much of an image's variance lies in each frequency band, and whether a coarser level's
blocks show (docs/layout.md 6.7, `--fine-start`).

- ``band_power(images, patch)``: the radially averaged power spectrum of ``patch``×``patch`` crops (a Hann taper,
  so the edges of a crop leak no low-frequency energy into the high bands), in rings one cycle per patch wide.
  A sampler that leaves the high bands short blurs; one that adds energy there adds grain or edges.
- ``block_edge_ratio(images, factor)``: the mean |difference| between neighbouring pixels across the edges of a
  ``factor`` block grid over the mean within the blocks. 1 for any stationary image; above 1 where content
  follows the blocks (a nearest-upsampled coarser level: infinite without noise).

Both take (…, H, W) tensors (seeds, channels) and average over everything but the last two axes.
"""

from __future__ import annotations

import math

import torch


def ring_index(patch: int) -> torch.Tensor:
    """(patch, patch) ring of each DFT bin: round(|k|) in cycles per patch (0 = the mean)."""
    k = torch.fft.fftfreq(patch, d=1.0 / patch)
    return torch.sqrt(k[:, None] ** 2 + k[None, :] ** 2).round().long()


def crops(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Non-overlapping ``patch``×``patch`` crops of (…, H, W), (N, patch, patch); a remainder is dropped."""
    height, width = images.shape[-2] // patch * patch, images.shape[-1] // patch * patch
    if not height or not width:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than a {patch}×{patch} patch")
    tiles = images[..., :height, :width].reshape(-1, height // patch, patch, width // patch, patch)
    return tiles.transpose(2, 3).reshape(-1, patch, patch)


def band_power(images: torch.Tensor, patch: int) -> torch.Tensor:
    """Mean power per ring 1 … ⌊patch/2⌋ (cycles per patch; ring r holds the frequencies nearest r/patch cycles
    per pixel) of the Hann-tapered crops of ``images`` (…, H, W), each crop's mean removed. The rings beyond
    patch/2 (the corners of the spectrum, only in the diagonals) are left out. A Gaussian field whose spectrum
    falls as 1/f² gives powers that fall as 1/r² (up to the taper's smoothing)."""
    tiles = crops(images.double(), patch)
    tiles = tiles - tiles.mean((-2, -1), keepdim=True)
    taper = torch.hann_window(patch, periodic=False, dtype=torch.float64)
    taper = taper[:, None] * taper[None, :]
    power = torch.fft.fft2(tiles * taper).abs().pow(2).mean(0) / taper.pow(2).sum()
    rings = ring_index(patch)
    return torch.stack([power[rings == r].mean() for r in range(1, patch // 2 + 1)])


def block_edge_ratio(images: torch.Tensor, factor: tuple[int, int]) -> float:
    """Mean |difference| of neighbouring pixels across the edges of the ``factor`` = (rows, columns) block grid
    that starts at (0, 0), over the mean within the blocks, both directions together (a direction whose factor is
    1 has no block edges and is left out). ≈ 1 for a stationary image; > 1 where the blocks show."""
    images = images.double()
    across, within = [], []
    for axis, size in ((-2, factor[0]), (-1, factor[1])):
        if size == 1:
            continue
        differences = images.diff(dim=axis).abs()  # difference i is between pixels i and i + 1
        edges = (torch.arange(differences.shape[axis]) + 1) % size == 0
        moved = differences.movedim(axis, -1)
        across.append(moved[..., edges].mean())
        within.append(moved[..., ~edges].mean())
    if not across:
        raise ValueError("a 1×1 block grid has no edges")
    return float(sum(across) / sum(within))


def power_law_covariance(window: int, exponent: float, texture: float, grid: int | None = None) -> torch.Tensor:
    """The (window², window²) covariance of a stationary Gaussian field whose power spectrum falls as
    1/(f² + f₀²)^(exponent/2) (natural images: exponent ≈ 2), plus white texture of std ``texture``; the field's
    own variance is 1. Computed on a periodic ``grid`` (default 4 × window, f₀ = 1/grid) and cropped, so the
    window sees no wrap-around."""
    grid = grid or 4 * window
    f = torch.fft.fftfreq(grid, dtype=torch.float64)
    spectrum = (f[:, None] ** 2 + f[None, :] ** 2 + 1.0 / grid**2) ** (-exponent / 2)
    spectrum[0, 0] = 0.0  # no power in the mean of the whole grid: a window still sees its large-scale modes
    correlation = torch.fft.ifft2(spectrum).real
    correlation = correlation / correlation[0, 0]
    offsets = torch.arange(window)
    offset = (offsets[:, None] - offsets[None, :]) % grid  # [i, j]: offset of pixel i from pixel j along an axis
    # [i_row, i_col, j_row, j_col] → the correlation at (i_row − j_row, i_col − j_col)
    pair = correlation[offset[:, None, :, None], offset[None, :, None, :]]
    covariance = pair.reshape(window * window, window * window)
    return covariance + texture**2 * torch.eye(window * window, dtype=torch.float64)


def spectral_slope(power: torch.Tensor, first: int = 2) -> float:
    """Least-squares slope of log power against log ring over rings ``first`` … end: −2 for a 1/f² field."""
    rings = torch.arange(first, len(power) + 1, dtype=torch.float64)
    x, y = rings.log(), power[first - 1:].log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def standard_error(per_seed: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over the first axis (seeds)."""
    return per_seed.std(0) / math.sqrt(per_seed.shape[0])
