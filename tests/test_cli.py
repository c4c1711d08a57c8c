"""The `msd-panorama` command: an end-to-end run and every kind of bad input."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from msd_core import cli
from msd_core.imageio import pngmeta
from msd_core.settings import QUALITY

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "5"]


def test_generate_end_to_end_through_the_console_script(tmp_path):
    out = tmp_path / "pano.png"
    script = pathlib.Path(sys.executable).with_name("msd-panorama")
    completed = subprocess.run(
        [str(script), "generate", "a red barn in a wheat field", "-o", str(out), "--width", "256", "--height", "128",
         "--gradient", "fast", "--stride", "32", *SMALL],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == str(out)
    assert "seed 5" in completed.stderr
    with Image.open(out) as image:
        assert image.size == (256, 128) and image.mode == "RGB"
    meta = pngmeta.read_text_chunks(out)
    assert meta["prompt"] == "a red barn in a wheat field" and meta["seed"] == "5"
    assert meta["width"] == "256" and meta["height"] == "128" and meta["wrap"] == "true"  # 2:1 → seamless
    assert meta["gradient"] == "fast" and meta["model"] == "tiny" and meta["coarse_noise"] == "drawn"
    assert meta["pyramid"] == "global" and meta["scales"] == "3"  # two halving levels and the global one
    assert meta["msd_core_version"]


def test_python_dash_m_msd_core_shows_help():
    completed = subprocess.run(
        [sys.executable, "-m", "msd_core", "generate", "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert completed.returncode == 0
    for option in ("--preset", "--omega", "--gradient", "--wrap", "--no-wrap", "--overwrite", "--view-batch"):
        assert option in completed.stdout
    assert "torch" not in completed.stderr  # --help must not load the model stack


def run_cli(*arguments) -> int:
    """cli.main's exit code, also when argparse exits by itself."""
    try:
        return cli.main(list(arguments))
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--width", "1001"], "--width 1001 is not a multiple of 8 (the VAE's factor); nearest valid: 1000 or 1008"),
        (["--width", "48", "--height", "48"], "smaller than one 64 px window"),
        (["--omega", "-1"], "--omega must be a number from 0 to 1000"),
        (["--omega", "inf"], "--omega must be a number from 0 to 1000 (0 is plain MultiDiffusion), got inf"),
        (["--omega", "nan"], "--omega must be a number"),
        (["--guidance", "-2"], "--guidance must be a number from 0 to 100"),
        (["--guidance", "1e400"], "--guidance must be a number from 0 to 100 (7.5 is usual; 1 or less turns it off), got inf"),
        (["--steps", "0"], "--steps must be a whole number from 1 to 1000"),
        (["--steps", "100000"], "--steps must be a whole number from 1 to 1000 (Stable Diffusion's scheduler has 1000 timesteps)"),
        (["--width", "100000", "--height", "100000"], "--width must be a whole number of pixels from 8 to 16384"),
        (["--stride", "8"], "--stride 8 px: with more than one pyramid level the stride must be a multiple of 16 px"),
        (["--scales", "99"], "--scales must be a whole number from 1 to 12"),
        (["--view-batch", "0"], "--view-batch must be a whole number from 1 to 1024"),
        (["--seed", "-1"], "--seed must be a whole number from 0 to 2^63−1"),
        (["--threads", "-1"], "--threads must be from 0 (automatic) to 1024"),
        (["--negative", "a\x07b"], "--negative contains the control character U+0007"),
        (["--model", "nobody/no-such-model"], "'nobody/no-such-model' was not found"),
        (["--model", "weights.ckpt"], "pickle"),
        (["--model", "weights.CKPT"], "pickle"),
        (["--model", ""], "--model is empty"),
        (["--preset", "strip", "--scales", "9"], "fewer --scales"),
        (["--preset", "strip", "--cubemap"], "a --cubemap needs a 2:1 360° world (wrapping); this panorama is 4096×1024"),
        (["--no-wrap", "--cubemap"], "this panorama is 2048×1024 without wrap"),
        (["--poles", "round"], "argument --poles: invalid choice: 'round'"),
        # argparse's own errors: one line too, with exit code 2
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc' (see msd-panorama generate --help)"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
        (["--preset", "square"], "argument --preset: invalid choice: 'square'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, arguments, message):
    code = run_cli("generate", "a lake", "-o", str(tmp_path / "out.png"), "-q", *SMALL, *arguments)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert [line for line in err if "error" in line] == [err[-1]] and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("msd-panorama: error: ") and message in err[-1], err[-1]
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_and_existing_file(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "folder" / "out.png"
    assert cli.main(["generate", "a lake", "-o", str(missing), *SMALL]) == 2
    assert "does not exist" in capsys.readouterr().err
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"precious")
    assert cli.main(["generate", "a lake", "-o", str(existing), *SMALL]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert existing.read_bytes() == b"precious"


def test_presets_and_wrap_defaults():
    parser = cli.build_parser()

    def settings(*arguments):
        return cli.settings_from_args(parser.parse_args(["generate", "x", "-o", "x.png", *arguments]))

    assert (settings().width, settings().height, settings().wrap) == (2048, 1024, True)
    strip = settings("--preset", "strip")
    assert (strip.width, strip.height, strip.wrap) == (4096, 1024, False)
    assert settings("--preset", "360", "--no-wrap").wrap is False
    assert settings("--width", "1536", "--height", "512").wrap is False  # 3:1 is not a 360° image
    assert settings("--seed", "9").seed == 9
    assert (settings().pyramid, settings().coarse_noise) == ("global", "drawn")
    paper = settings("--pyramid", "halving", "--coarse-noise", "literal")
    assert (paper.pyramid, paper.coarse_noise) == ("halving", "literal")
    assert settings("--fine-start", "0.6").fine_start == 0.6 and settings("--fine-start", "0").fine_start == 0
    assert (settings().fine_join, settings("--fine-join", "deterministic").fine_join) == ("stochastic", "deterministic")
    assert (settings().tile_starts, settings("--tile-starts", "even").tile_starts) == ("any", "even")
    assert (settings().pull_through, settings("--pull-through", "x0").pull_through) == ("step", "x0")
    # ω and the tile starts follow the quality preset unless given: the paper's ω 10 and even tiles for best
    assert (settings().omega, settings("--quality", "draft").omega, settings("--omega", "3").omega) == (14.0, 14.0, 3.0)
    best = settings("--quality", "best")
    assert (best.omega, best.tile_starts) == (10.0, "even")
    assert settings("--quality", "best", "--omega", "14", "--tile-starts", "any").omega == 14.0
    # the second level's gradient too: refresh for draft and standard, the paper's exact for best, or as given
    assert (settings().coarse_gradient, settings("--quality", "draft").coarse_gradient, best.coarse_gradient) == (
        "refresh", "refresh", "exact")
    assert settings("--coarse-gradient", "exact").coarse_gradient == "exact"
    assert settings("--quality", "best", "--coarse-gradient", "refresh").coarse_gradient == "refresh"
    # the finest level's steps too: stochastic within its blocks for standard only, or as given
    assert (settings().fine_steps, settings("--quality", "draft").fine_steps, best.fine_steps) == (
        "stochastic", "deterministic", "deterministic")
    assert settings("--quality", "best", "--fine-steps", "stochastic").fine_steps == "stochastic"
    assert settings("--fine-steps", "deterministic").fine_steps == "deterministic"
    assert (settings().global_move, settings("--global-move", "fixed").global_move) == ("roll", "fixed")
    assert len({settings().seed for _ in range(5)}) > 1  # a fresh seed unless one is given


def test_drawn_seeds_fit_blenders_seed_field():
    """Blender's Seed field is a 32-bit IntProperty: a drawn seed is below 2^31, so Use Settings can
    put it there (explicit seeds up to 2^63−1 stay valid)."""
    parser = cli.build_parser()
    seeds = [cli.settings_from_args(parser.parse_args(["generate", "x"])).seed for _ in range(200)]
    assert max(seeds) < 2**31 and len(set(seeds)) > 190
    assert cli.settings_from_args(parser.parse_args(["generate", "x", "--seed", str(2**63 - 1)])).seed == 2**63 - 1


def test_dry_run_prints_the_seed_and_the_resolved_settings(capsys):
    assert cli.main(["generate", "x", "--dry-run", "--device", "cpu", "--quality", "draft", "--seed", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 7 and printed["unet_windows"]["forwards"] > 0
    resolved = printed["settings"]
    assert (resolved["seed"], resolved["device"], resolved["dtype"]) == (7, "cpu", "float32")
    draft = QUALITY["draft"][0]
    assert (resolved["windows"], resolved["steps"], resolved["scheduler"]) == (draft["windows"], draft["steps"], draft["scheduler"])
    assert (resolved["width"], resolved["pyramid"]) == (2048, "global")
    assert cli.main(["generate", "x", "--dry-run", "--device", "cpu"]) == 0
    drawn = json.loads(capsys.readouterr().out)
    assert drawn["seed"] == drawn["settings"]["seed"] < 2**31


def test_variations_write_n_drafts_with_consecutive_seeds(tmp_path, capsys):
    out = tmp_path / "lake.png"
    arguments = ["generate", "a lake", "-o", str(out), "--width", "256", "--height", "128", "--variations", "2",
                 "--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "40", "-q"]
    assert cli.main(arguments) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "lake_v01.png"), str(tmp_path / "lake_v02.png")]
    for index, path in enumerate(written):
        meta = pngmeta.read_text_chunks(path)
        assert (meta["seed"], meta["width"], meta["height"]) == (str(40 + index), "128", "64")  # one 64 px window tall
    assert not out.exists()
    assert cli.main(arguments) == 2  # never overwritten
    assert "lake_v01.png exists; to replace it, turn on --overwrite" in capsys.readouterr().err
    assert cli.main([*arguments[:-5], "--variations", "17"]) == 2
    assert "--variations must be a whole number from 1 to 16, got 17" in capsys.readouterr().err


def test_quiet_silences_every_progress_bar(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "msd_core", "generate", "a lake", "-o", str(tmp_path / "q.png"), "-q", "--width", "128",
         "--height", "64", *SMALL],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "%|" not in completed.stderr and "it/s" not in completed.stderr, completed.stderr
    assert "seed 5" in completed.stderr  # the one line that says what runs stays


def test_cubemap_and_sphere_poles_write_faces_beside_the_png(tmp_path, capsys):
    out = tmp_path / "world.png"
    arguments = ["generate", "a lake", "-o", str(out), "-q", "--width", "128", "--height", "64", "--poles", "sphere",
                 "--cubemap", "--hdr", *SMALL]
    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out.split()
    faces = [tmp_path / f"world_{face}{suffix}" for suffix in (".png", ".exr") for face in ("px", "nx", "py", "ny", "pz", "nz")]
    assert printed == [str(out), str(out.with_suffix(".exr")), *map(str, faces)]
    with Image.open(faces[2]) as face:
        assert face.size == (32, 32) and face.text["cubemap_face"] == "py"
    assert json.loads(pngmeta.read_text_chunks(out)["settings"])["poles"] == "sphere"
    # A second run refuses before sampling: the faces exist (the PNG is new).
    out.unlink()
    out.with_suffix(".exr").unlink()
    assert cli.main(arguments) == 2
    assert "world_px.png exists" in capsys.readouterr().err and not out.exists()
