"""LoRAs: applied to a loaded model before a run, through diffusers' own LoRA loaders (peft backend).

``apply_loras(components, loras)`` makes the model carry exactly the LoRAs a run asks for, at their
weights, and returns what the PNG metadata records of each (file name, SHA-256, weight). The model is
kept warm between runs (the worker's ``key_for``), so what the previous run loaded is removed first
when the set of files differs, and only the weights change when it is the same: nothing leaks from one
run into the next. LoRAs stay separate adapters (peft layers beside the frozen weights, scaled per
run) instead of being fused into the weights: removing them restores the model bit for bit.

What is read: the file must hold safetensors by its content (``models.check_safetensors``: a pickle or
a renamed pickle is refused, nothing is ever unpickled), at most MAX_LORA_BYTES; it is read once, and
that one copy is hashed and parsed. The formats are the ones diffusers converts: its own (the
``unet.``/``text_encoder.`` keys and the adapter metadata of ``save_lora_weights``), the older
diffusers/PEFT layouts and the kohya/A1111 community format (``lora_unet_…``, ``lora_te_…``). A LoRA
that does not fit the model — layers the model lacks, other sizes, weights for a second text encoder
on a model without one — is a BadInput before any sampling, and leaves the model without LoRAs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import warnings

from ..errors import BadInput, UnsupportedModelFile
from .lora_files import lora_name
from .loading import MAX_SAFETENSORS_HEADER, check_safetensors

MAX_LORA_BYTES = 2 * 2**30  # community LoRAs are 10–900 MB; a larger file is a full checkpoint
ADAPTER_PREFIX = "msd"  # adapter names: msd<index>_<first 16 hex digits of the SHA-256>
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights stores each LoraConfig here
# torch's load_state_dict error opens with a bare header line; its first size mismatch says what differs.
SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                           r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def apply_loras(components, loras: list[dict]) -> list[dict]:
    """Load ``loras`` ([{"path", "weight"}], validated settings) into the UNet and text encoder(s) of
    ``components`` (and ``text_encoder_2`` where the model has one), replacing any other LoRAs; return
    [{"name", "sha256", "weight"}] in order. Raises BadInput for a file that is not a LoRA for this
    model, before anything samples."""
    files = [_read(pathlib.Path(os.path.expanduser(entry["path"]))) for entry in loras]
    seen = {}
    for entry, (sha256, _) in zip(loras, files):
        if sha256 in seen:
            raise BadInput("the LoRAs {first} and {second} are the same file (SHA-256 {sha}…); give it once, with "
                           "the sum of the weights", field="loras", first=seen[sha256], second=entry["path"],
                           sha=sha256[:12])
        seen[sha256] = entry["path"]
    names = [f"{ADAPTER_PREFIX}{index}_{sha256[:16]}" for index, (sha256, _) in enumerate(files)]
    targets = _targets(components)
    if loaded_adapters(components) != names:
        remove_loras(components)
        for name, entry, (_, data) in zip(names, loras, files):
            try:
                _load(components, targets, name, entry["path"], data)
            except BaseException:
                remove_loras(components)  # a half-loaded LoRA must not reach the next run
                raise
    _set_weights(targets, names, [entry["weight"] for entry in loras])
    for module in targets.values():
        module.eval().requires_grad_(False)  # peft makes its layers trainable; the sampler needs none
    return [{"name": lora_name(entry["path"]), "sha256": sha256, "weight": entry["weight"]}
            for entry, (sha256, _) in zip(loras, files)]


def loaded_adapters(components) -> list[str]:
    """The names of the LoRAs ``apply_loras`` left in the model, in order."""
    names = {name for module in _targets(components).values() for name in getattr(module, "peft_config", {}) or {}}
    return sorted(names, key=lambda name: int(name.removeprefix(ADAPTER_PREFIX).split("_")[0]))


def remove_loras(components) -> None:
    """Take every LoRA layer out of the model: the original layers are put back as they were."""
    from diffusers.utils import recurse_remove_peft_layers

    for module in _targets(components).values():
        if getattr(module, "peft_config", None) is None:
            continue
        recurse_remove_peft_layers(module)
        del module.peft_config
        module._hf_peft_config_loaded = None


def _targets(components) -> dict:
    """The modules LoRAs go into, by the key prefix diffusers gives them."""
    targets = {"unet": components.unet, "text_encoder": components.text_encoder}
    if getattr(components, "text_encoder_2", None) is not None:  # SDXL
        targets["text_encoder_2"] = components.text_encoder_2
    return targets


def _read(path: pathlib.Path) -> tuple[str, bytes]:
    """(SHA-256, content) of a LoRA file, refused unless it holds safetensors of a LoRA's size."""
    try:
        check_safetensors(path)
    except BadInput as exc:
        raise UnsupportedModelFile("the LoRA {why}", field="loras", why=str(exc)) from None
    size = path.stat().st_size
    if size > MAX_LORA_BYTES:
        raise BadInput("the LoRA {path} is {size:.1f} GB, more than any LoRA ({limit} GB): is it a full model "
                       "checkpoint? give that as the model", field="loras", path=path, size=size / 2**30,
                       limit=MAX_LORA_BYTES // 2**30)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadInput("the LoRA {path} cannot be read: {why}", field="loras", path=path,
                       why=exc.strerror or str(exc)) from None
    return hashlib.sha256(data).hexdigest(), data


def _parse(path: str, data: bytes) -> tuple[dict, dict | None]:
    """The tensors of a safetensors file's content, and diffusers' adapter metadata from its header."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    length = int.from_bytes(data[:8], "little")
    try:
        if not 2 <= length <= min(len(data) - 8, MAX_SAFETENSORS_HEADER):
            raise ValueError("bad header length")
        header = json.loads(data[8:8 + length])
        tensors = load(data)
        stored = (header.get("__metadata__") or {}).get(METADATA_KEY)
        metadata = json.loads(stored) if stored else None
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"{METADATA_KEY} is not a JSON object")
    except (ValueError, SafetensorError, AttributeError, RecursionError) as exc:
        raise BadInput("the LoRA {path} is not a valid safetensors file: {why}", field="loras", path=path,
                       why=_first_line(exc)) from None
    return tensors, metadata


def _load(components, targets: dict, name: str, path: str, data: bytes) -> None:
    """Convert one LoRA to diffusers' layout and load it as the adapter ``name``, or raise BadInput."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    tensors, metadata = _parse(path, data)
    sdxl = "text_encoder_2" in targets
    loader = StableDiffusionXLLoraLoaderMixin if sdxl else StableDiffusionLoraLoaderMixin
    try:
        with _quiet():
            # As the pipelines' load_lora_weights do; the SDXL one passes the UNet's config to map SGM blocks.
            extra = {"unet_config": components.unet.config} if sdxl else {}
            state_dict, alphas = loader.lora_state_dict(tensors, **extra)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, AttributeError) as exc:
        raise BadInput("the LoRA {path} is not in a LoRA format diffusers reads: {why}", field="loras", path=path,
                       why=_first_line(exc)) from None
    if not state_dict or not all("lora" in key for key in state_dict):
        raise BadInput("the LoRA {path} holds weights that are not LoRA layers (is it a full model or another kind "
                       "of adapter?)", field="loras", path=path)
    counts = {prefix: sum(key.startswith(prefix + ".") for key in state_dict) for prefix in targets}
    foreign = sorted({key.split(".")[0] for key in state_dict} - {prefix for prefix, count in counts.items() if count})
    if foreign:
        hint = ("it was made for a model with two text encoders (SDXL)" if foreign == ["text_encoder_2"]
                else "it was made for another kind of model")
        raise BadInput("the LoRA {path} does not fit this model: it has weights for {parts}, which this model does "
                       "not have; {hint}", field="loras", path=path, parts=", ".join(foreign), hint=hint)
    try:
        with _quiet():
            loader.load_lora_into_unet(state_dict, alphas, components.unet, adapter_name=name, metadata=metadata)
            for prefix in targets:
                if prefix != "unet":
                    loader.load_lora_into_text_encoder(state_dict, alphas, targets[prefix], prefix=prefix,
                                                       adapter_name=name, metadata=metadata)
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, AttributeError) as exc:
        raise BadInput("the LoRA {path} does not fit this model ({model}, {family}): {why}; {hint}", field="loras",
                       path=path, model=components.model, family="SDXL" if sdxl else "SD 1.x/2.x",
                       why=_why_not_loaded(exc, name), hint=_family_hint(sdxl)) from None
    _check_complete(path, targets, name, counts, _family_hint(sdxl))


def _family_hint(sdxl: bool) -> str:
    if sdxl:
        return "is it a LoRA for SD 1.x/2.x? Those do not fit an SDXL model"
    return "is it a LoRA for another model family or version? SD 1.x, SD 2.x and SDXL LoRAs do not fit each other"


def _why_not_loaded(exc: BaseException, name: str) -> str:
    found = SIZE_MISMATCH.search(str(exc))
    if found is None:
        return _first_line(exc)
    layer, in_lora, in_model = found.groups()
    return f"{layer.replace('.' + name, '')} is {in_lora} in the LoRA, {in_model} in the model"


def _check_complete(path: str, targets: dict, name: str, counts: dict, hint: str) -> None:
    """Every LoRA tensor must have found its layer: diffusers only logs keys the model lacks, which would
    apply part of a LoRA made for another model."""
    from peft.utils import get_peft_model_state_dict

    for prefix, expected in counts.items():
        module = targets[prefix]
        present = name in (getattr(module, "peft_config", None) or {})
        loaded = len(get_peft_model_state_dict(module, adapter_name=name)) if present else 0
        if loaded != expected:
            raise BadInput("the LoRA {path} does not fit this model: only {loaded} of its {expected} {part} weights "
                           "match a layer of the model; {hint}", field="loras", path=path, loaded=loaded,
                           expected=expected, part=prefix, hint=hint)


def _set_weights(targets: dict, names: list[str], weights: list[float]) -> None:
    """Each module runs the adapters it has, each at its weight (its LoRA scale)."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    for module in targets.values():
        present = getattr(module, "peft_config", None) or {}
        chosen = [(name, weight) for name, weight in zip(names, weights) if name in present]
        if not chosen:
            continue
        if hasattr(module, "set_adapters"):  # a diffusers model: its own weight expansion
            module.set_adapters([name for name, _ in chosen], [float(weight) for _, weight in chosen])
        else:
            set_weights_and_activate_adapters(module, [name for name, _ in chosen], [float(w) for _, w in chosen])


@contextlib.contextmanager
def _quiet():
    """diffusers and transformers log a table of every base weight an adapter does not hold and draw a progress
    bar for a few tensors; the errors that matter are raised here. diffusers also logs a failed load (torch's
    many-line message, with our adapter name) before raising it: the BadInput made of it is said once."""
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several LoRAs: intended
            # Layers the adapter config names but the file lacks: _check_complete refuses such a LoRA.
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
