"""LoRAs: a tiny random LoRA made with peft, our pipeline against diffusers with the same LoRA loaded,
several at once, switching between runs of a warm model, and every refusal (pickles, misfits, bad input)."""

import dataclasses
import json
import logging
import os
import pickle
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from msd_core import cli
from msd_core.models import lora, lora_files, loading
from msd_core.imageio import output, pngmeta
from msd_core.errors import BadInput, UnsupportedModelFile
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings
from test_sdxl import WINDOW as XL_WINDOW
from test_sdxl import diffusers_xl

ONE_WINDOW = GenerationSettings(  # one 64 px window of the tiny model: plain Stable Diffusion
    prompt="a quiet lake under mountains", width=64, height=64, wrap=False, model="tiny", method="multidiffusion",
    steps=4, seed=3, device="cpu", scales=1, scheduler="ddim",
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(path, seed: int, unet: bool = True, text: bool = True, rank: int = 4, alpha: int = 8):
    """A random LoRA for the tiny model in diffusers' own format (save_lora_weights, with its adapter
    metadata: lora_alpha ≠ rank, so a loader that ignored the metadata would scale it wrongly)."""
    source = loading.tiny_pipeline()
    layers, configs = {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if unet:
            config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
            source.unet.add_adapter(config)
            layers["unet_lora_layers"] = get_peft_model_state_dict(source.unet)
            configs["unet_lora_adapter_metadata"] = config.to_dict()
        if text:
            config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=TEXT_TARGETS)
            inject_adapter_in_model(config, source.text_encoder)
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(source.text_encoder)
            configs["text_encoder_lora_adapter_metadata"] = config.to_dict()
    folder = path.parent / f".{path.name}-build"
    StableDiffusionPipeline.save_lora_weights(folder, weight_name=path.name, **layers, **configs)
    os.replace(folder / path.name, path)
    folder.rmdir()
    return path


@pytest.fixture(scope="module")
def lora_a(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("loras") / "style-a.safetensors", seed=1)


@pytest.fixture(scope="module")
def lora_b(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("loras") / "style-b.safetensors", seed=2, text=False, rank=2, alpha=1)


@pytest.fixture(scope="module")
def pipe():
    return MSDPanoramaPipeline.from_settings(ONE_WINDOW)


def ours(pipe, *loras, **changes):
    settings = dataclasses.replace(ONE_WINDOW, loras=[{"path": str(p), "weight": w} for p, w in loras], **changes)
    return pipe(settings.validate(), decode=False)


def diffusers_with(loras, settings=ONE_WINDOW):
    """diffusers' StableDiffusionPipeline on a fresh copy of the tiny model, the LoRAs loaded by diffusers
    itself (load_lora_weights from the file, set_adapters with the weights)."""
    c = loading.load_components("tiny", device="cpu")
    reference = StableDiffusionPipeline(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet, scheduler=c.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    names = [f"lora{index}" for index in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        reference.load_lora_weights(str(path), adapter_name=name)
    if loras:
        reference.set_adapters(names, [weight for _, weight in loras])
    pipe = MSDPanoramaPipeline(c)
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    with torch.no_grad():
        return reference(settings.prompt, height=settings.height, width=settings.width,
                         num_inference_steps=settings.steps, guidance_scale=settings.guidance, latents=initial,
                         output_type="latent").images


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# --- equality with diffusers ----------------------------------------------------------------------------


def test_one_window_with_a_lora_equals_diffusers_with_the_same_lora_and_differs_without(pipe, lora_a):
    with_lora = ours(pipe, (lora_a, 1.0)).latents
    theirs = diffusers_with([(lora_a, 1.0)])
    print(f"LoRA vs diffusers: max abs diff {max_diff(with_lora, theirs):.2e}")
    assert with_lora.shape == theirs.shape == (1, 4, 8, 8)
    assert torch.allclose(with_lora, theirs, atol=1e-4), max_diff(with_lora, theirs)
    without = ours(pipe).latents
    assert torch.allclose(without, diffusers_with([]), atol=1e-4)
    print(f"with vs without the LoRA: max abs diff {max_diff(with_lora, without):.3f}")
    assert max_diff(with_lora, without) > 0.05


def test_two_loras_with_their_weights_equal_diffusers_set_adapters(pipe, lora_a, lora_b):
    loras = [(lora_a, 0.7), (lora_b, -0.4)]
    mine, theirs = ours(pipe, *loras).latents, diffusers_with(loras)
    print(f"two LoRAs vs diffusers: max abs diff {max_diff(mine, theirs):.2e}")
    assert torch.allclose(mine, theirs, atol=1e-4), max_diff(mine, theirs)
    assert max_diff(mine, ours(pipe, (lora_a, 0.7)).latents) > 1e-3  # the second one counts


def test_a_panorama_of_several_windows_with_a_lora_runs_and_differs_with_the_exact_gradient(pipe, lora_a):
    wide = {"width": 256, "height": 128, "method": "msd", "scales": None, "gradient": "exact", "steps": 2}  # the default
    with_lora = ours(pipe, (lora_a, 0.8), **wide).latents
    assert with_lora.shape == (1, 4, 16, 32) and torch.isfinite(with_lora).all()
    assert max_diff(with_lora, ours(pipe, **wide).latents) > 1e-2


def test_weight_zero_is_exactly_no_lora(pipe, lora_a):
    assert torch.equal(ours(pipe, (lora_a, 0.0)).latents, ours(pipe).latents)


def test_switching_loras_on_a_warm_model_never_leaks_the_previous_one(pipe, lora_a, lora_b):
    plain = ours(pipe).latents
    only_b = ours(pipe, (lora_b, 1.0)).latents
    ours(pipe, (lora_a, 1.0))
    assert torch.equal(ours(pipe, (lora_b, 1.0)).latents, only_b)  # A was taken out, B loaded again
    ours(pipe, (lora_a, 1.0), (lora_b, 0.5))
    assert torch.equal(ours(pipe, (lora_a, 1.0), (lora_b, 1.0)).latents,
                       ours(pipe, (lora_a, 1.0), (lora_b, 1.0)).latents)  # a new weight only: same adapters
    assert torch.equal(ours(pipe).latents, plain)
    assert lora.loaded_adapters(pipe.components) == []
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())  # original layers restored


def test_loaded_loras_leave_the_model_frozen(pipe, lora_a):
    ours(pipe, (lora_a, 1.0))
    for module in (pipe.unet, pipe.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    assert len(lora.loaded_adapters(pipe.components)) == 1


def test_a_kohya_format_lora_gives_what_the_diffusers_format_gives(pipe, lora_a, tmp_path):
    """The community (kohya/A1111) layout of the same weights: lora_unet_…/lora_te_… keys, lora_down/lora_up
    and an alpha per layer; diffusers converts it back."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    tensors = load_file(lora_a)
    kohya = {}
    for prefix, head, alpha in (("unet", "lora_unet_", 8.0), ("text_encoder", "lora_te_text_model_", 2.0)):
        part = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
        for key, value in convert_state_dict_to_kohya(part).items():  # a_b_c.lora_down.weight, a_b_c.alpha, …
            kohya[head + key] = torch.tensor(alpha) if key.endswith(".alpha") else value
    path = tmp_path / "kohya.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)
    assert torch.allclose(ours(pipe, (path, 1.0)).latents, ours(pipe, (lora_a, 1.0)).latents, atol=1e-5)


# --- metadata ---------------------------------------------------------------------------------------------


def test_the_png_records_each_loras_name_hash_and_weight_and_restores_them(pipe, lora_a, lora_b, tmp_path):
    settings = dataclasses.replace(ONE_WINDOW, loras=[{"path": str(lora_a), "weight": 0.7},
                                                      {"path": str(lora_b), "weight": -0.4}])
    result = pipe(settings)
    path = output.save_png(result.image, tmp_path / "pano.png", result.metadata)
    texts = pngmeta.read_text_chunks(path)
    records = json.loads(texts[pngmeta.LORAS_KEY])
    assert records == [
        {"name": "style-a.safetensors", "sha256": lora_files.sha256_of(lora_a), "weight": 0.7},
        {"name": "style-b.safetensors", "sha256": lora_files.sha256_of(lora_b), "weight": -0.4},
    ]
    stored = GenerationSettings.from_stored(json.loads(texts[pngmeta.SETTINGS_KEY]))
    assert stored == settings
    found, missing = lora_files.restore_loras(stored.loras, records, [])
    assert found == settings.loras and missing == []


def test_a_png_without_loras_has_no_lora_key_and_restores_none(pipe):
    result = pipe(ONE_WINDOW, decode=False)
    assert pngmeta.LORAS_KEY not in result.metadata
    assert GenerationSettings.from_stored(json.loads(result.metadata[pngmeta.SETTINGS_KEY])).loras == []
    assert GenerationSettings.from_stored({"prompt": "older, before LoRAs"}).loras == []


def test_restore_finds_a_moved_lora_by_name_and_hash_and_names_the_missing_ones(lora_a, lora_b, tmp_path):
    records = [{"name": "style-a.safetensors", "sha256": lora_files.sha256_of(lora_a), "weight": 0.5},
               {"name": "gone.safetensors", "sha256": "0" * 64, "weight": 1.0}]
    stored = [{"path": "/nowhere/style-a.safetensors", "weight": 0.5}, {"path": "/nowhere/gone.safetensors", "weight": 1.0}]
    folder = lora_a.parent
    found, missing = lora_files.restore_loras(stored, records, [str(tmp_path), str(folder)])
    assert found == [{"path": str(lora_a), "weight": 0.5}]
    assert len(missing) == 1 and "gone.safetensors" in missing[0] and "not found" in missing[0]
    # The same name with other content is not the LoRA the panorama was made with.
    impostor = tmp_path / "style-a.safetensors"
    impostor.write_bytes(lora_b.read_bytes())
    found, missing = lora_files.restore_loras(stored[:1], records[:1], [str(tmp_path)])
    assert found == [] and "SHA-256 differs" in missing[0] and str(impostor) in missing[0]


# --- refusals ----------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("layout", ["renamed", "symlink", "torch-zip"])
def test_a_pickle_lora_is_refused_by_content_without_unpickling(pipe, tmp_path, no_unpickling, layout):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.safetensors"
    if layout == "renamed":
        evil.write_bytes(pickle.dumps(_Payload(marker)))
    elif layout == "symlink":
        (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Payload(marker)))
        evil.symlink_to(tmp_path / "evil.pt")
    else:
        evil.write_bytes(b"PK\x03\x04" + bytes(64))  # torch.save's zip layout
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: unet_calls.append(1))
    try:
        with pytest.raises(UnsupportedModelFile, match="not a safetensors file") as caught:
            ours(pipe, (evil, 1.0))
    finally:
        hook.remove()
    assert str(evil) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists() and unet_calls == []


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_suffixes_are_refused_by_validation(tmp_path, suffix):
    path = tmp_path / f"style{suffix}"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(BadInput, match="pickle-based file"):
        dataclasses.replace(ONE_WINDOW, loras=[{"path": str(path), "weight": 1.0}]).validate()


def _variant(source, path, change):
    tensors = load_file(source)
    save_file({k: v.contiguous() for k, v in change(tensors).items()}, path)
    return path


@pytest.mark.parametrize("kind,message", [
    ("wider", "does not fit this model"),  # another model's sizes (a 48-wide cross-attention)
    ("other-layers", "only 56 of its 64 unet weights match"),  # 8 of its layers are not in this model
    ("sdxl", "made for a model with two text encoders (SDXL)"),
    ("flux", "made for another kind of model"),
    ("not-lora", "not LoRA layers"),
])  # fmt: skip
def test_a_lora_that_does_not_fit_is_refused_before_sampling_and_leaves_the_model_clean(
        pipe, lora_a, tmp_path, kind, message):
    def change(tensors):
        if kind == "wider":
            return {k: torch.randn(v.shape[0], 48) if "attn2.to_k.lora_A" in k else v for k, v in tensors.items()}
        if kind == "other-layers":
            return {k.replace("attn1.", "attn9.") if "down_blocks" in k else k: v for k, v in tensors.items()}
        if kind == "sdxl":
            return {**tensors, **{k.replace("text_encoder.", "text_encoder_2."): v.clone() for k, v in tensors.items()
                                  if k.startswith("text_encoder.")}}
        if kind == "flux":
            return {k.replace("unet.", "transformer."): v for k, v in tensors.items()}
        return {**tensors, "unet.conv_in.weight": torch.zeros(16, 4, 3, 3)}

    bad = _variant(lora_a, tmp_path / f"{kind}.safetensors", change)
    plain = ours(pipe).latents
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: unet_calls.append(1))
    try:
        with pytest.raises(BadInput, match=re.escape(message)) as caught:
            ours(pipe, (bad, 1.0))
    finally:
        hook.remove()
    assert unet_calls == [] and str(bad) in str(caught.value) and caught.value.field == "loras"
    assert lora.loaded_adapters(pipe.components) == []
    assert torch.equal(ours(pipe).latents, plain)


def test_the_same_file_twice_under_two_names_is_refused(pipe, lora_a, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lora_a.read_bytes())
    with pytest.raises(BadInput, match="are the same file"):
        ours(pipe, (lora_a, 0.5), (copy, 0.5))


@pytest.mark.parametrize("loras,message", [
    ("style.safetensors", "must be a list"),
    ([{"path": "x.safetensors"}], "must be an object with a path and a weight"),
    ([{"path": "x.safetensors", "weight": 1, "scale": 2}], "unknown key(s): scale"),
    ([{"path": "", "weight": 1.0}], "entry 1 has an empty path"),
    ([{"path": "{missing}.safetensors", "weight": 1.0}], "the LoRA file {missing}.safetensors does not exist"),
    ([{"path": "style.txt", "weight": 1.0}], "is not a .safetensors file"),
])  # fmt: skip
def test_bad_lora_settings_are_refused_with_a_clear_message(loras, message):
    with pytest.raises(BadInput) as caught:
        dataclasses.replace(ONE_WINDOW, loras=loras).validate()
    assert message in str(caught.value) and caught.value.field == "loras"


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), 10.5, -11, True, "1"])
def test_weights_must_be_finite_numbers_in_range(lora_a, weight):
    with pytest.raises(BadInput, match="must be a number from -10 to 10"):
        dataclasses.replace(ONE_WINDOW, loras=[{"path": str(lora_a), "weight": weight}]).validate()


def test_a_folder_duplicates_and_too_many_are_refused(lora_a, tmp_path):
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for loras, message in (([{"path": str(folder), "weight": 1.0}], "is not a file"),
                           ([{"path": str(lora_a), "weight": 1.0}] * 2, "is given twice"),
                           ([{"path": str(tmp_path / f"{n}.safetensors"), "weight": 1.0} for n in range(17)],
                            "17 LoRAs given; at most 16")):
        with pytest.raises(BadInput, match=message):
            dataclasses.replace(ONE_WINDOW, loras=loras).validate()


# --- the command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argument,expected", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.8", ("style.safetensors", 0.8)),
    ("style.safetensors:-1.5", ("style.safetensors", -1.5)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:0.25", ("C:\\loras\\style.safetensors", 0.25)),
    ("odd:name.SAFETENSORS", ("odd:name.SAFETENSORS", 1.0)),
])  # fmt: skip
def test_lora_arguments_split_at_the_last_colon_unless_they_end_in_safetensors(argument, expected):
    parsed = lora_files.parse_lora_argument(argument)
    assert (parsed["path"], parsed["weight"]) == (os.path.abspath(expected[0]), expected[1])


@pytest.mark.parametrize("argument,message", [
    ("style.safetensors:abc", "the weight 'abc' after the last colon is not a number"),
    ("style.safetensors:", "the weight '' after the last colon is not a number"),
    ("style.safetensors:nan", "finite"),
    ("style", "is not FILE or FILE:WEIGHT"),
    (":0.5", "is not FILE or FILE:WEIGHT"),
])  # fmt: skip
def test_bad_lora_arguments_are_one_line_errors_naming_the_option(capsys, argument, message):
    code = cli.main(["generate", "x", "--model", "tiny", "--dry-run", "--lora", argument])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and message in err and "--lora" in err and err.count("\n") == 1


def test_the_cli_applies_repeated_loras_and_records_them(lora_a, lora_b, tmp_path, capsys):
    out = tmp_path / "pano.png"
    code = cli.main(["generate", "a lake", "-o", str(out), "--model", "tiny", "--device", "cpu", "--width", "64",
                     "--height", "64", "--steps", "2", "--seed", "1", "-q", "--lora", f"{lora_a}:0.6", "--lora",
                     str(lora_b)])
    assert code == 0, capsys.readouterr().err
    records = json.loads(pngmeta.read_text_chunks(out)[pngmeta.LORAS_KEY])
    assert [(r["name"], r["weight"]) for r in records] == [("style-a.safetensors", 0.6), ("style-b.safetensors", 1.0)]
    stored = json.loads(pngmeta.read_text_chunks(out)[pngmeta.SETTINGS_KEY])["loras"]
    assert stored == [{"path": str(lora_a), "weight": 0.6}, {"path": str(lora_b), "weight": 1.0}]


def test_a_missing_lora_file_fails_at_once_from_the_cli(tmp_path, capsys):
    code = cli.main(["generate", "x", "--model", "tiny", "--dry-run", "--lora", str(tmp_path / "nope.safetensors")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and "the LoRA file" in err and "does not exist" in err


# --- through the worker ------------------------------------------------------------------------------------


def test_the_worker_applies_loras_per_request_on_its_warm_model(lora_a, tmp_path):
    """plain → LoRA → plain on one warm worker: the second plain panorama is the first one, pixel for
    pixel; a pickle LoRA and a missing one are bad_input errors, and the worker goes on."""
    import sys

    import numpy as np
    from PIL import Image

    from msd_core.worker import protocol
    from msd_core.worker.client import WorkerClient

    def settings(*loras):
        return dataclasses.replace(ONE_WINDOW, width=128, steps=2, loras=[{"path": str(p), "weight": w} for p, w in loras]).to_dict()

    def finish(request_id):
        while True:
            event = client.next_event(timeout=120)
            assert event is not None, client.stderr_lines
            if event["id"] == request_id and event["event"] in protocol.FINAL_EVENTS:
                return event

    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"not": "weights"}))
    client = WorkerClient(sys.executable, pythonpath=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}).start()
    try:
        done = [finish(client.generate(settings(*loras), tmp_path / f"{name}.png"))
                for name, loras in (("plain", []), ("lora", [(lora_a, 1.0)]), ("again", []))]
        assert [event["event"] for event in done] == ["done"] * 3, done
        assert json.loads(done[1]["metadata"][pngmeta.LORAS_KEY])[0]["name"] == "style-a.safetensors"
        pixels = [np.asarray(Image.open(event["output"])).astype(int) for event in done]
        assert np.array_equal(pixels[0], pixels[2]) and np.abs(pixels[0] - pixels[1]).max() > 10
        refused = finish(client.generate(settings((evil, 1.0)), tmp_path / "evil.png"))
        assert (refused["event"], refused["kind"], refused["field"]) == ("error", "bad_input", "loras")
        assert "not a safetensors file (it is a pickle)" in refused["message"]
        missing = finish(client.generate(settings((tmp_path / "gone.safetensors", 1.0)), tmp_path / "gone.png"))
        assert missing["kind"] == "bad_input" and "does not exist" in missing["message"]
        assert finish(client.generate(settings(), tmp_path / "after.png"))["event"] == "done"
        assert not (tmp_path / "evil.png").exists() and not (tmp_path / "gone.png").exists()
    finally:
        assert client.stop(timeout=60) == 0


def test_a_bfloat16_model_takes_the_lora_too(lora_a):
    """The dtype a user may pick on the CPU (and float16's path on GPUs): the adapters run in the model's
    dtype, and the result stays near float32's with the LoRA, far from float32's without it."""
    settings = dataclasses.replace(ONE_WINDOW, dtype="bfloat16")
    half = MSDPanoramaPipeline.from_settings(settings)
    with_lora = ours(half, (lora_a, 1.0), dtype="bfloat16").latents
    full = MSDPanoramaPipeline.from_settings(ONE_WINDOW)
    reference, without = ours(full, (lora_a, 1.0)).latents, ours(full).latents
    assert torch.isfinite(with_lora).all()
    assert max_diff(with_lora, reference) < 0.2 * max_diff(reference, without)


# --- SDXL: two text encoders (the components the SDXL family adds; no pipeline needed) ------------------------


def _tiny_sdxl_parts():
    """A tiny SDXL-shaped UNet (text_time added conditioning, 64-wide cross-attention from two 32-wide
    CLIP encoders, the second with a projection) and its text encoders, fixed by a seed."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8,
        )
        config = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=32)
        return unet, CLIPTextModel(CLIPTextConfig(**config)), CLIPTextModelWithProjection(CLIPTextConfig(**config))


def _sdxl_outputs(unet, text_encoder, text_encoder_2):
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        first = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        second = text_encoder_2(ids, output_hidden_states=True)
        context = torch.cat([first, second.hidden_states[-2]], dim=-1)
        conditions = {"text_embeds": second.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return unet(sample, 500, encoder_hidden_states=context, added_cond_kwargs=conditions).sample, second.text_embeds


def make_xl_lora(path, parts, seed: int = 5):
    """A random SDXL LoRA for ``parts`` (unet, text_encoder, text_encoder_2; changed in place): peft layers on
    the UNet's attention and on both text encoders (rank 2, alpha 4), saved by StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = {}
        for name, module, targets in zip(("unet", "text_encoder", "text_encoder_2"), parts,
                                         (UNET_TARGETS, TEXT_TARGETS, TEXT_TARGETS)):
            config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=targets)
            inject_adapter_in_model(config, module)
            layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
            layers[f"{name}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path


def test_an_sdxl_lora_goes_into_both_text_encoders_as_diffusers_puts_it(tmp_path, lora_a):
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    path = make_xl_lora(tmp_path / "xl.safetensors", _tiny_sdxl_parts())

    base = _tiny_sdxl_parts()
    plain = _sdxl_outputs(*base)
    components = SimpleNamespace(unet=base[0], text_encoder=base[1], text_encoder_2=base[2], model="tiny-xl")
    records = lora.apply_loras(components, [{"path": str(path), "weight": 0.8}])
    assert records[0]["name"] == "xl.safetensors"
    mine = _sdxl_outputs(*base)

    ref_unet, ref_te, ref_te2 = _tiny_sdxl_parts()
    source = loading.tiny_pipeline()
    reference = StableDiffusionXLPipeline(vae=source.vae, text_encoder=ref_te, text_encoder_2=ref_te2,
                                          tokenizer=source.tokenizer, tokenizer_2=source.tokenizer, unet=ref_unet,
                                          scheduler=source.scheduler)
    reference.load_lora_weights(str(path), adapter_name="xl")
    reference.set_adapters(["xl"], [0.8])
    theirs = _sdxl_outputs(ref_unet, ref_te, ref_te2)
    for a, b, c in zip(mine, theirs, plain):
        assert torch.allclose(a, b, atol=1e-5), max_diff(a, b)
        assert max_diff(a, c) > 1e-3  # the pooled embedding comes from text_encoder_2 alone: its LoRA counts
    assert len(lora.loaded_adapters(components)) == 1

    with pytest.raises(BadInput, match="does not fit this model"):  # an SD 1.x LoRA on this SDXL-shaped model
        lora.apply_loras(components, [{"path": str(lora_a), "weight": 1.0}])
    assert lora.loaded_adapters(components) == []
    assert all(torch.equal(a, b) for a, b in zip(_sdxl_outputs(*base), plain))


# --- SDXL: the tiny-xl model through our pipeline and the command line ---------------------------------------


@pytest.fixture(scope="module")
def xl_pipe():
    return MSDPanoramaPipeline.from_settings(XL_WINDOW)


@pytest.fixture(scope="module")
def xl_lora(tmp_path_factory):
    """A random LoRA for tiny-xl: its UNet and both text encoders."""
    source = loading.tiny_pipeline(family="sdxl")
    path = tmp_path_factory.mktemp("loras") / "xl-style.safetensors"
    return make_xl_lora(path, (source.unet, source.text_encoder, source.text_encoder_2))


def ours_xl(pipe, *loras, **changes):
    settings = dataclasses.replace(XL_WINDOW, loras=[{"path": str(p), "weight": w} for p, w in loras], **changes)
    settings = settings.validate()
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    return pipe(settings, latents=initial, decode=False).latents


def _refused_before_any_unet_call(pipe, path, message):
    unet_calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *args: unet_calls.append(1))
    try:
        with pytest.raises(BadInput, match=message) as caught:
            (ours_xl if pipe.family == "sdxl" else ours)(pipe, (path, 1.0))
    finally:
        hook.remove()
    assert unet_calls == [] and str(path) in str(caught.value) and caught.value.field == "loras"
    assert lora.loaded_adapters(pipe.components) == []
    modules = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert not any("lora" in name for m in modules if m is not None for name, _ in m.named_parameters())
    return str(caught.value)


def test_sdxl_window_with_lora_equals_diffusers(xl_pipe, xl_lora):
    """One tiny-xl window with an SDXL LoRA at 0.8 = StableDiffusionXLPipeline on fresh components with the
    same file loaded by load_lora_weights and set_adapters(…, [0.8]): same latents, scheduler and steps."""
    mine = ours_xl(xl_pipe, (xl_lora, 0.8))
    c = loading.load_components("tiny-xl", device="cpu")
    reference = diffusers_xl(c)
    reference.load_lora_weights(str(xl_lora), adapter_name="xl")
    reference.set_adapters(["xl"], [0.8])
    settings = XL_WINDOW.validate()
    initial = MSDPanoramaPipeline(c).initial_latents(xl_pipe.check_inputs(settings), settings.seed)
    with torch.no_grad():
        theirs = reference(settings.prompt, height=settings.height, width=settings.width,
                           num_inference_steps=settings.steps, guidance_scale=settings.guidance, latents=initial,
                           output_type="latent").images
    print(f"SDXL LoRA vs diffusers: max abs diff {max_diff(mine, theirs):.2e}")
    assert mine.shape == theirs.shape == (1, 4, 16, 16)
    assert torch.allclose(mine, theirs, atol=1e-4), max_diff(mine, theirs)
    without = ours_xl(xl_pipe)
    print(f"SDXL with vs without the LoRA: max abs diff {max_diff(mine, without):.3f}")
    assert max_diff(mine, without) > 0.05
    assert lora.loaded_adapters(xl_pipe.components) == []


def test_an_sd_lora_on_sdxl_is_refused_before_sampling_and_leaves_the_model_clean(xl_pipe, lora_a):
    message = _refused_before_any_unet_call(xl_pipe, lora_a, "does not fit this model")
    print(message)
    assert "SD 1.x/2.x" in message and "SDXL" in message and "in the LoRA" in message, message
    fresh = MSDPanoramaPipeline.from_settings(XL_WINDOW)
    assert torch.equal(ours_xl(xl_pipe), ours_xl(fresh))


def test_an_sdxl_lora_on_sd_is_refused_before_sampling_and_leaves_the_model_clean(pipe, xl_lora):
    plain = ours(pipe).latents
    message = _refused_before_any_unet_call(pipe, xl_lora, "does not fit this model")
    assert "two text encoders (SDXL)" in message, message
    assert torch.equal(ours(pipe).latents, plain)


def test_the_cli_runs_tiny_xl_with_a_lora_and_records_family_and_lora(xl_lora, tmp_path, capsys):
    out = tmp_path / "xl.png"
    code = cli.main(["generate", "a canyon", "--model", "tiny-xl", "--device", "cpu", "--width", "128", "--height",
                     "128", "--steps", "2", "--seed", "1", "-q", "-o", str(out), "--lora", f"{xl_lora}:0.8"])
    assert code == 0, capsys.readouterr().err
    texts = pngmeta.read_text_chunks(out)
    assert texts["family"] == "sdxl" and texts["model"] == "tiny-xl"
    assert json.loads(texts[pngmeta.LORAS_KEY]) == [
        {"name": "xl-style.safetensors", "sha256": lora_files.sha256_of(xl_lora), "weight": 0.8}]
    assert json.loads(texts[pngmeta.SETTINGS_KEY])["loras"] == [{"path": str(xl_lora), "weight": 0.8}]


def test_the_cli_refuses_an_sd_lora_on_tiny_xl_in_one_line_and_writes_nothing(lora_a, tmp_path, capsys, caplog):
    out = tmp_path / "xl.png"
    code = cli.main(["generate", "a canyon", "--model", "tiny-xl", "--device", "cpu", "--width", "128", "--height",
                     "128", "--steps", "2", "-q", "-o", str(out), "--lora", f"{lora_a}:0.8"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BAD_INPUT and not out.exists()
    assert "error: the LoRA" in err and "does not fit this model (tiny-xl, SDXL)" in err, err
    # diffusers logs a failed load itself (torch's many-line message) before raising it: not said twice.
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
