"""Print the result tables of docs/results.md (Markdown) from bench/results/*.json.

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


def header(data: dict, source: str, threads: int | None = None) -> str:
    env = data["environment"]
    threads = env["torch_threads"] if threads is None else threads
    load_start = ", ".join(f"{v:.1f}" for v in env["loadavg"])
    load_end = ", ".join(f"{v:.1f}" for v in data["environment_end"]["loadavg"])
    return (f"*{source}: `{env['command']}`, {env['date']}, {env['cpu_count']} CPUs, torch {env['torch']} "
            f"({threads} thread(s)), diffusers {env['diffusers']}; load average {load_start} at the "
            f"start, {load_end} at the end.*")


def speed_main(data: dict, source: str) -> str:
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
    return "\n".join(out) + "\n" + markdown_table(rows, list(rows[0]))


def speed_growth(data: dict) -> str:
    growth = [{"area": r["area"], "px": f"{r['width']}×{r['height']}", "method": r["method"],
               "windows per level": r["windows_per_level"], "UNet window evals": r["unet_windows"],
               "median s": r["median"], "ms / window eval": r["ms_per_window"]} for r in data["growth"]]
    fits = "; ".join(
        f"{name}: a = {f['seconds_per_window'] * 1000:.2f} ms, b = {f['intercept']:.2f} s, R² = {f['r2']:.4f}"
        for name, f in data["growth_fits"].items())
    return (markdown_table(growth, list(growth[0])) +
            f"\n\nLeast-squares fit seconds = a · (UNet window evaluations) + b: {fits}.")


def speed_overhead(data: dict) -> str:
    o = data["overhead"]
    rows = []
    for name in ("our MD", "MSD fast", "MSD exact"):
        run = min(o[name]["runs"], key=lambda r: abs(r["overhead_share"] - o[name]["median_share"]))
        rows.append({"method": name, "outside models (median)": f"{o[name]['median_share']:.1%}",
                     "min–max": f"{o[name]['min_share']:.1%}–{o[name]['max_share']:.1%}", "total s": run["total"],
                     "UNet fwd s": run["unet"], "UNet bwd s": run["unet_backward"], "VAE s": run["vae"],
                     "text s": run["text_encoder"]})
    top = "\n".join(f"- {e['self_seconds'] * 1000:.1f} ms {e['function']}" for e in o["profile_top_self_time"][:5])
    return (f"512×128 px, 5 steps, {len(o['our MD']['runs'])} runs each:\n\n" + markdown_table(rows, list(rows[0]))
            + "\n\nLargest self times in msd_core (cProfile, one MSD fast run, built-ins charged to their msd_core "
              "caller):\n\n" + top)


def speed_worker(data: dict) -> str:
    w = data["worker"]
    return (f"Worker (256×128 px, 5 steps): start-up to \"ready\" {w['start_to_ready']:.1f} s; generate → first "
            f"progress event: cold {w['cold_first_progress']:.2f} s (model load {w['cold_worker_timings']['load']:.2f} s), "
            f"warm {w['warm_first_progress']:.2f} s and {w['warm_again_first_progress']:.2f} s (load 0 s, the "
            f"\"loading\" event says warm={w['warm_loading_warm_flag']}); a whole request: cold "
            f"{w['cold_total']:.2f} s, warm {w['warm_total']:.2f} s.")


def speed_section(data: dict, source: str) -> str:
    return "\n\n".join([speed_main(data, source), speed_growth(data), speed_overhead(data), speed_worker(data)])


def memory_section(data: dict, source: str) -> str:
    rows = []
    for r in data["rows"]:
        rows.append({"what": r["kind"], "size px": f"{r['width']}×{r['height']}", "ok": r["ok"],
                     "tile (latent px)": r.get("tile"), "seconds": r["seconds"],
                     "RSS after load MiB": r.get("baseline_rss_mib"), "peak RSS MiB": r.get("peak_rss_mib"),
                     "peak − load MiB": r.get("peak_above_baseline_mib"),
                     "note": r.get("error") or (f"{r['steps']} step(s), levels {r['plan']['levels']}, windows/level "
                                                f"{r['plan']['windows_per_level']}" if r["kind"] == "msd_run" else "")})
    threads = data.get("child_threads", 1)
    note = f" Each measurement in its own process, address space capped at {data['limit_gb']} GB."
    return header(data, source, threads) + note + "\n\n" + markdown_table(
        rows, list(rows[0]))


def layout_section(data: dict, source: str) -> str:
    rows = data["horizon"]
    first = rows[0]
    seeds = first["seeds"]

    def cell(r):
        return f"{r['coherent_count']}/{seeds} ({r['transitions']:.2f})"

    def find(**match):
        return [r for r in rows if all(r.get(k) == v for k, v in match.items())]

    out = [header(data, source), "",
           f"{seeds} seeds per cell (the same seeds everywhere), {first['steps']} DDIM steps, window 16, stride 4. "
           f"Cells: coherent panoramas / seeds (mean sky→ground transitions per column; 1 = one horizon).", ""]
    md = find(panorama="64×64", prior="wide", omega=0.0)[0]
    omegas = sorted({r["omega"] for r in find(panorama="64×64", prior="wide", noise="literal")})
    sweep = []
    for gradient in ("fast", "exact"):
        for loss in ("projection", "mean", "mean-sd", "sum"):
            cells = {f"ω={o:g}": cell(md) if o == 0 else next(
                (cell(r) for r in find(panorama="64×64", prior="wide", noise="literal", gradient=gradient, loss=loss,
                                       omega=o)), "") for o in omegas}
            if any(cells[k] for k in cells if k != "ω=0"):
                sweep.append({"gradient": gradient, "omega_loss": loss, **cells})
    out += ["**ω sweep**, 64×64, wide prior (ω = 0 is MultiDiffusion; mean-sd divides by SD's coarse-crop "
            "size 4·32·32 instead of this prior's 8·8):", "", markdown_table(sweep, list(sweep[0])), ""]

    shapes = []
    for panorama in dict.fromkeys(r["panorama"] for r in rows):
        group = find(panorama=panorama, prior="wide", noise="literal")
        entry = {"panorama (latent px)": panorama}
        for label, match in (("MD", {"omega": 0.0}), ("MSD fast ω=10", {"omega": 10.0, "gradient": "fast", "loss": "projection"}),
                             ("MSD exact ω=10", {"omega": 10.0, "gradient": "exact", "loss": "projection"}),
                             ("MSD exact-1f ω=10", {"omega": 10.0, "gradient": "exact-1f", "loss": "projection"}),
                             ("MSD fast-2f ω=10", {"omega": 10.0, "gradient": "fast-2f", "loss": "projection"})):
            hit = [r for r in group if all(r.get(k) == v for k, v in match.items())]
            entry[label] = cell(hit[0]) if hit else ""
            if hit and label == "MD":
                entry["MD seam"] = hit[0]["seam"]
            if hit and label == "MSD fast ω=10":
                entry["MSD fast seam"] = hit[0]["seam"]
                entry["horizon spread (rows)"] = hit[0]["spread"]
        shapes.append(entry)
    out += ["**Shapes**, wide prior (exact-1f: exact gradient, Φ(x̂) reusing ε(x), 1 forward + 1 backward; "
            "fast-2f: fast gradient, a fresh model call at x̂, 2 forwards; seam = mean |first − last column| / mean interior neighbour difference; ≈ 1 "
            "means the 0/360° edge looks like any other neighbouring pair; horizon spread = max − min horizon row "
            "over the columns of the coherent panoramas):", "", markdown_table(shapes, list(shapes[0])), ""]

    variants = []
    for prior in ("wide", "narrow"):
        for noise in ("literal", "fresh", "snr"):
            for gradient in ("fast", "exact", "exact-1f", "fast-2f"):
                group = find(panorama="64×64", prior=prior, noise=noise, gradient=gradient, loss="projection")
                if not group:
                    continue
                entry = {"prior": prior, "coarse-level noise": noise, "gradient": gradient,
                         "MD": cell(find(panorama="64×64", prior=prior, omega=0.0)[0])}
                for o in omegas[1:]:
                    hit = [r for r in group if r["omega"] == o]
                    entry[f"ω={o:g}"] = cell(hit[0]) if hit else ""
                    if hit and o == 10.0:
                        entry["uniform at ω=10"] = f"{round(hit[0]['uniform'] * seeds)}/{seeds}"
                        entry["discrepancy at ω=10"] = hit[0]["discrepancy"]
                variants.append(entry)
    out += ["**Prior and coarse-level noise handling**, 64×64, projection loss (discrepancy = cross-scale "
            f"discrepancy averaged over steps and level pairs; MultiDiffusion's: {md['discrepancy']:.3f}):", "",
            markdown_table(variants, list(variants[0]))]
    if data.get("tiny_model"):
        out += ["", "**Tiny SD model** through the pipeline (cross-scale discrepancy averaged over steps and level "
                    "pairs; seam ratio of the latent and of the decoded image):", ""]
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
