"""Session-wide test environment: nothing is written to the home folder and nothing reaches the Hub."""

import os
import tempfile

_ROOT = tempfile.mkdtemp(prefix="msd-tests-")
os.environ.setdefault("BLENDER_USER_RESOURCES", os.path.join(_ROOT, "blender"))
os.environ.setdefault("MSD_PANORAMA_CACHE", os.path.join(_ROOT, "cache"))
os.environ["HF_HUB_OFFLINE"] = "1"
# One thread per process: tests start workers beside the test process on 2-core machines, and
# oversubscribed torch threads made tiny-model runs about 20× slower there.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["HF_HOME"] = os.path.join(_ROOT, "hf")
