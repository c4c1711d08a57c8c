"""The plan of a run, in pure Python (no torch): pyramid levels, where the windows lie at every step, how
much UNet work that is, and how much memory it needs.

Blender's Python imports this to show the cost before a run; the CLI's ``--dry-run`` prints it without
loading a model; the pipeline turns each step's window starts into ``windows.WindowGrid``s.
"""

from __future__ import annotations

import json
import math
import pathlib
import random
from dataclasses import dataclass

from ..errors import BadInput
from ..settings import GenerationSettings, check_stride_alignment

# Activation memory of one window (a classifier-free-guidance pair) of SD-2-base's UNet at its native
# 64×64 latent, in float32 terms: a forward without grad (0.28 GB on the CPU in float32, 0.14 GB on an
# H200 in float16), and the exact gradient's forward kept for the backward pass plus the backward itself
# (2.8 GB on the CPU in float32, 1.52 GB on an H200 in float16: the larger is kept; bench/device.py).
WINDOW_ACTIVATION_BYTES_FP32 = {"no_grad": 0.28e9, "exact": 3.04e9}
NATIVE_LATENT = 64  # the window those numbers were measured at
# The same per model family, at each family's native latent: SDXL-base's UNet (2.57 G parameters) at
# 128×128 counted under FakeTensorMode and calibrated on SD-2-base by the same count (bench/sdxl_memory.py,
# docs/sdxl.md): 2.4× SD-2's no-grad window, 7.2× its exact-gradient one (ten transformer layers at
# 32×32 and two at 64×64, all kept for the backward).
FAMILY_WINDOW_BYTES_FP32 = {
    "sd": (WINDOW_ACTIVATION_BYTES_FP32, NATIVE_LATENT),
    "sdxl": ({"no_grad": 0.68e9, "exact": 21.9e9}, 128),
}
FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # activations scale with the element size
# Weights of SD-2-base (UNet 865.9 M, VAE 83.7 M, CLIP text encoder 340.4 M parameters).
SD_PARAMETERS = 1.29e9
# Per family: SDXL-base = UNet 2567.5 M + VAE 83.7 M + CLIP 123.1 M + OpenCLIP bigG 694.7 M parameters;
# its VAE is kept in float32 in a float16 run (models.vae_dtype).
FAMILY_PARAMETERS = {"sd": SD_PARAMETERS, "sdxl": 3.469e9}
UPCAST_VAE_PARAMETERS = {"sd": 0.0, "sdxl": 83.7e6}
# A window twice as wide costs 2 + 2c square windows' FLOPs, c the measured excess of its self-attention, whose
# cost grows with the square of the window's pixel count (the rest grows with the area): a 64×128 latent window
# of SD-2-base's UNet is 2.30× a 64×64 one, a 128×256 window of SDXL-base's 2.21× a 128×128 one
# (bench/sdxl_memory.py --wide, FLOPs counted under FakeTensorMode). A window f times as wide: f + c (f² − f).
WIDE_ATTENTION_EXCESS = {"sd": 0.15, "sdxl": 0.105}
# A backward pass through the UNet costs 1.34 forwards (SD-2-base's UNet on an H200 in float16, view batch
# 32: bench/results/device-h200.json). Forward-equivalents = forwards + BACKWARD_COST × backwards.
BACKWARD_COST = 1.34
# λ = log(ᾱ/(1−ᾱ)) falls by about 12.4 from timestep 0 to 999 on SD's (and SDXL's) scaled-linear training
# schedule: a drawn start (``start_step_count``) spaces its steps as densely in λ as the run's own on average.
LOG_SNR_SPAN = 12.4
CPU_VIEW_BATCH = 4  # on the CPU larger batches are not faster and only hold more memory
MAX_VIEW_BATCH = 32

# Native window in pixels of the known model families, by a substring of the model id (first match): only
# for a plan without the model (a Hub id not downloaded yet); a loaded model's config decides.
KNOWN_WINDOWS = (("stable-diffusion-xl", 1024, "sdxl"), ("sdxl", 1024, "sdxl"), ("768-v", 768, "sd"),
                 ("stable-diffusion-2-1-base", 512, "sd"), ("stable-diffusion-2-base", 512, "sd"),
                 ("stable-diffusion-2-1", 768, "sd"), ("stable-diffusion-2", 768, "sd"), ("stable-diffusion", 512, "sd"))
TINY_MODELS = {"tiny": (64, "sd"), "tiny-v": (64, "sd"), "tiny-xl": (128, "sdxl"), "tiny-xl-v": (128, "sdxl")}
# A single-file checkpoint whose UNet has SDXL's added-conditioning embedding (LDM key names).
SDXL_CHECKPOINT_KEY = "model.diffusion_model.label_emb.0.0.weight"
# Pole caps (``--poles sphere``, msd_core.sampling.sphere): each cap's gnomonic view spans 90° (tan 45° = 1 either side
# of the pole), so it reaches 45° from the pole along its edges.
CAP_HALF_EXTENT = 1.0
# The caps run the last CAP_STEPS of the steps: their layout is the strip's (msd_core.sampling.sphere.keep_layout), and
# the texture they exist for is made at the end: the last quarter measures as the last 40 % did (within 0.005 on
# every pole figure) and keeps the default world, drawn start included, within issue 18's budgets (Standard ≤ 1,000
# forward-equivalents, Draft ≤ 500; docs/poles.md).
CAP_STEPS = 0.25


def window_starts(length: int, window: int, stride: int, wrap: bool = False) -> list[int]:
    """Start offsets of windows along one axis that cover every position.

    Without wrap the windows march by ``stride`` and the last one is snapped to the edge, so no strip at
    the end is left undenoised (diffusers' MultiDiffusion leaves one when (length − window) is not a
    multiple of the stride). With wrap (360° panoramas) windows start every ``stride`` around the whole
    circle and those near the end continue across the edge into the start.
    """
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be ≥ 1")
    if stride > window:
        raise ValueError(f"stride {stride} is larger than the window {window}: positions would be skipped")
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}")
    if wrap:
        return list(range(0, length, stride))
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def shifted_starts(length: int, window: int, shift: int, wrap: bool = False, multiple: int = 1) -> list[int]:
    """Tiles of ``window`` shifted by ``shift`` along one axis, covering every position (SpotDiffusion's idea).

    With wrap the ⌈length/window⌉ tiles are spread evenly around the circle from ``shift`` (they touch
    without overlap when the window divides the length). Without wrap the tiles that would stick out
    at either end are snapped to the edge, so the first and last overlap their neighbour. Every start
    is a multiple of ``multiple`` (2 where the coarser level's crop must align), given an even shift.
    """
    if length < window:
        raise ValueError(f"length {length} is smaller than the window {window}")
    if wrap:
        count = math.ceil(length / window)
        return sorted({(shift + k * length // count // multiple * multiple) % length for k in range(count)})
    first = shift - window if shift else 0
    return sorted({min(max(start, 0), length - window) for start in range(first, length, window)})


def shifted_offsets(
    height: int, width: int, window: int, step_index: int, seed: int, wrap: bool, level: int = 0,
    multiple: int | tuple[int, int] = 1, window_width: int | None = None,
) -> tuple[list[int], list[int]]:
    """Row and column starts of the shifted tiles of one level at one step, reproducible from the seed.

    The shift along each axis is drawn uniformly from [0, window) (columns: [0, ``window_width``) for
    wider tiles) in multiples of ``multiple`` (one for both axes, or (rows, columns)), anew for every
    (seed, step, level), so one step's tile edges lie inside the next step's tiles.
    """
    rows_multiple, cols_multiple = multiple if isinstance(multiple, tuple) else (multiple, multiple)
    window_width = window_width or window
    draw = random.Random(f"shifted-windows/{seed}/{step_index}/{level}")
    shift_rows, shift_cols = (draw.randrange(0, size, step) for size, step in
                              ((window, rows_multiple), (window_width, cols_multiple)))
    return (shifted_starts(height, window, shift_rows, False, rows_multiple),
            shifted_starts(width, window_width, shift_cols, wrap, cols_multiple))


def default_levels(height: int, width: int, window: int) -> int:
    """The smallest pyramid whose coarsest level's short side fits one window: 1 + ⌊log2(short/window)⌋.

    4096×1024 px with SD-2-base (128×512 latents, 64 px windows) → 2; 4096×2048 → 3. Levels that cannot
    be halved exactly (odd sizes) are dropped.
    """
    levels = 1 + max(0, int(math.floor(math.log2(min(height, width) / window))))
    while levels > 1 and (height % 2 ** (levels - 1) or width % 2 ** (levels - 1)):
        levels -= 1
    return levels


def global_squeeze(width: int, window: int, stride: int) -> int:
    """Columns averaged into one by a global level over a coarsest level ``width`` wide (1 = no such level).

    The paper's pyramid stops once the short side fits a window, so a 2:1 or 4:1 panorama's coarsest level
    is still several windows wide and runs plain MultiDiffusion: it can hold two horizons or two suns.
    A global level averages groups of f columns, with f the largest divisor of the width, window and
    stride (so coarse crops stay aligned) that keeps it at least a window wide; the level below is guided
    through the same f-column average (docs/layout.md).
    """
    for squeeze in range(width // window, 1, -1):
        if not (width % squeeze or window % squeeze or stride % squeeze):
            return squeeze
    return 1


def cap_size(height: int, window: int, half_extent: float = CAP_HALF_EXTENT) -> int:
    """Latent pixels across a pole cap's view: the whole number of windows (at least one, and even) nearest
    the size whose centre pixel spans one row of the equirectangular latent (π/H of arc). Whole windows,
    because shifted tiles over k windows take (k+1)² windows per step (one for k = 1) and anything between
    takes a row and a column more: SD's 360° world (128 rows: 81.5 px) gets one 64 px window per cap, its
    centre pixel 1.27 rows, for +5 % of Standard's work instead of +28 % (docs/poles.md)."""
    matched = 2 * half_extent * height / math.pi
    size = window * max(1, round(matched / window))
    return size + size % 2


def has_poles(width: int, height: int, wrap: bool) -> bool:
    """Whether a panorama is an equirectangular world (2:1 and wrapping, as operators/world.py maps it): only
    then do its top and bottom rows meet at the poles; a strip or backdrop has no poles."""
    return wrap and width == 2 * height


GRADIENT_PASSES = {"exact": (2, 1), "refresh": (2, 0), "fast": (1, 0)}  # (forwards, backwards) of a guided window


def level_gradient(level: int, levels: int, gradient: str, coarse_gradient: str | None) -> str:
    """A guided level's gradient mode: ``gradient``, except that where it is "exact" the second level from the top
    (level 1, the one the coarsest guides) takes ``coarse_gradient`` (None: exact) unless it is the finest."""
    if level == 1 and levels > 2 and gradient == "exact" and coarse_gradient is not None:
        return coarse_gradient
    return gradient


def unet_work(windows_per_step: list[list[int]], gradient: str, guided: bool, coarse_gradient: str | None = None,
              levels: int = 0) -> dict:
    """UNet window passes of a run: ``windows_per_step[i][level]`` windows at step i (coarsest level first).

    A window is one classifier-free-guidance pair. The coarsest level (and every level when ``guided``
    is false: plain MultiDiffusion) costs 1 forward per window; a guided finer window costs
    2 forwards + 1 backward ("exact"), 2 forwards ("refresh") or 1 forward ("fast"). A step that runs
    only its finest level (``Plan.windows_per_step``: after the guided steps, or ω = 0) lists one count.
    Each guided level's mode is ``level_gradient``'s (``coarse_gradient``, of a pyramid of ``levels`` levels).
    """
    forwards = backwards = 0
    for counts in windows_per_step:
        forwards += counts[0]
        for level, count in enumerate(counts[1:], start=1):
            passes = GRADIENT_PASSES[level_gradient(level, levels, gradient, coarse_gradient)] if guided else (1, 0)
            forwards += count * passes[0]
            backwards += count * passes[1]
    return {"forwards": forwards, "backwards": backwards}


def forward_equivalents(work: dict) -> float:
    """``unet_work``'s counts in window forwards: forwards + ``BACKWARD_COST`` × backwards (+ a wide global
    window's attention beyond its area, ``Plan.work``'s "wide_extra")."""
    return work["forwards"] + BACKWARD_COST * work["backwards"] + work.get("wide_extra", 0.0)


def window_activation_bytes(exact_gradient: bool, dtype: str, window: int, family: str = "sd") -> float:
    """Activation memory of one window (CFG pair): the family's measured numbers, scaled by the element
    size (float16: ½ of float32) and by the window's area relative to the native latent they were measured at."""
    measured, native = FAMILY_WINDOW_BYTES_FP32[family]
    return measured["exact" if exact_gradient else "no_grad"] * FLOAT_BYTES[dtype] / 4 * (window / native) ** 2


def weight_bytes(dtype: str, family: str = "sd") -> float:
    """The model's weights in memory (an SDXL VAE kept in float32 in a float16 run)."""
    upcast = UPCAST_VAE_PARAMETERS[family] * (4 - FLOAT_BYTES[dtype]) if dtype == "float16" else 0.0
    return FAMILY_PARAMETERS[family] * FLOAT_BYTES[dtype] + upcast


def view_batch_for(free_bytes: float | None, exact_gradient: bool, dtype: str, window: int, family: str = "sd") -> int:
    """Windows per UNet call: what fits in 80 % of the free accelerator memory (``free_bytes``), capped at
    32; ``CPU_VIEW_BATCH`` when there is no accelerator (None)."""
    if free_bytes is None:
        return CPU_VIEW_BATCH
    per_window = window_activation_bytes(exact_gradient, dtype, window, family)
    return max(1, min(MAX_VIEW_BATCH, int(free_bytes * 0.8 // per_window)))


def known_model(model: str, model_config: str | None = None) -> tuple[int | None, str]:
    """(native window in pixels, family) of a model without loading it: the tiny models', a local
    diffusers folder's unet/config.json (its sample_size and added-conditioning type), a single
    .safetensors file's header (SDXL's added-conditioning weights), else a known family by name
    (SD 1.x and SD-2-base 512 px, SD-2 768-v 768 px, SDXL 1024 px; window None when unknown)."""
    if model in TINY_MODELS:
        return TINY_MODELS[model]
    for source in (model, model_config):
        if source and (config := pathlib.Path(source).expanduser() / "unet" / "config.json").is_file():
            unet = json.loads(config.read_text(encoding="utf-8")[:100_000])
            family = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd"
            sample_size = unet.get("sample_size")
            if isinstance(sample_size, int):
                return sample_size * 8, family
    if not model_config and SDXL_CHECKPOINT_KEY in safetensors_keys(model):
        return 1024, "sdxl"
    name = " ".join(filter(None, (model, model_config))).lower()
    return next(((pixels, family) for key, pixels, family in KNOWN_WINDOWS if key in name), (None, "sd"))


def known_window(model: str, model_config: str | None = None) -> int | None:
    """The native window in pixels of a model without loading it (``known_model``)."""
    return known_model(model, model_config)[0]


def safetensors_keys(path: str) -> set[str]:
    """The tensor names in a .safetensors file's JSON header (bounded), or an empty set."""
    file = pathlib.Path(path).expanduser()
    if file.suffix != ".safetensors" or not file.is_file():
        return set()
    try:
        with open(file, "rb") as stream:
            length = int.from_bytes(stream.read(8), "little")
            if not 2 <= length <= 16 * 2**20:  # checkpoint headers are well under 1 MB
                return set()
            header = json.loads(stream.read(length))
    except (OSError, ValueError, RecursionError):
        return set()
    return set(header) if isinstance(header, dict) else set()


@dataclass(frozen=True)
class Plan:
    """Settings resolved against a model: everything the loop needs, sizes in latent pixels."""

    height: int
    width: int
    window: int
    stride: int  # of the dense grid (the window for shifted tiles)
    levels: int
    view_batch: int
    wrap: bool
    windows: str  # "dense" or "shifted"
    seed: int
    steps: int
    factor: int  # pixels per latent pixel
    gradient: str
    guided: bool  # MSD with ω > 0: finer levels take the gradient step
    squeeze: int = 1  # columns averaged by a global level on top of the halving pyramid (1 = none)
    family: str = "sd"  # the model family ("sd", "sdxl"): its memory figures
    caps: int = 0  # latent pixels across each pole cap's view (``--poles sphere``); 0 = no cap windows
    cap_start: int = 0  # the first step (0-based) that denoises the caps
    guided_steps: int | None = None  # the first steps that guide with ``gradient`` (None = all when guided)
    late_gradient: str = "none"  # the later steps' gradient mode; "none": they run only the finest level
    # Where a step's gradient is exact, the second level from the top takes this one unless it is the finest
    # (``sampler.msd_step``).
    coarse_gradient: str = "exact"
    # The global level as one window of the world's aspect (``--global-window wide``): the coarsest level's
    # windows are window × wide·window, not squeezed (1 = square windows everywhere).
    wide: int = 1

    def window_shape(self, level: int) -> tuple[int, int]:
        """(rows, columns) of a level's windows: square, or the wide global window at level 0."""
        return (self.window, self.wide * self.window) if level == 0 else (self.window, self.window)
    start_steps: int = 0  # steps of the coarsest level's own trajectory before the first (coarse_noise "drawn")
    # The step (0-based) at which each level, coarsest first, joins the run (``--fine-start``); () = all at step 0.
    level_starts: tuple[int, ...] = ()
    stochastic_join: bool = False  # ``--fine-join stochastic``: the late levels' part of the steps after the join
    tile_starts: str = "even"  # ``--tile-starts``: "any" lets the finer levels' shifted tiles start on any pixel
    stochastic_steps: bool = False  # ``--fine-steps stochastic``: the finest level's own blocks, every guided step

    def levels_at(self, step_index: int) -> int:
        """How many levels, from the coarsest, a guided step denoises; the finer ones have not joined yet."""
        return sum(start <= step_index for start in self.level_starts) if self.level_starts else self.levels

    def stochastic_at(self, step_index: int) -> bool:
        """Whether a step's finest latent takes fresh noise (``sampler.msd_step``'s ``fresh_noise``, where
        ``fresh_scope_at`` says): from the step the finest level joins on, if it joined late; with
        ``stochastic_steps``, every guided step the finest level runs."""
        return self._joined_stochastic(step_index) or (self.stochastic_steps and self.gradient_at(step_index) is not None
                                                       and self.levels_at(step_index) == self.levels)

    def fresh_scope_at(self, step_index: int) -> str:
        """Where a stochastic step's fresh noise goes (``sampler.msd_step``'s ``fresh_scope``): beneath the top two
        levels' blocks after a stochastic join ("join"), else within the finest level's own blocks ("finest")."""
        return "join" if self._joined_stochastic(step_index) else "finest"

    def _joined_stochastic(self, step_index: int) -> bool:
        return self.stochastic_join and bool(self.level_starts) and step_index >= self.level_starts[-1]

    def runs_level(self, step_index: int, level: int) -> bool:
        """Whether a step denoises a level (0 = coarsest): a guided step the levels that have joined, another
        only the finest."""
        if self.gradient_at(step_index) is None:
            return level == self.levels - 1
        return level < self.levels_at(step_index)
    # A wrapped world's coarsest level moves every step, its drawn start's steps too (settings.global_move "roll").
    roll: bool = False

    def gradient_at(self, step_index: int) -> str | None:
        """The gradient mode of a step (0-based), or None where nothing is guided: then only the finest level
        runs, as MultiDiffusion (its result never depends on a coarser level that does not guide it)."""
        if not self.guided:
            return None
        if self.guided_steps is None or step_index < self.guided_steps:
            return self.gradient
        return None if self.late_gradient == "none" else self.late_gradient

    @property
    def coarsest_factor(self) -> tuple[int, int]:
        """(rows, columns) of finest-level latent pixels averaged into one pixel of the coarsest level."""
        halvings = 2 ** (self.levels - 1 - (self.squeeze > 1))
        return halvings, halvings * self.squeeze

    def level_shape(self, level: int) -> tuple[int, int]:
        """(height, width) of a level, 0 = coarsest (the global level, if any)."""
        if level == 0 and self.squeeze > 1:
            height, width = self.level_shape(1)
            return height, width // self.squeeze
        scale = 2 ** (self.levels - 1 - level)
        return self.height // scale, self.width // scale

    def starts_at(self, step_index: int) -> list[tuple[list[int], list[int]]]:
        """Row and column window starts of every level (coarsest first) at step ``step_index`` (0-based).

        Finer levels' shifted tiles start on any pixel (``tile_starts`` "any": one starting between two pixels of the
        coarser level is guided on its whole blocks, ``windows.GuidedPart``), or ("even") in multiples of their
        reduction to the coarser level (2, or the global level's squeeze along columns), so their crops map exactly
        onto it. The global level itself stays
        put unless it wraps and ``roll``: it is (about) one window wide, so shifting its tiles only rolls it, which
        on a 360° world moves its edges off the 0/360° seam (its columns then start where the shifted tiles' own
        draw says, its rows stay). A wide global window is the squeezed one unsqueezed, as many windows: dense
        ones start every wide·stride columns; a shifted one covering a 360° world moves like the tiles below, so
        the world's 0/360° seam lies inside it at most steps (with a single level nothing else would denoise
        across the seam). Negative step indices are a drawn start's steps (``start_starts``)."""
        result = []
        for level in range(self.levels):
            height, width = self.level_shape(level)
            if self.tile_starts == "any" or level == 0:
                multiple = 1
            else:
                multiple = (1, self.squeeze) if level == 1 and self.squeeze > 1 else 2
            if level == 0 and self.wide > 1 and self.windows == "shifted":
                result.append(shifted_offsets(height, width, self.window, step_index, self.seed, self.wrap, level,
                                              window_width=self.wide * self.window))
            elif level == 0 and self.wide > 1:
                result.append((window_starts(height, self.window, self.stride),
                               window_starts(width, self.wide * self.window, self.wide * self.stride, self.wrap)))
            elif self.windows == "shifted" and not (level == 0 and self.squeeze > 1):
                result.append(shifted_offsets(height, width, self.window, step_index, self.seed, self.wrap, level,
                                              multiple))
            elif level == 0 and self.windows == "shifted" and self.roll:  # the global level, rolled
                result.append((window_starts(height, self.window, self.stride),
                               shifted_offsets(height, width, self.window, step_index, self.seed, True, level)[1]))
            else:
                result.append((window_starts(height, self.window, self.stride),
                               window_starts(width, self.window, self.stride, self.wrap)))
        return result

    def start_starts(self) -> list[tuple[list[int], list[int]]]:
        """Row and column starts of the coarsest level at each step of a drawn start (``start_steps``): the first
        step's windows, or, where it moves (``roll``), its windows at the steps before the first (step indices
        −start_steps … −1), so the start's window edges move as the run's do."""
        if not self.roll:
            return [self.starts_at(0)[0]] * self.start_steps
        return [self.starts_at(index)[0] for index in range(-self.start_steps, 0)]

    def start_grids(self) -> list:
        """The ``windows.WindowGrid`` of the coarsest level at each step of a drawn start (imports torch)."""
        return [self._grid(0, rows, cols) for rows, cols in self.start_starts()]

    def _grid(self, level: int, rows: list[int], cols: list[int]):
        from .windows import WindowGrid

        return WindowGrid(*self.level_shape(level), self.window, self.stride, self.wrap,
                          starts=(tuple(rows), tuple(cols)), window_width=self.window_shape(level)[1])

    def cap_starts_at(self, step_index: int) -> tuple[list[int], list[int]]:
        """Row and column window starts over a pole cap's view at one step (both caps share them): shifted
        tiles like the strip's when its windows are shifted, else dense windows every stride."""
        if self.windows == "shifted":
            return shifted_offsets(self.caps, self.caps, self.window, step_index, self.seed, False, level=-1,
                                   multiple=2)  # even: the guided caps crop a halved view
        starts = window_starts(self.caps, self.window, self.stride)
        return starts, starts

    def cap_grid_at(self, step_index: int):
        """The ``windows.WindowGrid`` over a pole cap's view at one step (imports torch)."""
        from .windows import WindowGrid

        rows, cols = self.cap_starts_at(step_index)
        return WindowGrid(self.caps, self.caps, self.window, self.stride, False, starts=(tuple(rows), tuple(cols)))

    def cap_windows_per_step(self) -> list[int]:
        """Windows of both pole caps at every step (0 without caps)."""
        return [2 * math.prod(map(len, self.cap_starts_at(index))) if self.caps_at(index) else 0
                for index in range(self.steps)]

    def caps_at(self, step_index: int) -> bool:
        """Whether a step denoises the pole caps (the last ``CAP_STEPS`` of the steps of a world with poles)."""
        return bool(self.caps) and step_index >= self.cap_start

    @property
    def exact(self) -> bool:
        """Whether any step takes the exact gradient (autograd through the model)."""
        return self.guided and "exact" in (self.gradient, self.late_gradient)

    def windows_per_step(self) -> list[list[int]]:
        """Windows per level at every step (coarsest first), of the levels the step runs (``runs_level``): one
        count, the finest level's, at a step that guides nothing; the top levels only before the finer ones join."""
        return [[count for level, count in enumerate(level_counts) if self.runs_level(index, level)]
                for index, level_counts in enumerate(self._all_level_counts())]

    def _all_level_counts(self) -> list[list[int]]:
        return [[len(rows) * len(cols) for rows, cols in self.starts_at(index)] for index in range(self.steps)]

    def grids_at(self, step_index: int) -> list:
        """The ``windows.WindowGrid`` of every level at one step (imports torch)."""
        from .windows import level_factor

        grids = [self._grid(level, rows, cols) for level, (rows, cols) in enumerate(self.starts_at(step_index))]
        for coarse, fine in zip(grids, grids[1:]):
            fine.check_nested(level_factor(fine, coarse))  # every finer window's crop maps onto the coarser level
        return grids

    @property
    def grids(self) -> list:
        """The first step's grids (every step's, with dense windows)."""
        return self.grids_at(0)

    def _step_work(self) -> list[dict]:
        """UNet work of every step: the pyramid's windows with that step's gradient, plus the pole caps' forwards.
        A wide global window counts as ``wide`` window forwards, its area (its no-grad activations grow so:
        2.00× at 2:1 on SDXL-base), and its self-attention's cost beyond that as "wide_extra"
        (``WIDE_ATTENTION_EXCESS``) forward-equivalents."""
        per_step = []
        excess = WIDE_ATTENTION_EXCESS[self.family] * (self.wide**2 - self.wide)
        for index, (counts, caps) in enumerate(zip(self.windows_per_step(), self.cap_windows_per_step())):
            gradient = self.gradient_at(index)
            extra = {}
            if self.wide > 1:
                top = counts[0] if self.runs_level(index, 0) else 0  # the global level runs at this step
                counts = [top * self.wide, *counts[1:]] if top else counts
                extra = {"wide_extra": top * excess}
            work = unet_work([counts], gradient or self.gradient, gradient is not None, self.coarse_gradient,
                             self.levels)
            per_step.append({**work, "forwards": work["forwards"] + caps, **extra})
        if self.start_steps:  # the drawn start runs the coarsest level's windows before step 0
            windows = sum(len(rows) * len(cols) for rows, cols in self.start_starts())
            per_step[0]["forwards"] += windows * self.wide
            if self.wide > 1:
                per_step[0]["wide_extra"] += windows * excess
        return per_step

    def work(self, start_step: int = 0) -> dict:
        """UNet window passes of the run, or of its steps from ``start_step`` on (a refine runs only those); with
        a wide global window also "wide_extra", its attention's cost beyond its area in forward-equivalents."""
        steps = self._step_work()[start_step:]
        keys = ("forwards", "backwards", "wide_extra") if self.wide > 1 else ("forwards", "backwards")
        total = {key: sum(work[key] for work in steps) for key in keys}
        return {**total, "wide_extra": round(total["wide_extra"], 2)} if self.wide > 1 else total

    def step_costs(self) -> list[float]:
        """UNet work of every step in window forwards, a backward counted as ``BACKWARD_COST`` forwards."""
        return [forward_equivalents(work) for work in self._step_work()]

    def limit(self) -> float:
        """The least UNet work a run of this size and step count can do: one window pass per window area of
        every pyramid level at every step, Σ_steps Σ_levels height·width / window² (no overlap, no gradient)."""
        area = sum(math.prod(self.level_shape(level)) for level in range(self.levels))
        return self.steps * area / self.window**2

    def describe(self, start_step: int = 0) -> dict:
        """What the run will do, in pixels (stored in the output's metadata); windows per level are the
        most any step that runs the level has (shifted tiles vary by a snapped edge tile; 0 for a coarser
        level no step runs, at ω = 0); the UNet work and guided steps count the steps from ``start_step`` on
        (a refine's)."""
        all_counts = self._all_level_counts()
        per_level = [max((all_counts[index][level] for index in range(self.steps) if self.runs_level(index, level)),
                         default=0) for level in range(self.levels)]
        caps = {"pole_caps": {"size": self.caps * self.factor, "windows_per_step": max(self.cap_windows_per_step())}}
        return {
            "levels": self.levels,
            "window": self.window * self.factor,
            "stride": self.stride * self.factor,
            "windows": self.windows,
            "view_batch": self.view_batch,
            "windows_per_level": per_level,
            **({"global_window_size": [self.window * self.factor, self.wide * self.window * self.factor]}
               if self.wide > 1 else {}),
            "unet_windows": self.work(start_step),
            "guided_steps": sum(self.gradient_at(index) is not None for index in range(start_step, self.steps)),
            **(caps if self.caps else {}),
        }

    def dry_run(self, dtype: str) -> dict:
        """``describe`` plus the decoded size and an estimate of the peak accelerator memory: the weights and
        a view batch of the finer levels' windows, or of the wide global windows (no gradient, ``wide``
        times a square window's area) where those hold more."""
        activations = self.view_batch * window_activation_bytes(self.exact, dtype, self.window, self.family)
        if self.wide > 1 and self.levels == 1:  # the wide windows are all there is
            activations = 0.0
        if self.wide > 1:
            top_windows = min(self.view_batch, max(counts[0] for counts in self._all_level_counts()))
            wide = self.wide * window_activation_bytes(False, dtype, self.window, self.family)
            activations = max(activations, top_windows * wide)
        weights = weight_bytes(dtype, self.family)
        sized = {"sd": "SD-2-base-sized", "sdxl": "SDXL-base-sized"}[self.family]
        return {
            **self.describe(),
            "family": self.family,
            "steps": self.steps,
            "decoded_size": [self.width * self.factor, self.height * self.factor],
            "dtype": dtype,
            "estimated_peak_gib": round((weights + activations) / 2**30, 2),
            "memory_note": f"{sized} weights plus view_batch windows of measured activations",
        }


def estimated_seconds(work: dict, ms_per_window: float) -> float:
    """Sampling time of ``work`` (``unet_work``'s counts) at a measured rate of ms per window forward."""
    return forward_equivalents(work) * ms_per_window / 1000


def make_plan(settings: GenerationSettings, factor: int, native_window: int, free_bytes: float | None = None,
              dtype: str = "float32", family: str = "sd") -> Plan:
    """Validate ``settings`` against a model (VAE ``factor``, ``native_window`` in pixels) and resolve window,
    stride, levels and view batch; raise BadInput with one sentence for what does not fit."""
    settings.validate()
    if settings.width % factor or settings.height % factor:
        raise BadInput(f"width and height must be multiples of {factor} for this model's VAE")
    height, width = settings.height // factor, settings.width // factor
    if settings.window and settings.window % factor:
        raise BadInput(f"window must be a multiple of {factor} pixels")
    window = (settings.window or native_window) // factor
    if window > min(height, width):
        raise BadInput(
            f"the panorama ({settings.width}×{settings.height}) is smaller than one {window * factor} px window; "
            f"use at least {window * factor}×{window * factor}"
        )
    if settings.method == "multidiffusion":
        levels = 1
    elif settings.scales:
        levels = settings.scales
    else:
        levels = default_levels(height, width, window)
    if settings.windows == "shifted":
        stride = window
    elif settings.stride:
        check_stride_alignment(settings.stride, levels)  # in pixels; the grids would say latent pixels
        stride = settings.stride // factor
    else:
        stride = max(1, window // 8)
        stride += stride % 2 if levels > 1 else 0  # coarse crops need even offsets
    if stride < 1 or stride > window:
        raise BadInput(f"stride must be between {factor} and the window ({window * factor} px)")
    if levels > 1 and (stride % 2 or window % 2):
        raise BadInput(f"stride {stride * factor} px or window {window * factor} px is odd in latent pixels: coarse "
                       f"crops would not align; use multiples of {2 * factor} px")
    for level in range(levels):
        scale = 2 ** (levels - 1 - level)
        if height % scale or width % scale or min(height // scale, width // scale) < window:
            raise BadInput(
                f"{levels} pyramid levels need the latent size ({height}×{width}) divisible by {scale} and its "
                f"coarsest level at least one window ({window}) tall and wide; use fewer --scales"
            )
    squeeze = wide = 1
    if settings.pyramid == "global" and settings.method == "msd":
        squeeze = global_squeeze(width // 2 ** (levels - 1), window, stride)
        if settings.global_window == "wide":  # the coarsest level itself, in windows of the world's aspect
            squeeze, wide = 1, squeeze
        levels += squeeze > 1
    guided = settings.method == "msd" and settings.omega > 0 and levels > 1
    halvings = 2 ** (levels - 1 - (squeeze > 1))
    start_steps = start_step_count(settings.steps, halvings * halvings * squeeze) if guided and settings.coarse_noise == "drawn" else 0
    exact = guided and "exact" in (settings.gradient, settings.late_gradient)
    view_batch = settings.view_batch or view_batch_for(free_bytes, exact, dtype, window, family)
    if wide > 1 and not settings.view_batch and free_bytes is not None:  # a batch of wide windows must fit too
        wide_window = wide * window_activation_bytes(False, dtype, window, family)
        view_batch = min(view_batch, max(1, int(free_bytes * 0.8 // wide_window)))
    caps = cap_size(height, window) if settings.poles == "sphere" and has_poles(width, height, settings.wrap) else 0
    cap_start = settings.steps - max(1, math.ceil(CAP_STEPS * settings.steps - 1e-9))
    # Dense windows already start every stride round a wrapped world; shifted tiles leave the global level one window.
    roll = settings.global_move == "roll" and settings.wrap and settings.windows == "shifted"
    level_starts = level_start_steps(levels, settings.steps, settings.fine_start, guided_step_count(settings),
                                     settings.late_gradient) if guided else ()
    return Plan(height, width, window, stride, levels, view_batch, settings.wrap, settings.windows, settings.seed,
                settings.steps, factor, settings.gradient, guided, squeeze, family=family, caps=caps, cap_start=cap_start,
                guided_steps=guided_step_count(settings), late_gradient=settings.late_gradient,
                coarse_gradient=settings.coarse_gradient, wide=wide,
                start_steps=start_steps, level_starts=level_starts, roll=roll,
                stochastic_join=bool(level_starts) and settings.fine_join == "stochastic", tile_starts=settings.tile_starts,
                stochastic_steps=guided and settings.fine_steps == "stochastic")


def level_start_steps(levels: int, steps: int, fine_start: float, guided_steps: int, late_gradient: str) -> tuple[int, ...]:
    """The step (0-based) at which each level, coarsest first, joins the run (``--fine-start``, docs/layout.md 6.6):
    the top two levels at once, the finest after ⌊``fine_start``·steps⌋ steps and the levels between at evenly
    spaced shares of that (a level waits until the one above it has laid the scene out at its own scale). A step
    that guides nothing (``late_gradient`` "none") runs only the finest level, so every level joins by then.
    () when every level starts at once."""
    if fine_start <= 0 or levels < 3:
        return ()
    last = guided_steps if late_gradient == "none" else steps - 1
    return (0, 0) + tuple(min(last, math.floor(fine_start * steps * (level - 1) / (levels - 2) + 1e-9))
                          for level in range(2, levels))


def start_step_count(steps: int, gain: int) -> int:
    """Steps of a drawn start (``sampler.drawn_start``) for a coarsest level that averages ``gain`` latent pixels:
    its trajectory spans log ``gain`` of log-SNR, covered as densely as a ``steps``-step run covers the schedule
    (``LOG_SNR_SPAN``); 0 when nothing is averaged."""
    return math.ceil(steps * math.log(gain) / LOG_SNR_SPAN - 1e-9) if gain > 1 else 0


def guided_step_count(settings: GenerationSettings) -> int:
    """The first ⌈guided_fraction · steps⌉ steps take the settings' gradient (at least one)."""
    return max(1, math.ceil(settings.guided_fraction * settings.steps - 1e-9))


def plan_without_model(settings: GenerationSettings, free_bytes: float | None, dtype: str) -> Plan:
    """The plan for ``--dry-run``: the window from ``settings.window`` or the model's known family."""
    native, family = known_model(settings.model, settings.model_config)
    window = settings.window or native
    if window is None:
        raise BadInput(f"the window size of {settings.model!r} is not known without loading it; give --window "
                       "(512 for SD 1.x and SD-2-base, 768 for SD-2 768-v, 1024 for SDXL)")
    return make_plan(settings, 8, window, free_bytes, dtype, family)
