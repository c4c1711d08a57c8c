"""The README as a user reads it: short enough, its links resolve, and its scripting recipe runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

from blender_env import REPO_ROOT, extension_zip

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
MAX_LINES = 400


def test_readme_is_at_most_400_lines_with_the_artists_quick_start_first():
    assert len(README.splitlines()) <= MAX_LINES
    headings = re.findall(r"^## (.+)$", README, flags=re.MULTILINE)
    assert headings[:2] == ["Quick start (artists)", "Hardware and time"]
    quick_start = README.split("## Quick start (artists)")[1].split("## ")[0]
    steps = ["Get the zip", "Install it", "Install Worker", "Download Model", "Generate"]
    assert [quick_start.index(f"**{step}") for step in steps] == sorted(quick_start.index(f"**{step}") for step in steps)
    assert "A CPU is for the tiny test model only" in README


def test_readme_links_to_files_that_exist():
    for target in re.findall(r"\]\(((?:docs|msd_core)/[^)#]+)", README):
        assert (REPO_ROOT / target).is_file(), target


def recipe() -> str:
    """The Python block of the Scripting section, exactly as the README shows it."""
    section = README.split("## 6. Scripting")[1].split("\n## ")[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return code


def test_the_scripting_recipe_runs_as_written_from_any_folder_and_again_in_a_second_session(tmp_path):
    """Only its two paths are set (the zip, the worker's Python), as the README asks; it runs from
    another folder, writes only into its own folder (never Blender's user configuration), and a
    second run enables the extension the first one installed."""
    code = recipe()
    paths = {
        'Path("~/msd-panorama/dist/msd_panorama-0.1.0.zip")': f"Path({str(extension_zip())!r})",
        'Path("~/msd-panorama/.venv/bin/python")': f"Path({sys.executable!r})",
    }
    for placeholder, real in paths.items():
        assert code.count(placeholder) == 1
        code = code.replace(placeholder, real)
    elsewhere, temp = tmp_path / "somewhere" / "else", tmp_path / "tmp"
    elsewhere.mkdir(parents=True)
    temp.mkdir()
    (elsewhere / "first_run.py").write_text(code, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "BLENDER_USER_RESOURCES"}  # the user's own
    env["TMPDIR"] = str(temp)
    work = temp / "msd-first-run"
    for session in ("first", "second"):
        result = subprocess.run(
            [sys.executable, "first_run.py"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
        )
        assert result.returncode == 0, f"{session} session:\n{result.stdout}\n{result.stderr}"
        assert ("Installed" in result.stdout) == (session == "first"), result.stdout
        assert (work / "first.blend").is_file()
        assert len(list((work / "panoramas").glob("msd_*.png"))) == (2 if session == "first" else 4)
    assert (work / "blender-user" / "extensions" / "user_default" / "msd_panorama" / "__init__.py").is_file()
    assert sorted(path.name for path in elsewhere.iterdir()) == ["first_run.py"]
    assert [path.name for path in temp.iterdir() if path.name.startswith("msd")] == ["msd-first-run"]  # torch keeps its caches
