"""The sphere behind a 360° world: gnomonic views of its poles, and pole-cap windows (``--poles sphere``).

Window samplers treat the equirectangular latent as a flat strip, so its top and bottom rows, each one point
on the sphere, get ordinary texture and the world pinches when the camera looks up. Here the last steps also
denoise a perspective (gnomonic) view of each cap, where the model sees the pole as it would see any point,
with the strip's layout (``pole_cap_step``); the caps are blended over the polar rows at the end, and
decoded as views (``blend_decoded_caps``; docs/poles.md).

Directions follow Blender's equirectangular mapping: the image's centre faces +X, its top row is the zenith,
u = 0.5 − atan2(y, x)/2π; pixel centres sit at integer coordinates (row 0 is ½ row below the pole).

Resampling a noisy latent with interpolation shrinks its noise (a bilinear average of four unit-variance
pixels has variance ¼–1), so a resampled latent would look less noisy than its timestep says. ``resample``
splits x = α x₀ + σ ε with the x₀ estimate the latent came from: x₀ is interpolated (bilinear), ε is taken
from the nearest pixel, so every pixel keeps unit-variance noise (white wherever the target is not finer
than the source: the whole cap except the outer ring of a view, which is up to 2× finer radially).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from .plan import CAP_HALF_EXTENT as HALF_EXTENT
from .sampler import (
    BatchMap, Denoiser, Interrupt, SolverStep, alphas_cumprod, msd_level_step, multidiffusion_step, run_batches,
)
from .windows import WindowGrid

POLES = ("zenith", "nadir")
# The caps' views reach 45° from the pole along their edges; the caps' own step replaces the strip's up to
# FULL_CAP from the pole and fades out linearly until FADE_END.
FULL_CAP = math.radians(30)
FADE_END = math.radians(42)
# Decoded caps replace the decoded strip over a smaller cap: the VAE's decoder sees zero padding at a view's
# edges, so the fade ends farther from them (38° from the pole is 11 % of the half view from its edge).
DECODED_FULL_CAP = math.radians(25)
DECODED_FADE_END = math.radians(38)
# The decoded rows nearest each pole come from the view low-passed to POLE_BLUR rows (σ), fading to the sharp
# view over POLE_ROWS rows (``blend_decoded_caps``).
POLE_ROWS = 3
POLE_BLUR = 1.5
# The caps' frequencies below a Gaussian of LAYOUT_SIGMA view pixels (about a row) are the strip's: the layout
# is the strip's; measured on the analytic priors' layout table against 2 and 4 (docs/poles.md).
LAYOUT_SIGMA = 1.0


def axes_for(pole: str) -> torch.Tensor:
    """(right, up, forward) rows of a camera looking at the pole with +X (the image's centre) at its top."""
    if pole not in POLES:
        raise ValueError(f"unknown pole {pole!r} ({' or '.join(POLES)})")
    forward = torch.tensor([0.0, 0.0, 1.0 if pole == "zenith" else -1.0], dtype=torch.float64)
    up = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    right = torch.linalg.cross(forward, up)
    return torch.stack([right, up, forward])


def view_directions(size: int, axes: torch.Tensor, half_extent: float = HALF_EXTENT) -> torch.Tensor:
    """Unit directions (size, size, 3) of a gnomonic view's pixel centres, top row first."""
    ticks = ((torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1) * half_extent
    y, x = torch.meshgrid(-ticks, ticks, indexing="ij")
    directions = x[..., None] * axes[0] + y[..., None] * axes[1] + axes[2]
    return directions / directions.norm(dim=-1, keepdim=True)


def view_coords(directions: torch.Tensor, size: int, axes: torch.Tensor, half_extent: float = HALF_EXTENT):
    """Fractional (row, column) of directions in a gnomonic view (the inverse of ``view_directions``)."""
    local = directions @ axes.T  # (…, 3): right, up, forward components
    x, y = local[..., 0] / local[..., 2], local[..., 1] / local[..., 2]
    return (-y / half_extent + 1) / 2 * size - 0.5, (x / half_extent + 1) / 2 * size - 0.5


def equirect_directions(height: int, width: int) -> torch.Tensor:
    """Unit directions (H, W, 3) of an equirectangular image's pixel centres."""
    latitude = math.pi * (0.5 - (torch.arange(height, dtype=torch.float64) + 0.5) / height)
    longitude = math.pi * (1 - 2 * (torch.arange(width, dtype=torch.float64) + 0.5) / width)
    lat, lon = torch.meshgrid(latitude, longitude, indexing="ij")
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def equirect_coords(directions: torch.Tensor, height: int, width: int):
    """Fractional (row, column) of directions in an equirectangular image (the inverse of ``equirect_directions``)."""
    x, y, z = directions.unbind(-1)
    u = 0.5 - torch.atan2(y, x) / (2 * math.pi)
    v = 0.5 - torch.atan2(z, torch.hypot(x, y)) / math.pi
    return v * height - 0.5, u * width - 0.5


def sample_bilinear(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, wrap: bool) -> torch.Tensor:
    """Bilinear samples of (C, H, W) at fractional coordinates (any shape S) → (C, *S); columns wrap when
    ``wrap`` (equirectangular), coordinates are clamped to the image otherwise and at the rows' ends."""
    _, height, width = image.shape
    rows, cols = _on(image, rows, cols)
    rows = rows.clamp(0, height - 1)
    cols = cols if wrap else cols.clamp(0, width - 1)
    top, left = rows.floor().long().clamp(max=max(height - 2, 0)), cols.floor().long()
    fr, fc = (rows - top).to(image.dtype), (cols - left).to(image.dtype)
    bottom = (top + 1).clamp(max=height - 1)
    right = left + 1
    if wrap:
        left, right = left % width, right % width
    else:
        left, right = left.clamp(max=width - 1), right.clamp(max=width - 1)
    upper = image[:, top, left] * (1 - fc) + image[:, top, right] * fc
    lower = image[:, bottom, left] * (1 - fc) + image[:, bottom, right] * fc
    return upper * (1 - fr) + lower * fr


def sample_nearest(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, wrap: bool) -> torch.Tensor:
    """The nearest pixel of (C, H, W) at fractional coordinates → (C, *S): values are copied, never mixed."""
    _, height, width = image.shape
    rows, cols = _on(image, rows, cols)
    rows = rows.round().long().clamp(0, height - 1)
    cols = cols.round().long()
    cols = cols % width if wrap else cols.clamp(0, width - 1)
    return image[:, rows, cols]


def _on(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates on the image's device, in float32 (MPS has no float64; a 16k image's coordinates fit)."""
    return rows.to(image.device, torch.float32), cols.to(image.device, torch.float32)


def resample(latents: torch.Tensor, x0: torch.Tensor | None, alpha: float, rows: torch.Tensor, cols: torch.Tensor,
             wrap: bool) -> torch.Tensor:
    """A noisy latent (C, H, W) = √ᾱ x₀ + √(1−ᾱ) ε resampled at (rows, cols) without losing noise: x₀ (the
    estimate the latent was made from; None = 0, pure noise) bilinearly, ε from the nearest pixel."""
    signal, noise = math.sqrt(alpha), math.sqrt(max(1 - alpha, 0.0))
    if noise < 1e-6:  # a clean latent (the last step's): plain interpolation
        return sample_bilinear(latents, rows, cols, wrap)
    x0 = torch.zeros_like(latents) if x0 is None else x0
    eps = (latents - signal * x0) / noise
    return signal * sample_bilinear(x0, rows, cols, wrap) + noise * sample_nearest(eps, rows, cols, wrap)


def cap_weights(height: int, full: float = FULL_CAP, fade_end: float = FADE_END) -> torch.Tensor:
    """Weight (H,) of the caps' step per equirectangular row: 1 within ``full`` of either pole, falling linearly
    to 0 at ``fade_end``, 0 beyond (the strip's windows alone)."""
    colatitude = math.pi * (torch.arange(height, dtype=torch.float64) + 0.5) / height
    from_pole = torch.minimum(colatitude, math.pi - colatitude)
    return ((fade_end - from_pole) / (fade_end - full)).clamp(0, 1)


@dataclass(frozen=True)
class CapProjection:
    """The maps between an equirectangular latent (height × width) and the gnomonic views (size × size) of its
    two caps, precomputed once per run (the geometry never changes between steps)."""

    height: int
    width: int
    size: int
    full: float = FULL_CAP
    fade_end: float = FADE_END
    half_extent: float = HALF_EXTENT  # tan of the view's half angle: 45°, whatever its pixel count

    @cached_property
    def weights(self) -> torch.Tensor:
        return cap_weights(self.height, self.full, self.fade_end)

    @cached_property
    def view_weights(self) -> torch.Tensor:
        """Weight (size, size) of the cap's own step at each view pixel: ``cap_weights`` of its angle from the pole."""
        from_pole = torch.acos(view_directions(self.size, axes_for("zenith"), self.half_extent)[..., 2])
        return ((self.fade_end - from_pole) / (self.fade_end - self.full)).clamp(0, 1)

    @cached_property
    def rows(self) -> dict[str, slice]:
        """The equirectangular rows each cap's step reaches (weight > 0)."""
        reach = int((self.weights > 0).sum()) // 2
        return {"zenith": slice(0, reach), "nadir": slice(self.height - reach, self.height)}

    @cached_property
    def to_view(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per pole: the equirectangular (row, column) of every view pixel, each (size, size)."""
        return {pole: equirect_coords(view_directions(self.size, axes_for(pole), self.half_extent),
                                      self.height, self.width) for pole in POLES}

    @cached_property
    def from_view(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per pole: the view (row, column) of every equirectangular pixel in the cap's rows, (rows, width)."""
        directions = equirect_directions(self.height, self.width)
        return {pole: view_coords(directions[self.rows[pole]], self.size, axes_for(pole), self.half_extent)
                for pole in POLES}

    def views(self, latents: torch.Tensor, x0: torch.Tensor | None, alpha: float) -> dict[str, torch.Tensor]:
        """Both caps' views (1, C, size, size) of an equirectangular latent (1, C, H, W) at ᾱ (``resample``)."""
        x0 = None if x0 is None else x0[0]
        return {pole: resample(latents[0], x0, alpha, *self.to_view[pole], wrap=True)[None] for pole in POLES}

    def blend(self, latents: torch.Tensor, x0: torch.Tensor | None, caps: dict[str, tuple[torch.Tensor, torch.Tensor]],
              alpha: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The strip's (latents, x₀) with each cap's (latents, x₀) views projected back (``resample``) and blended
        in with ``weights`` over the polar rows."""
        latents, x0 = latents.clone(), None if x0 is None else x0.clone()
        for pole, (view, view_x0) in caps.items():
            rows = self.rows[pole]
            weight = self.weights[rows].to(latents)[:, None]
            back = resample(view[0], view_x0[0], alpha, *self.from_view[pole], wrap=False)
            latents[0, :, rows] = torch.lerp(latents[0, :, rows], back, weight)
            if x0 is not None:
                x0[0, :, rows] = torch.lerp(x0[0, :, rows], sample_bilinear(view_x0[0], *self.from_view[pole], False),
                                            weight)
        return latents, x0

    def shift_views(self, caps: "Caps", change: torch.Tensor) -> "Caps":
        """The caps' own views moved by a change made to the strip (1, C, H, W), projected into each view
        (bilinear; the change is smooth: refine's layout guide replaces the strip's lowest frequencies). The
        caps keep their own view near the poles between steps, so a change to the strip alone would not reach
        them there; their x₀ is left alone, as the strip's is."""
        return {pole: (view + sample_bilinear(change[0], *self.to_view[pole], True)[None], x0)
                for pole, (view, x0) in caps.items()}


Caps = dict[str, tuple[torch.Tensor, torch.Tensor]]  # per pole: a view's (latents, x₀), each (1, C, size, size)


def pole_cap_step(
    latents: torch.Tensor,
    x0: torch.Tensor | None,
    strip: torch.Tensor,
    strip_x0: torch.Tensor,
    projection: CapProjection,
    grid: WindowGrid,
    step: SolverStep,
    denoise: Denoiser,
    *,
    caps: Caps | None = None,
    prediction_type: str = "epsilon",
    view_batch: int = 8,
    weights: torch.Tensor | None = None,
    interrupt: Interrupt | None = None,
    coarse: torch.Tensor | None = None,
    omega: float = 0.0,
    omega_loss: str = "projection",
    map_batches: BatchMap = run_batches,
    layout_sigma: float = LAYOUT_SIGMA,
) -> Caps:
    """One step of both pole caps beside the strip's: the caps' own (z_{t−1}, x₀) views, which the next step
    passes back as ``caps`` and the end of the run blends over the poles (``CapProjection.blend``).

    Each cap's view of z_t is the cap's own last view where the cap alone makes the latent (``view_weights``)
    and a view of the strip's z_t (``latents``, made from the x₀ estimate ``x0``; None at the first step)
    beyond, faded in between: the cap is never resampled back and forth, which would blur it a little at
    every step. The view is denoised over ``grid`` (its windows); then its lowest frequencies (a Gaussian of
    ``layout_sigma`` view pixels) are replaced by those of the strip's z_{t−1} and x₀ (``strip``,
    ``strip_x0``: what ``msd_step`` made of z_t), as refine keeps a source's layout (ILVR): the layout is the
    strip's and its pyramid's, which see the whole world, and the cap makes the texture. The strip is never
    changed during the run (the caps reach it only at the end), so its layout, its pyramid and its seams are
    the flat method's: a cap window, prompted like any other, would otherwise draw the scene into the sky
    and, through the pyramid, into the whole world (bench/layout.py, docs/poles.md).

    With ``coarse`` (the pyramid's next coarser level at t−1, the strip halved) and ω > 0 the cap's windows
    are guided towards the same cap of that level, as the strip's are (``msd_level_step`` with the fast
    gradient: no UNet work beyond the windows' one forward); else they are plain MultiDiffusion."""
    alpha, alpha_next = alphas_cumprod(step)
    guided = coarse is not None and omega > 0 and 2 * coarse.shape[-2] == projection.height
    if guided:
        coarse_projection = CapProjection(coarse.shape[-2], coarse.shape[-1], projection.size // 2)
    own = projection.view_weights.to(latents)
    result = {}
    for pole, view in projection.views(latents, x0, alpha).items():
        memory = None if x0 is None else sample_bilinear(x0[0], *projection.to_view[pole], True)[None]
        if caps is not None:
            view = torch.lerp(view, caps[pole][0], own)
            memory = caps[pole][1] if memory is None else torch.lerp(memory, caps[pole][1], own)
        if guided:
            target = sample_bilinear(coarse[0], *coarse_projection.to_view[pole], True)[None]
            prev, prev_x0 = msd_level_step(view, target, grid, step, denoise, omega, gradient="fast",
                                           omega_loss=omega_loss, prediction_type=prediction_type,
                                           view_batch=view_batch, weights=weights, interrupt=interrupt,
                                           previous_x0=memory, map_batches=map_batches)
        else:
            prev, prev_x0 = multidiffusion_step(view, grid, step, denoise, prediction_type=prediction_type,
                                                view_batch=view_batch, weights=weights, interrupt=interrupt,
                                                previous_x0=memory, map_batches=map_batches)
        coords = projection.to_view[pole]
        layout = resample(strip[0], strip_x0[0], alpha_next, *coords, wrap=True)[None]
        layout_x0 = sample_bilinear(strip_x0[0], *coords, True)[None]
        result[pole] = (keep_layout(prev, layout, layout_sigma), keep_layout(prev_x0, layout_x0, layout_sigma))
    return result


def keep_layout(image: torch.Tensor, layout: torch.Tensor, sigma: float) -> torch.Tensor:
    """``image`` with its frequencies below a Gaussian of ``sigma`` pixels replaced by ``layout``'s (0: ``image``)."""
    if sigma == 0:
        return image
    return image - gaussian_blur(image, sigma) + gaussian_blur(layout, sigma)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) blurred by a Gaussian of ``sigma`` pixels (separable, edges reflected)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = image.shape[1]
    padded = torch.nn.functional.pad(image, (radius, radius, radius, radius), mode="replicate")
    rows = torch.nn.functional.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return torch.nn.functional.conv2d(rows, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def blend_decoded_caps(images: torch.Tensor, caps: dict[str, torch.Tensor], pole_rows: int = POLE_ROWS) -> torch.Tensor:
    """The decoded strip (1, 3, H, W) with each cap's decoded view (1, 3, S, S) projected over its polar rows:
    the decoder, too, then works on the caps where they are not squeezed into a strip (it adds texture of
    its own at the pixel scale, which a strip's top row would spread around the pole).

    The first ``pole_rows`` rows at each pole are sampled from the view low-passed to ``POLE_BLUR`` rows,
    fading to the sharp view by the last of them, and the first row is one point, their mean: Blender draws
    the disc within half a row of the pole from the first row (and the other pole's), its pixels as spokes
    meeting at the pole, so any change along that row (the decoder's fine texture, or the image's gradient
    across the pole) is a tiny star whose centre has no one colour; a constant row makes the disc flat and
    the world continuous at the pole."""
    size = next(iter(caps.values())).shape[-1]
    height = images.shape[-2]
    projection = CapProjection(height, images.shape[-1], size, DECODED_FULL_CAP, DECODED_FADE_END)
    blended, _ = projection.blend(images, None, {pole: (view, view) for pole, view in caps.items()}, alpha=1.0)
    row_in_pixels = size * math.pi / (2 * projection.half_extent * height)  # one row of arc, at the view's centre
    fade = (1 - torch.arange(pole_rows, dtype=images.dtype, device=images.device) / max(pole_rows, 1))[:, None]
    for pole, view in caps.items():
        soft = gaussian_blur(view, POLE_BLUR * row_in_pixels)[0]
        rows, cols = (coords[:pole_rows] if pole == "zenith" else coords[coords.shape[0] - pole_rows:].flip(0)
                      for coords in projection.from_view[pole])
        index = torch.arange(pole_rows, device=images.device)  # from the pole outwards
        index = index if pole == "zenith" else height - 1 - index
        blended[0, :, index] = torch.lerp(blended[0, :, index], sample_bilinear(soft, rows, cols, False), fade)
        if pole_rows:
            blended[0, :, index[0]] = blended[0, :, index[0]].mean(-1, keepdim=True)
    return blended
