"""More analytic priors for the layout benchmark, so a sampler change is not tuned to the horizon alone.

Each prior is a uniform-texture Gaussian mixture over one-channel window×window images whose component
means are ±1 everywhere, so all means have the same norm and the exact posterior mean has the same
closed form as the horizon prior's (``horizon.MixturePrior``); what differs is how the components are
laid out and how a panorama is scored:

- ``SunPrior``: one bright square "sun" (+1) on a dark sky (−1), any size from ``sizes``, anywhere it
  overlaps the window, or no sun at all (probability ``empty``). A panorama must hold exactly one sun —
  MultiDiffusion puts one in nearly every window.
- ``RiverPrior``: one vertical band of water (+1) on land (−1), any width from ``widths``, or none. A
  panorama must hold one band that runs unbroken from the bottom edge to the top — MultiDiffusion gives
  each row of windows its own river.

Every prior answers ``denoiser()`` (for msd_core's sampler), ``posterior_mean``, ``sample`` (exact draws,
for the Tweedie test), ``components`` (explicit means and log-weights, for the same test) and
``score(image, wrap) -> dict`` with ``coherent``, ``collapsed`` and its own count (``objects`` per panorama,
``runs`` per row or ``transitions`` per column).
"""

from __future__ import annotations

import math

import torch
from msd_core.models.loading import sd_ddim_scheduler
from horizon import HorizonPrior, MixturePrior, score_layout, vertical_median3
from spectrum import power_law_covariance

SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # large enough that windows wholly inside the object exist
SUN_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)  # for the sun's 8-pixel window


def _intervals(length: int, size: int, circular: bool = False) -> torch.Tensor:
    """Indicator rows of every placement of a ``size``-long segment that overlaps [0, length), clipped; or,
    when ``circular``, of every placement on a circle of ``length`` (one per start, wrapping at the end)."""
    positions = torch.arange(length)[None, :]
    if circular:
        starts = torch.arange(length)[:, None]
        return (((positions - starts) % length) < size).double()
    starts = torch.arange(-size + 1, length)[:, None]
    return ((positions >= starts) & (positions < starts + size)).double()


class SunPrior(MixturePrior):
    """One square sun of side s ∈ ``sizes`` at a uniform position overlapping the window, or none.

    Its components are pairs of row and column placements (thousands), so it uses 8-pixel windows
    (the benchmark halves the panorama too, keeping its shape in windows): 18× cheaper than 16.
    """

    name = "sun"

    def __init__(self, window: int = 8, sizes=SUN_SIZES, empty: float = 0.3, texture: float = 0.3, scheduler=None):
        super().__init__(window, texture, scheduler)
        self.sizes, self.empty = sizes, empty
        self.rows = [_intervals(window, size) for size in sizes]  # row placements of each size
        self.log_empty = math.log(empty)
        self.lay_out()

    def lay_out(self) -> None:
        self.columns = [_intervals(self.width, size, self.circular) for size in self.sizes]
        # Every size equally likely, every placement of a size equally likely.
        self.log_weights = [math.log((1 - self.empty) / len(self.sizes) / (len(r) * len(c)))
                            for r, c in zip(self.rows, self.columns)]

    def mixed_mean(self, x: torch.Tensor, alpha: float, var: float) -> torch.Tensor:
        # x·μ = −Σx + 2·Σ_box x, and Σ_box x = R X Cᵀ for the box's row and column indicators R, C: two
        # plain matrix products per size (batched products of small matrices are many times slower).
        h, w = self.window, self.width
        flat = x.reshape(-1, h, w)
        count = flat.shape[0]
        total = flat.sum((-2, -1))
        logits = [torch.full((count, 1), self.log_empty, dtype=x.dtype) - (math.sqrt(alpha) / var) * total[:, None]]
        for r, c, log_w in zip(self.rows, self.columns, self.log_weights):
            by_column = (flat.reshape(-1, w) @ c.T).view(count, h, -1).transpose(1, 2)  # (N, T cols, h rows)
            box_sums = (by_column.reshape(-1, h) @ r.T).view(count, len(c), len(r))  # [col j, row i]
            logits.append((math.sqrt(alpha) / var) * (2 * box_sums - total[:, None, None]).flatten(1) + log_w)
        weights = torch.softmax(torch.cat(logits, 1), 1)
        mean, start = -torch.ones_like(flat), 1
        for r, c in zip(self.rows, self.columns):
            size = len(r) * len(c)
            block = weights[:, start:start + size].reshape(-1, len(r))  # rows (N, col j), columns row i
            by_row = (block @ r).view(count, len(c), h).transpose(1, 2)  # (N, row pixel, col j)
            mean = mean + 2 * (by_row.reshape(-1, len(c)) @ c).view(count, h, w)
            start += size
        return mean.view(x.shape)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        means, log_weights = [-torch.ones(1, self.window, self.width, dtype=torch.float64)], [self.log_empty]
        for r, c, log_w in zip(self.rows, self.columns, self.log_weights):
            boxes = r[None, :, :, None] * c[:, None, None, :]  # [col placement j, row placement i, row, col]
            means.append(2 * boxes.flatten(0, 1) - 1)
            log_weights += [log_w] * (len(r) * len(c))
        return torch.cat(means), torch.tensor(log_weights, dtype=torch.float64)

    def score(self, image: torch.Tensor, wrap: bool = False) -> dict:
        """coherent = exactly one sun; collapsed = no sun or all sun; ``aspect`` = width/height of the
        largest sun's bounding box (1 for a square: shows a sun stretched by a squeezed level)."""
        bright = majority3x3(image > 0, wrap)
        labels = connected_components(bright, wrap)
        ids = labels[labels > 0].unique()
        aspect = None
        if len(ids):
            largest = max(ids.tolist(), key=lambda i: int((labels == i).sum()))
            rows, cols = (labels == largest).nonzero(as_tuple=True)
            aspect = _extent(cols, image.shape[1], wrap) / _extent(rows, image.shape[0], False)
        return {"coherent": len(ids) == 1 and not bool(bright.all()), "collapsed": len(ids) == 0 or bool(bright.all()),
                "objects": len(ids), "aspect": aspect}


class RiverPrior(MixturePrior):
    """One vertical band of width w ∈ ``widths`` at a uniform position overlapping the window, or none."""

    name = "river"
    runs_through_poles = True

    def __init__(self, window: int = 16, widths=SIZES, empty: float = 0.3, texture: float = 0.3, scheduler=None):
        super().__init__(window, texture, scheduler)
        self.widths, self.empty = widths, empty
        self.lay_out()

    def lay_out(self) -> None:
        bands = [_intervals(self.width, width, self.circular) for width in self.widths]
        counts = torch.cat([torch.full((len(b),), (1 - self.empty) / len(self.widths) / len(b), dtype=torch.float64)
                            for b in bands])
        self.profiles = torch.cat([2 * torch.cat(bands) - 1, -torch.ones(1, self.width, dtype=torch.float64)])  # column profiles
        self.log_weights = torch.cat([counts, torch.tensor([self.empty], dtype=torch.float64)]).log()

    def mixed_mean(self, x: torch.Tensor, alpha: float, var: float) -> torch.Tensor:
        profiles = self.profiles.to(x)
        logits = (math.sqrt(alpha) / var) * (x.sum(-2) @ profiles.T) + self.log_weights.to(x)
        return (torch.softmax(logits, -1) @ profiles)[..., None, :].expand(x.shape)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.profiles[:, None, :].expand(-1, self.window, -1), self.log_weights

    def score(self, image: torch.Tensor, wrap: bool = False) -> dict:
        """coherent = every row crosses exactly one band and each row's band overlaps the row below it
        (one unbroken river from the bottom edge to the top); collapsed = no water or all water."""
        water = majority3x3(image > 0, wrap)
        runs = torch.tensor([_runs(row, wrap) for row in water])
        continuous = bool((water[1:] & water[:-1]).any(1).all())
        return {"coherent": bool((runs == 1).all()) and continuous and not bool(water.all()),
                "collapsed": not bool(water.any()) or bool(water.all()), "runs": float(runs.double().mean())}


SKYLINE_SLOPES = (-0.5, -0.25, 0.0, 0.25, 0.5)  # rows per column: a coarse level's slope is a fine level's too


class SkylinePrior(MixturePrior):
    """Sky (+1) above a straight skyline, ground (−1) below: the skyline row at column c is
    round(h + s·(c − centre)), slope s ∈ ``slopes``, height h uniform over ``heights``. A panorama must hold
    one skyline that moves by at most a row from column to column, all the way round when it wraps: a layout
    whose height varies smoothly across the panorama, so the windows must agree on where it is *and* where it
    goes (the horizon prior needs only the first)."""

    name = "skyline"

    def __init__(self, window: int = 16, heights=range(-4, 21), slopes=SKYLINE_SLOPES, texture: float = 0.3,
                 scheduler=None):
        super().__init__(window, texture, scheduler)
        rows, columns = torch.arange(window)[:, None], torch.arange(window)[None, :] - (window - 1) / 2
        means = [torch.where(rows < torch.round(h + slope * columns), 1.0, -1.0) for slope in slopes for h in heights]
        self.means = torch.stack(means).double()  # (K, window, window); some are all sky or all ground
        self.log_weights = torch.full((len(means),), -math.log(len(means)), dtype=torch.float64)

    def lay_out(self) -> None:
        if self.width != self.window:  # a straight sloped skyline cannot wrap: no wider version was defined
            raise NotImplementedError("the skyline prior has no wider version (issue 16's wide global window was "
                                      "evaluated on the horizon, sun and river priors)")

    def mixed_mean(self, x: torch.Tensor, alpha: float, var: float) -> torch.Tensor:
        means = self.means.to(x).flatten(1)
        logits = (math.sqrt(alpha) / var) * (x.flatten(-2) @ means.T) + self.log_weights.to(x)
        return (torch.softmax(logits, -1) @ means).view(x.shape)

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.means, self.log_weights

    def score(self, image: torch.Tensor, wrap: bool = False) -> dict:
        """coherent = the horizon's rule (one sky→ground transition per column, sky on top) and the skyline
        row moves by at most one between neighbouring columns (and across the 0/360° edge when ``wrap``);
        collapsed = all sky or all ground; ``spread`` = highest − lowest skyline row."""
        layout = score_layout(image)
        sky = vertical_median3(image > 0)
        rows = sky.int().sum(0)  # with one transition, sky on top: the skyline row of each column
        steps = torch.diff(torch.cat([rows, rows[:1]]) if wrap else rows).abs()
        coherent = layout.coherent and int(steps.max()) <= 1
        return {"coherent": coherent, "collapsed": layout.uniform, "transitions": layout.transitions,
                "spread": int(rows.max() - rows.min()) if coherent else None}


class GaussianPrior:
    """A Gaussian prior over one-channel window×window images: a smooth field (squared-exponential covariance of
    length ``length`` px) plus texture of std τ; or, with ``exponent``, a field whose power spectrum falls as
    1/f^exponent (natural images: 2; ``spectrum.power_law_covariance``), detail at every scale. Its exact
    denoiser is linear, so each eigenmode evolves on its own: the setting of the per-mode analysis of a coarse
    level's starting state and of the detail measure (docs/layout.md). It has no layout to score;
    ``bench/layout.py --gaussian`` measures the variance of its large-scale modes, ``--detail`` its spectrum."""

    name = "gaussian"

    def __init__(self, window: int = 16, length: float = 6.0, texture: float = 0.3, scheduler=None,
                 exponent: float | None = None):
        self.window, self.width, self.texture = window, window, texture  # ``width``: what MixturePrior.denoiser counts
        self.work = {"forwards": 0, "backwards": 0}
        self.alphas_cumprod = (scheduler or sd_ddim_scheduler()).alphas_cumprod.double()
        if exponent is not None:
            self.name = f"power law 1/f^{exponent:g}"
            self.covariance = power_law_covariance(window, exponent, texture)
        else:
            grid = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"), -1).flatten(0, 1)
            distance2 = (grid[:, None, :] - grid[None, :, :]).double().pow(2).sum(-1)
            self.covariance = torch.exp(-distance2 / (2 * length**2)) + texture**2 * torch.eye(window * window)
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(self.covariance)

    def posterior_mean(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """E[x₀ | x_t] = √ᾱ Σ (ᾱ Σ + (1 − ᾱ) I)⁻¹ x_t, mode by mode."""
        gains = math.sqrt(alpha) * self.eigenvalues / (alpha * self.eigenvalues + 1 - alpha)
        modes = x.flatten(-2) @ self.eigenvectors
        return ((modes * gains) @ self.eigenvectors.T).view(x.shape)

    eps = MixturePrior.eps
    denoiser = MixturePrior.denoiser

    def for_width(self, width: int) -> "GaussianPrior":
        if width != self.window:
            raise ValueError(f"the Gaussian prior has no {self.window}×{width} version")
        return self

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        white = torch.randn(count, self.window * self.window, generator=generator, dtype=torch.float64)
        return ((white * self.eigenvalues.sqrt()) @ self.eigenvectors.T).view(count, self.window, self.window)


# ----------------------------------------------------------------------------------- image helpers


def majority3x3(mask: torch.Tensor, wrap: bool) -> torch.Tensor:
    """3×3 majority vote of a boolean (H, W) map (edges repeat; columns wrap when ``wrap``), so single
    texture outliers make no object."""
    padded = torch.nn.functional.pad(mask.double()[None, None], (1, 1, 0, 0), mode="circular" if wrap else "replicate")
    padded = torch.nn.functional.pad(padded, (0, 0, 1, 1), mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 3, stride=1)[0, 0] > 0.5


def connected_components(mask: torch.Tensor, wrap: bool) -> torch.Tensor:
    """4-connected labels of a boolean (H, W) map (0 = background; columns wrap when ``wrap``), by
    propagating the smallest pixel index until nothing changes."""
    height, width = mask.shape
    big = height * width + 1
    labels = torch.where(mask, torch.arange(1, big).view(height, width), big)
    while True:
        neighbours = [labels.roll(1, 0), labels.roll(-1, 0), labels.roll(1, 1), labels.roll(-1, 1)]
        neighbours[0][0], neighbours[1][-1] = big, big  # no wrap between top and bottom
        if not wrap:
            neighbours[2][:, 0], neighbours[3][:, -1] = big, big
        updated = torch.where(mask, torch.stack([labels, *neighbours]).min(0).values, big)
        if torch.equal(updated, labels):
            return torch.where(mask, labels, 0)
        labels = updated


def _runs(row: torch.Tensor, wrap: bool) -> int:
    """Number of runs of True in a boolean row (circular when ``wrap``)."""
    if row.all():
        return 1
    starts = row & ~torch.cat([row[-1:] if wrap else row.new_zeros(1), row[:-1]])
    return int(starts.sum())


def _extent(positions: torch.Tensor, length: int, wrap: bool) -> int:
    """Span of a set of positions; on a circle, the shortest arc that holds them all."""
    values = positions.unique().sort().values
    if not wrap or len(values) == length:
        return int(values[-1] - values[0] + 1)
    gaps = torch.diff(torch.cat([values, values[:1] + length]))
    return int(length - gaps.max() + 1)
