"""`msd-panorama batch`: a job file with the tiny model, one bad job among good ones, a re-run that skips
the finished ones, and the same file through a local Ray instance with the same outputs."""

import json

import pytest

from msd_core import batch, cli
from msd_core.imageio import pngmeta

GOOD = {"prompt": "a lake", "model": "tiny", "width": 128, "height": 64, "steps": 2, "device": "cpu", "view_batch": 4}


def job_lines():
    return [
        {"op": "generate", "settings": {**GOOD, "seed": 1}, "output": "first.png"},
        {"settings": {**GOOD, "seed": 2, "omega": -1}, "output": "bad.png"},  # invalid: fails, the queue goes on
        "this line is not JSON",
        {"op": "variations", "settings": GOOD, "count": 2, "output": "drafts.png"},  # not a generate request
        {"id": "second", "settings": {**GOOD, "seed": 3, "windows": "dense"}, "output": "second.png"},
        {"settings": {**GOOD, "seed": 4}, "output": "second.png"},  # the same output as the line before
    ]


def write_jobs(folder):
    path = folder / "night.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n\n" for line in job_lines()))
    return path


def outcomes(path):
    return [json.loads(line) for line in (path.parent / (path.name + batch.LOG_SUFFIX)).read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local")
    jobs = write_jobs(folder)
    assert cli.main(["batch", str(jobs)]) == 1  # a job failed
    return jobs


def test_local_batch_runs_the_good_jobs_and_records_the_bad(local_run, capsys):
    folder = local_run.parent
    assert sorted(p.name for p in folder.glob("*.png")) == ["first.png", "second.png"]
    for name, seed in (("first.png", 1), ("second.png", 3)):
        stored = json.loads(pngmeta.read_text_chunks(folder / name)[pngmeta.SETTINGS_KEY])
        assert stored["seed"] == seed and stored["prompt"] == "a lake"
    by_line = {entry["line"]: entry for entry in outcomes(local_run)}
    assert sorted(by_line) == [1, 3, 5, 7, 9, 11]  # blank lines are not jobs
    assert by_line[1]["status"] == by_line[9]["status"] == "done"
    assert by_line[3] == {**by_line[3], "status": "failed", "kind": "bad_input"}
    assert "omega must be a number from 0" in by_line[3]["message"]
    assert "not a JSON request" in by_line[5]["message"]
    assert 'op must be "generate"' in by_line[7]["message"]
    assert by_line[11]["message"] == "line 9 writes the same output"


def test_rerun_skips_finished_jobs_and_retries_failed_ones(local_run, capsys):
    folder = local_run.parent
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    summary = batch.run_batch(local_run)
    # Line 11 now finds its output written (by line 9): it counts as done too.
    assert (summary.done, summary.skipped, summary.failed) == (0, 3, 3)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == before  # nothing redone or rewritten
    printed = capsys.readouterr().err
    assert "batch: [6/6]" in printed and "0 done, 3 skipped (output exists), 3 failed" in printed
    # Fixing the bad line and running again finishes only it.
    lines = local_run.read_text().splitlines()
    lines[2] = json.dumps({"settings": {**GOOD, "seed": 2}, "output": "bad.png"})
    local_run.write_text("\n".join(lines) + "\n")
    summary = batch.run_batch(local_run)
    assert (summary.done, summary.skipped) == (1, 3) and (folder / "bad.png").is_file()


def test_job_file_limits(tmp_path, monkeypatch):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"output": "' + b"x" * (2**20) + b'.png"}\n')
    [(line, request, problem)] = batch.read_requests(path)
    assert request is None and "the limit is 1048576" in problem
    monkeypatch.setattr(batch, "MAX_JOBS", 2)
    path.write_text('{"output": "a.png"}\n' * 3)
    with pytest.raises(batch.BadInput, match="more than 2 jobs"):
        batch.read_requests(path)
    with pytest.raises(batch.BadInput, match="cannot read the job file"):
        batch.read_requests(tmp_path / "missing.jsonl")


def test_same_file_through_local_ray_gives_the_same_outputs(local_run, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is the optional cluster extra: pip install '.[cluster]'")
    jobs = write_jobs(tmp_path)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20)
    try:
        summary = batch.run_batch(jobs, ray_address="local", workers=2)
    finally:
        ray.shutdown()
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, 4)
    assert {entry["line"]: entry["status"] for entry in outcomes(jobs)} == {
        1: "done", 3: "failed", 5: "failed", 7: "failed", 9: "done", 11: "failed"}
    for name in ("first.png", "second.png"):
        assert (tmp_path / name).read_bytes() == (local_run.parent / name).read_bytes()


def test_two_local_workers_each_with_a_warm_model_share_the_queue(local_run, tmp_path):
    """--workers 2 here: two processes (one per GPU where there are GPUs), the same outputs as one."""
    jobs = tmp_path / "night.jsonl"
    jobs.write_text("".join(json.dumps({"settings": {**GOOD, "seed": seed}, "output": f"job{seed}.png"}) + "\n"
                            for seed in (1, 3)))
    summary = batch.run_batch(jobs, workers=2)
    assert (summary.done, summary.failed) == (2, 0)
    assert (tmp_path / "job1.png").read_bytes() == (local_run.parent / "first.png").read_bytes()
    assert (tmp_path / "job3.png").read_bytes() != (tmp_path / "job1.png").read_bytes()
