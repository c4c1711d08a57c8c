"""bench/device.py, the one prepared GPU check, in its CPU smoke mode: it is run on a lent GPU only now and then,
so it must not rot between those runs (a regroup once broke it at start). Its SDXL and whole-world parts run
here on the tiny models' UNets."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_gpu_check_times_sdxl_windows_and_whole_worlds_phase_by_phase(tmp_path):
    out = tmp_path / "device.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "device.py"), "--device", "cpu", "--quick", "--parts", "sdxl", "worlds",
         "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == {} and report["skipped"] == [], report["errors"]

    sdxl = report["parts"]["sdxl"]
    assert sdxl["unet"]["parameters"] > 0 and sdxl["unet"]["fused_attention"]
    passes = {row["pass"]: row for row in sdxl["timings"]}
    assert set(passes) == {"forward", "exact fwd+bwd"}
    assert all(row["ms_per_window"] > 0 for row in passes.values())
    estimates = {(row["world"], row["config"]) for row in sdxl["estimates_360"]}
    assert ("512x256", "standard") in estimates  # 4096×2048 an eighth the size, as the tiny XL window is SDXL's

    rows = {row["world"]: row for row in report["parts"]["worlds"]["rows"]}
    assert len(rows) == 11
    # v0.8's second level beside today's: the same forwards, that level's backwards on top
    paper = rows["sd2 256x128 standard {'coarse_gradient': 'exact', 'steps': 4}"]
    today = rows["sd2 256x128 standard {'steps': 4}"]
    assert paper["forwards"] == today["forwards"] and paper["backwards"] > today["backwards"]
    sphere, flat = rows["sdxl 512x256 standard {'steps': 4}"], rows["sdxl 512x256 standard {'poles': 'flat', 'steps': 4}"]
    # An eighth of SDXL's 4096×2048 world on tiny-xl has its windows per level, and SD-2's 2048×1024 on tiny the same.
    assert sphere["windows_per_level"] == rows["sd2 256x128 standard {'steps': 4}"]["windows_per_level"] == [1, 2, 12]
    assert sphere["caps"] and not flat["caps"] and sphere["forwards"] > flat["forwards"]
    assert "pole caps" in sphere["phases"] and "pole caps" not in flat["phases"]
    for name, row in rows.items():
        assert row["finite"] and row["view_batch"] == 4, name  # the CPU's view batch
        levels = [phase for phase in row["phases"] if phase.startswith("level ")]
        assert len(levels) == len(row["windows_per_level"]), name
        # The phases are the loop's time, each ended by a synchronisation: together nearly all of it, never more.
        assert 0.5 * row["seconds"] < sum(row["phases"].values()) <= row["seconds"], (name, row)
