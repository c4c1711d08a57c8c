"""Shared helpers of the benchmark scripts: environment record, JSON results, Markdown tables."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"

# Scratch caches (the tiny model, matplotlib's fonts) outside ~, and nothing reaches the Hugging Face Hub.
os.environ.setdefault("MSD_PANORAMA_CACHE", os.path.join(tempfile.gettempdir(), "msd-panorama-bench-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "msd-panorama-bench-matplotlib"))

if str(ROOT) not in sys.path:  # run as `python bench/x.py`: make msd_core importable from the checkout
    sys.path.insert(0, str(ROOT))


def environment() -> dict:
    """What the numbers depend on: machine, versions and how busy the machine was."""
    import diffusers
    import torch

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "machine": platform.machine(),
    }


def write_json(name: str, data: dict) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**data, "environment_end": {"loadavg": os.getloadavg()}}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def median_spread(values: list[float]) -> dict:
    """Median and spread (min, max) of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def window_seam_ratio(images, grid, multiple: int = 1, within_class: bool = False) -> dict:
    """Whether the window edges of ``grid`` (e.g. the last step's finest level) show in ``images`` (…, H, W).

    Per direction: the mean |difference| between neighbouring pixels across those edges over the mean
    across every other pair of neighbours at a position that is a multiple of ``multiple`` (the pair across
    the 0/360° edge included when the grid wraps). Tiles of a level below a coarser one start at multiples
    of 2 (pass 2), and content that follows the coarser level's 2×2 blocks changes more often at even
    positions, so only even positions are a fair comparison there. ≈ 1: the edges look like anywhere
    else; larger: a seam. None where the edges are every such pair (or none).

    ``within_class``: only pairs whose pixels have the same sign count (the analytic priors' two classes,
    sky and ground, sun and sky, water and land, are the signs of their ±1 means). An object's boundary is
    one large difference wherever it lies, so a few panoramas whose horizons happen to sit on a tile edge
    move the plain ratio by ±0.1 at 24 seeds; within a class only the texture is compared, and a tile edge
    that shows in it is a seam.
    """
    images = images.double()
    column_edges = {left % grid.width for _, left in grid.offsets} | {(left + grid.window) % grid.width
                                                                      for _, left in grid.offsets}
    row_edges = {top for top, _ in grid.offsets} | {top + grid.window for top, _ in grid.offsets}
    # Difference i is between pixel i − 1 and pixel i; i = 0 (across the 360° edge) only with wrap.
    columns = _mean_differences(images, images.roll(1, dims=-1), within_class)
    rows = _mean_differences(images.transpose(-1, -2), images.roll(1, dims=-2).transpose(-1, -2), within_class)
    return {"columns": _edge_ratio(columns, column_edges, grid.wrap, multiple),
            "rows": _edge_ratio(rows, row_edges, False, multiple)}


def wrap_seam_ratio(images, within_class: bool = False) -> float | None:
    """Whether a wrapped world's 0/360° edge shows in ``images`` (…, H, W): the mean |difference| across it over
    the mean across every other pair of neighbouring columns (``horizon.seam_ratio``; ``within_class`` as in
    ``window_seam_ratio``: only same-sign pairs, the texture, so an object's boundary on the edge is no seam)."""
    differences = _mean_differences(images.double(), images.double().roll(1, dims=-1), within_class)
    elsewhere = differences[1:][~differences[1:].isnan()]
    if math.isnan(differences[0]) or not len(elsewhere):
        return None
    return float(differences[0] / elsewhere.mean())


def _mean_differences(images, neighbours, within_class: bool):
    """Mean |pixel − neighbour| per position of the last axis (over same-sign pairs only when ``within_class``;
    NaN where there is none)."""
    differences = (images - neighbours).abs()
    dims = tuple(range(images.dim() - 1))
    if not within_class:
        return differences.mean(dim=dims)
    same = ((images > 0) == (neighbours > 0)).double()
    return (differences * same).sum(dim=dims) / same.sum(dim=dims)


def seam_multiple(plan) -> int:
    """Positions to compare the last step's tile edges with (``common.window_seam_ratio``): shifted tiles
    below a coarser level start at even offsets, so other even positions; a dense grid has an edge at
    every stride, so every other position."""
    return 2 if plan.levels > 1 and plan.windows == "shifted" else 1


def _edge_ratio(differences, edges: set[int], wrap: bool, multiple: int) -> float | None:
    positions = range(0 if wrap else 1, len(differences))
    positions = [i for i in positions if not math.isnan(differences[i])]
    at_edges = [float(differences[i]) for i in positions if i in edges]
    elsewhere = [float(differences[i]) for i in positions if i not in edges and i % multiple == 0]
    if not at_edges or not elsewhere:
        return None
    return statistics.mean(at_edges) / statistics.mean(elsewhere)


def figure_path(name: str, quick: bool):
    """Full runs draw the figures of docs/results.md (docs/bench-NAME.png); quick runs draw beside their JSON."""
    if quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        return RESULTS / f"bench-{name}-quick.png"
    DOCS.mkdir(exist_ok=True)
    return DOCS / f"bench-{name}.png"


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (then figures are skipped, JSON still written)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping figures (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
