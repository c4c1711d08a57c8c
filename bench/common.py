"""Shared helpers of the benchmark scripts: environment record, JSON results, Markdown tables."""

from __future__ import annotations

import datetime
import json
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


def figure_path(name: str, quick: bool):
    """Full runs draw the README's figures (docs/bench-NAME.png); quick runs draw beside their JSON."""
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
