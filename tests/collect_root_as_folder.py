"""pytest plugin (loaded with -p from pyproject.toml): collect the repository root as a folder.

The root is the Blender extension, so it has an ``__init__.py``; pytest would collect it as a package
and import the add-on (and bpy) before any test. Collect it as a plain folder instead.
"""

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pytest_collect_directory(path, parent):
    if path.resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
