"""Shared helpers and fixtures for tests that run Blender as a module (bpy, headless).

The extension is built from the working tree with Blender's own builder and installed into the
session's temporary user resources (tests/conftest.py points BLENDER_USER_RESOURCES there before
bpy is imported), exactly as a user would install the zip. Use in a test module:

    from blender_env import MODULE, blender, extension   # noqa: F401  (fixtures)

``extension`` gives the enabled add-on module (bl_ext.user_default.msd_panorama) on an empty scene;
``blender`` gives an empty scene without requiring the extension.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import bpy

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ID = "msd_panorama"
REPO = "user_default"
MODULE = f"bl_ext.{REPO}.{PACKAGE_ID}"


def blender_ext_cli() -> Path:
    """Blender's extension command line tool (validate/build), shipped inside the bpy module."""
    bpy_dir = Path(importlib.util.find_spec("bpy").origin).parent
    found = sorted(bpy_dir.glob("*/scripts/addons_core/bl_pkg/cli/blender_ext.py"))
    if not found:
        raise FileNotFoundError(f"blender_ext.py not found under {bpy_dir}")
    return found[-1]


def run_blender_ext(*args: str) -> subprocess.CompletedProcess:
    """Run blender_ext.py with this Python (no shell); output captured as text."""
    return subprocess.run(
        [sys.executable, str(blender_ext_cli()), *args], capture_output=True, text=True, timeout=120
    )


def build_extension_zip(output_dir: str | Path, source_dir: str | Path = REPO_ROOT) -> Path:
    """Build the extension zip from ``source_dir`` with Blender's builder; return the zip's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = run_blender_ext("build", "--source-dir", str(source_dir), "--output-dir", str(output_dir))
    zips = sorted(output_dir.glob(f"{PACKAGE_ID}-*.zip"))
    if result.returncode != 0 or not zips:
        raise RuntimeError(f"extension build failed:\n{result.stdout}\n{result.stderr}")
    return zips[-1]


def install_extension(zip_path: str | Path) -> str:
    """Install and enable the zip in the user_default repository; return the add-on module name."""
    result = bpy.ops.extensions.package_install_files(
        filepath=str(zip_path), repo=REPO, enable_on_install=True
    )
    if result != {"FINISHED"} or not is_enabled():
        raise RuntimeError(f"installing {zip_path} failed: {result}")
    return MODULE


def repo_directory() -> Path:
    """The user_default repository's folder (repositories are keyed by name; REPO is the module)."""
    return Path(next(repo.directory for repo in bpy.context.preferences.extensions.repos if repo.module == REPO))


def uninstall_extension() -> None:
    """Remove the installed extension (disables it first, as Blender's UI does)."""
    result = bpy.ops.extensions.package_uninstall(repo_directory=str(repo_directory()), pkg_id=PACKAGE_ID)
    if result != {"FINISHED"}:
        raise RuntimeError(f"uninstalling {PACKAGE_ID} failed: {result}")


def installed_dir() -> Path:
    """Where Blender unpacked the extension (contains __init__.py and msd_core/)."""
    return repo_directory() / PACKAGE_ID


def is_enabled() -> bool:
    return MODULE in bpy.context.preferences.addons


_zip_cache: dict[str, Path] = {}


def extension_zip() -> Path:
    """The zip of the working tree, built once per test session."""
    if "zip" not in _zip_cache:
        folder = tempfile.mkdtemp(prefix="msd-ext-zip-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _zip_cache["zip"] = build_extension_zip(folder)
    return _zip_cache["zip"]


def ensure_installed() -> str:
    """Install (once) and enable the extension; return its module name."""
    if not is_enabled():
        install_extension(extension_zip())
    return MODULE


def reset_scene() -> None:
    """An empty file, keeping preferences: read_homefile keeps the installed extension enabled,
    read_factory_settings would disable it."""
    bpy.ops.wm.read_homefile(use_empty=True)


def addon_module():
    return sys.modules[MODULE]


def addon_preferences():
    return bpy.context.preferences.addons[MODULE].preferences


@pytest.fixture
def blender():
    """An empty scene (no world, no objects); the extension's state is left as it is."""
    reset_scene()
    yield bpy.context
    reset_scene()


@pytest.fixture
def extension(blender):
    """The enabled extension's module on an empty scene."""
    ensure_installed()
    return addon_module()
