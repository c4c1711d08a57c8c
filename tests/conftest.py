"""Session-wide test environment: nothing is written to the home folder and nothing reaches the Hub."""

import atexit
import os
import shutil
import subprocess
import tempfile

import pytest

_ROOT = tempfile.mkdtemp(prefix="msd-tests-")
# Registered before bpy is imported, so it runs after Blender's own exit handlers (atexit runs in reverse).
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
os.environ.setdefault("BLENDER_USER_RESOURCES", os.path.join(_ROOT, "blender"))
os.environ.setdefault("MSD_PANORAMA_CACHE", os.path.join(_ROOT, "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread per process: tests start workers beside the test process on 2-core machines, and
# oversubscribed torch threads made tiny-model runs about 20× slower there.
os.environ["OMP_NUM_THREADS"] = "1"
# Workers keep their usual priority: niced beside other busy test processes, they would crawl.
os.environ["MSD_WORKER_NICENESS"] = "0"
os.environ["HF_HOME"] = os.path.join(_ROOT, "hf")


@pytest.fixture
def unwritable_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    # Root ignores permission bits; the immutable attribute stops it too.
    as_root = os.geteuid() == 0
    if as_root and (not shutil.which("chattr") or subprocess.run(["chattr", "+i", folder], capture_output=True).returncode):
        pytest.skip("running as root where chattr +i is unavailable: no way to make a folder unwritable")
    yield folder
    if as_root:
        subprocess.run(["chattr", "-i", folder], check=True)
    folder.chmod(0o755)


@pytest.fixture
def no_unpickling(monkeypatch):
    """torch.load and every pickle entry point fail the test if anything calls them (no user file, model
    or LoRA, may ever be unpickled)."""
    import pickle

    import torch

    calls = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: a user's file must never be unpickled")

        return call

    for module, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden(f"{module.__name__}.{name}"))
    yield calls
    assert calls == []
