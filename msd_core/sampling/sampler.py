"""Multi-Scale Diffusion (arXiv 2410.18830, Algorithm 1) as small functions on tensors.

The model enters only as a ``Denoiser``: ``denoise(x, t) -> model_output`` for a batch of windows
(classifier-free guidance included). Everything else is plain tensor math, so the tests and the
analytic-prior benchmark call these functions directly with any denoiser.

Notation: Φ(x) is one solver step of a window x at timestep t (DDIM, or DPM-Solver++ (2M) whose memory,
the previous step's x₀ estimate, the loop keeps per pyramid level), ds the bilinear ×½ downsample,
F_i / F'_i the window crops of a level and of the next coarser one (``windows.WindowGrid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from diffusers import DPMSolverMultistepScheduler

from ..errors import Cancelled
from .plan import level_gradient
from .windows import HALF, Factor, GuidedPart, WindowGrid, downsample, downsample_transpose, level_factor

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # (windows, timestep; fractional at matched levels)

# "projection": ω = 10 removes the whole cross-scale gap at the first step (see guidance_scale).
PROJECTION_OMEGA = 10.0


class Interrupt(Protocol):
    def is_set(self) -> bool: ...


class SolverStep(Protocol):
    """One step of a deterministic solver from timestep ``t`` to the next: Φ and its slope.

    ``previous_x0`` is the solver's memory (the x₀ estimate of the previous step for the same pixels);
    single-step solvers ignore it. ``DDIMTimestep`` and ``DPMTimestep`` are the two kinds.
    """

    t: int

    def apply(
        self, sample: torch.Tensor, model_output: torch.Tensor, prediction_type: str = "epsilon",
        previous_x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def jacobian(self, prediction_type: str = "epsilon") -> float: ...


@dataclass(frozen=True)
class DDIMTimestep:
    """One DDIM step t → t_prev: the timestep and the cumulative alphas at both ends (t is fractional
    for a coarse level denoised at its matched noise level: ``snr_matched``)."""

    t: float
    alpha: float
    alpha_prev: float

    def apply(self, sample, model_output, prediction_type="epsilon", previous_x0=None):
        """``ddim_step``; DDIM has no memory, so ``previous_x0`` is not used."""
        return ddim_step(sample, model_output, self, prediction_type)

    def jacobian(self, prediction_type="epsilon"):
        return ddim_jacobian(self, prediction_type)


def ddim_schedule(scheduler, steps: int) -> list[DDIMTimestep]:
    """The (t, ᾱ_t, ᾱ_prev) triples of a diffusers DDIMScheduler for ``steps`` inference steps."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    schedule = []
    for t in scheduler.timesteps.tolist():
        prev = t - stride
        alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        schedule.append(DDIMTimestep(int(t), float(scheduler.alphas_cumprod[t]), float(alpha_prev)))
    return schedule


def predicted_x0(sample: torch.Tensor, model_output: torch.Tensor, alpha: float, sigma: float, prediction_type: str):
    """The model's x₀ estimate at a timestep where x = α x₀ + σ ε (α = √ᾱ, σ = √(1−ᾱ))."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def ddim_step(
    sample: torch.Tensor, model_output: torch.Tensor, step: DDIMTimestep, prediction_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ: one deterministic DDIM step (η = 0). Returns (x_{t−1}, predicted x₀).

    Same arithmetic as diffusers' DDIMScheduler.step with clip_sample and thresholding off, but pure:
    it keeps no state, so every window (and every pyramid level) can be stepped independently.
    """
    signal, noise, alpha_prev = math.sqrt(step.alpha), math.sqrt(1 - step.alpha), step.alpha_prev
    x0 = predicted_x0(sample, model_output, signal, noise, prediction_type)
    eps = model_output if prediction_type == "epsilon" else signal * model_output + noise * sample
    return math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev) * eps, x0


def ddim_jacobian(step: DDIMTimestep, prediction_type: str = "epsilon") -> float:
    """c = ∂Φ(x)/∂x with the model output held constant: Φ is affine in x, so Φ(1; 0) is the slope.

    ε-prediction: c = √(ᾱ_prev/ᾱ_t) (≈ 1); v-prediction: c = √(ᾱ_prev ᾱ_t) + √((1−ᾱ_prev)(1−ᾱ_t)).
    """
    one = torch.ones((), dtype=torch.float64)
    return float(ddim_step(one, torch.zeros_like(one), step, prediction_type)[0])


@dataclass(frozen=True)
class DPMTimestep:
    """One DPM-Solver++ step from timestep t to the next, in the form x = α x₀ + σ ε (α = √ᾱ, σ = √(1−ᾱ)).

    ``ratio`` is r = h_last / h with h = λ_next − λ_t and λ = log(α/σ) (h_last: the previous step's h):
    it makes the step second order. None for a first-order step (the first one, which has no memory, and
    the last one, which goes to σ = 0 and returns x₀ itself).
    """

    t: int
    alpha: float
    sigma: float
    alpha_next: float
    sigma_next: float
    ratio: float | None

    def apply(self, sample, model_output, prediction_type="epsilon", previous_x0=None):
        return dpm_solver_step(sample, model_output, self, prediction_type, previous_x0)

    def jacobian(self, prediction_type="epsilon"):
        return dpm_solver_jacobian(self, prediction_type)

    @property
    def data_weight(self) -> float:
        """α_next (1 − e^{−h}) = α_next − σ_next α/σ: how much of the x₀ estimate enters x_next."""
        return self.alpha_next - self.sigma_next * self.alpha / self.sigma

    @property
    def history_weight(self) -> float:
        """1/(2r): the multistep correction D = x₀ + (x₀ − x₀_last)/(2r) (the 2M midpoint rule)."""
        return 0.0 if self.ratio is None else 1 / (2 * self.ratio)


def dpm_solver_schedule(config, steps: int) -> list[DPMTimestep]:
    """The steps of diffusers' DPMSolverMultistepScheduler for ``steps`` inference steps, built from a
    scheduler config as ``from_config`` does: the betas and prediction type come from the config, and so
    do settings it names explicitly; SD's configs name no timestep spacing, so it is DPM's "linspace"
    (t = 999 down to ~1000/steps, then σ = 0), not DDIM's "leading".

    The solver is DPM-Solver++ (2M) with diffusers' defaults: data prediction, second order, midpoint
    rule, first order at the first step and (final σ = 0, ``lower_order_final``) at the last one.
    """
    scheduler = DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", thresholding=False
    )
    scheduler.set_timesteps(steps)
    # diffusers' σ is √((1−ᾱ)/ᾱ) (float32, 0 after the last step); turn it into α, σ of x = α x₀ + σ ε.
    sigmas = scheduler.sigmas.double()
    alphas = 1 / torch.sqrt(sigmas**2 + 1)
    sigmas = sigmas * alphas
    lambdas = torch.log(alphas) - torch.log(sigmas)
    config = scheduler.config
    count = len(scheduler.timesteps)
    last_first_order = config.euler_at_final or config.final_sigmas_type == "zero" or (config.lower_order_final and count < 15)
    schedule = []
    for i, t in enumerate(scheduler.timesteps.tolist()):
        second_order = i > 0 and not (i == count - 1 and last_first_order)
        ratio = float((lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])) if second_order else None
        schedule.append(DPMTimestep(int(t), float(alphas[i]), float(sigmas[i]), float(alphas[i + 1]), float(sigmas[i + 1]), ratio))
    return schedule


def dpm_solver_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    step: DPMTimestep,
    prediction_type: str = "epsilon",
    previous_x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ: one DPM-Solver++ (2M) step. Returns (x_next, predicted x₀).

    x_next = (σ_next/σ) x + α_next (1 − e^{−h}) D with D = x₀ + (x₀ − x₀_last)/(2r) (D = x₀ at a
    first-order step, which is then exactly DDIM). Same arithmetic as diffusers'
    DPMSolverMultistepScheduler.step, but pure: the memory x₀_last is an argument (``previous_x0``, the
    same pixels' x₀ estimate of the previous step), so the caller keeps it per pyramid level. The step is
    affine in (x, x₀, x₀_last), so averaging windows commutes with it: the MultiDiffusion merge of the
    windows' steps is the step of the merged estimates, and a level's merged x₀ is all the memory it needs.
    """
    x0 = predicted_x0(sample, model_output, step.alpha, step.sigma, prediction_type)
    data = x0
    if step.ratio is not None:
        if previous_x0 is None:
            raise ValueError("a second-order DPM-Solver++ step needs the previous step's x₀ estimate (previous_x0)")
        data = x0 + step.history_weight * (x0 - previous_x0)
    return (step.sigma_next / step.sigma) * sample + step.data_weight * data, x0


def dpm_solver_jacobian(step: DPMTimestep, prediction_type: str = "epsilon") -> float:
    """c = ∂Φ(x)/∂x with the model output and x₀_last held constant (the fast gradient's slope).

    Φ = (σ_next/σ) x + α_next(1 − e^{−h})(1 + 1/(2r)) x₀(x) + const, and ∂x₀/∂x is 1/α (ε-prediction) or
    α (v-prediction), so c = σ_next/σ + (α_next − σ_next α/σ)(1 + 1/(2r)) ∂x₀/∂x. At a first-order step
    with ε-prediction this is α_next/α, DDIM's c; the second-order term makes it larger.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")
    dx0_dx = 1 / step.alpha if prediction_type == "epsilon" else step.alpha
    return step.sigma_next / step.sigma + step.data_weight * (1 + step.history_weight) * dx0_dx


def solver_schedule(name: str, scheduler, steps: int) -> list[SolverStep]:
    """The steps of the named solver (``settings.SCHEDULERS``) on a DDIMScheduler's training schedule."""
    if name == "ddim":
        return ddim_schedule(scheduler, steps)
    if name == "dpmpp-2m":
        return dpm_solver_schedule(scheduler.config, steps)
    raise ValueError(f"unknown scheduler {name!r} (ddim or dpmpp-2m)")


def alphas_cumprod(step) -> tuple[float, float]:
    """ᾱ at the start and at the end of a solver step, whichever solver made it (DDIM keeps ᾱ, DPM √ᾱ)."""
    if isinstance(step, DPMTimestep):
        return step.alpha**2, step.alpha_next**2
    return step.alpha, step.alpha_prev


def matched_alpha(alpha: float, gain: float) -> float:
    """ᾱ' of the noise level a latent really has after averaging ``gain`` pixels of a latent at ᾱ.

    Averaging (ds over the levels below, a global level's squeeze) keeps the signal √ᾱ·ds(x₀) and divides
    the noise variance by g, so the SNR ᾱ/(1−ᾱ) grows by g: ᾱ'/(1−ᾱ') = g ᾱ/(1−ᾱ) ⇔ ᾱ' = g ᾱ/(1 + (g − 1) ᾱ).
    """
    return gain * alpha / (1 + (gain - 1) * alpha)


def _log_snr(train_alphas: torch.Tensor) -> torch.Tensor:
    alphas = train_alphas.double()
    return torch.log(alphas) - torch.log1p(-alphas)


def alpha_at(train_alphas: torch.Tensor, t: float) -> float:
    """ᾱ at a fractional training timestep t: the log-SNR interpolated linearly between whole timesteps
    (``matched_timestep`` is its inverse). ``train_alphas``: the scheduler's ᾱ of every training timestep."""
    log_snr = _log_snr(train_alphas)
    low = min(max(int(math.floor(t)), 0), len(log_snr) - 2)
    value = float(torch.lerp(log_snr[low], log_snr[low + 1], t - low))
    return 1 / (1 + math.exp(-value))


def matched_timestep(train_alphas: torch.Tensor, alpha: float) -> float:
    """The fractional training timestep whose ᾱ is ``alpha`` (the inverse of ``alpha_at``), clamped to the
    schedule: a level less noisy than timestep 0 is denoised as at timestep 0 (the model knows no other)."""
    log_snr = _log_snr(train_alphas)  # falls as t grows
    target = math.log(alpha) - math.log1p(-alpha) if alpha < 1 else math.inf
    if target >= log_snr[0]:
        return 0.0
    if target <= log_snr[-1]:
        return float(len(log_snr) - 1)
    upper = int(torch.searchsorted(-log_snr, torch.tensor(-target, dtype=log_snr.dtype)))  # first t with λ_t ≤ target
    return upper - 1 + float((log_snr[upper - 1] - target) / (log_snr[upper - 1] - log_snr[upper]))


@dataclass(frozen=True)
class MatchedStep:
    """A coarse level's solver step taken at the noise level the level really has (``snr_matched``).

    The level's latent x (the ds of finer levels, its noise averaged over g pixels) times ``scale`` is in
    the variance-preserving form of ``matched``, the step between the matched noise levels; the model sees
    that scaled latent at timestep ``matched.t`` (``level_denoiser``), and the result is scaled back by
    ``scale_next``, so the level stays the ds of the finer ones and the guidance compares like with like.
    """

    matched: SolverStep
    scale: float
    scale_next: float

    @property
    def t(self) -> float:
        return self.matched.t

    def apply(self, sample, model_output, prediction_type="epsilon", previous_x0=None):
        """The matched step in the level's own units; x₀ needs no scaling (the signal is the same)."""
        prev, x0 = self.matched.apply(self.scale * sample, model_output, prediction_type, previous_x0)
        return prev / self.scale_next, x0

    def jacobian(self, prediction_type="epsilon"):
        return self.matched.jacobian(prediction_type) * self.scale / self.scale_next


def snr_matched(step: SolverStep, gain: float, train_alphas: torch.Tensor) -> SolverStep:
    """``step`` for a level whose noise is averaged over ``gain`` pixels: a ``MatchedStep`` between the
    matched noise levels (``matched_alpha``) at both ends; the step itself when gain is 1.

    DDIM steps move ᾱ; DPM-Solver++ steps move (α, σ) by the same rule, and their ratio r of log-SNR
    steps is unchanged (λ shifts by ½ log g at both ends). The level's x₀ estimates, a multistep solver's
    memory, are the same in both units.
    """
    if gain == 1:
        return step
    before, after = alphas_cumprod(step)
    start, end = matched_alpha(before, gain), matched_alpha(after, gain)
    t = matched_timestep(train_alphas, start)
    if isinstance(step, DPMTimestep):
        matched = DPMTimestep(t, math.sqrt(start), math.sqrt(1 - start), math.sqrt(end), math.sqrt(1 - end), step.ratio)
    else:
        matched = DDIMTimestep(t, start, end)
    return MatchedStep(matched, math.sqrt(start / before), math.sqrt(end / after))


def start_schedule(solver: str, alpha: float, gain: float, count: int, train_alphas: torch.Tensor) -> list[SolverStep]:
    """``count`` steps of ``solver`` ("ddim" or "dpmpp-2m") from ᾱ = ``alpha`` (the run's first noise level) to
    ``matched_alpha(alpha, gain)``, evenly spaced in log-SNR λ = log(ᾱ/(1−ᾱ)) (λ rises by log ``gain``), in the
    variance-preserving units of one model window; timesteps are fractional (``matched_timestep``).

    This is the trajectory the coarsest level would already have run when the finest level starts: averaging
    ``gain`` pixels makes it that much less noisy (``drawn_start``). Equal λ steps make every DPM-Solver++ step
    ratio r = 1 (the first is first order).
    """
    if count < 1 or gain <= 1:
        raise ValueError(f"a start trajectory needs at least one step and a gain above 1 (got {count}, {gain})")
    start = math.log(alpha) - math.log1p(-alpha)
    alphas = [1 / (1 + math.exp(-(start + math.log(gain) * i / count))) for i in range(count + 1)]
    steps: list[SolverStep] = []
    for i, (now, after) in enumerate(zip(alphas, alphas[1:])):
        t = matched_timestep(train_alphas, now)
        if solver == "ddim":
            steps.append(DDIMTimestep(t, now, after))
        elif solver == "dpmpp-2m":
            steps.append(DPMTimestep(t, math.sqrt(now), math.sqrt(1 - now), math.sqrt(after), math.sqrt(1 - after),
                                     None if i == 0 else 1.0))
        else:
            raise ValueError(f"unknown scheduler {solver!r} (ddim or dpmpp-2m)")
    return steps


def with_block_means(latents: torch.Tensor, means: torch.Tensor, factor: Factor) -> torch.Tensor:
    """``latents`` whose fh×fw block means are replaced by ``means`` (``latents`` ds by ``factor``), the rest
    unchanged: latents − up(ds(latents)) + up(means), up the nearest-neighbour upsample (ds∘up = identity).
    For Gaussian noise the part left is independent of the block means, so it stays valid noise."""
    up = lambda coarse: torch.nn.functional.interpolate(coarse, scale_factor=factor, mode="nearest")  # noqa: E731
    return latents - up(downsample(latents, factor)) + up(means)


def drawn_start(
    noise: torch.Tensor,
    grids: list[WindowGrid],
    factor: Factor,
    schedule: list[SolverStep],
    denoise: Denoiser,
    *,
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    interrupt: Interrupt | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The finest level's starting latent whose coarsest level already holds its large-scale content.

    A coarsest level that averages g = fh·fw latent pixels (``factor``: the whole pyramid's reduction) has,
    at the first step, the SNR of a much later timestep (``matched_alpha``): a faithful sample there already
    shows the scene's layout, while ds of pure noise shows none, and a deterministic solver started from it
    ends with too little large-scale variance (a pull towards uniform scenes that grows with g,
    docs/layout.md). So the coarsest level first runs its own trajectory (``schedule``: ``start_schedule``,
    plain MultiDiffusion on ``grids``, one per step: ``plan.Plan.start_grids``) from the unit noise √g·ds(noise)
    (independent of the rest of ``noise``), and the result, scaled into the level's units (ds of the finest),
    replaces ``noise``'s block means. With a model that predicts x₀ = 0 this returns ``noise`` itself.
    ``weights``: the coarsest level's window weight map (``plan.Plan.level_weights``).
    """
    gain = factor[0] * factor[1]
    coarse, history = downsample(noise, factor) * math.sqrt(gain), None
    if len(grids) != len(schedule):
        raise ValueError(f"a drawn start needs one grid per step: {len(grids)} grids for {len(schedule)} steps")
    for step, grid in zip(schedule, grids):
        coarse, history = multidiffusion_step(coarse, grid, step, denoise, prediction_type=prediction_type,
                                              view_batch=view_batch, weights=weights, interrupt=interrupt,
                                              previous_x0=history)
    first, last = alphas_cumprod(schedule[0])[0], alphas_cumprod(schedule[-1])[1]
    return with_block_means(noise, coarse * math.sqrt(first / last), factor)


def level_denoiser(denoise: Denoiser, step: SolverStep) -> Denoiser:
    """The denoiser for a level stepped by ``step``: a ``MatchedStep``'s model sees the scaled latent."""
    if not isinstance(step, MatchedStep):
        return denoise
    return lambda windows, t: denoise(step.scale * windows, t)


def cosine_decay(t: int, num_train_timesteps: int) -> float:
    """The paper's schedule for ω: (1 + cos(π (T − t) / T)) / 2, 1 at t = T falling to 0 at t = 0."""
    return (1 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps)) / 2


def guidance_scale(omega_loss: str, coarse_numel: int, jacobian: float = 1.0, area: int = 4) -> float:
    """The factor k in L = k · Σ (ds(Φ(x)) − y)², which fixes what a given ω means.

    One gradient step moves ds(Φ(x)) by −ω·k·c²·2·(ds dsᵀ) r = −(ω·k·c²/2)·r (ds dsᵀ = ¼ for 2×2
    averaging, 1/``area`` for an fh×fw block; r the cross-scale residual; c = ``step.jacobian()``, the
    solver's own slope), i.e. it removes the fraction ω·k·c²/2 of the gap (exactly in the fast mode, to
    first order in the exact one).
    - "sum":  k = 1: ω = 2/c² already closes the whole gap, ω = 10 overshoots about five times.
    - "mean": k = 1/numel (F.mse_loss, the paper's literal wording): ω = 10 removes ~0.1 % of the gap
      on a 4×32×32 coarse crop, which leaves MSD indistinguishable from MultiDiffusion.
    - "projection" (default): k = 2/(PROJECTION_OMEGA·c²), so ω = 10 closes the gap exactly and ω/10 is
      the fraction removed, whatever the step count (c² reaches 2 at the first steps of a 10-step run).
    """
    if omega_loss == "sum":
        return 1.0
    if omega_loss == "mean":
        return 1.0 / coarse_numel
    if omega_loss == "projection":
        return area / (2 * PROJECTION_OMEGA * jacobian**2)
    raise ValueError(f"unknown omega_loss {omega_loss!r}")


def cross_scale_loss(prev: torch.Tensor, target: torch.Tensor, scale: float, factor: Factor = HALF,
                     part: GuidedPart | None = None) -> torch.Tensor:
    """k · Σ (ds(Φ(x)) − F'(z^{s−1}_{t−1}))², summed over every window in the batch (over the blocks each window
    holds whole, ``part``, when windows start off the coarse grid)."""
    return scale * block_residual(prev, target, factor, part).pow(2).sum()


def block_residual(prev: torch.Tensor, target: torch.Tensor, factor: Factor = HALF,
                   part: GuidedPart | None = None) -> torch.Tensor:
    """ds(Φ(x)) − F'(z^{s−1}_{t−1}) per coarse block: of every block under a window on the coarse grid (``part``
    None), else of the blocks of its region it holds whole (0 at the others)."""
    if part is None:
        return downsample(prev, factor) - target
    return (downsample(part.take(prev), factor) - target) * part.whole(prev.device, prev.dtype)


def guidance_fraction(omega: float, loss_scale: float, jacobian: float, factor: Factor = HALF) -> float:
    """The share of the cross-scale gap one fast gradient step removes: ω·k·c²·2/(fh·fw) (ω/10 with the
    "projection" loss, ``guidance_scale``)."""
    return omega * loss_scale * jacobian**2 * 2 / (factor[0] * factor[1])


def close_split_blocks(merged: torch.Tensor, coarse: torch.Tensor, split: torch.Tensor, fraction: float,
                       factor: Factor = HALF) -> torch.Tensor:
    """Move each block that no window held whole (``split``, 1 there; ``WindowGrid.split_blocks``) by
    ``fraction`` of its gap to the coarser level, every pixel by the same amount: the pull a window gives a block
    it holds whole, given after the merge, where the block's pixels from both windows are together. Its detail
    within the block is kept (pulling each window's part of it alone would flatten it)."""
    gap = (coarse - downsample(merged, factor)) * split.to(merged.device, merged.dtype)
    return merged + fraction * torch.nn.functional.interpolate(gap, scale_factor=factor, mode="nearest")


def _check_interrupt(interrupt: Interrupt | None) -> None:
    if interrupt is not None and interrupt.is_set():
        raise Cancelled("generation cancelled")


def batch_slices(count: int, size: int) -> list[slice]:
    """The window batches of one model call each, in order: [0, size), [size, 2·size), …"""
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


BatchRun = Callable[[slice], tuple[torch.Tensor, torch.Tensor]]  # one batch of windows → its (x_{t−1}, x₀)
# (windows, view_batch, run_batch) → (x_{t−1}, x₀) of every window in order; ``distributed`` shards it.
BatchMap = Callable[[torch.Tensor, int, BatchRun], tuple[torch.Tensor, torch.Tensor]]


def run_batches(windows: torch.Tensor, view_batch: int, run_batch: BatchRun) -> tuple[torch.Tensor, torch.Tensor]:
    """Every batch of ``windows`` here, one after the other: the one-process ``BatchMap``."""
    results = [run_batch(batch) for batch in batch_slices(windows.shape[0], view_batch)]
    return torch.cat([prev for prev, _ in results]), torch.cat([x0 for _, x0 in results])


def _crop(grid: WindowGrid, latents: torch.Tensor | None) -> torch.Tensor | None:
    """The windows of an optional latent (the solver's memory: absent for DDIM and at the first step)."""
    return None if latents is None else grid.crop(latents)


def _part(windows: torch.Tensor | None, batch: slice) -> torch.Tensor | None:
    return None if windows is None else windows[batch]


def denoise_windows(
    windows: torch.Tensor,
    step: SolverStep,
    denoise: Denoiser,
    *,
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    interrupt: Interrupt | None = None,
    previous_x0: torch.Tensor | None = None,
    map_batches: BatchMap = run_batches,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Φ for every window, ``view_batch`` windows per model call: (x_{t−1}, x₀), each (N, C, h, w).
    ``previous_x0``: the solver's memory for these windows (N, C, h, w), if it has one. ``map_batches``
    runs the batches (here, or spread over processes: ``distributed.ShardedBatches``)."""

    def run_batch(batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        _check_interrupt(interrupt)
        output = denoise(windows[batch], step.t)
        return step.apply(windows[batch], output, prediction_type, _part(previous_x0, batch))

    return map_batches(windows, view_batch, run_batch)


def multidiffusion_step(
    latents: torch.Tensor,
    grid: WindowGrid,
    step: SolverStep,
    denoise: Denoiser,
    *,
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    weights: torch.Tensor | None = None,
    interrupt: Interrupt | None = None,
    previous_x0: torch.Tensor | None = None,
    map_batches: BatchMap = run_batches,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MultiDiffusion (Eq. 6): z_{t−1} = Σ W_i ⊗ F_i⁻¹(Φ(F_i(z_t))) / Σ W_i. Returns (z_{t−1}, merged x₀).

    ``previous_x0``: the merged x₀ of the previous step (a multistep solver's memory, shaped like
    ``latents``); every window gets its crop, so the grid may differ from the previous step's.
    """
    prev, x0 = denoise_windows(
        grid.crop(latents), step, denoise, prediction_type=prediction_type, view_batch=view_batch, interrupt=interrupt,
        previous_x0=_crop(grid, previous_x0), map_batches=map_batches,
    )
    return grid.merge(prev, weights), grid.merge(x0, weights)


def guided_windows_exact(
    windows: torch.Tensor,
    targets: torch.Tensor,
    step: SolverStep,
    denoise: Denoiser,
    omega: float,
    loss_scale: float,
    prediction_type: str = "epsilon",
    previous_x0: torch.Tensor | None = None,
    factor: Factor = HALF,
    part: GuidedPart | None = None,
    through: str = "step",
) -> torch.Tensor:
    """x̂ = x − ω ∇ₓ L(x) with autograd through the model and the solver step (the paper's method).

    Only the window latents require grad: the model's parameters are frozen, so no parameter
    gradients are kept; the solver's memory ``previous_x0`` is a constant. The caller recomputes Φ(x̂)
    with a fresh model call. ``part``: the blocks each window holds whole (``windows.GuidedPart``; None: the
    window's own). ``through``: "step" differentiates the loss through Φ (the paper); "x0" takes the direction
    through the model's x₀ estimate instead (``pull_through_x0``), at the same UNet cost.
    """
    if through not in ("step", "x0"):
        raise ValueError(f"unknown pull_through {through!r} (step or x0)")
    with torch.enable_grad():
        x = windows.detach().requires_grad_(True)
        prev, x0 = step.apply(x, denoise(x, step.t), prediction_type, previous_x0)
        if through == "step":
            (grad,) = torch.autograd.grad(cross_scale_loss(prev, targets, loss_scale, factor, part), x)
            return windows - omega * grad
        residual = block_residual(prev.detach(), targets, factor, part)
        x0_target = block_residual(x0.detach(), residual / x0_weight(step, prediction_type, previous_x0 is not None),
                                   factor, part)
        (direction,) = torch.autograd.grad(block_residual(x0, x0_target, factor, part).pow(2).sum(), x)
    held = windows - guided_windows_fast(windows, prev.detach(), targets, step, omega, loss_scale, prediction_type,
                                         factor, part)
    return windows - pull_through_x0(direction, held)


def x0_weight(step: SolverStep, prediction_type: str = "epsilon", memory: bool = False) -> float:
    """b in Φ(x) = a·x + b·x̂₀ (+ the solver's memory, ``memory``: whether the step reads one): how far the step's
    result moves per unit of the model's x₀ estimate. Every solver step is affine in its model output, so one unit
    change of that output reads b off."""
    zero = torch.zeros(1, dtype=torch.float64)
    last = zero if memory else None
    prev, x0 = step.apply(zero, zero, prediction_type, last)
    prev_moved, x0_moved = step.apply(zero, zero + 1, prediction_type, last)
    return float((prev_moved - prev) / (x0_moved - x0))


def pull_through_x0(direction: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """The pull taken through the model's x₀ estimate (``--pull-through x0``, docs/layout.md 6.16): ``direction``,
    ∂x̂₀/∂xᵀ dsᵀ(ds(x̂₀) − T), T the x₀ whose step lands on the coarser level's state, scaled per window and channel
    to the length of ``held``, the paper's pull with the model held (``guided_windows_fast``'s).

    Φ = a·x + b·x̂₀, so the paper's gradient weighs the model's own response, b·∂x̂₀/∂x − b·c₀ (c₀ = ∂x̂₀/∂x with
    the model held), only 1 − (σ'/σ)(α/α') of what it weighs in ∂x̂₀/∂x (0.17–0.27 over Standard's exact steps): the
    pull is mostly dsᵀ of the residual, every pixel of a block moved alike. For a posterior-mean denoiser ∂x̂₀/∂x =
    (α/σ²)·Cov(x₀ | x): through x̂₀ a block's pull goes to the pixels the model couples to it (a small object as a
    whole), not evenly over the block. The length is the paper's, so ω keeps its scale (the direction's own length
    follows the model's Jacobian and is not a step size); the lengths are taken in float32."""
    def length(latents: torch.Tensor) -> torch.Tensor:
        return latents.float().flatten(2).norm(dim=2)[..., None, None]

    return direction * (length(held) / length(direction).clamp_min(1e-30)).to(direction.dtype)


def guided_windows_fast(
    windows: torch.Tensor,
    prev: torch.Tensor,
    targets: torch.Tensor,
    step: SolverStep,
    omega: float,
    loss_scale: float,
    prediction_type: str = "epsilon",
    factor: Factor = HALF,
    part: GuidedPart | None = None,
) -> torch.Tensor:
    """x̂ = x − ω ∇ₓ L(x) with the model output held constant inside the gradient.

    Then Φ is affine in x with slope c (``step.jacobian``) and the gradient has a closed form:
    ∇ₓ L = k · c · dsᵀ(2 (ds(Φ(x)) − y)). ``prev`` is Φ(x) from the window's single model call. ``part``: the
    blocks each window holds whole (``windows.GuidedPart``; None: the window's own); zero outside them.
    """
    c = step.jacobian(prediction_type)
    correction = downsample_transpose(2 * block_residual(prev, targets, factor, part), factor)
    if part is not None:
        correction = part.put(correction)
    return windows - omega * loss_scale * c * correction


def msd_level_step(
    latents: torch.Tensor,
    coarse_prev: torch.Tensor,
    grid: WindowGrid,
    step: SolverStep,
    denoise: Denoiser,
    omega: float,
    *,
    gradient: str = "exact",
    omega_loss: str = "projection",
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    weights: torch.Tensor | None = None,
    interrupt: Interrupt | None = None,
    previous_x0: torch.Tensor | None = None,
    factor: Factor = HALF,
    map_batches: BatchMap = run_batches,
    pull_through: str = "step",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One finer level of Algorithm 1: guide every window towards the already-denoised coarser level,
    denoise the guided windows, and merge them the MultiDiffusion way. Returns (z^s_{t−1}, merged x₀).
    ``previous_x0`` is the level's merged x₀ of the previous step, as in ``multidiffusion_step``.

    Gradient modes, by cost per window:
    - ``"exact"``: forward + backward through the model, then a second forward for Φ(x̂) (~4× MD);
    - ``"refresh"``: the fast closed-form gradient, then a second forward for Φ(x̂) (2× MD); on the
      analytic horizon prior it recovers most of what exact gains over fast (bench/layout.py);
    - ``"fast"``: one model output serves the gradient and Φ(x̂), so it costs what MD does.
    ``factor`` is the reduction to the coarser level: (2, 2), or (1, f) under a ``global_level``. ``pull_through``:
    the exact gradient's direction (``guided_windows_exact``'s ``through``); the others hold the model, where both
    directions are one.
    """
    part = grid.guided_part(factor)
    windows, targets = grid.crop(latents), grid.coarse_crop(coarse_prev, factor, part)
    memory = _crop(grid, previous_x0)
    loss_scale = guidance_scale(omega_loss, targets[0].numel(), step.jacobian(prediction_type), factor[0] * factor[1])
    if gradient not in ("exact", "fast", "refresh"):
        raise ValueError(f"unknown gradient mode {gradient!r} (exact, refresh or fast)")

    def run_batch(batch: slice) -> tuple[torch.Tensor, torch.Tensor]:
        _check_interrupt(interrupt)
        x, y, x0_last = windows[batch], targets[batch], _part(memory, batch)
        guided = part[batch] if part is not None else None
        if gradient == "exact":
            x_hat = guided_windows_exact(x, y, step, denoise, omega, loss_scale, prediction_type, x0_last, factor, guided,
                                         pull_through)
            _check_interrupt(interrupt)
            output = denoise(x_hat, step.t)
        else:
            output = denoise(x, step.t)
            prev, _ = step.apply(x, output, prediction_type, x0_last)
            x_hat = guided_windows_fast(x, prev, y, step, omega, loss_scale, prediction_type, factor, guided)
            if gradient == "refresh":
                _check_interrupt(interrupt)
                output = denoise(x_hat, step.t)
        return step.apply(x_hat, output, prediction_type, x0_last)

    prev, x0 = map_batches(windows, view_batch, run_batch)
    merged = grid.merge(prev, weights)
    if part is not None:
        fraction = guidance_fraction(omega, loss_scale, step.jacobian(prediction_type), factor)
        merged = close_split_blocks(merged, coarse_prev, grid.split_blocks(factor, part), fraction, factor)
    return merged, grid.merge(x0, weights)


def build_pyramid(latents: torch.Tensor, levels: int, factors: list[Factor] | None = None) -> list[torch.Tensor]:
    """[z^1, …, z^S]: the finest latent and its repeated ds, coarsest first. ``factors`` (coarsest pair
    first) are the reductions between neighbouring levels; None = the paper's halving everywhere."""
    factors = factors or [HALF] * (levels - 1)
    pyramid = [latents]
    for factor in reversed(factors):
        pyramid.insert(0, downsample(pyramid[0], factor))
    return pyramid


def level_steps(step: SolverStep, factors: list[Factor], coarse_noise: str = "literal",
                train_alphas: torch.Tensor | None = None) -> list[SolverStep]:
    """The step each pyramid level takes (coarsest first): ``step`` itself everywhere ("literal", the
    paper), or for "matched" each coarse level's ``snr_matched`` step, its noise averaged over the product
    of the reductions (``factors``, coarsest pair first) between it and the finest level."""
    if coarse_noise == "literal":
        return [step] * (len(factors) + 1)
    if coarse_noise not in ("matched", "drawn"):  # "drawn" only adds a start before the loop (``drawn_start``)
        raise ValueError(f"unknown coarse_noise {coarse_noise!r} (drawn, matched or literal)")
    if train_alphas is None:
        raise ValueError("coarse_noise 'matched' needs the scheduler's alphas_cumprod (train_alphas)")
    gains = [math.prod(fh * fw for fh, fw in factors[level:]) for level in range(len(factors) + 1)]
    return [snr_matched(step, gain, train_alphas) for gain in gains]


@dataclass
class LevelResult:
    """What one level produced in one step (handed to progress callbacks)."""

    level: int  # 1 = coarsest
    latents: torch.Tensor  # z^s_{t−1}
    pred_x0: torch.Tensor  # merged x₀ estimate of that level


def msd_step(
    latents: torch.Tensor,
    grids: list[WindowGrid],
    step: SolverStep,
    denoise: Denoiser,
    omega: float,
    *,
    gradient: str = "exact",
    coarse_gradient: str | None = None,
    omega_loss: str = "projection",
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    weights: list[torch.Tensor | None] | None = None,
    interrupt: Interrupt | None = None,
    on_level: Callable[[LevelResult], None] | None = None,
    x0_history: list[torch.Tensor | None] | None = None,
    coarse_noise: str = "literal",
    train_alphas: torch.Tensor | None = None,
    map_batches: BatchMap = run_batches,
    levels_run: int | None = None,
    fresh_noise: Callable[[], torch.Tensor] | None = None,
    fresh_scope: str = "join",
    pull_through: str = "step",
) -> torch.Tensor:
    """Algorithm 1, one timestep: pyramid down from z_t, plain MD at the coarsest level, then each finer
    level guided by the one below it. ``grids`` holds one grid per level, coarsest first (each the next
    one halved, or reduced by (1, f) under a ``windows.global_level``); ``omega`` is
    ω_t (already decayed). With one level, or ω = 0, this is exactly MultiDiffusion: with ω = 0 only
    the finest level is denoised (nothing guides it, so the coarser ones would be computed and
    discarded; their solver memory in ``x0_history`` is left as it was). Returns z_{t−1} of the finest
    level: only that one is kept between steps.

    ``coarse_gradient``: where ``gradient`` is "exact", the mode of the second level from the top, the one the
    coarsest guides, unless it is the finest (None: exact too, the paper's). "refresh" spares its backward pass: on the
    layout priors its exact gradient gains nothing over it, while the levels below it need theirs to keep a thin
    river through their halvings (docs/layout.md 6.13). ``pull_through``: the finest level's exact gradient's
    direction, through the solver step ("step", the paper's) or through the model's x₀ estimate ("x0",
    ``pull_through_x0``). The levels between keep the paper's: they hand a skyline or a river down through their
    halvings, which the direction through x₀ loses at the large shapes, and a small object forms at the finest
    (docs/layout.md 6.12, 6.16).

    ``coarse_noise``: "literal" (the paper) denoises every level as if at timestep t; "matched" steps each
    coarse level at the noise level it really has (``snr_matched``; needs ``train_alphas``, the
    scheduler's ᾱ of every training timestep).

    ``x0_history`` is a multistep solver's memory, owned by the sampling loop: one entry per level
    (None before the first step), each level's merged x₀ of the previous step. It is read, then
    overwritten with this step's. Single-step solvers (DDIM) need none.

    ``map_batches`` runs each level's window batches (``run_batches``: here; ``distributed``: spread over
    processes, each level gathered whole before the next one needs it).

    ``levels_run``: how many levels, from the coarsest, this step denoises (``plan.Plan.levels_at``; None = all);
    the finer ones have not joined yet and are held (``held_latents``): their latent is the last run level's state
    under noise, and each one's solver memory is the level above's x₀ upsampled, ready for the step it joins.

    ``fresh_noise`` (white noise shaped like ``latents``; a step where every level runs, guided or not): the part of
    the finest latent finer than the top two levels' blocks takes the step's stochastic form
    (``stochastic_increment``), the rest stays deterministic, so every level the finest is guided towards is
    unchanged. It is how a level that joined late regains the within-block signal its held noise lacked
    (docs/layout.md 6.8). ``fresh_scope`` "finest" takes it within the finest level's own blocks instead, the part no
    pull sees (``--fine-steps stochastic``, docs/layout.md 6.17), and only on a guided step, so ω = 0 stays
    MultiDiffusion.
    """
    weights = weights or [None] * len(grids)
    history = x0_history if x0_history is not None else [None] * len(grids)
    levels_run = len(grids) if levels_run is None else levels_run
    if not 1 <= levels_run <= len(grids) or (omega == 0 and levels_run < len(grids)):
        raise ValueError(f"a step runs 1 to {len(grids)} levels, all of them at ω = 0 (got {levels_run}, ω = {omega})")
    factors = [level_factor(fine, coarse) for coarse, fine in zip(grids, grids[1:])]
    finest_memory = history[-1]
    if omega == 0:
        prev, history[-1] = multidiffusion_step(
            latents, grids[-1], step, denoise, prediction_type=prediction_type, view_batch=view_batch,
            weights=weights[-1], interrupt=interrupt, previous_x0=history[-1], map_batches=map_batches,
        )
        if on_level:
            on_level(LevelResult(len(grids), prev, history[-1]))
        return _stochastic_beneath(prev, history[-1], finest_memory, step, factors,
                                   fresh_noise if fresh_scope == "join" else None, fresh_scope)
    pyramid = build_pyramid(latents, len(grids), factors)
    steps = level_steps(step, factors, coarse_noise, train_alphas)
    prev, x0 = multidiffusion_step(
        pyramid[0], grids[0], steps[0], level_denoiser(denoise, steps[0]), prediction_type=prediction_type,
        view_batch=view_batch, weights=weights[0], interrupt=interrupt, previous_x0=history[0],
        map_batches=map_batches,
    )
    history[0] = x0
    if on_level:
        on_level(LevelResult(1, prev, x0))
    for level in range(1, levels_run):
        level_step, level_denoise = steps[level], level_denoiser(denoise, steps[level])
        prev, x0 = msd_level_step(
            pyramid[level], prev, grids[level], level_step, level_denoise, omega,
            gradient=level_gradient(level, len(grids), gradient, coarse_gradient), omega_loss=omega_loss,
            prediction_type=prediction_type,
            view_batch=view_batch, weights=weights[level], interrupt=interrupt, previous_x0=history[level],
            factor=factors[level - 1], map_batches=map_batches,
            pull_through=pull_through if level == len(grids) - 1 else "step",
        )
        history[level] = x0
        if on_level:
            on_level(LevelResult(level + 1, prev, x0))
    if levels_run == len(grids):
        return _stochastic_beneath(prev, x0, finest_memory, step, factors, fresh_noise, fresh_scope)
    held = held_latents(latents, prev, math.prod(fh for fh, _ in factors[levels_run - 1:]),
                        math.prod(fw for _, fw in factors[levels_run - 1:]), step)
    levels = build_pyramid(held, len(grids), factors)
    for level in range(levels_run, len(grids)):
        history[level] = torch.nn.functional.interpolate(history[level - 1], scale_factor=factors[level - 1],
                                                         mode="nearest")
        if on_level:
            on_level(LevelResult(level + 1, levels[level], history[level]))
    return held


def _stochastic_beneath(prev: torch.Tensor, x0: torch.Tensor, memory: torch.Tensor | None, step: SolverStep,
                        factors: list[Factor], fresh_noise: Callable[[], torch.Tensor] | None,
                        scope: str = "join") -> torch.Tensor:
    """The finest level's new state with the part beneath the top two levels' blocks ("join") or within its own
    blocks ("finest") stepped stochastically (``msd_step``'s ``fresh_noise``; unchanged without it, or without the
    levels that make such blocks)."""
    if scope not in ("join", "finest"):
        raise ValueError(f"unknown fresh_scope {scope!r} (join or finest)")
    if fresh_noise is None or len(factors) < (2 if scope == "join" else 1):
        return prev
    below = factors[1:] if scope == "join" else factors[-1:]
    block = (math.prod(fh for fh, _ in below), math.prod(fw for _, fw in below))
    increment = stochastic_increment(prev, solver_data(step, x0, memory), step, fresh_noise())
    return prev + with_block_means(increment, torch.zeros_like(downsample(increment, block)), block)


def held_latents(latents: torch.Tensor, coarse_prev: torch.Tensor, fh: int, fw: int, step: SolverStep) -> torch.Tensor:
    """The finest latent after a step that ran the levels down to ``coarse_prev`` only (``--fine-start``): its
    fh×fw block means are that level's new state z_{t−1}, and the rest, noise alone as it started (nothing has
    denoised it), is carried to the step's next noise level by σ_{t−1}/σ_t: DDIM's step for pixels whose x₀
    estimate is 0. So ds of it is the run levels' state exactly, and a level that joins later starts as an
    SDEdit of the level above at its own noise level (docs/layout.md 6.6)."""
    alpha, alpha_next = alphas_cumprod(step)
    return with_block_means(latents * math.sqrt((1 - alpha_next) / (1 - alpha)), coarse_prev, (fh, fw))


def solver_data(step: SolverStep, x0: torch.Tensor, previous_x0: torch.Tensor | None) -> torch.Tensor:
    """The x₀ term a step moves its sample towards: x₀ itself (DDIM, a first-order step), or DPM-Solver++ (2M)'s
    D = x₀ + (x₀ − x₀_last)/(2r). Affine in the estimates, so it may be taken of merged ones."""
    if isinstance(step, DPMTimestep) and step.ratio is not None:
        return x0 + step.history_weight * (x0 - previous_x0)
    return x0


def stochastic_increment(x_next: torch.Tensor, data: torch.Tensor, step: SolverStep, noise: torch.Tensor) -> torch.Tensor:
    """What the stochastic form of a step adds to its deterministic one, for the same estimate: x_SDE − x_ODE.

    With x = α x₀ + σ ε and e^{−h} = σ_next α / (α_next σ), the deterministic step is x_next = α_next D + σ_next ε̂
    and the stochastic one (DDIM with η = 1, DPM-Solver++ (2M) SDE) keeps only e^{−h} of ε̂ and draws the rest
    afresh: x_SDE = α_next D + σ_next (e^{−h} ε̂ + √(1 − e^{−2h}) ξ). Both have the marginal's noise level; the
    fresh draw is what lets a state that lacks some of the signal's variance regain it over the next steps
    (a deterministic solver keeps any deficit to the end). ``data``: the step's D (``solver_data``)."""
    alpha, alpha_next = (math.sqrt(a) for a in alphas_cumprod(step))
    sigma, sigma_next = math.sqrt(1 - alpha**2), math.sqrt(1 - alpha_next**2)
    kept = sigma_next * alpha / (alpha_next * sigma)
    return (1 - kept) * (alpha_next * data - x_next) + sigma_next * math.sqrt(1 - kept**2) * noise


def cross_scale_discrepancy(fine: torch.Tensor, coarse: torch.Tensor) -> float:
    """‖ds(z^s) − z^{s−1}‖ / √numel: how far a level is from being the downsample of the finer one."""
    factor = (fine.shape[-2] // coarse.shape[-2], fine.shape[-1] // coarse.shape[-1])
    diff = downsample(fine.detach(), factor) - coarse.detach()
    return float(diff.pow(2).mean().sqrt())
