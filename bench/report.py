"""Print the README's result tables (Markdown) from bench/results/*.json.

    .venv/bin/python bench/report.py          # uses the full runs where present, else the quick ones
"""

from __future__ import annotations

import json

from common import RESULTS, markdown_table


def load(name: str) -> tuple[dict | None, str]:
    for suffix in ("", "-quick"):
        path = RESULTS / f"{name}{suffix}.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), path.name
    return None, ""


def header(data: dict, source: str) -> str:
    env = data["environment"]
    load_start = ", ".join(f"{v:.1f}" for v in env["loadavg"])
    load_end = ", ".join(f"{v:.1f}" for v in data["environment_end"]["loadavg"])
    return (f"*{source}: `{env['command']}`, {env['date']}, {env['cpu_count']} CPUs, torch {env['torch']} "
            f"({env['torch_threads']} thread(s)), diffusers {env['diffusers']}; load average {load_start} at the "
            f"start, {load_end} at the end.*")


def speed_section(data: dict, source: str) -> str:
    s = data["speed"]["settings"]
    out = [header(data, source), "",
           f"{s['width']}×{s['height']} px, {s['steps']} steps, window 64 px (the tiny UNet's 8 latents), stride "
           f"{s['stride']} px, view batch {s['view_batch']}, CFG 7.5; windows per level "
           f"{data['speed']['windows_per_level']}.", ""]
    rows = []
    for name, r in data["speed"]["results"].items():
        ratios = r["round_ratios_vs_diffusers"]
        rows.append({"method": name, "median s": r["median"], "min–max s": f"{r['min']:.2f}–{r['max']:.2f}",
                     "× diffusers MD": r["vs_diffusers"],
                     "per-round ratio range": f"{min(ratios):.2f}–{max(ratios):.2f}",
                     "× our MD": r["vs_our_md"], "UNet window evals": r["windows"], "UNet calls": r["calls"],
                     "wall ms / UNet call": 1000 * r["median"] / r["calls"]})
    out.append(markdown_table(rows, list(rows[0])))
    out += ["", "Cost growth (5 steps; area in window areas, doubling width then height):", ""]
    growth = [{"area": r["area"], "px": f"{r['width']}×{r['height']}", "method": r["method"],
               "windows per level": r["windows_per_level"], "UNet window evals": r["unet_windows"],
               "median s": r["median"], "ms / window eval": r["ms_per_window"]} for r in data["growth"]]
    out.append(markdown_table(growth, list(growth[0])))
    fits = data["growth_fits"]
    out += ["", "Least-squares fit seconds = a · (UNet window evaluations) + b: " + "; ".join(
        f"{name}: a = {f['seconds_per_window'] * 1000:.2f} ms, b = {f['intercept']:.2f} s, R² = {f['r2']:.4f}"
        for name, f in fits.items()) + "."]
    o = data["overhead"]
    out += ["", "Share of wall time outside the model calls (UNet forward and backward, VAE, text encoder), "
                "decoding included:", ""]
    rows = []
    for name in ("our MD", "MSD fast", "MSD exact"):
        run = min(o[name]["runs"], key=lambda r: abs(r["overhead_share"] - o[name]["median_share"]))
        rows.append({"method": name, "overhead (median)": f"{o[name]['median_share']:.1%}",
                     "min–max": f"{o[name]['min_share']:.1%}–{o[name]['max_share']:.1%}", "total s": run["total"],
                     "UNet fwd s": run["unet"], "UNet bwd s": run["unet_backward"], "VAE s": run["vae"],
                     "text s": run["text_encoder"]})
    out.append(markdown_table(rows, list(rows[0])))
    out += ["", "Largest self times in msd_core (cProfile, MSD fast):", ""]
    out += [f"- {e['self_seconds']:.3f} s {e['function']}" for e in o["profile_top_self_time"][:6]]
    w = data["worker"]
    out += ["", f"Worker (256×128 px, 5 steps): start-up to \"ready\" {w['start_to_ready']:.1f} s; generate → first "
                f"progress event: cold {w['cold_first_progress']:.2f} s (model load {w['cold_worker_timings']['load']:.2f} s), "
                f"warm {w['warm_first_progress']:.2f} s and {w['warm_again_first_progress']:.2f} s (load 0, "
                f"\"loading\" says warm={w['warm_loading_warm_flag']}); a whole request: cold "
                f"{w['cold_total']:.2f} s, warm {w['warm_total']:.2f} s."]
    return "\n".join(out)


def memory_section(data: dict, source: str) -> str:
    rows = []
    for r in data["rows"]:
        rows.append({"what": r["kind"], "size px": f"{r['width']}×{r['height']}", "ok": r["ok"],
                     "tile (latent px)": r.get("tile"), "seconds": r["seconds"],
                     "RSS after load MiB": r.get("baseline_rss_mib"), "peak RSS MiB": r.get("peak_rss_mib"),
                     "peak − load MiB": r.get("peak_above_baseline_mib"),
                     "note": r.get("error") or (f"{r['steps']} step(s), levels {r['plan']['levels']}, windows/level "
                                                f"{r['plan']['windows_per_level']}" if r["kind"] == "msd_run" else "")})
    note = f" Each child: address space capped at {data['limit_gb']} GB, {data.get('child_threads', 1)} torch thread(s)."
    return header(data, source) + note + "\n\n" + markdown_table(
        rows, list(rows[0]))


def layout_section(data: dict, source: str) -> str:
    columns = ["panorama", "prior", "method", "omega", "loss", "noise", "coherent", "uniform", "transitions",
               "spread", "discrepancy", "seam"]
    rows = [{**r, "coherent": f"{r['coherent_count']}/{r['seeds']}"} for r in data["horizon"]]
    first = data["horizon"][0]
    out = [header(data, source), "",
           f"{first['seeds']} seeds per row (the same seeds in every row), {first['steps']} DDIM steps, window 16, "
           "stride 4. coherent = one sky→ground transition in every column, sky on top; uniform = all sky or all "
           "ground; transitions = per column (1 = one horizon); spread = horizon row max − min over columns of the "
           "coherent ones; discrepancy = cross-scale discrepancy averaged over steps and level pairs; seam = mean "
           "|first − last column| / mean interior neighbour difference.", "",
           markdown_table(rows, columns)]
    if data.get("tiny_model"):
        out += ["", "Tiny SD model through the pipeline:", ""]
        disc = [r for r in data["tiny_model"] if r["part"] == "discrepancy"]
        out.append(markdown_table(disc, ["method", "omega", "levels", "discrepancy"]))
        seam = [r for r in data["tiny_model"] if r["part"] == "seam"]
        out += ["", markdown_table(seam, ["wrap", "latent_seam", "image_seam"])]
    return "\n".join(out)


def main() -> None:
    for name, section in (("speed", speed_section), ("memory", memory_section), ("layout", layout_section)):
        data, source = load(name)
        if data:
            print(f"\n<!-- {name} -->\n" + section(data, source))


if __name__ == "__main__":
    main()
