"""VAE decoding (and encoding) of panorama latents: plain, tiled (bounded memory) and wrapped (seamless at 0/360°).

A panorama's latent is far larger than the VAE was trained on; decoding it in one call needs memory
proportional to its area (SD's decoder keeps 128–512 channels at full resolution). Tiled decoding
decodes overlapping tiles one at a time and blends them with linear ramps across each overlap, so peak
memory depends on the tile size only and no tile edge shows. For 360° panoramas the latent is
extended circularly on both sides before decoding, so the decoder's zero padding falls outside the
image and the left and right edges are decoded as the neighbours they are. Encoding an image (to refine
it) works the same way in the other direction.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..errors import Cancelled

SMALL_LATENT = 128  # latent px per side that one decode call handles comfortably on a GPU
SMALL_LATENT_LOW_MEMORY = 64  # the same on Apple MPS (shared memory) and the CPU


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, wrap: bool = False, tile: int | None = None, overlap: int = 8,
                   interrupt=None) -> torch.Tensor:
    """Decode diffusion latents (B, C, h, w) into images (B, 3, h·f, w·f): float32 on the CPU, in [0, 1].

    ``tile`` is the tile size in latent px (None: one decode call), ``overlap`` the latent px that
    neighbouring tiles share and, with ``wrap``, how far the latent is extended around the seam.
    A set ``interrupt`` (threading.Event) raises Cancelled before the next tile.
    """
    if tile is not None and tile <= overlap:
        raise ValueError(f"the tile ({tile}) must be larger than the overlap ({overlap})")
    param = next(vae.parameters())
    scaled = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
    width = scaled.shape[-1]
    pad = min(overlap, width) if wrap else 0
    if pad:
        scaled = torch.cat([scaled[..., -pad:], scaled, scaled[..., :pad]], dim=-1)
    if tile is None:
        Cancelled.check(interrupt)
        images = _decode(vae, scaled)
    else:
        images = _apply_tiled(lambda part: _decode(vae, part), scaled, tile, overlap, 1, interrupt)
    if pad:
        factor = images.shape[-1] // scaled.shape[-1]
        images = images[..., pad * factor : (pad + width) * factor]
    return ((images + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, *, wrap: bool = False, tile: int | None = None, overlap: int = 8,
                  interrupt=None) -> torch.Tensor:
    """Encode images (B, 3, H, W) in [0, 1] into diffusion latents (B, C, H/f, W/f), float32 on the CPU.

    The latent is the mean of the VAE's latent distribution (no sampling: the same image always gives
    the same latent) times its scaling factor. ``tile``, ``overlap`` and ``wrap`` work as for
    ``decode_latents`` (``interrupt`` too), in latent px: with ``wrap`` the image is extended circularly by ``overlap``
    latent px on both sides, so the encoder sees across the 0/360° seam.
    """
    if tile is not None and tile <= overlap:
        raise ValueError(f"the tile ({tile}) must be larger than the overlap ({overlap})")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if images.shape[-2] % factor or images.shape[-1] % factor:
        raise ValueError(f"image sizes must be multiples of the VAE's factor {factor}, got {tuple(images.shape[-2:])}")
    param = next(vae.parameters())
    pixels = (images * 2 - 1).to(device=param.device, dtype=param.dtype)
    width = images.shape[-1] // factor
    pad = min(overlap, width) if wrap else 0
    if pad:
        pixels = torch.cat([pixels[..., -pad * factor :], pixels, pixels[..., : pad * factor]], dim=-1)

    def encode(part: torch.Tensor) -> torch.Tensor:
        return vae.encode(part).latent_dist.mean.float().cpu()

    Cancelled.check(interrupt)
    latents = encode(pixels) if tile is None else _apply_tiled(encode, pixels, tile, overlap, factor, interrupt)
    if pad:
        latents = latents[..., pad : pad + width]
    return latents * vae.config.scaling_factor


def _decode(vae, scaled: torch.Tensor) -> torch.Tensor:
    return vae.decode(scaled).sample.float().cpu()


def _apply_tiled(function, inputs: torch.Tensor, tile: int, overlap: int, input_scale: int, interrupt=None) -> torch.Tensor:
    """Apply ``function`` (decode or encode) tile by tile, accumulating ramp-weighted outputs on the CPU;
    a set ``interrupt`` raises Cancelled between tiles (a 16K panorama is hundreds of tiles).

    Tiles are laid out in latent px: ``input_scale`` is input px per latent px (1 for latents, the VAE's
    factor for images). Every tile's weight is an outer product of 1-D ramps and the tiles form a grid,
    so the total weight at a pixel is the outer product of the 1-D totals: no 2-D weight buffer is needed.
    """
    batch, _, height, width = inputs.shape
    height, width = height // input_scale, width // input_scale
    rows, cols = _tile_spans(height, tile, overlap), _tile_spans(width, tile, overlap)
    output = None
    for row, (top, bottom) in enumerate(rows):
        for col, (left, right) in enumerate(cols):
            Cancelled.check(interrupt)
            part = inputs[..., top * input_scale : bottom * input_scale, left * input_scale : right * input_scale]
            result = function(part)
            factor = result.shape[-1] // (right - left)
            if output is None:
                output = torch.zeros(batch, result.shape[1], height * factor, width * factor)
            weight_y = _ramp_weights(rows, row, factor)
            weight_x = _ramp_weights(cols, col, factor)
            output[..., top * factor : bottom * factor, left * factor : right * factor] += (
                result * weight_y[:, None] * weight_x[None, :]
            )
    total_y = _total_weights(rows, height, factor)
    total_x = _total_weights(cols, width, factor)
    return output / (total_y[:, None] * total_x[None, :])


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spaced [start, end) spans of ``tile`` covering ``length``, neighbours sharing ≥ ``overlap``."""
    if length <= tile:
        return [(0, length)]
    count = -(-(length - overlap) // (tile - overlap))  # ceil
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _ramp_weights(spans: list[tuple[int, int]], index: int, factor: int) -> torch.Tensor:
    """1-D weights (in image px) of one tile: rising linearly across the overlap with the previous
    tile, falling across the overlap with the next, 1 elsewhere (and at the image border)."""
    start, end = spans[index][0] * factor, spans[index][1] * factor
    position = torch.arange(start, end, dtype=torch.float32) + 0.5
    weights = torch.ones(end - start)
    if index > 0:
        previous_end = spans[index - 1][1] * factor
        weights = torch.minimum(weights, (position - start) / (previous_end - start))
    if index < len(spans) - 1:
        next_start = spans[index + 1][0] * factor
        weights = torch.minimum(weights, (end - position) / (end - next_start))
    return weights


def _total_weights(spans: list[tuple[int, int]], length: int, factor: int) -> torch.Tensor:
    total = torch.zeros(length * factor)
    for index, (start, end) in enumerate(spans):
        total[start * factor : end * factor] += _ramp_weights(spans, index, factor)
    return total


def auto_tile(latent_h: int, latent_w: int, device) -> int | None:
    """The tile size (latent px) for decoding a latent of this size on ``device``: None (one call) when
    it fits in one SMALL_LATENT square, else that square; smaller on MPS and the CPU, whose memory is
    shared with everything else. SD's decoder needs a few GB in float16 for a 128×128 latent (1024 px)."""
    limit = SMALL_LATENT if torch.device(device).type == "cuda" else SMALL_LATENT_LOW_MEMORY
    return None if latent_h <= limit and latent_w <= limit else limit


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] → 8-bit RGB PIL images."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
