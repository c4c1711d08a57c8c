"""Do a 360° world's poles look right? A metric on any equirectangular image (H × W × C, numpy).

A window sampler treats the equirectangular image as a flat strip: its top and bottom rows, each one
point on the sphere, get ordinary texture, and a camera looking straight up sees radial streaks (a pinch).
``pole_metric`` renders perspective (gnomonic) views straight up, straight down and at the horizon and
measures, per pole:

- ``isotropy``: the RMS texture gradient across the radii (around the view centre) over the one along them,
  each per radian of arc on the sphere (the view's own stretch undone: a gnomonic view magnifies by
  sec²θ along the radii and secθ across them at θ from its centre), weighted by solid angle. 1 on a
  sphere-correct image; a flat strip reads ≫ 1 (its texture is squeezed across the radii near the pole).
- ``detail``: the RMS gradient per radian of arc of the cap view over the horizon view's (averaged over four
  azimuths). ~1 when the cap has the texture the rest has; a flat-filled or blurred cap reads ≪ 1.
- ``row_spread``: the std across longitude of the top (bottom) pixel row over the whole image's std: 0 when the
  row is one point, ≈ 1 for a flat strip.

Views have ``view_size(H)`` pixels across 90°, so their centre pixel spans one row of the image (π/H).
The same per-arc measure applies to rendered views (``view_energy``: Cycles renders in tests/test_world.py).

    .venv/bin/python bench/poles.py             # the tiny model at 512×256, Standard (seeds 0–1), before/after
    .venv/bin/python bench/poles.py --sizes 1024x512 --seeds 0   # writes poles-1024x512.json

    .venv/bin/python bench/poles.py --layout "Standard, sphere poles"   # the layout table on the 2:1 worlds
    .venv/bin/python bench/poles.py --pole-layout 72   # flat vs sphere: polar rows, seams beyond the caps, 0/360°

Writes bench/results/poles.json (512×256; other sizes: poles-SIZES.json, -windowN with --window).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np

from msd_core.imageio.cubemap import equirect_coords, sample_equirect  # Blender's equirectangular mapping, bilinear

FOV = math.pi / 2  # 90° views, as an artist looking up would see
# Azimuths of the horizon views that ``detail`` compares with (radians).
HORIZON_AZIMUTHS = (0.0, math.pi / 2, math.pi, 3 * math.pi / 2)


def view_size(height: int) -> int:
    """Pixels across a 90° view whose centre pixel spans one row of an equirectangular image ``height`` tall."""
    return max(8, round(2 * math.tan(FOV / 2) * height / math.pi))


def frame(forward, up) -> np.ndarray:
    """The (right, up, forward) rows of a camera looking along ``forward`` with ``up`` towards the view's top."""
    forward = np.asarray(forward, float) / np.linalg.norm(forward)
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    return np.stack([right, np.cross(right, forward), forward])


ZENITH = frame((0, 0, 1), (1, 0, 0))  # looking up, +X (the image's centre column) at the top of the view
NADIR = frame((0, 0, -1), (1, 0, 0))


def horizon_frame(azimuth: float) -> np.ndarray:
    return frame((math.cos(azimuth), math.sin(azimuth), 0), (0, 0, 1))


def view_directions(size: int, axes: np.ndarray, fov: float = FOV) -> np.ndarray:
    """Unit directions (size, size, 3) of a gnomonic view's pixel centres, top row first."""
    half = math.tan(fov / 2)
    ticks = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    x, y = np.meshgrid(ticks, -ticks)
    directions = x[..., None] * axes[0] + y[..., None] * axes[1] + axes[2]
    return directions / np.linalg.norm(directions, axis=-1, keepdims=True)


def render_view(image: np.ndarray, axes: np.ndarray, size: int | None = None, fov: float = FOV) -> np.ndarray:
    """A perspective view (size, size, C) of an equirectangular (H, W, C) image."""
    image = _channels(image)
    size = size or view_size(image.shape[0])
    return sample_equirect(image, *equirect_coords(view_directions(size, axes, fov), *image.shape[:2]))


def view_energy(view: np.ndarray, fov: float = FOV) -> dict:
    """Mean squared gradient per radian² of arc of a gnomonic view (H × W [× C], centre on the axis), split
    into the part across the radii (around the centre) and along them, weighted by solid angle (cos³θ)."""
    view = _channels(view).mean(axis=-1)
    size_y, size_x = view.shape
    pixel = 2 * math.tan(fov / 2) / size_x  # view-plane units per pixel
    gy, gx = np.gradient(view)  # per pixel; y grows downwards
    ticks_x = ((np.arange(size_x) + 0.5) / size_x * 2 - 1) * math.tan(fov / 2)
    ticks_y = ((np.arange(size_y) + 0.5) / size_y * 2 - 1) * math.tan(fov / 2) * size_y / size_x
    x, y = np.meshgrid(ticks_x, ticks_y)  # y downwards, like gy
    rho = np.hypot(x, y)
    cos = 1 / np.sqrt(1 + rho**2)
    keep = rho > 1.5 * pixel  # the radial direction is undefined at the centre
    ux, uy = x / np.where(keep, rho, 1), y / np.where(keep, rho, 1)
    radial = (gx * ux + gy * uy) / pixel / cos**2  # d/dθ = d/dρ · sec²θ
    across = (-gx * uy + gy * ux) / pixel / cos  # arc across the radii is cosθ · dρ
    weight = np.where(keep, cos**3, 0)[1:-1, 1:-1]  # np.gradient is one-sided at the border: leave it out
    radial, across = radial[1:-1, 1:-1], across[1:-1, 1:-1]
    along_energy = float((weight * radial**2).sum() / weight.sum())
    across_energy = float((weight * across**2).sum() / weight.sum())
    return {"across": across_energy, "along": along_energy, "total": across_energy + along_energy}


def row_spread(image: np.ndarray, row: int) -> float:
    """Std across longitude of one pixel row over the whole image's std (mean over channels)."""
    image = _channels(image).astype(float)
    spread = image.std(axis=(0, 1))
    return float(np.mean(image[row].std(axis=0) / np.maximum(spread, 1e-12)))


# The pole rows' low-pass of the shipped caps (msd_core.sampling.sphere.POLE_BLUR, rows), applied to the reference.
POLE_BLUR_ROWS = 1.5


def equator_row_spread(image: np.ndarray, blur_rows: float = POLE_BLUR_ROWS, band: float = 0.125) -> dict:
    """What ``row_spread`` would read if a pole were any point near the equator of the same image.

    A pole's first row is a circle 0.5 rows from the pole; once its texture finer than a row is low-passed
    (``blur_rows``, the caps' pole rows), what varies around that circle is the image's gradient at the pole:
    the row spread is 0.5 rows × |gradient| / √2 over the image's std, one draw per pole. Here the same
    quantity at every pixel within ``band`` (a fraction of the height) of the equator, after the same low-pass
    (Gaussian, columns wrap): ``rms`` is the value a pole as good as any point would read on average, ``p90``
    its 90th percentile and ``over`` the share of points above the issue's 0.15."""
    image = _channels(image).astype(float)
    height, width = image.shape[:2]
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    transfer = np.exp(-2 * math.pi**2 * blur_rows**2 * (fy**2 + fx**2))
    smooth = np.real(np.fft.ifft2(np.fft.fft2(image, axes=(0, 1)) * transfer[..., None], axes=(0, 1)))
    rows = slice(round(height * (0.5 - band)), round(height * (0.5 + band)))
    gy, gx = np.gradient(smooth[rows], axis=(0, 1))
    spread = (0.5 * np.hypot(gy, gx) / math.sqrt(2) / np.maximum(image.std(axis=(0, 1)), 1e-12)).mean(-1)
    return {"rms": float(np.sqrt((spread**2).mean())), "p90": float(np.percentile(spread, 90)),
            "over": float((spread > 0.15).mean())}


def pole_metric(image: np.ndarray, size: int | None = None) -> dict:
    """``isotropy``, ``detail`` and ``row_spread`` for the zenith and the nadir of an equirectangular image."""
    image = _channels(image).astype(float)
    size = size or view_size(image.shape[0])
    horizon = np.mean([view_energy(render_view(image, horizon_frame(a), size))["total"] for a in HORIZON_AZIMUTHS])
    result = {}
    for name, axes, row in (("zenith", ZENITH, 0), ("nadir", NADIR, -1)):
        energy = view_energy(render_view(image, axes, size))
        result[name] = {
            "isotropy": math.sqrt(energy["across"] / energy["along"]),
            "detail": math.sqrt(energy["total"] / horizon),
            "row_spread": row_spread(image, row),
        }
    return result


def rendered_metric(up: np.ndarray, down: np.ndarray, horizons: list[np.ndarray], fov: float = FOV) -> dict:
    """``isotropy`` and ``detail`` of rendered views (a Cycles camera looking straight up and down, and
    horizontal ones), with the same per-arc measure as ``pole_metric``."""
    horizon = np.mean([view_energy(view, fov)["total"] for view in horizons])
    result = {}
    for name, view in (("zenith", up), ("nadir", down)):
        energy = view_energy(view, fov)
        result[name] = {"isotropy": math.sqrt(energy["across"] / energy["along"]),
                        "detail": math.sqrt(energy["total"] / horizon)}
    return result


def sphere_noise(height: int, width: int, channels: int = 3, wavelength_rows: float = 6.0, waves: int = 400,
                 seed: int = 0) -> np.ndarray:
    """A sphere-correct test image: a random isotropic field of 3D direction (a sum of plane waves with random
    directions and phases, one wavelength ≈ ``wavelength_rows`` image rows of arc) rendered to (H, W, C)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    latitude, longitude = math.pi * (0.5 - rows / height), math.pi * (1 - 2 * cols / width)
    directions = np.stack([np.cos(latitude) * np.cos(longitude), np.cos(latitude) * np.sin(longitude),
                           np.sin(latitude)], axis=-1)
    number = 2 * math.pi / (wavelength_rows * math.pi / height)
    image = np.zeros((height, width, channels))
    for channel in range(channels):
        normals = rng.normal(size=(waves, 3))
        normals /= np.linalg.norm(normals, axis=1, keepdims=True)
        phases = rng.uniform(0, 2 * math.pi, waves)
        image[..., channel] = np.cos(number * directions @ normals.T + phases).sum(-1) / math.sqrt(waves / 2)
    return image


def strip_noise(height: int, width: int, channels: int = 3, wavelength_rows: float = 6.0, seed: int = 0) -> np.ndarray:
    """The same kind of texture made the flat-strip way: isotropic in pixels, so pinched on the sphere
    (white noise low-passed to the same wavelength in pixels, wrapping across 0/360°)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(height, width, channels))
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
    keep = np.hypot(fy, fx) <= 1 / wavelength_rows
    image = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * keep[..., None], axes=(0, 1)))
    return image / image.std()


def _channels(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=float)
    return image[..., None] if image.ndim == 2 else image


def summary(metric: dict) -> str:
    return "  ".join(f"{pole}: iso {m['isotropy']:.2f} detail {m['detail']:.2f}"
                     + (f" rows {m['row_spread']:.2f}" if "row_spread" in m else "") for pole, m in metric.items())


# ------------------------------------------------------------------------------------------------ runs


def work_rows() -> list[dict]:
    """UNet window work of each quality preset for the 360 world at SD's 512 px window, flat vs sphere poles."""
    from msd_core.sampling.plan import BACKWARD_COST, plan_without_model
    from msd_core.settings import QUALITY, GenerationSettings

    rows = []
    for quality in QUALITY:
        costs = {}
        for poles in ("flat", "sphere"):
            settings = GenerationSettings(prompt="bench", window=512, poles=poles).with_quality(quality)
            work = plan_without_model(settings, None, "float16").work()
            costs[poles] = work["forwards"] + BACKWARD_COST * work["backwards"]
            rows.append({"quality": quality, "poles": poles, **work, "forward_equivalents": costs[poles]})
        rows[-1]["added"] = costs["sphere"] / costs["flat"] - 1
    return rows


def row_matched_cap_size(height: int, window: int, half_extent: float = 1.0) -> int:
    """v0.4's first cap size (the runner-up): the view's centre pixel spans one row, not whole windows."""
    size = max(window, math.ceil(2 * half_extent * height / math.pi))
    return size + size % 2


CANDIDATES = ("flat", "sphere", "sphere, row-matched cap")


def tiny_rows(sizes: list[tuple[int, int]], seeds: list[int], window: int | None = None,
              candidates=CANDIDATES, quality: str = "standard") -> list[dict]:
    """The metric on the tiny model's 360° worlds (Standard), flat and with pole caps; each sphere run is
    decoded three ways: caps decoded as views (shipped), the same without the pole rows' low-pass, and the
    strip decoded alone. "row-matched cap" sizes the caps' views as the first version did (more windows).
    ``window`` (px): the tiny model's windows at another size (128 at 512×256 is SD's geometry at 2048×1024:
    a window half the latent's height)."""
    import torch
    from common import environment  # noqa: F401  (sets the offline caches)

    from msd_core.sampling import plan as plans
    from msd_core.sampling import sphere
    from msd_core.models import vae
    from msd_core.pipeline import MSDPanoramaPipeline
    from msd_core.settings import GenerationSettings

    torch.set_num_threads(1)
    base = GenerationSettings(prompt="a landscape", model="tiny", device="cpu", dtype="float32", window=window)
    pipe = MSDPanoramaPipeline.from_settings(base)
    shipped_size = plans.cap_size
    rows = []
    for width, height in sizes:
        for seed in seeds:
            for candidate in candidates:
                settings = dataclasses.replace(base.with_quality(quality), width=width, height=height, seed=seed,
                                               poles="flat" if candidate == "flat" else "sphere")
                plans.cap_size = row_matched_cap_size if candidate.endswith("row-matched cap") else shipped_size
                try:
                    started = time.perf_counter()
                    result = pipe(settings, decode=False)
                    seconds = time.perf_counter() - started
                finally:
                    plans.cap_size = shipped_size
                images = {}
                if candidate == "flat":
                    images[candidate] = pipe.decode(result.latents, True)
                else:
                    strip = vae.decode_latents(pipe.vae, result.latents, wrap=True, tile=None)
                    views = {pole: vae.decode_latents(pipe.vae, view) for pole, (view, _) in result.caps.items()}
                    images[f"{candidate} (cap decode)"] = sphere.blend_decoded_caps(strip, views)
                    images[f"{candidate} (cap decode, no pole-row low-pass)"] = sphere.blend_decoded_caps(strip, views, 0)
                    images[f"{candidate} (strip decode)"] = strip
                work = result.plan.work()
                for name, image in images.items():
                    pixels = np.asarray(image, float) / 255 if not hasattr(image, "permute") else \
                        image[0].permute(1, 2, 0).clamp(0, 1).double().numpy()
                    metric = pole_metric(pixels)
                    rows.append({"size": f"{width}×{height}", "window": window or 64, "seed": seed, "candidate": name,
                                 "quality": quality, "equator_row_spread": equator_row_spread(pixels)["rms"],
                                 "cap_size": result.plan.caps, "forwards": work["forwards"],
                                 "backwards": work["backwards"], "seconds": seconds,
                                 "seam_360": seam_360(pixels), **{
                                     f"{pole}_{key}": value for pole, values in metric.items()
                                     for key, value in values.items()}})
                    print(rows[-1]["size"], window or 64, seed, f"{name:50}", summary(metric),
                          f"seam {rows[-1]['seam_360']:.2f} equator rows {rows[-1]['equator_row_spread']:.3f}", flush=True)
    return rows


def seam_360(pixels: np.ndarray) -> float:
    """Mean |first − last column| over the mean difference of neighbouring columns (≈ 1: no seam at 0/360°)."""
    inner = np.abs(np.diff(pixels, axis=1)).mean()
    return float(np.abs(pixels[:, 0] - pixels[:, -1]).mean() / inner)


def layout_rows(settings: list[str], seeds: int = 24) -> list[dict]:
    """bench/layout.py's table (its analytic priors, sampled as the pipeline would, pole caps included) on the
    2:1 wrapping worlds, the only shapes with poles, for ``settings`` (layout.POLE_SETTINGS' names)."""
    import layout
    import torch

    torch.set_num_threads(1)
    rows = []
    for setting in settings:
        for prior in layout.aspect_priors().values():
            for shape in (layout.ASPECTS[1], layout.ASPECTS[2]):
                rows.append(layout.run_aspect(prior, shape, setting, list(range(seeds))))
    return rows


def polar_rows_left_out(image, rows: int = 2):
    """An (…, H, W) image without the ``rows`` rows nearest each pole."""
    return image[..., rows:image.shape[-2] - rows, :]


def seam_rows_beyond_caps(images, grid, multiple: int, weights) -> float | None:
    """``common.window_seam_ratio``'s rows, both its edges and the rows it compares them with taken only where
    the caps' weight (``weights``, per row) is 0: the strip's tile edges against the strip's own rows. With the
    caps in, the polar rows' neighbours differ less (the cap's texture, resampled from its view), so the plain
    ratio's reference shrinks while the edges themselves, all beyond the caps, are unchanged."""
    from common import _edge_ratio, _mean_differences

    differences = _mean_differences(images.transpose(-1, -2), images.roll(1, dims=-2).transpose(-1, -2), False)
    beyond = (weights == 0) & (weights.roll(1) == 0)  # both rows of the pair beyond the caps
    differences = differences.masked_fill(~beyond.to(differences.device), float("nan"))
    edges = {top for top, _ in grid.offsets} | {top + grid.window for top, _ in grid.offsets}
    return _edge_ratio(differences, edges, False, multiple)


def seam_360_by_band(images, weights) -> dict:
    """The 0/360° seam (horizon.seam_ratio per panorama, then the mean) over the caps' rows and over the rest:
    a cap carries the strip's seam through its layout or adds its own."""
    import torch

    images = images.double()
    edge = (images[..., 0] - images[..., -1]).abs()
    inner = (images[..., 1:] - images[..., :-1]).abs().mean(-1)
    caps = (weights > 0).to(images.device)
    return {band: float(torch.stack([edge[i, rows].mean() / inner[i, rows].mean() for i in range(len(images))]).mean())
            for band, rows in (("caps", caps), ("beyond", ~caps))}


def pair_ratios_in_caps(images, weights, eighths=range(8)) -> dict:
    """In the caps' rows: |column c−1 − column c| at c = k·W/8 (k in ``eighths``; k = 0 is the 0/360° pair) over
    the mean difference of all neighbouring columns there. A seam at 0/360° shows at k = 0 alone; a property of
    the caps' views shows at every longitude on the same view axis (0°, 90°, 180°, 270°) alike."""
    images = images.double()
    width = images.shape[-1]
    caps = (weights > 0).to(images.device)
    reference = (images[..., 1:] - images[..., :-1]).abs()[:, caps].mean()
    return {f"{45 * k}°": float((images[..., k * width // 8 - 1] - images[..., k * width // 8]).abs()[:, caps].mean()
                                / reference) for k in eighths}


def pole_layout_rows(seeds: int = 72, presets=("standard", "draft")) -> list[dict]:
    """Issue 17's open layout questions, flat against sphere poles on the 2:1 wrapping worlds, ``seeds`` seeds:
    coherent panoramas with and without the two rows nearest each pole scored, the window-row seam plain and
    beyond the caps, and the 0/360° seam per panorama (its paired difference) in the caps' rows and beyond."""
    import statistics

    import layout
    import torch
    from horizon import PRIOR_FACTOR, sample_with_settings, seam_ratio

    from msd_core.sampling.sphere import cap_weights
    from msd_core.settings import QUALITY, GenerationSettings
    from common import window_seam_ratio

    torch.set_num_threads(1)
    rows = []
    for name in ("river", "horizon", "sun"):
        prior = layout.aspect_priors()[name]
        for shape in (layout.ASPECTS[1], layout.ASPECTS[2]):
            scale = 16 // prior.window
            height, width = shape[0] // scale, shape[1] // scale
            weights = cap_weights(height)
            for preset in presets:
                paired = {}
                for poles in ("flat", "sphere"):
                    settings = GenerationSettings(prompt="bench", width=width * PRIOR_FACTOR,
                                                  height=height * PRIOR_FACTOR, wrap=True, poles=poles)
                    settings = dataclasses.replace(settings, **QUALITY[preset][0])
                    images, plan = sample_with_settings(prior, settings, list(range(seeds)))
                    grid, multiple = plan.grids_at(plan.steps - 1)[-1], layout.seam_multiple(plan)
                    paired[poles] = [seam_ratio(image) for image in images]
                    rows.append({
                        "prior": name, "world": f"{shape[0]}×{shape[1]} wrap", "preset": preset, "poles": poles,
                        "seeds": seeds,
                        "coherent": sum(prior.score(image, True)["coherent"] for image in images),
                        "coherent_without_polar_rows": sum(prior.score(polar_rows_left_out(image), True)["coherent"]
                                                           for image in images),
                        "seam_rows": window_seam_ratio(images, grid, multiple)["rows"],
                        "seam_rows_beyond_caps": seam_rows_beyond_caps(images, grid, multiple, weights),
                        "seam_columns": window_seam_ratio(images, grid, multiple)["columns"],
                        "seam_360": statistics.mean(paired[poles]),
                        **{f"seam_360_{band}": value for band, value in seam_360_by_band(images, weights).items()},
                        "pairs_in_caps": pair_ratios_in_caps(images, weights),
                    })
                difference = [s - f for f, s in zip(paired["flat"], paired["sphere"])]
                rows[-1].update(seam_360_change=statistics.mean(difference),
                                seam_360_change_se=statistics.stdev(difference) / math.sqrt(seeds))
                print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                      flush=True)
    return rows


def main() -> None:
    from common import environment, markdown_table, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["512x256"], help="WIDTHxHEIGHT of the tiny model's worlds")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--window", type=int, help="the tiny model's window in px (default its native 64)")
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--quality", choices=("draft", "standard"), default="standard")
    parser.add_argument("--pole-layout", type=int, metavar="SEEDS",
                        help="only issue 17's layout checks, flat vs sphere (writes layout-poles-checks.json)")
    parser.add_argument("--layout", nargs="+", metavar="SETTING",
                        help="only the layout table on the 2:1 worlds for these settings (writes layout-poles.json)")
    args = parser.parse_args()
    if args.pole_layout:
        write_json("layout-poles-checks", {"environment": environment(), "rows": pole_layout_rows(args.pole_layout)})
        return
    if args.layout:
        write_json("layout-poles", {"environment": environment(), "aspects": layout_rows(args.layout)})
        return
    sizes = [tuple(int(part) for part in size.split("x")) for size in args.sizes]
    references = []
    for wavelength in (8, 16):
        for name, make in (("sphere-correct noise", sphere_noise), ("flat-strip noise", strip_noise)):
            metric = pole_metric(make(256, 512, wavelength_rows=wavelength, seed=1))
            references.append({"image": f"{name}, wavelength {wavelength} rows, 512×256", **{
                f"{pole}_{key}": value for pole, values in metric.items() for key, value in values.items()}})
            print(references[-1]["image"], summary(metric), flush=True)
    work = work_rows()
    print(markdown_table(work, ["quality", "poles", "forwards", "backwards", "forward_equivalents", "added"]))
    tiny = tiny_rows(sizes, args.seeds, args.window, args.candidates, args.quality)
    name = "poles" if args.sizes == ["512x256"] else f"poles-{'-'.join(args.sizes)}"
    name += "" if args.quality == "standard" else f"-{args.quality}"
    write_json(name + (f"-window{args.window}" if args.window else ""),
               {"environment": environment(), "references": references, "work": work, "tiny": tiny})


if __name__ == "__main__":
    main()
