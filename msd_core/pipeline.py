"""MSDPanoramaPipeline: loads a Stable Diffusion model (SD 1.x/2.x or SDXL) and wires the sampler's steps together.

The math lives in ``sampler`` and ``windows``; this module resolves settings against the model
(window, stride, levels, view batch), encodes the prompt, runs the loop and decodes.

SDXL's UNet is told more than the text: the pooled embedding of its second text encoder and six size
ids (original height and width, crop top and left, target height and width: ``size_conditioning``).
Every window, at every level (the global level's too), is told that it is a whole image of its own
pixel size, uncropped: (h, w, 0, 0, h, w) with h, w the window's size in pixels (1024, 1024 for
SDXL-base's native window). That is what a single SDXL image of that size is told, so one window
equals diffusers' StableDiffusionXLPipeline, and no window is told it is a crop of something larger
(SDXL would then draw it as a cut-out part of a picture).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import __version__, refine
from .errors import Cancelled, NonFiniteResult
from .imageio import output
from .models import graphs, loading, lora, vae
from .sampling import sphere
from .sampling.plan import Plan, default_levels, make_plan  # noqa: F401  (default_levels: used from here by bench/)
from .sampling.sampler import (
    DPMTimestep,
    Interrupt,
    LevelResult,
    SolverStep,
    alphas_cumprod,
    cosine_decay,
    drawn_start,
    msd_step,
    run_batches,
    solver_schedule,
    start_schedule,
)
from .settings import GenerationSettings, RefineSettings
from .sampling.windows import StackedGrids, feathered_weights


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
    caps: sphere.Caps | None = None  # the pole caps' final views (``--poles sphere``), decoded over the poles


class MSDPanoramaPipeline:
    """Text-to-panorama with Multi-Scale Diffusion (or plain MultiDiffusion) on a Stable Diffusion model."""

    def __init__(self, components: loading.Components):
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.text_encoder_2 = components.text_encoder_2
        self.tokenizer_2 = components.tokenizer_2
        self.family = components.family
        self.scheduler = components.scheduler
        self.device = components.device
        self.dtype = components.dtype
        self.factor = components.vae_factor
        self.key = None
        # How each level's window batches run: here, or spread over the ranks of a sharded run
        # (msd_core.sampling.distributed.ShardedBatches); the result is the same either way.
        self.map_batches = run_batches
        # The UNet's small calls (coarse levels, caps) replayed as CUDA graphs (msd_core.models.graphs).
        self.cuda_graphs = graphs.wanted()
        self.graph_stats: dict | None = None  # the last run's (graphs recorded, replays, a failed capture)

    @classmethod
    def from_settings(cls, settings: GenerationSettings) -> "MSDPanoramaPipeline":
        pipe = cls(
            loading.load_components(
                settings.model, device=settings.device, dtype=settings.dtype, model_config=settings.model_config
            )
        )
        if settings.compile:
            pipe.unet = torch.compile(pipe.unet)
            pipe.cuda_graphs = False  # a compiled UNet manages its own
        pipe.key = cls.key_for(settings)
        return pipe

    @staticmethod
    def key_for(settings: GenerationSettings) -> tuple:
        """What identifies a loaded model (for keeping one warm between requests); "auto" is resolved,
        so asking for the device that auto picks does not reload the model."""
        device, dtype = loading.resolve_device(settings.device, settings.dtype)
        return (settings.model, settings.model_config, str(device), str(dtype), settings.compile)

    # -- 1. inputs ---------------------------------------------------------------------------------
    def check_inputs(self, settings: GenerationSettings) -> Plan:
        """Validate the settings against this model and resolve window, stride, levels and batch size."""
        dtype = str(self.dtype).removeprefix("torch.")
        return make_plan(settings, self.factor, self.unet.config.sample_size * self.factor,
                         loading.free_accelerator_bytes(self.device), dtype, self.family)

    # -- 2. prompt ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(text embeddings, pooled embeddings): [negative, positive] with classifier-free guidance, else
        [positive]. Pooled embeddings are SDXL's (the second encoder's projected output), None for SD.

        SDXL: the penultimate hidden states of both encoders side by side (768 + 1280 channels for
        SDXL-base); an empty negative prompt is zeros when the model's pipeline says so
        (force_zeros_for_empty_prompt, SDXL-base's default), as diffusers does without a negative prompt.
        """
        if self.family == "sdxl":
            return self._encode_xl(prompt, negative_prompt, guidance)

        def encode(text: str) -> torch.Tensor:
            return self.text_encoder(self._tokens(self.tokenizer, text))[0]

        positive = encode(prompt)
        if guidance <= 1:
            return positive, None
        return torch.cat([encode(negative_prompt), positive]), None

    def _tokens(self, tokenizer, text: str) -> torch.Tensor:
        return tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)

    def _encode_xl(self, prompt: str, negative_prompt: str, guidance: float):
        def encode(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = []
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                output = encoder(self._tokens(tokenizer, text), output_hidden_states=True)
                hidden.append(output.hidden_states[-2])
            return torch.cat(hidden, dim=-1), output.text_embeds  # pooled: the second encoder's projection

        positive, pooled = encode(prompt)
        if guidance <= 1:
            return positive, pooled
        if not negative_prompt and self.components.zero_empty_negative:
            negative, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
        else:
            negative, negative_pooled = encode(negative_prompt)
        return torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])

    def size_conditioning(self, windows: torch.Tensor) -> torch.Tensor:
        """SDXL's six size ids for a batch of windows (N, C, h, w): original size = the window's own size
        in pixels, crop top-left (0, 0), target size = the same size; (1, 6) in the UNet's dtype."""
        height, width = (side * self.factor for side in windows.shape[-2:])
        return torch.tensor([[height, width, 0, 0, height, width]], device=windows.device, dtype=self.dtype)

    def make_denoiser(self, embeddings: torch.Tensor, guidance: float, pooled: torch.Tensor | None = None,
                      graphed: graphs.GraphedCalls | None = None) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """denoise(windows, t): one batched UNet call (t may be fractional) with the unconditional and
        conditional halves interleaved per window (as diffusers' MultiDiffusion does), then classifier-free
        guidance. ``pooled`` (SDXL): the pooled text embeddings, given with every window's size ids
        (``size_conditioning``) as the UNet's added conditioning, interleaved the same way. ``graphed``: the
        run's CUDA graphs, which replay its small calls."""
        cfg = embeddings.shape[0] == 2
        embeddings = embeddings.to(self.dtype)

        def denoise(windows: torch.Tensor, t: float) -> torch.Tensor:
            count = windows.shape[0]
            model_input = windows.repeat_interleave(2, dim=0) if cfg else windows
            # A tensor, not a Python number: coarse levels at their matched noise level have fractional
            # timesteps, and a compiled UNet would recompile for every new Python constant.
            timestep = torch.tensor(float(t), device=windows.device)
            text_embeds = time_ids = None
            if pooled is not None:
                text_embeds = pooled.to(self.dtype).repeat(count, 1)
                time_ids = self.size_conditioning(windows).repeat(model_input.shape[0], 1)
            inputs = (model_input.to(self.dtype), timestep, embeddings.repeat(count, 1, 1), text_embeds, time_ids)
            output = (graphed(*inputs) if graphed else self.unet_output(*inputs)).to(windows.dtype)
            if not cfg:
                return output
            uncond, cond = output[::2], output[1::2]
            return uncond + guidance * (cond - uncond)

        return denoise

    def unet_output(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                    text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's output for a batch (tensors only, so a CUDA graph can record the call)."""
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added).sample

    # -- the loop ----------------------------------------------------------------------------------
    def initial_latents(self, plan: Plan, seed: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Seeded on the CPU so the same seed gives the same panorama on every device. ``generator``: the seed's
        own, kept by the loop for the fresh noise of a stochastic join (``fresh_noise``)."""
        generator = generator or torch.Generator("cpu").manual_seed(seed)
        return self.fresh_noise(plan, generator) * self.scheduler.init_noise_sigma

    def fresh_noise(self, plan: Plan, generator: torch.Generator) -> torch.Tensor:
        """White noise of one panorama's latent shape, drawn on the CPU (the same on every device)."""
        channels = self.unet.config.in_channels
        noise = torch.randn((1, channels, plan.height, plan.width), generator=generator, dtype=torch.float32)
        return noise.to(self.device)

    def __call__(
        self,
        settings: GenerationSettings,
        *,
        latents: torch.Tensor | None = None,
        start_step: int = 0,
        guide: Callable[[torch.Tensor, SolverStep], torch.Tensor] | None = None,
        callback: Callable[[StepInfo], None] | None = None,
        interrupt: Interrupt | None = None,
        decode: bool = True,
    ) -> PanoramaResult:
        """Sample a panorama. ``latents`` with ``start_step`` > 0 start the loop part-way (at that index of
        the schedule, ``latents`` being z_t there: see ``refine``); ``guide(z, step)`` may adjust the
        latents after every step."""
        return self._sample([settings], latents, start_step, guide, callback, interrupt, decode)[0]

    def sample_batch(
        self,
        batch: list[GenerationSettings],
        *,
        callback: Callable[[StepInfo], None] | None = None,
        interrupt: Interrupt | None = None,
        decode: bool = True,
    ) -> list[PanoramaResult]:
        """Several panoramas whose settings differ only in the seed (drafts), sampled together: every UNet
        call denoises windows of all of them (``view_batch`` windows per call, as for one), each keeps its own
        noise and tiles, so each result is the one ``self(settings)`` gives, up to float rounding. The
        callback's latents hold all of them (panorama 0 first). Pole caps (``plan.caps``) are views of one
        panorama each: they are denoised panorama by panorama beside the batched strip."""
        if not batch:
            raise ValueError("sample_batch needs at least one panorama's settings")
        if any(dataclasses.replace(settings, seed=batch[0].seed) != batch[0] for settings in batch):
            raise ValueError("a batch's settings may differ only in the seed")
        return self._sample(batch, None, 0, None, callback, interrupt, decode)

    def _sample(self, batch, latents, start_step, guide, callback, interrupt, decode) -> list[PanoramaResult]:
        graphed = graphs.GraphedCalls(self.unet_output) if self.cuda_graphs and self.device.type == "cuda" else None
        try:
            return self._sample_with(graphed, batch, latents, start_step, guide, callback, interrupt, decode)
        finally:
            # The graphs' memory goes back with the run (the next may have other LoRAs).
            self.graph_stats = graphed.release() if graphed else None

    def _sample_with(self, graphed, batch, latents, start_step, guide, callback, interrupt, decode) -> list[PanoramaResult]:
        started = time.perf_counter()
        settings = batch[0]
        # 1. Check inputs and resolve the plans (one per seed: shifted tiles follow it); the model gets this
        # run's LoRAs (and no others).
        plans = [self.check_inputs(each) for each in batch]
        if latents is not None:  # given latents (a refine's) already hold their layout and detail: no drawn start,
            plans = [dataclasses.replace(each, start_steps=0, level_starts=()) for each in plans]  # every level at once
        plan = plans[0]
        loras = lora.apply_loras(self.components, settings.loras)
        # 2. Encode the prompt.
        embeddings, pooled = self.encode_prompt(settings.prompt, settings.negative_prompt, settings.guidance)
        denoise = self.make_denoiser(embeddings, settings.guidance, pooled, graphed)
        # 3. Timesteps of the chosen solver (a multistep one remembers each level's x₀ of the last step).
        schedule = solver_schedule(settings.scheduler, self.scheduler, settings.steps)
        if not 0 <= start_step < len(schedule):
            raise ValueError(f"start_step {start_step} is outside the {len(schedule)}-step schedule")
        schedule = schedule[start_step:]
        if start_step and isinstance(schedule[0], DPMTimestep):  # no memory yet: first order, as the solver starts
            schedule[0] = dataclasses.replace(schedule[0], ratio=None)
        x0_history = [None] * plan.levels
        train_steps = self.scheduler.config.num_train_timesteps
        # 4. Initial latents (float32: the merge averages in full precision; the UNet casts).
        # Each panorama's seed draws its initial noise, then any fresh noise of a stochastic join.
        generators = [torch.Generator("cpu").manual_seed(one.seed) for one in batch]
        if latents is None:
            latents = torch.cat([self.initial_latents(each, one.seed, generator)
                                 for each, one, generator in zip(plans, batch, generators)])
            if plan.start_steps:  # coarse_noise "drawn": the coarsest level's content first (docs/layout.md)
                start = start_schedule(settings.scheduler, alphas_cumprod(schedule[0])[0], math.prod(plan.coarsest_factor),
                                       plan.start_steps, self.scheduler.alphas_cumprod)
                with torch.no_grad():
                    latents = torch.cat([  # each panorama on its own coarsest grid (shifted tiles follow the seed)
                        drawn_start(latents[item:item + 1], each.start_grids(), plan.coarsest_factor, start, denoise,
                                    prediction_type=self.components.prediction_type, view_batch=plan.view_batch,
                                    interrupt=interrupt)
                        for item, each in enumerate(plans)])
        latents = latents.to(self.device, torch.float32)
        weights = [feathered_weights(plan.window_shape(level)).to(self.device) if settings.feather else None
                   for level in range(plan.levels)]
        omega = settings.omega if settings.method == "msd" else 0.0
        # Only the exact gradient needs autograd; everything else runs in inference mode (no version counters).
        no_grad = torch.no_grad if plan.exact else torch.inference_mode
        # A 360° world's poles (--poles sphere): both caps' views are denoised beside the strip (its last steps).
        caps = sphere.CapProjection(plan.height, plan.width, plan.caps) if plan.caps else None
        coarser, cap_views = [None], [None] * len(batch)  # each panorama's caps (views of its own poles)
        # 5. Denoising loop (shifted windows move every step, so each step gets its own grids).
        for index, step in enumerate(schedule):

            def on_level(result: LevelResult, index=index) -> None:
                if result.level == plan.levels - 1:
                    coarser[0] = result.latents  # the caps' guidance target (the strip's is this level too)
                if callback:
                    callback(StepInfo(index + 1, len(schedule), result.level, plan.levels, result.latents,
                                      result.pred_x0, time.perf_counter() - started))

            # A step the plan does not guide runs only the finest level (ω_t = 0: MultiDiffusion).
            gradient = plan.gradient_at(start_step + index)
            omega_t = omega * cosine_decay(step.t, train_steps) if gradient else 0.0
            with no_grad():
                before, x0_before = latents, x0_history[-1]
                latents = msd_step(
                    latents, _grids_at(plans, start_step + index), step, denoise, omega_t,
                    gradient=gradient or settings.gradient, coarse_gradient=settings.coarse_gradient,
                    pull_through=settings.pull_through, omega_loss=settings.omega_loss,
                    prediction_type=self.components.prediction_type, view_batch=plan.view_batch,
                    weights=weights, interrupt=interrupt, on_level=on_level, x0_history=x0_history,
                    coarse_noise=settings.coarse_noise, train_alphas=self.scheduler.alphas_cumprod,
                    map_batches=self.map_batches, levels_run=plan.levels_at(start_step + index),
                    fresh_noise=(lambda: torch.cat([self.fresh_noise(each, generator) for each, generator
                                                    in zip(plans, generators)])) if plan.stochastic_at(start_step + index) else None,
                    fresh_scope=plan.fresh_scope_at(start_step + index),
                )
                if caps is not None and plan.caps_at(start_step + index):
                    cap_views = [sphere.pole_cap_step(
                        before[one], _item(x0_before, one), latents[one], x0_history[-1][one], caps,
                        each.cap_grid_at(start_step + index), step, denoise, caps=cap_views[item],
                        prediction_type=self.components.prediction_type, view_batch=plan.view_batch,
                        weights=weights[-1], interrupt=interrupt, coarse=_item(coarser[0], one) if gradient else None,
                        omega=omega_t, omega_loss=settings.omega_loss, map_batches=self.map_batches,
                    ) for item, (each, one) in enumerate(zip(plans, _items(len(batch))))]
                if guide is not None:
                    guided = guide(latents, step)
                    if caps is not None and guided is not latents:  # refine's layout reaches the caps too
                        cap_views = [None if views is None else caps.shift_views(views, (guided - latents)[one])
                                     for views, one in zip(cap_views, _items(len(batch)))]
                    latents = guided
        if caps is not None and cap_views[0] is not None:  # the caps over the poles, now the strip's run is done
            alpha = alphas_cumprod(schedule[-1])[1]
            latents = torch.cat([caps.blend(latents[one], None, views, alpha)[0]
                                 for views, one in zip(cap_views, _items(len(batch)))])
        sampled = time.perf_counter()
        if not torch.isfinite(latents).all():  # decoded, NaN would be a black image written as a success
            raise NonFiniteResult(
                "sampling produced values that are not finite numbers (NaN or infinity), so nothing was written; "
                "float16 can overflow where float32 does not: try --dtype float32"
            )
        results = []
        for item, (one, one_plan) in enumerate(zip(batch, plans)):
            decoding = time.perf_counter()
            # 6. Decode.
            one_latents = latents[item:item + 1]
            image = self.decode(one_latents, one.wrap, cap_views[item], interrupt=interrupt) if decode else None
            finished = time.perf_counter()
            timings = {"sample": sampled - started, "decode": finished - decoding, "total": finished - started}
            # 7. Metadata.
            resolved = {**one_plan.describe(start_step), "device": str(self.device),
                        "dtype": str(self.dtype).removeprefix("torch."), "family": self.family,
                        "msd_core_version": __version__, **({"loras": loras} if loras else {})}
            metadata = output.generation_metadata(one, resolved)
            results.append(PanoramaResult(image, one_latents, metadata, timings, one_plan, cap_views[item]))
        return results

    # -- refining from an image ----------------------------------------------------------------------
    def refine(self, settings: GenerationSettings, source: RefineSettings, *, interrupt: Interrupt | None = None,
               **kwargs) -> PanoramaResult:
        """Refine / upscale the image ``source.source`` at the settings' size (SDEdit + MSD, see
        ``msd_core.refine``): encode it, renoise it with the seed's noise to the step where
        ⌊strength·steps⌋ steps remain, sample from there while the early steps keep the coarsest
        level's layout the source's. ``kwargs`` go to ``__call__`` (callback, decode); ``interrupt`` to every
        step, the source's decoding (block by block) and the encoding (tile by tile) included."""
        # 1. Check inputs, read and resize the source (bad files fail here, before any model call).
        plan = self.check_inputs(settings)
        source.validate()
        start = refine.start_step(source.strength, settings.steps)
        refine.check_source_cost(source.source, settings.width, settings.height)
        pixels = refine.read_source(source.source, interrupt)
        Cancelled.check(interrupt)
        image = refine.resize_panorama(pixels, settings.width, settings.height, settings.wrap)
        del pixels  # up to 16× the result's pixels, as float32
        # 2. Encode it: x₀ of the source.
        tile = vae.auto_tile(plan.height, plan.width, self.device)
        clean = vae.encode_images(self.vae, image, wrap=settings.wrap, tile=tile, interrupt=interrupt).to(self.device)
        # 3. Renoise with the seed's noise to the start step, and guide the layout while t is high.
        noise = self.initial_latents(plan, settings.seed)
        alpha = alphas_cumprod(solver_schedule(settings.scheduler, self.scheduler, settings.steps)[start])[0]
        factor = 2 ** (default_levels(plan.height, plan.width, plan.window) - 1)
        guide = refine.layout_guide(
            clean, noise, factor, refine.LAYOUT_GUIDANCE_UNTIL * self.scheduler.config.num_train_timesteps
        )
        # 4. Sample from there.
        result = self(settings, latents=refine.renoise(clean, noise, alpha), start_step=start, guide=guide,
                      interrupt=interrupt, **kwargs)
        result.metadata.update(refine.source_metadata(source.source, source.strength, start))
        return result

    # -- decoding and saving -----------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, wrap: bool, caps: sphere.Caps | None = None, interrupt: Interrupt | None = None):
        """Full-size image (PIL), tiled for large panoramas, wrap-aware for 360° ones; ``caps`` (the pole caps'
        final views, ``--poles sphere``) are decoded as views and blended over the poles. A set ``interrupt``
        raises Cancelled between tiles."""
        tile = vae.auto_tile(latents.shape[2], latents.shape[3], self.device)
        # Cast by decode_latents to the VAE's own dtype (float32 for an upcast SDXL VAE: loading.vae_dtype).
        images = vae.decode_latents(self.vae, latents, wrap=wrap, tile=tile, interrupt=interrupt)
        if not torch.isfinite(images).all():
            raise NonFiniteResult("decoding produced values that are not finite numbers (NaN or infinity), so nothing "
                                  "was written; float16 can overflow where float32 does not: try --dtype float32")
        if caps:
            size = next(iter(caps.values()))[0].shape[-1]
            cap_tile = vae.auto_tile(size, size, self.device)
            images = sphere.blend_decoded_caps(images, {
                pole: vae.decode_latents(self.vae, view, tile=cap_tile, interrupt=interrupt) for pole, (view, _) in caps.items()
            })
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


def _items(count: int) -> list[slice]:
    """Each panorama's slice of a batch's latents (it keeps the batch dimension: (1, C, H, W))."""
    return [slice(item, item + 1) for item in range(count)]


def _item(latents: torch.Tensor | None, one: slice) -> torch.Tensor | None:
    return None if latents is None else latents[one]


def _grids_at(plans: list[Plan], step_index: int) -> list:
    """Every level's grid at one step: one panorama's, or each level's grids of a batch stacked."""
    if len(plans) == 1:
        return plans[0].grids_at(step_index)
    return [StackedGrids(level) for level in zip(*(plan.grids_at(step_index) for plan in plans))]
