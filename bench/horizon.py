"""An analytic "horizon prior" and an exact denoiser for it, to test MSD's layout claim without weights.

Prior over one-channel window×window images: a uniform mixture of Gaussians, one component per horizon
row h: mean +1 (sky) on rows above h, −1 (ground) from row h down, independent texture noise of std τ.
Horizon rows range beyond the window, so some components are all sky or all ground.

Under x_t = √ᾱ x₀ + √(1−ᾱ) ε every component stays Gaussian, so the posterior mean E[x₀ | x_t] — the
best possible ε-prediction model — has a closed form: component weights from the Gaussian likelihoods
(a softmax), and per component the linear Gaussian posterior mean. It is exact, differentiable (so
``gradient="exact"`` backpropagates through it) and costs two small matrix products per batch.

Several panoramas are sampled in one run by putting one seed per channel: the denoiser treats every
(window, channel) pair as its own image, and ds, crops and merges act per channel, so channels never mix.
The helpers here sample with msd_core's sampler pieces and score the layout of the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from msd_core.models import sd_ddim_scheduler
from msd_core.pipeline import default_levels
from msd_core.sampler import (
    DDIMTimestep,
    LevelResult,
    build_pyramid,
    cosine_decay,
    cross_scale_discrepancy,
    cross_scale_loss,
    ddim_jacobian,
    ddim_step,
    guidance_scale,
    msd_level_step,
    msd_step,
    multidiffusion_step,
    solver_schedule,
)
from msd_core.windows import WindowGrid

TRAIN_STEPS = 1000
SD_COARSE_NUMEL = 4 * 32 * 32  # what F.mse_loss divides by on an SD coarse crop (64-latent window)
NOISE_MODES = ("literal", "fresh", "snr")
VIEW_BATCH = 1024  # windows per denoiser call: batching never changes results, and the prior is cheap


class HorizonPrior:
    """The mixture prior and its exact posterior-mean denoiser (float64)."""

    def __init__(self, window: int = 16, horizons=range(-4, 21), texture: float = 0.3, scheduler=None):
        self.window = window
        self.texture = texture
        rows = torch.arange(window)
        horizon = torch.tensor(list(horizons))
        # (K, window): each component's row profile; rows above the horizon row are sky (+1).
        self.profiles = torch.where(rows[None, :] < horizon[:, None], 1.0, -1.0).double()
        self.alphas_cumprod = (scheduler or sd_ddim_scheduler()).alphas_cumprod.double()

    @property
    def uniform_fraction(self) -> float:
        """Share of components that are all sky or all ground."""
        return float((self.profiles.abs().sum(1) == self.profiles.sum(1).abs()).double().mean())

    def posterior_mean(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """E[x₀ | x_t = x] for images (..., window, window) at cumulative alpha ᾱ."""
        var = alpha * self.texture**2 + 1 - alpha  # per-pixel variance of x_t within a component
        profiles = self.profiles.to(x)
        # log N(x; √ᾱ μ_k, var I) up to a k-independent constant (‖μ_k‖² is the same for all k).
        logits = math.sqrt(alpha) * (x.sum(-1) @ profiles.T) / var
        mixed = torch.softmax(logits, dim=-1) @ profiles  # Σ_k w_k μ_k as a row profile
        gain = math.sqrt(alpha) * self.texture**2 / var  # per component: μ_k + gain (x − √ᾱ μ_k)
        return (1 - gain * math.sqrt(alpha)) * mixed[..., None] + gain * x

    def eps(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (x - math.sqrt(alpha) * self.posterior_mean(x, alpha)) / math.sqrt(1 - alpha)

    def denoiser(self, alpha_map=lambda alpha: alpha):
        """denoise(x, t) → ε for msd_core's sampler; ``alpha_map`` re-labels ᾱ_t (SNR-matched levels)."""

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            return self.eps(x, alpha_map(float(self.alphas_cumprod[t])))

        return denoise

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` exact draws from the prior, (count, window, window)."""
        component = torch.randint(len(self.profiles), (count,), generator=generator)
        texture = torch.randn(count, self.window, self.window, generator=generator, dtype=torch.float64)
        return self.profiles[component][:, :, None] + self.texture * texture


# ------------------------------------------------------------------------------------------- sampling


def matched_alpha(alpha: float, depth: int) -> float:
    """ᾱ' of the timestep whose SNR equals that of ds^depth(z_t).

    ds^d (2^d×2^d averaging) keeps the signal √ᾱ·ds(x₀) and divides the noise std by 2^d, so the SNR
    ᾱ/(1−ᾱ) grows by 4^d: ᾱ'/(1−ᾱ') = 4^d ᾱ/(1−ᾱ)  ⇔  ᾱ' = 4^d ᾱ / (1 + (4^d − 1) ᾱ).
    """
    gain = 4.0**depth
    return gain * alpha / (1 + (gain - 1) * alpha)


@dataclass
class Trajectory:
    """What a run recorded besides its result."""

    discrepancy: list[float] = field(default_factory=list)  # per step: mean over level pairs


def pyramid_step(
    latents: torch.Tensor,
    grids: list[WindowGrid],
    step: DDIMTimestep,
    prior: HorizonPrior,
    omega: float,
    *,
    noise: str = "literal",
    gradient: str = "fast",
    omega_loss: str = "projection",
    view_batch: int = VIEW_BATCH,
    generator: torch.Generator | None = None,
    on_level=None,
) -> torch.Tensor:
    """Algorithm 1 built from the sampler's pieces, with a choice of how coarse levels treat their noise.

    - "literal": ds(z_t) is denoised as if it were at timestep t (the paper; equals ``msd_step``).
    - "fresh":   fresh Gaussian noise restores the variance ds removed, so the level is at t in fact.
    - "snr":     the level is rescaled to the variance-preserving form of the timestep with the same SNR
                 (``matched_alpha``), stepped there, and scaled back; no noise is added.
    ``gradient`` is one of the sampler's modes ("fast", "refresh", "exact"), "fast-2f" (the name this
    bench first gave "refresh"), or ``level_step_variant``'s "exact-1f".
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"unknown noise mode {noise!r}")
    levels = len(grids)
    pyramid = build_pyramid(latents, levels)
    prev = None
    for index, grid in enumerate(grids):
        depth = levels - 1 - index
        level_step, denoise, scale_in, scale_out = step, prior.denoiser(), 1.0, 1.0
        level_latents = pyramid[index]
        if depth and noise == "fresh":
            extra = math.sqrt((1 - step.alpha) * (1 - 4.0**-depth))
            level_latents = level_latents + extra * torch.randn(
                level_latents.shape, generator=generator, dtype=level_latents.dtype
            )
        elif depth and noise == "snr":
            alpha, alpha_prev = matched_alpha(step.alpha, depth), matched_alpha(step.alpha_prev, depth)
            level_step = DDIMTimestep(step.t, alpha, alpha_prev)
            denoise = prior.denoiser(lambda a, depth=depth: matched_alpha(a, depth))
            scale_in, scale_out = math.sqrt(alpha / step.alpha), math.sqrt(alpha_prev / step.alpha_prev)
        if index == 0 or omega == 0:
            out, x0 = multidiffusion_step(scale_in * level_latents, grid, level_step, denoise, view_batch=view_batch)
        elif gradient == "exact-1f":
            out, x0 = level_step_variant(
                scale_in * level_latents, scale_out * prev, grid, level_step, denoise, omega, omega_loss
            )
        else:
            out, x0 = msd_level_step(
                scale_in * level_latents, scale_out * prev, grid, level_step, denoise, omega,
                gradient="refresh" if gradient == "fast-2f" else gradient, omega_loss=omega_loss, view_batch=view_batch,
            )
        prev = out / scale_out
        if on_level:
            on_level(LevelResult(index + 1, prev, x0))
    return prev


def level_step_variant(latents, coarse_prev, grid, step, denoise, omega, omega_loss):
    """"exact-1f": msd_level_step's exact gradient, but Φ(x̂) reuses ε(x) from the gradient pass
    (1 forward + 1 backward), to see where "exact" gains over "fast"."""
    windows, targets = grid.crop(latents), grid.coarse_crop(coarse_prev)
    scale = guidance_scale(omega_loss, targets[0].numel(), ddim_jacobian(step))
    with torch.enable_grad():
        x = windows.detach().requires_grad_(True)
        output = denoise(x, step.t)
        prev, _ = ddim_step(x, output, step)
        (grad,) = torch.autograd.grad(cross_scale_loss(prev, targets, scale), x)
    prev, x0 = ddim_step(windows - omega * grad, output.detach(), step)
    return grid.merge(prev), grid.merge(x0)


def make_grids(height: int, width: int, window: int, stride: int, wrap: bool, levels: int | None = None):
    levels = levels or default_levels(height, width, window)
    return [
        WindowGrid(height >> (levels - 1 - i), width >> (levels - 1 - i), window, stride, wrap) for i in range(levels)
    ]


def sample_panoramas(
    prior: HorizonPrior,
    height: int,
    width: int,
    seeds: list[int],
    *,
    omega: float = 0.0,
    gradient: str = "fast",
    omega_loss: str = "projection",
    mean_numel: int | None = None,
    noise: str = "literal",
    steps: int = 50,
    stride: int = 4,
    wrap: bool = False,
    levels: int | None = None,
    scheduler: str = "ddim",
) -> tuple[torch.Tensor, Trajectory]:
    """One panorama per seed (as channels of one latent), (len(seeds), height, width), and the
    cross-scale discrepancy along the way. ω is decayed as the pipeline does: ω·cosine_decay(t).

    ``omega_loss="mean"`` divides by ``mean_numel`` elements per window (default: one channel's coarse
    crop); the ω passed to the sampler is rescaled so that stacking seeds as channels changes nothing.
    ``scheduler``: "ddim" or "dpmpp-2m" (only with the literal noise and the sampler's gradient modes).
    """
    grids = make_grids(height, width, prior.window, stride, wrap, levels)
    schedule = solver_schedule(scheduler, sd_ddim_scheduler(), steps)
    x0_history = [None] * len(grids)  # the multistep solver's memory (DDIM ignores it)
    sampler_modes = noise == "literal" and gradient in ("fast", "refresh", "exact")
    if scheduler != "ddim" and not sampler_modes:
        raise ValueError("the other noise modes and gradient variants are built for DDIM steps only")
    latents = torch.stack(
        [torch.randn(height, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) for seed in seeds]
    )[None]
    if omega_loss == "mean":
        # The sampler divides by the numel of all channels' coarse crop; one image divides by mean_numel.
        coarse_numel = len(seeds) * (prior.window // 2) ** 2
        omega = omega * coarse_numel / (mean_numel or (prior.window // 2) ** 2)
    generator = torch.Generator().manual_seed(10_000 + seeds[0])
    trajectory = Trajectory()
    for step in schedule:
        levels_out: list[torch.Tensor] = []

        def record(result: LevelResult) -> None:
            levels_out.append(result.latents)

        omega_t = omega * cosine_decay(step.t, TRAIN_STEPS)
        if sampler_modes:
            latents = msd_step(
                latents, grids, step, prior.denoiser(), omega_t, gradient=gradient, omega_loss=omega_loss,
                view_batch=VIEW_BATCH, on_level=record, x0_history=x0_history,
            )
        else:
            latents = pyramid_step(
                latents, grids, step, prior, omega_t, noise=noise, gradient=gradient, omega_loss=omega_loss,
                generator=generator, on_level=record,
            )
        if len(levels_out) > 1:
            pairs = zip(levels_out[1:], levels_out[:-1])
            trajectory.discrepancy.append(sum(cross_scale_discrepancy(f, c) for f, c in pairs) / (len(levels_out) - 1))
    return latents[0].detach(), trajectory


# -------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class Layout:
    coherent: bool  # every column has exactly one sky→ground transition, sky on top
    uniform: bool  # the whole panorama is one class (all sky or all ground)
    transitions: float  # mean transitions per column
    horizon_spread: float | None  # max − min horizon row over columns, when coherent


def vertical_median3(sky: torch.Tensor) -> torch.Tensor:
    """3-tap vertical majority of a boolean (H, W) map (edges repeat), so a lone texture outlier is no
    transition."""
    padded = torch.cat([sky[:1], sky, sky[-1:]]).int()
    return (padded[:-2] + padded[1:-1] + padded[2:]) >= 2


def score_layout(image: torch.Tensor) -> Layout:
    """Layout of one (H, W) sample: sky is > 0."""
    sky = vertical_median3(image > 0)
    changes = sky[1:] != sky[:-1]
    per_column = changes.sum(0)
    coherent = bool((per_column == 1).all() and sky[0].all() and not sky[-1].any())
    uniform = bool(sky.all() or not sky.any())
    spread = None
    if coherent:
        rows = changes.int().argmax(0)
        spread = int(rows.max() - rows.min())
    return Layout(coherent, uniform, float(per_column.double().mean()), spread)


def seam_ratio(image: torch.Tensor) -> float:
    """Mean |first − last column| over the mean difference of interior neighbouring columns (…, H, W):
    ≈ 1 when the 0/360° edge looks like any other pair of neighbours, larger when it shows."""
    image = image.double()
    edge = (image[..., 0] - image[..., -1]).abs().mean()
    interior = (image[..., 1:] - image[..., :-1]).abs().mean()
    return float(edge / interior)
