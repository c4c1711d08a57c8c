"""MSDPanoramaPipeline: loads a Stable Diffusion model and wires the sampler's steps together.

The math lives in ``sampler`` and ``windows``; this module resolves settings against the model
(window, stride, levels, view batch), encodes the prompt, runs the loop and decodes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import __version__, models, output, vae
from .errors import BadInput
from .sampler import (
    Interrupt,
    LevelResult,
    cosine_decay,
    ddim_schedule,
    msd_step,
)
from .settings import GenerationSettings
from .windows import WindowGrid, feathered_weights, global_level


@dataclass(frozen=True)
class Plan:
    """Settings resolved against the model: everything the loop needs, in latent pixels."""

    height: int
    width: int
    window: int
    stride: int
    levels: int
    view_batch: int
    grids: tuple[WindowGrid, ...]  # coarsest first

    def describe(self, factor: int) -> dict:
        return {
            "levels": self.levels,
            "window": self.window * factor,
            "stride": self.stride * factor,
            "view_batch": self.view_batch,
            "windows_per_level": [len(grid) for grid in self.grids],
        }


@dataclass
class StepInfo:
    """Handed to the callback after every level of every step."""

    step: int  # 1-based
    total: int
    level: int  # 1 = coarsest
    levels: int
    latents: torch.Tensor
    pred_x0: torch.Tensor
    elapsed: float


@dataclass
class PanoramaResult:
    image: object  # PIL.Image.Image
    latents: torch.Tensor
    metadata: dict
    timings: dict
    plan: Plan


def default_levels(height: int, width: int, window: int) -> int:
    """The smallest pyramid whose coarsest level's short side fits one window: 1 + ⌊log2(short/window)⌋.

    1024×4096 px with SD-2-base (128×512 latents, 64 px windows) → 2; 2048×4096 → 3. Levels that cannot
    be halved exactly (odd sizes) are dropped.
    """
    levels = 1 + max(0, int(math.floor(math.log2(min(height, width) / window))))
    while levels > 1 and (height % 2 ** (levels - 1) or width % 2 ** (levels - 1)):
        levels -= 1
    return levels


def default_view_batch(device: torch.device, gradient_exact: bool) -> int:
    """Windows per UNet call: as many as free memory allows on a GPU (a rough per-window cost for SD at
    64×64 latents with CFG: ~0.6 GiB without grad, ~2.5 GiB with the exact gradient), 4 on CPU/MPS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        per_window = (2.5 if gradient_exact else 0.6) * 2**30
        return max(1, min(32, int(free * 0.8 // per_window)))
    return 4


class MSDPanoramaPipeline:
    """Text-to-panorama with Multi-Scale Diffusion (or plain MultiDiffusion) on a Stable Diffusion model."""

    def __init__(self, components: models.Components):
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.device = components.device
        self.dtype = components.dtype
        self.factor = components.vae_factor
        self.key = None

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> "MSDPanoramaPipeline":
        pipe = cls(
            models.load_components(
                settings.model, device=settings.device, dtype=settings.dtype, model_config=settings.model_config
            )
        )
        pipe.key = cls.key_for(settings)
        return pipe

    @staticmethod
    def key_for(settings: GenerationSettings) -> tuple:
        """What identifies a loaded model (for keeping one warm between requests); "auto" is resolved,
        so asking for the device that auto picks does not reload the model."""
        device, dtype = models.resolve_device(settings.device, settings.dtype)
        return (settings.model, settings.model_config, str(device), str(dtype))

    # -- 1. inputs ---------------------------------------------------------------------------------
    def check_inputs(self, settings: GenerationSettings) -> Plan:
        """Validate the settings against this model and resolve window, stride, levels and batch size."""
        settings.validate()
        factor = self.factor
        if settings.width % factor or settings.height % factor:
            raise BadInput(f"width and height must be multiples of {factor} for this model's VAE")
        height, width = settings.height // factor, settings.width // factor
        window = settings.window // factor if settings.window else self.unet.config.sample_size
        if settings.window and settings.window % factor:
            raise BadInput(f"window must be a multiple of {factor} pixels")
        if window > min(height, width):
            raise BadInput(
                f"the panorama ({settings.width}×{settings.height}) is smaller than one {window * factor} px window; "
                f"use at least {window * factor}×{window * factor}"
            )
        if settings.method == "multidiffusion":
            levels = 1
        elif settings.scales:
            levels = settings.scales
        else:
            levels = default_levels(height, width, window)
        if settings.stride:
            stride = settings.stride // factor
        else:
            stride = max(1, window // 8)
            stride += stride % 2 if levels > 1 else 0  # coarse crops need even offsets
        if stride < 1 or stride > window:
            raise BadInput(f"stride must be between {factor} and the window ({window * factor} px)")
        grids = []
        for level in range(levels):
            scale = 2 ** (levels - 1 - level)
            level_h, level_w = height // scale, width // scale
            if height % scale or width % scale or min(level_h, level_w) < window:
                raise BadInput(
                    f"{levels} pyramid levels need the latent size ({height}×{width}) divisible by {scale} and its "
                    f"coarsest level at least one window ({window}) tall and wide; use fewer --scales"
                )
            grids.append(WindowGrid(level_h, level_w, window, stride, settings.wrap))
        for grid in grids[1:]:
            try:
                grid.check_nested()
            except ValueError as exc:
                raise BadInput(str(exc)) from None
        top = global_level(grids[0]) if settings.pyramid == "global" and settings.method == "msd" else None
        if top:
            grids.insert(0, top)
            levels += 1
        view_batch = settings.view_batch or default_view_batch(self.device, settings.gradient == "exact")
        return Plan(height, width, window, stride, levels, view_batch, tuple(grids))

    # -- 2. prompt ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: float) -> torch.Tensor:
        """Text embeddings: [negative, positive] with classifier-free guidance, else [positive]."""

        def encode(text: str) -> torch.Tensor:
            tokens = self.tokenizer(
                text, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            )
            return self.text_encoder(tokens.input_ids.to(self.device))[0]

        positive = encode(prompt)
        if guidance <= 1:
            return positive
        return torch.cat([encode(negative_prompt), positive])

    def make_denoiser(self, embeddings: torch.Tensor, guidance: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """denoise(windows, t): one batched UNet call with the unconditional and conditional halves
        interleaved per window (as diffusers' MultiDiffusion does), then classifier-free guidance."""
        cfg = embeddings.shape[0] == 2

        def denoise(windows: torch.Tensor, t: int) -> torch.Tensor:
            count = windows.shape[0]
            model_input = windows.repeat_interleave(2, dim=0) if cfg else windows
            output = self.unet(
                model_input.to(self.dtype), t, encoder_hidden_states=embeddings.repeat(count, 1, 1)
            ).sample.to(windows.dtype)
            if not cfg:
                return output
            uncond, cond = output[::2], output[1::2]
            return uncond + guidance * (cond - uncond)

        return denoise

    # -- the loop ----------------------------------------------------------------------------------
    def initial_latents(self, plan: Plan, seed: int) -> torch.Tensor:
        """Seeded on the CPU so the same seed gives the same panorama on every device."""
        generator = torch.Generator("cpu").manual_seed(seed)
        channels = self.unet.config.in_channels
        noise = torch.randn((1, channels, plan.height, plan.width), generator=generator, dtype=torch.float32)
        return noise.to(self.device) * self.scheduler.init_noise_sigma

    def __call__(
        self,
        settings: GenerationSettings,
        *,
        latents: torch.Tensor | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        interrupt: Interrupt | None = None,
        decode: bool = True,
    ) -> PanoramaResult:
        started = time.perf_counter()
        # 1. Check inputs and resolve the plan.
        plan = self.check_inputs(settings)
        # 2. Encode the prompt.
        embeddings = self.encode_prompt(settings.prompt, settings.negative_prompt, settings.guidance)
        denoise = self.make_denoiser(embeddings, settings.guidance)
        # 3. Timesteps.
        schedule = ddim_schedule(self.scheduler, settings.steps)
        train_steps = self.scheduler.config.num_train_timesteps
        # 4. Initial latents (float32: the merge averages in full precision; the UNet casts).
        if latents is None:
            latents = self.initial_latents(plan, settings.seed)
        latents = latents.to(self.device, torch.float32)
        weights = [feathered_weights(plan.window).to(self.device) if settings.feather else None] * plan.levels
        omega = settings.omega if settings.method == "msd" else 0.0
        # 5. Denoising loop.
        for index, step in enumerate(schedule):

            def on_level(result: LevelResult, index=index) -> None:
                if callback:
                    callback(StepInfo(index + 1, len(schedule), result.level, plan.levels, result.latents,
                                      result.pred_x0, time.perf_counter() - started))

            with torch.no_grad():
                latents = msd_step(
                    latents, list(plan.grids), step, denoise, omega * cosine_decay(step.t, train_steps),
                    gradient=settings.gradient, omega_loss=settings.omega_loss,
                    prediction_type=self.components.prediction_type, view_batch=plan.view_batch,
                    weights=weights, interrupt=interrupt, on_level=on_level,
                )
        sampled = time.perf_counter()
        # 6. Decode.
        image = self.decode(latents, settings.wrap) if decode else None
        finished = time.perf_counter()
        timings = {"sample": sampled - started, "decode": finished - sampled, "total": finished - started}
        # 7. Metadata.
        resolved = {**plan.describe(self.factor), "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                    "msd_core_version": __version__}
        metadata = output.generation_metadata(settings, resolved)
        return PanoramaResult(image, latents, metadata, timings, plan)

    # -- decoding and saving -----------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, wrap: bool):
        """Full-size image (PIL), tiled for large panoramas, wrap-aware for 360° ones."""
        tile = vae.auto_tile(latents.shape[2], latents.shape[3], self.device)
        images = vae.decode_latents(self.vae, latents.to(self.dtype), wrap=wrap, tile=tile)
        return vae.to_pil(images)[0]

    def decode_preview(self, latents: torch.Tensor, max_width: int = 512):
        """A small preview of a (coarse) latent, e.g. the coarsest level's x₀ estimate."""
        image = self.decode(latents, wrap=False)
        if image.width > max_width:
            image = image.resize((max_width, max(1, round(image.height * max_width / image.width))))
        return image

    @staticmethod
    def save(result: PanoramaResult, path, overwrite: bool = False):
        return output.save_png(result.image, path, result.metadata, overwrite=overwrite)
