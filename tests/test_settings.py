"""GenerationSettings.validate: every field type-checked and bounded, errors that name their field, and
the memory check made before anything is allocated."""

import json

import pytest

from msd_core import settings as settings_module
from msd_core.errors import BadInput
from msd_core.settings import GenerationSettings, check_memory, memory_needed


def validate(**changes):
    return GenerationSettings(**{"prompt": "a valley", **changes}).validate()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"omega": float("inf")}, "omega"), ({"omega": json.loads("1e400")}, "omega"), ({"omega": 10**5000}, "omega"),
        ({"guidance": float("nan")}, "guidance"), ({"guidance": True}, "guidance"),
        ({"steps": 1001}, "steps"), ({"steps": 5.0}, "steps"), ({"scales": 2**40}, "scales"),
        ({"width": 16392}, "width"), ({"height": True}, "height"), ({"view_batch": 0}, "view_batch"),
        ({"seed": 1.5}, "seed"), ({"seed": 2**63}, "seed"), ({"wrap": "yes"}, "wrap"), ({"feather": 0}, "feather"),
        ({"model_config": 3}, "model_config"), ({"model_config": ""}, "model_config"), ({"model": None}, "model"),
        ({"prompt": "a\x00b"}, "prompt"), ({"prompt": "x" * 10001}, "prompt"), ({"negative_prompt": b"x"}, "negative_prompt"),
        ({"method": ["msd"]}, "method"), ({"device": None}, "device"), ({"stride": 24, "scales": 3, "windows": "dense"}, "stride"),
        ({"stride": 16}, "stride"), ({"fine_start": 0.95}, "fine_start"), ({"fine_start": -0.1}, "fine_start"),
        ({"fine_join": "ancestral"}, "fine_join"), ({"tile_starts": "odd"}, "tile_starts"),
        ({"coarse_gradient": "fast"}, "coarse_gradient"), ({"pull_through": "solver"}, "pull_through"),
        ({"fine_steps": "ancestral"}, "fine_steps"),
    ],
)  # fmt: skip
def test_each_bad_value_is_refused_naming_its_field(changes, field):
    with pytest.raises(BadInput) as caught:
        validate(**changes)
    assert caught.value.field == field
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400  # one line, and a 5000-digit number is not printed


def test_the_limits_themselves_are_accepted():
    validate(width=16384, height=8192, steps=1000, omega=1000, guidance=100, view_batch=1024, seed=2**63 - 1)
    validate(prompt="line one\nline two\ttabbed", negative_prompt="", model_config=None)
    validate(stride=8, scales=1, windows="dense")  # one level: any multiple of 8
    validate(stride=8, windows="dense")  # levels not known yet: the pipeline checks the stride once it has resolved them


def test_messages_are_rendered_with_each_front_ends_names():
    with pytest.raises(BadInput) as caught:
        validate(view_batch=0)
    assert str(caught.value).startswith("view_batch must be a whole number from 1 to 1024")
    assert caught.value.render(lambda field: "--" + field.replace("_", "-")).startswith("--view-batch must be")
    assert caught.value.render(lambda field: "View Batch").startswith("View Batch must be")


def test_user_text_in_a_message_is_not_read_as_a_template():
    with pytest.raises(BadInput) as caught:
        validate(method="{field} {0} {x!r}")
    assert caught.value.render(lambda field: "--method") == (
        "unknown --method '{field} {0} {x!r}'; choose one of: msd, multidiffusion"
    )


def test_an_unknown_coarse_noise_names_the_field_and_its_choices():
    assert (validate().pyramid, validate().coarse_noise) == ("global", "drawn")
    with pytest.raises(BadInput) as caught:
        validate(coarse_noise="snr")
    assert caught.value.field == "coarse_noise"
    assert caught.value.render(lambda field: "--" + field.replace("_", "-")) == (
        "unknown --coarse-noise 'snr'; choose one of: drawn, matched, literal"
    )


def test_a_size_that_cannot_fit_in_memory_is_refused_before_allocating():
    huge = validate(width=16384, height=16384, device="cpu")
    needed = memory_needed(huge)
    assert needed > 16384 * 16384 * 3 * 4  # at least the float32 image
    check_memory(huge, available=needed)  # just fits
    with pytest.raises(BadInput, match=r"16384×16384 panorama needs about [\d.]+ GB .*\(at most 16384 px per side\)"):
        check_memory(huge, available=needed - 1)
    assert settings_module.available_memory() > 0  # this machine reports it (Linux: MemAvailable)


def test_stored_settings_without_the_newer_fields_mean_what_that_version_did():
    older = {"prompt": "a red desert", "width": 512, "height": 256}  # a PNG written before pyramid/coarse_noise
    restored = GenerationSettings.from_stored(older)
    assert (restored.pyramid, restored.coarse_noise) == ("halving", "literal")
    assert GenerationSettings.from_dict(older).coarse_noise == "drawn"  # a request means today's default
    assert (restored.scheduler, restored.guided_fraction, restored.late_gradient) == ("ddim", 1.0, "none")
    # A v0.3 file stored its scheduler and steps, not how many steps were guided: all of them.
    v03 = GenerationSettings.from_stored({**older, "scheduler": "ddim", "steps": 50, "pyramid": "global"})
    assert (v03.guided_fraction, v03.late_gradient, v03.pyramid) == (1.0, "none", "global")
    # A v0.5 file (drawn start, pole caps) stored no global_move: its global level never moved.
    v05 = {**older, "pyramid": "global", "coarse_noise": "drawn", "poles": "sphere", "scheduler": "dpmpp-2m"}
    assert GenerationSettings.from_stored(v05).global_move == "fixed"
    assert GenerationSettings.from_dict(v05).global_move == "roll"
    # A v0.8 file stored no coarse_gradient: its second level took the exact gradient.
    assert (GenerationSettings.from_stored(v05).coarse_gradient, GenerationSettings.from_dict(v05).coarse_gradient) == (
        "exact", "refresh")
    # A v0.6 file with a late finest level stored no fine_join: its level joined deterministically.
    v06 = {**v05, "global_move": "roll", "fine_start": 0.6}
    assert GenerationSettings.from_stored(v06).fine_join == "deterministic"
    assert GenerationSettings.from_dict(v06).fine_join == "stochastic"
    # Every file before v0.10 pulled through the solver step.
    assert GenerationSettings.from_stored(v06).pull_through == GenerationSettings.from_dict(v06).pull_through == "step"
    # Every file before v0.11 stepped its finest level deterministically; Standard now steps its blocks stochastically.
    assert (GenerationSettings.from_stored(v06).fine_steps, GenerationSettings.from_dict(v06).fine_steps) == (
        "deterministic", "stochastic")
    current = GenerationSettings(prompt="a red desert").to_dict()
    assert GenerationSettings.from_stored(current) == GenerationSettings(prompt="a red desert")
    with pytest.raises(BadInput, match="must be a JSON object"):
        GenerationSettings.from_stored(["not", "settings"])
