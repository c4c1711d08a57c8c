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

import copy
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from msd_core.models.loading import sd_ddim_scheduler
from msd_core.pipeline import default_levels
from msd_core.sampling.plan import Plan, make_plan
from msd_core.sampling.sampler import (
    DDIMTimestep,
    LevelResult,
    alphas_cumprod,
    build_pyramid,
    cosine_decay,
    cross_scale_discrepancy,
    cross_scale_loss,
    ddim_jacobian,
    alpha_at,
    ddim_step,
    drawn_start,
    guidance_scale,
    matched_alpha,
    msd_level_step,
    msd_step,
    multidiffusion_step,
    solver_schedule,
    start_schedule,
)
from msd_core.sampling.sphere import CapProjection, pole_cap_step
from msd_core.sampling.windows import WindowGrid, feathered_weights, global_level, level_factor

TRAIN_STEPS = 1000
SD_COARSE_NUMEL = 4 * 32 * 32  # what F.mse_loss divides by on an SD coarse crop (64-latent window)
NOISE_MODES = ("literal", "matched", "fresh", "snr")
VIEW_BATCH = 1024  # windows per denoiser call: batching never changes results, and the prior is cheap


class MixturePrior:
    """A uniform mixture-of-Gaussians prior over one-channel window×window images whose component means
    are ±1 everywhere (so all have the same norm) with i.i.d. texture of std τ, and its exact
    posterior-mean denoiser (float64). Subclasses say how the mixture's mean is weighted (``mixed_mean``),
    list their components (``components``) and score a panorama (``score``).

    ``widened(width)`` is the same prior over window×width images (a model that knows a wider aspect, as
    a 360° LoRA trained at 2:1 does): the denoiser hands windows of that width to it."""

    name = "mixture"
    # Whether the layout must run into the poles of a 360° world (a river from the bottom edge to the top):
    # bench/layout.py then also scores it without the polar rows, where a sphere-correct world cannot draw it.
    runs_through_poles = False

    def __init__(self, window: int, texture: float, scheduler=None):
        self.window = window
        self.width = window  # columns of the images; ``widened`` makes wider ones
        self.circular = False  # whether placements wrap around the columns (``widened``)
        self.wider: dict[int, MixturePrior] = {}
        self.texture = texture
        self.work = {"forwards": 0, "backwards": 0}  # window evaluations by ``denoiser()``s, summed over calls
        self.alphas_cumprod = (scheduler or sd_ddim_scheduler()).alphas_cumprod.double()

    def widened(self, width: int, circular: bool = False) -> "MixturePrior":
        """The same prior over window × ``width`` images: every object size and placement of this one,
        placed anywhere along the wider columns (around them when ``circular``: a model trained on 360°
        images, whose objects may cross the 0/360° edge). Registered so that ``denoiser()`` uses it for
        windows ``width`` wide; returns it."""
        wide = copy.copy(self)
        wide.width, wide.circular, wide.wider = width, circular, {}
        wide.lay_out()
        self.wider[width] = wide
        return wide

    def lay_out(self) -> None:
        """Recompute what depends on the images' width (``self.width``, ``self.circular``)."""

    def for_width(self, width: int) -> "MixturePrior":
        """The prior that denoises windows ``width`` wide: this one, or a registered ``widened`` one."""
        if width == self.width:
            return self
        if width not in self.wider:
            raise ValueError(f"the {self.name} prior has no {self.window}×{width} version: call widened({width}) first")
        return self.wider[width]

    def mixed_mean(self, x: torch.Tensor, alpha: float, var: float) -> torch.Tensor:
        """Σ_k w_k μ_k with w_k ∝ π_k N(x; √ᾱ μ_k, var I): the softmax of log π_k + √ᾱ x·μ_k / var
        (‖μ_k‖² is the same for all k)."""
        raise NotImplementedError

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every component's mean (K, window, window) and log-weight (K,), written out (for tests)."""
        raise NotImplementedError

    def score(self, image: torch.Tensor, wrap: bool = False) -> dict:
        """Layout of one (H, W) sample: at least ``coherent`` and ``collapsed`` (one uniform scene)."""
        raise NotImplementedError

    def posterior_mean(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """E[x₀ | x_t = x] for images (..., window, window) at cumulative alpha ᾱ."""
        var = alpha * self.texture**2 + 1 - alpha  # per-pixel variance of x_t within a component
        gain = math.sqrt(alpha) * self.texture**2 / var  # per component: μ_k + gain (x − √ᾱ μ_k)
        return (1 - gain * math.sqrt(alpha)) * self.mixed_mean(x, alpha, var) + gain * x

    def eps(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (x - math.sqrt(alpha) * self.posterior_mean(x, alpha)) / math.sqrt(1 - alpha)

    def denoiser(self, alpha_map=lambda alpha: alpha):
        """denoise(x, t) → ε for msd_core's sampler; ``alpha_map`` re-labels ᾱ_t (SNR-matched levels)."""

        def denoise(x: torch.Tensor, t: int) -> torch.Tensor:
            # UNet work as a real model would do it: one forward per window area, one backward when differentiated.
            windows = x.shape[0] * x.shape[-1] // self.width
            self.work["forwards"] += windows
            self.work["backwards"] += windows if x.requires_grad and torch.is_grad_enabled() else 0
            prior = self.for_width(x.shape[-1])
            return prior.eps(x, alpha_map(alpha_at(self.alphas_cumprod, t)))  # t is fractional at matched levels

        return denoise

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` exact draws from the prior, (count, window, width)."""
        means, log_weights = self.components()
        component = torch.multinomial(log_weights.exp(), count, replacement=True, generator=generator)
        texture = torch.randn(count, self.window, self.width, generator=generator, dtype=torch.float64)
        return means[component] + self.texture * texture


class HorizonPrior(MixturePrior):
    """Sky (+1) above a horizon row, ground (−1) from it down; the horizon row uniform over ``horizons``."""

    name = "horizon"

    def __init__(self, window: int = 16, horizons=range(-4, 21), texture: float = 0.3, scheduler=None):
        super().__init__(window, texture, scheduler)
        rows = torch.arange(window)
        horizon = torch.tensor(list(horizons))
        # (K, window): each component's row profile; rows above the horizon row are sky (+1).
        self.profiles = torch.where(rows[None, :] < horizon[:, None], 1.0, -1.0).double()

    @property
    def uniform_fraction(self) -> float:
        """Share of components that are all sky or all ground."""
        return float((self.profiles.abs().sum(1) == self.profiles.sum(1).abs()).double().mean())

    def mixed_mean(self, x: torch.Tensor, alpha: float, var: float) -> torch.Tensor:
        profiles = self.profiles.to(x)
        logits = math.sqrt(alpha) * (x.sum(-1) @ profiles.T) / var
        return (torch.softmax(logits, dim=-1) @ profiles)[..., None].expand(x.shape)  # a row profile

    def components(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = len(self.profiles)
        return self.profiles[:, :, None].expand(-1, -1, self.width), torch.full((count,), -math.log(count)).double()

    def score(self, image: torch.Tensor, wrap: bool = False) -> dict:
        """coherent = one sky→ground transition in every column, sky on top; collapsed = all sky or
        all ground (``score_layout``)."""
        layout = score_layout(image)
        return {"coherent": layout.coherent, "collapsed": layout.uniform, "transitions": layout.transitions,
                "spread": layout.horizon_spread}


# ------------------------------------------------------------------------------------------- sampling


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
    - "matched": msd_core's ``coarse_noise="matched"`` (``sample_panoramas`` runs ``msd_step``); "snr" below
                 is this bench's own version of it, written independently (a test compares the two).
    - "fresh":   fresh Gaussian noise restores the variance ds removed, so the level is at t in fact.
    - "snr":     the level is rescaled to the variance-preserving form of the timestep with the same SNR
                 (``matched_alpha``), stepped there, and scaled back; no noise is added.
    ``gradient`` is one of the sampler's modes ("fast", "refresh", "exact"), "fast-2f" (the name this
    bench first gave "refresh"), or ``level_step_variant``'s "exact-1f".
    """
    if noise not in NOISE_MODES or noise == "matched":
        raise ValueError(f"noise mode {noise!r} is not one of pyramid_step's (matched runs msd_step)")
    factors = [level_factor(fine, coarse) for coarse, fine in zip(grids, grids[1:])]
    pyramid = build_pyramid(latents, len(grids), factors)
    prev = None
    for index, grid in enumerate(grids):
        block = math.prod(fh * fw for fh, fw in factors[index:])  # pixels averaged into one here
        level_step, denoise, scale_in, scale_out = step, prior.denoiser(), 1.0, 1.0
        level_latents = pyramid[index]
        if block > 1 and noise == "fresh":
            extra = math.sqrt((1 - step.alpha) * (1 - 1 / block))
            level_latents = level_latents + extra * torch.randn(
                level_latents.shape, generator=generator, dtype=level_latents.dtype
            )
        elif block > 1 and noise == "snr":
            alpha, alpha_prev = matched_alpha(step.alpha, block), matched_alpha(step.alpha_prev, block)
            level_step = DDIMTimestep(step.t, alpha, alpha_prev)
            denoise = prior.denoiser(lambda a, block=block: matched_alpha(a, block))
            scale_in, scale_out = math.sqrt(alpha / step.alpha), math.sqrt(alpha_prev / step.alpha_prev)
        if index == 0 or omega == 0:
            out, x0 = multidiffusion_step(scale_in * level_latents, grid, level_step, denoise, view_batch=view_batch)
        elif gradient == "exact-1f":
            out, x0 = level_step_variant(
                scale_in * level_latents, scale_out * prev, grid, level_step, denoise, omega, omega_loss, factors[index - 1]
            )
        else:
            out, x0 = msd_level_step(
                scale_in * level_latents, scale_out * prev, grid, level_step, denoise, omega,
                gradient="refresh" if gradient == "fast-2f" else gradient, omega_loss=omega_loss, view_batch=view_batch,
                factor=factors[index - 1],
            )
        prev = out / scale_out
        if on_level:
            on_level(LevelResult(index + 1, prev, x0))
    return prev


def level_step_variant(latents, coarse_prev, grid, step, denoise, omega, omega_loss, factor=(2, 2)):
    """"exact-1f": msd_level_step's exact gradient, but Φ(x̂) reuses ε(x) from the gradient pass
    (1 forward + 1 backward), to see where "exact" gains over "fast"."""
    windows, targets = grid.crop(latents), grid.coarse_crop(coarse_prev, factor)
    scale = guidance_scale(omega_loss, targets[0].numel(), ddim_jacobian(step), factor[0] * factor[1])
    with torch.enable_grad():
        x = windows.detach().requires_grad_(True)
        output = denoise(x, step.t)
        prev, _ = ddim_step(x, output, step)
        (grad,) = torch.autograd.grad(cross_scale_loss(prev, targets, scale, factor), x)
    prev, x0 = ddim_step(windows - omega * grad, output.detach(), step)
    return grid.merge(prev), grid.merge(x0)


def make_grids(height: int, width: int, window: int, stride: int, wrap: bool, levels: int | None = None,
               global_view: bool = False):
    """The pipeline's pyramid (coarsest first), with a ``windows.global_level`` on top when ``global_view``."""
    levels = levels or default_levels(height, width, window)
    grids = [
        WindowGrid(height >> (levels - 1 - i), width >> (levels - 1 - i), window, stride, wrap) for i in range(levels)
    ]
    top = global_level(grids[0]) if global_view else None
    return [top, *grids] if top else grids


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
    global_view: bool = False,
    decay=None,
    on_step=None,
    scheduler: str = "ddim",
) -> tuple[torch.Tensor, Trajectory]:
    """One panorama per seed (as channels of one latent), (len(seeds), height, width), and the
    cross-scale discrepancy along the way. ω is decayed as the pipeline does: ω·cosine_decay(t).

    ``omega_loss="mean"`` divides by ``mean_numel`` elements per window (default: one channel's coarse
    crop); the ω passed to the sampler is rescaled so that stacking seeds as channels changes nothing.
    ``on_step(index, levels)`` receives every step's ``LevelResult``s, coarsest first (diagnosis).
    ``scheduler``: "ddim" or "dpmpp-2m" (only with msd_core's noise modes and the sampler's gradient modes).
    """
    grids = make_grids(height, width, prior.window, stride, wrap, levels, global_view)
    schedule = solver_schedule(scheduler, sd_ddim_scheduler(), steps)
    x0_history = [None] * len(grids)  # the multistep solver's memory (DDIM ignores it)
    # msd_step at ω = 0 denoises only the finest level; with literal noise pyramid_step (the same math)
    # denoises every level, so the cross-scale discrepancy of unguided levels is still recorded.
    sampler_modes = (noise in ("literal", "matched") and gradient in ("fast", "refresh", "exact")
                     and not (omega == 0 and noise == "literal" and scheduler == "ddim"))
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
    for index, step in enumerate(schedule):
        levels_out: list[LevelResult] = []

        def record(result: LevelResult) -> None:
            levels_out.append(result)

        omega_t = omega * (decay or cosine_decay)(step.t, TRAIN_STEPS)
        if sampler_modes:
            latents = msd_step(
                latents, grids, step, prior.denoiser(), omega_t, gradient=gradient, omega_loss=omega_loss,
                view_batch=VIEW_BATCH, on_level=record, x0_history=x0_history, coarse_noise=noise,
                train_alphas=prior.alphas_cumprod,
            )
        else:
            latents = pyramid_step(
                latents, grids, step, prior, omega_t, noise=noise, gradient=gradient, omega_loss=omega_loss,
                generator=generator, on_level=record,
            )
        if on_step:
            on_step(index, levels_out)
        if len(levels_out) > 1:
            pairs = zip((r.latents for r in levels_out[1:]), (r.latents for r in levels_out[:-1]))
            trajectory.discrepancy.append(sum(cross_scale_discrepancy(f, c) for f, c in pairs) / (len(levels_out) - 1))
    return latents[0].detach(), trajectory


PRIOR_FACTOR = 8  # prior pixels are treated as latent pixels of an 8× "VAE", so settings stay in SD pixels


def paired_starts(starts: list[int], length: int) -> list[int]:
    """Column starts of tiles round a circle of ``length``, each with its twin half a tile spacing on: a tile's
    cut (its edge) is then the middle of its twin."""
    half = length // len(starts) // 2
    return sorted({start for tile in starts for start in (tile, (tile + half) % length)})


@dataclass(frozen=True)
class PairedPlan(Plan):
    """A ``Plan`` whose global level of a wrapped world (one window, shifted tiles) is a pair of windows half a turn
    apart at its first ``pair_steps`` steps, a drawn start's included: every column lies away from the edge of one
    of them (docs/layout.md section 7; screened, not taken)."""

    pair_steps: int = 0

    def starts_at(self, step_index: int) -> list[tuple[list[int], list[int]]]:
        starts = super().starts_at(step_index)
        if step_index < self.pair_steps:
            rows, columns = starts[0]
            starts[0] = (rows, paired_starts(columns, self.level_shape(0)[1]))
        return starts

    @classmethod
    def of(cls, plan: Plan, pair_steps: int, **changes) -> "PairedPlan":
        if not (plan.wrap and plan.windows == "shifted" and plan.squeeze > 1):
            raise ValueError("only a wrapped world's squeezed global level with shifted tiles is one window to pair")
        fields = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)}
        return cls(**{**fields, **changes, "pair_steps": pair_steps})


def sample_with_settings(prior, settings, seeds: list[int], on_step=None, circular: bool | None = None,
                         pair: dict | None = None):
    """One panorama per seed (as channels), sampled exactly as the pipeline would for ``settings``
    (msd_core.settings.GenerationSettings, sizes in SD pixels: prior pixel = latent pixel): its plan, window
    grids step by step, solver, ω decay and coarse-level noise, with the prior as the model. Returns the
    images (len(seeds), H, W) and the plan. ``on_step(index, levels)`` as in ``sample_panoramas``.

    A wide global window (``global_window="wide"``) is denoised by the prior ``widened`` to its width, as
    a model trained at that aspect would; around its columns (``circular``, default: for a wrapping world)
    as a 360° model would.

    ``pair`` (bench only, ``PairedPlan``): the global level as two windows half a turn apart, {"weights": "uniform",
    "feathered" (each window's weights fall off linearly towards its left and right edge, its cut; a twin's then
    add up to the same everywhere) or "middle" (only its middle half counts); "steps": how many steps pair (default
    all); "roll": False for a pair that does not move}."""
    plan = make_plan(settings, PRIOR_FACTOR, prior.window * PRIOR_FACTOR)
    weights = [None] * plan.levels
    if pair:
        plan = PairedPlan.of(plan, pair.get("steps", plan.steps), roll=pair.get("roll", plan.roll))
        if pair["weights"] == "feathered":
            weights[0] = feathered_weights((1, plan.window))
        elif pair["weights"] == "middle":  # each column from the one window that holds it in its middle half
            weights[0] = (torch.arange(plan.window) // (plan.window // 4) % 3 != 0).double()[None]
    if plan.wide > 1:
        prior.widened(plan.wide * prior.window, circular=plan.wrap if circular is None else circular)
    scheduler = sd_ddim_scheduler()
    schedule = solver_schedule(settings.scheduler, scheduler, plan.steps)
    x0_history = [None] * plan.levels  # a multistep solver's memory (DDIM ignores it)
    # Each seed draws its initial noise, then any fresh noise of a stochastic join (as the pipeline does).
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = torch.stack([torch.randn(plan.height, plan.width, generator=generator, dtype=torch.float64)
                           for generator in generators])[None]
    omega = settings.omega if settings.method == "msd" else 0.0
    denoise = prior.denoiser()
    if plan.start_steps:  # coarse_noise "drawn", as the pipeline does it
        start = start_schedule(settings.scheduler, alphas_cumprod(schedule[0])[0], math.prod(plan.coarsest_factor),
                               plan.start_steps, scheduler.alphas_cumprod)
        latents = drawn_start(latents, plan.start_grids(), plan.coarsest_factor, start, denoise, view_batch=VIEW_BATCH,
                              weights=weights[0])
    caps = CapProjection(plan.height, plan.width, plan.caps) if plan.caps else None  # a 2:1 world's pole caps
    cap_views = None
    for index, step in enumerate(schedule):
        levels_out: list[LevelResult] = []
        gradient = plan.gradient_at(index)
        omega_t = omega * cosine_decay(step.t, TRAIN_STEPS) if gradient else 0.0
        before, x0_before = latents, x0_history[-1]
        latents = msd_step(latents, plan.grids_at(index), step, denoise, omega_t,
                           gradient=gradient or settings.gradient, coarse_gradient=settings.coarse_gradient,
                           pull_through=settings.pull_through, omega_loss=settings.omega_loss, view_batch=VIEW_BATCH,
                           weights=weights, x0_history=x0_history, on_level=levels_out.append, coarse_noise=settings.coarse_noise,
                           train_alphas=scheduler.alphas_cumprod, levels_run=plan.levels_at(index),
                           fresh_noise=(lambda: torch.stack([torch.randn(plan.height, plan.width, generator=generator,
                                                                         dtype=torch.float64) for generator in generators])[None])
                           if plan.stochastic_at(index) else None, fresh_scope=plan.fresh_scope_at(index))
        if caps is not None and plan.caps_at(index):  # as the pipeline runs them: guided towards the next coarser level's caps
            coarse = levels_out[-2].latents if gradient and len(levels_out) > 1 else None
            cap_views = pole_cap_step(
                before, x0_before, latents, x0_history[-1], caps, plan.cap_grid_at(index), step, denoise,
                caps=cap_views, view_batch=VIEW_BATCH, coarse=coarse, omega=omega_t, omega_loss=settings.omega_loss)
        if on_step:
            on_step(index, levels_out)
    if cap_views is not None:  # the caps' last step, over the poles
        latents = caps.blend(latents, None, cap_views, alphas_cumprod(schedule[-1])[1])[0]
    return latents[0].detach(), plan


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
