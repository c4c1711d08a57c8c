"""VAE decoding with the tiny model: plain, tiled and wrapped.

About the tiny VAE (measured): changing one latent pixel changes the image strongly within about
6 latent px and by up to ~5 % of that everywhere else, because GroupNorm statistics and the mid-block
attention span the whole decoded input. So no tiled decode can match a plain one exactly (each tile
has its own statistics): on i.i.d. latents the tiled result differs from the plain one by ≈0.005 on
average and at most ≈0.15 anywhere (pixel values in [0, 1]), spread evenly over the image. Tiles butted
together without blending (overlap 0) differ by up to ≈0.7 at the tile edges, so the tolerances below
(mean 0.01, max 0.25) still catch a visible seam.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from msd_core.models import loading
from msd_core.models.vae import _tile_spans, auto_tile, decode_latents, to_pil

MEAN_TOLERANCE = 0.01
MAX_TOLERANCE = 0.25


@pytest.fixture(scope="module")
def vae():
    return loading.load_components("tiny", device="cpu").vae


def _latents(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_decode_gives_float_images_in_range_at_eight_times_the_size(vae):
    images = decode_latents(vae, _latents(2, 4, 6, 10))
    assert images.shape == (2, 3, 48, 80)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert 0 <= images.min() and images.max() <= 1
    assert images.std() > 0.05 and not torch.equal(images[0], images[1])


def test_tiled_decode_matches_plain_decode(vae):
    latents = _latents(1, 4, 40, 64)  # a 2 × 3 grid of 32 px tiles
    plain = decode_latents(vae, latents)
    tiled = decode_latents(vae, latents, tile=32, overlap=8)
    error = (tiled - plain).abs()
    assert tiled.shape == plain.shape
    assert error.mean() < MEAN_TOLERANCE and error.max() < MAX_TOLERANCE

    butted = decode_latents(vae, latents, tile=32, overlap=0)  # the control: without blending a seam shows
    assert (butted - plain).abs().max() > 2 * MAX_TOLERANCE


def test_tiled_decode_never_decodes_more_than_one_tile_at_once(vae, monkeypatch):
    shapes = []
    decode = vae.decode

    def recording_decode(latents, *args, **kwargs):
        shapes.append(tuple(latents.shape[-2:]))
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", recording_decode)
    decode_latents(vae, _latents(1, 4, 30, 60), tile=24, overlap=8, wrap=True)
    assert shapes and all(h <= 24 and w <= 24 for h, w in shapes)
    # 30 rows need 2 tiles; 60 + 2·8 wrapped columns need 5.
    assert len(shapes) == 2 * 5


def test_wrapped_decode_has_no_seam_at_0_360(vae):
    """A wrapped panorama decoded from a circularly rolled latent, rolled back, must equal the direct
    decode, including the columns at the seam: the decoder sees the seam like any other place."""
    latents = _latents(1, 4, 16, 64, seed=1)
    shift = 32  # the seam moves to the middle of the image
    factor = 8

    def seam_error(decoded, decoded_rolled):
        back = torch.roll(decoded_rolled, -shift * factor, dims=-1)
        seam = torch.cat([back[..., :16] - decoded[..., :16], back[..., -16:] - decoded[..., -16:]], dim=-1)
        return seam.abs().max(), (back - decoded).abs().max()

    wrapped = decode_latents(vae, latents, wrap=True)
    seam, whole = seam_error(wrapped, decode_latents(vae, torch.roll(latents, shift, dims=-1), wrap=True))
    assert seam < 0.1 and whole < 0.1

    # The control: a plain decode puts the decoder's zero padding at the seam.
    plain = decode_latents(vae, latents)
    plain_seam, _ = seam_error(plain, decode_latents(vae, torch.roll(latents, shift, dims=-1)))
    assert plain_seam > 0.3


def test_wrapped_tiled_decode_matches_wrapped_decode(vae):
    latents = _latents(1, 4, 16, 64, seed=2)
    wrapped = decode_latents(vae, latents, wrap=True)
    tiled = decode_latents(vae, latents, wrap=True, tile=32, overlap=8)
    error = (tiled - wrapped).abs()
    assert tiled.shape == wrapped.shape == (1, 3, 128, 512)
    assert error.mean() < MEAN_TOLERANCE and error.max() < MAX_TOLERANCE


def test_tile_must_exceed_overlap(vae):
    with pytest.raises(ValueError, match="larger than the overlap"):
        decode_latents(vae, _latents(1, 4, 8, 8), tile=8, overlap=8)


@given(length=st.integers(1, 400), tile=st.integers(2, 128), overlap=st.integers(0, 64))
def test_tile_spans_cover_everything_with_the_overlap(length, tile, overlap):
    overlap = min(overlap, tile - 1)
    spans = _tile_spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == min(tile, length) for start, end in spans)
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start < next_start and end - next_start >= overlap


def test_auto_tile_decodes_small_latents_in_one_call_and_tiles_large_ones():
    assert auto_tile(64, 128, "cuda") is None and auto_tile(128, 256, "cuda") == 128
    assert auto_tile(64, 64, "cpu") is None and auto_tile(64, 256, "cpu") == 64
    assert auto_tile(128, 256, "mps") == 64


def test_to_pil_gives_8_bit_rgb():
    images = torch.zeros(2, 3, 4, 6)
    images[0, 0] = 1.0
    images[1, 2] = 0.5
    first, second = to_pil(images)
    assert first.mode == "RGB" and first.size == (6, 4)
    assert first.getpixel((0, 0)) == (255, 0, 0) and second.getpixel((5, 3)) == (0, 0, 128)
