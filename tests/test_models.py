"""Model loading: the tiny model, every source type load_components accepts, and its refusals."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import load_file, save_file

from msd_core.models import loading
from msd_core.errors import BadInput, ModelNotFound, NetworkError, UnsupportedModelFile
from msd_core.models.vae import decode_latents

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = not torch.cuda.is_available() and not torch.backends.mps.is_available()


def _assert_same_weights(module, expected: dict):
    actual = module.state_dict()
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key].cpu(), tensor), key


def _frozen(components) -> bool:
    modules = (components.unet, components.vae, components.text_encoder)
    return all(not m.training for m in modules) and all(
        not p.requires_grad for m in modules for p in m.parameters()
    )


def test_tiny_model_round_trips_and_produces_a_finite_64px_image(tmp_path):
    built = loading.tiny_pipeline()
    folder = loading.build_tiny_model(tmp_path / "tiny")
    loaded = loading.load_components(str(folder), local_files_only=True)

    for name in ("unet", "vae", "text_encoder"):
        _assert_same_weights(getattr(loaded, name), getattr(built, name).state_dict())
    prompt = "a misty valley, ünïcode"
    assert loaded.tokenizer(prompt).input_ids == built.tokenizer(prompt).input_ids
    assert loaded.tokenizer.model_max_length == loaded.text_encoder.config.max_position_embeddings == 16

    tokens = loaded.tokenizer(prompt, padding="max_length", truncation=True, return_tensors="pt").input_ids
    text = loaded.text_encoder(tokens)[0]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise_prediction = loaded.unet(latents, 500, encoder_hidden_states=text).sample
    assert noise_prediction.shape == (1, 4, 8, 8) and torch.isfinite(noise_prediction).all()

    image = decode_latents(loaded.vae, latents)
    assert image.shape == (1, 3, 64, 64)
    assert torch.isfinite(image).all() and image.std() > 0.05  # a real image, not a constant


def test_tiny_model_is_deterministic_and_leaves_the_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = loading.build_tiny_model(tmp_path / "a")
    assert torch.equal(torch.rand(3), expected_draw)

    second = loading.build_tiny_model(tmp_path / "b", "v_prediction")
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        a, b = load_file(first / f"{part}.safetensors"), load_file(second / f"{part}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_building_onto_a_finished_tiny_model_keeps_it(tmp_path):
    """What a process that loses the build race does: it finds the folder complete and keeps it."""
    target = loading.build_tiny_model(tmp_path / "tiny")
    written = (target / "model_index.json").stat().st_mtime_ns
    assert loading.build_tiny_model(target) == target
    assert (target / "model_index.json").stat().st_mtime_ns == written
    assert os.listdir(tmp_path) == ["tiny"]  # no staging folder left behind


@pytest.mark.parametrize("name, prediction_type", [("tiny", "epsilon"), ("tiny-v", "v_prediction")])
def test_tiny_models_load_frozen_with_ddim(name, prediction_type):
    components = loading.load_components(name, device="cpu")
    assert components.model == name
    assert components.prediction_type == prediction_type
    assert isinstance(components.scheduler, DDIMScheduler)
    assert components.scheduler.config.prediction_type == prediction_type
    assert components.scheduler.config.clip_sample is False
    assert (components.window, components.vae_factor) == (64, 8)
    assert components.device == torch.device("cpu") and components.dtype == torch.float32
    assert components.unet.dtype == components.vae.dtype == components.text_encoder.dtype == torch.float32
    assert _frozen(components)
    assert loading.tiny_model_dir(prediction_type).parent == loading.cache_root()


def test_bfloat16_is_honoured_on_the_cpu():
    components = loading.load_components("tiny", device="cpu", dtype="bfloat16")
    assert components.unet.dtype == components.vae.dtype == components.text_encoder.dtype == torch.bfloat16


# --- single-file checkpoints ------------------------------------------------------------------------


def _ldm_checkpoint(unet, vae, text_encoder) -> dict:
    """The tiny model in the original (CompVis LDM) single-file layout, the inverse of diffusers'
    conversion, so from_single_file is tested on the file format people actually download."""
    checkpoint = {}
    per_block = unet.config.layers_per_block + 1
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
              ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]  # fmt: skip
    up_has_attention = {i: "CrossAttn" in t for i, t in enumerate(unet.config.up_block_types)}
    for key, tensor in unet.state_dict().items():
        parts = key.split(".")
        if key in top:
            ldm = top[key]
        elif parts[0] in ("down_blocks", "up_blocks"):
            block, kind, rest = int(parts[1]), parts[2], ".".join(parts[4:])
            index = int(parts[3])
            if kind == "downsamplers":
                ldm = f"input_blocks.{(block + 1) * per_block}.0.op.{'.'.join(parts[5:])}"
            elif kind == "upsamplers":
                slot = 2 if up_has_attention[block] else 1
                ldm = f"output_blocks.{block * per_block + per_block - 1}.{slot}.{'.'.join(parts[4:])}"
            else:
                position = 1 + block * per_block + index if parts[0] == "down_blocks" else block * per_block + index
                prefix = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
                if kind == "resnets":
                    for new, old in resnet:
                        rest = rest.replace(new, old)
                ldm = f"{prefix}.{position}.{0 if kind == 'resnets' else 1}.{rest}"
        elif parts[0] == "mid_block":
            rest = ".".join(parts[3:])
            if parts[1] == "resnets":
                for new, old in resnet:
                    rest = rest.replace(new, old)
                ldm = f"middle_block.{2 * int(parts[2])}.{rest}"
            else:
                ldm = f"middle_block.1.{rest}"
        else:
            raise AssertionError(f"unexpected UNet key {key}")
        checkpoint[f"model.diffusion_model.{ldm}"] = tensor

    vae_top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    attention = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
    blocks = len(vae.config.up_block_types)
    for key, tensor in vae.state_dict().items():
        parts = key.split(".")
        if key in vae_top:
            ldm = vae_top[key]
        elif parts[1] == "mid_block" and parts[2] == "attentions":
            rest = ".".join(parts[4:])
            for new, old in attention:
                rest = rest.replace(new, old)
            ldm = f"{parts[0]}.mid.attn_1.{rest}"
            if tensor.ndim == 2:  # LDM stores these projections as 1×1 convolutions
                tensor = tensor[:, :, None, None]
        elif parts[1] == "mid_block":
            ldm = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        elif parts[1] == "down_blocks":
            if parts[3] == "downsamplers":
                ldm = f"encoder.down.{parts[2]}.downsample.{'.'.join(parts[5:])}"
            else:
                ldm = f"encoder.down.{parts[2]}.block.{'.'.join(parts[4:])}"
        elif parts[1] == "up_blocks":
            block = blocks - 1 - int(parts[2])
            if parts[3] == "upsamplers":
                ldm = f"decoder.up.{block}.upsample.{'.'.join(parts[5:])}"
            else:
                ldm = f"decoder.up.{block}.block.{'.'.join(parts[4:])}"
        else:
            raise AssertionError(f"unexpected VAE key {key}")
        checkpoint[f"first_stage_model.{ldm.replace('conv_shortcut', 'nin_shortcut')}"] = tensor

    for key, tensor in text_encoder.state_dict().items():
        checkpoint[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = tensor
    return checkpoint


def test_single_safetensors_file_loads_its_own_weights_with_a_config_folder(tmp_path):
    source = loading.tiny_pipeline()
    # Shift every weight so the test can tell the file's weights from the config folder's.
    parts = {name: {k: v + 0.25 for k, v in getattr(source, name).state_dict().items()} for name in ("unet", "vae", "text_encoder")}
    for name, weights in parts.items():
        getattr(source, name).load_state_dict(weights)
    checkpoint = tmp_path / "tiny-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in _ldm_checkpoint(source.unet, source.vae, source.text_encoder).items()}, checkpoint)

    components = loading.load_components(str(checkpoint), model_config=str(loading.tiny_model_dir()))
    for name, weights in parts.items():
        _assert_same_weights(getattr(components, name), weights)
    assert components.prediction_type == "epsilon" and isinstance(components.scheduler, DDIMScheduler)
    assert components.window == 64 and _frozen(components)


def test_single_file_without_a_config_or_weights_is_refused_with_the_fix(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, checkpoint)
    with pytest.raises(BadInput, match="--model-config"):
        loading.load_components(str(checkpoint))
    with pytest.raises(BadInput, match="could not be loaded as a Stable Diffusion checkpoint"):
        loading.load_components(str(checkpoint), model_config=str(loading.tiny_model_dir()))


# --- refusals -----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof of whether a checkpoint was ever unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickle_checkpoints_are_refused_without_being_loaded(tmp_path, suffix):
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsupportedModelFile, match="safetensors") as caught:
        loading.load_components(str(checkpoint))
    assert "execute" in str(caught.value)
    assert not marker.exists()
    # Refused by name: a missing pickle file gets the same answer, not "not found".
    with pytest.raises(UnsupportedModelFile):
        loading.load_components(str(tmp_path / f"missing{suffix}"))


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "old-model"
    shutil.copytree(loading.tiny_model_dir(), folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnsupportedModelFile, match=r"\.bin"):
        loading.load_components(str(folder))


# --- the hostile-model matrix: nothing may ever be unpickled -------------------------------------------


def _pickle_file(path, marker):
    """A pickle that creates ``marker`` when it is loaded (pickle.dumps is left alone by no_unpickling)."""
    path.write_bytes(pickle.dumps(_Payload(marker)))
    return path


WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}


def _tiny_copy(tmp_path, name="model"):
    folder = tmp_path / name
    shutil.copytree(loading.tiny_model_dir(), folder)
    return folder


def _ldm_file(tmp_path, drop_text_encoder=False):
    source = loading.tiny_pipeline()
    checkpoint = _ldm_checkpoint(source.unet, source.vae, source.text_encoder)
    if drop_text_encoder:
        checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("cond_stage_model.")}
    path = tmp_path / "tiny-ldm.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)
    return path


def _hostile(layout, tmp_path, marker):
    """Build one hostile layout; return (load_components kwargs, the file the refusal must name)."""
    config = str(loading.tiny_model_dir())
    if layout.startswith("suffix"):
        name = layout.split(":")[1]
        evil = _pickle_file(tmp_path / name, marker)
        return {"model": str(evil), "model_config": config}, evil
    if layout == "safetensors-symlink-to-pickle":
        evil = _pickle_file(tmp_path / "real.ckpt", marker)
        (tmp_path / "model.safetensors").symlink_to(evil)
        return {"model": str(tmp_path / "model.safetensors"), "model_config": config}, tmp_path / "model.safetensors"
    folder = _tiny_copy(tmp_path)
    if layout.startswith("bin-only:"):
        component = layout.split(":")[1]
        stem = WEIGHT_STEMS[component]
        (folder / component / f"{stem}.safetensors").unlink()
        name = "pytorch_model.Bin" if component == "text_encoder" else f"{stem}.bin"
        return {"model": str(folder)}, _pickle_file(folder / component / name, marker)
    if layout.startswith("renamed-pickle:"):
        component = layout.split(":")[1]
        evil = folder / component / f"{WEIGHT_STEMS[component]}.safetensors"
        return {"model": str(folder)}, _pickle_file(evil, marker)
    if layout == "symlinked-weights":
        weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
        weights.unlink()
        weights.symlink_to(_pickle_file(tmp_path / "elsewhere.pt", marker))
        return {"model": str(folder)}, weights
    if layout == "shard-index-names-a-pickle":
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        weights.unlink()
        index = weights.with_name("diffusion_pytorch_model.safetensors.index.json")
        index.write_text(json.dumps({"weight_map": {"conv_in.weight": "diffusion_pytorch_model-00001-of-00001.bin"}}))
        _pickle_file(weights.with_name("diffusion_pytorch_model-00001-of-00001.bin"), marker)
        return {"model": str(folder)}, index
    if layout.startswith("config-folder-with-weights:"):
        # The checkpoint lacks the text encoder: diffusers would load it from the config folder's weights.
        config_folder = _tiny_copy(tmp_path, "config")
        if layout.endswith("pickle"):
            (config_folder / "text_encoder" / "model.safetensors").unlink()
            _pickle_file(config_folder / "text_encoder" / "pytorch_model.bin", marker)
        checkpoint = _ldm_file(tmp_path, drop_text_encoder=True)
        return {"model": str(checkpoint), "model_config": str(config_folder)}, checkpoint
    raise AssertionError(layout)


@pytest.mark.parametrize(
    "layout",
    [
        "suffix:evil.SAFETENSORS", "suffix:evil.Bin", "suffix:evil.CKPT", "suffix:evil.pt", "suffix:evil.pth",
        "suffix:evil.Safetensors", "safetensors-symlink-to-pickle",
        "bin-only:unet", "bin-only:vae", "bin-only:text_encoder",
        "renamed-pickle:unet", "renamed-pickle:vae", "renamed-pickle:text_encoder",
        "symlinked-weights", "shard-index-names-a-pickle",
        "config-folder-with-weights:pickle", "config-folder-with-weights:safetensors",
    ],
)  # fmt: skip
def test_hostile_model_layouts_are_refused_in_one_line_without_unpickling(tmp_path, no_unpickling, layout):
    marker = tmp_path / "payload-ran"
    arguments, offending = _hostile(layout, tmp_path, marker)
    with pytest.raises(BadInput) as caught:  # UnsupportedModelFile is a BadInput
        loading.load_components(arguments.pop("model"), device="cpu", **arguments)
    message = str(caught.value)
    assert "\n" not in message and str(offending) in message, message
    assert not marker.exists()


def test_a_real_safetensors_file_with_an_upper_case_suffix_is_refused_with_the_fix(tmp_path, no_unpickling):
    checkpoint = _ldm_file(tmp_path)
    renamed = checkpoint.rename(checkpoint.with_name("MODEL.SAFETENSORS"))
    with pytest.raises(UnsupportedModelFile, match="rename the file to end in .safetensors in lower case"):
        loading.load_components(str(renamed), device="cpu", model_config=str(loading.tiny_model_dir()))


def test_a_folder_with_pickles_beside_its_safetensors_loads_without_unpickling(tmp_path, no_unpickling):
    """Hub snapshots often hold both formats: the safetensors are read, the pickles never touched."""
    folder = _tiny_copy(tmp_path)
    marker = tmp_path / "payload-ran"
    for component in ("unet", "vae"):
        _pickle_file(folder / component / "diffusion_pytorch_model.bin", marker)
    _pickle_file(folder / "text_encoder" / "pytorch_model.bin", marker)
    components = loading.load_components(str(folder), device="cpu")
    assert components.window == 64 and not marker.exists()


@pytest.mark.parametrize("name", ["./no-such-model", "no/such/model", "~/no-such-model.safetensors", "{tmp}/nope"])
def test_missing_paths_are_model_not_found(tmp_path, name):
    name = name.format(tmp=tmp_path)
    with pytest.raises(ModelNotFound, match="no such file or folder") as caught:
        loading.load_components(name)
    assert name in str(caught.value) and "--model tiny" in str(caught.value)


def test_folder_that_is_not_a_diffusers_model_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound, match="unet/"):
        loading.load_components(str(tmp_path))


def test_unknown_repo_id_offline_is_model_not_found_naming_the_model_and_the_fix():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: local_files_only=None must mean offline
    with pytest.raises(ModelNotFound) as caught:
        loading.load_components("msd-panorama-tests/no-such-model")
    message = str(caught.value)
    assert "msd-panorama-tests/no-such-model" in message and "offline" in message and "--model tiny" in message


# --- devices --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_cuda_device_is_bad_input():
    with pytest.raises(BadInput, match="--device cpu"):
        loading.resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_an_apple_gpu_is_bad_input():
    with pytest.raises(BadInput, match="--device cpu"):
        loading.resolve_device("mps")


@pytest.mark.skipif(not NO_GPU, reason="auto picks the GPU here")
def test_auto_is_the_cpu_in_float32_without_a_gpu():
    assert loading.resolve_device() == (torch.device("cpu"), torch.float32)


def test_explicit_dtypes():
    assert loading.resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(BadInput, match="float32 or bfloat16"):
        loading.resolve_device("cpu", "float16")
    with pytest.raises(BadInput, match="unknown dtype"):
        loading.resolve_device("cpu", "float8")
    with pytest.raises(BadInput, match="unknown device"):
        loading.resolve_device("gpu")


def test_pngmeta_does_not_import_torch_or_pil():
    code = "import sys, msd_core.imageio.pngmeta; print(sorted({'torch', 'PIL', 'diffusers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_an_unreachable_hub_is_told_apart_from_a_missing_model_without_retries(monkeypatch, capfd):
    """Online allowed but the Hub's address does not resolve: one quick probe, then the local cache only;
    the message says the Hub cannot be reached (not "not found"), and huggingface_hub prints nothing."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://msd-panorama-tests.invalid")
    with pytest.raises(NetworkError) as caught:
        loading.load_components("msd-panorama-tests/no-such-model", local_files_only=False)
    message = str(caught.value)
    assert "cannot be reached" in message and "msd-panorama-tests.invalid" in message
    assert "was not found" not in message and "\n" not in message
    assert "Retrying" not in capfd.readouterr().err


def test_a_tiny_model_cache_this_user_cannot_use_is_a_clean_message(monkeypatch, unwritable_folder):
    monkeypatch.setenv("MSD_PANORAMA_CACHE", str(unwritable_folder / "cache"))
    with pytest.raises(ModelNotFound, match="set MSD_PANORAMA_CACHE to a folder of your own"):
        loading.load_components("tiny", device="cpu")


def test_the_tiny_model_cache_is_readable_by_other_users(tmp_path, monkeypatch):
    monkeypatch.setenv("MSD_PANORAMA_CACHE", str(tmp_path / "shared"))
    folder = loading.tiny_model_dir()
    assert folder.stat().st_mode & 0o055 == 0o055  # group and others may read and enter it
