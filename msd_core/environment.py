"""What a Python environment can offer the worker: ``python -m msd_core.environment`` prints it as JSON.

The add-on's "Check Worker" runs this with the worker's Python. It must run in environments that lack
torch or diffusers (to say so), so it imports them inside ``describe`` only and keeps to plain syntax.
"""

import json
import sys


def auto_device(torch) -> str:
    """The device "auto" means: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def describe() -> dict:
    """Python version, torch and diffusers versions (None with an "<name>_error" when missing), device."""
    info = {"python": "%d.%d.%d" % sys.version_info[:3]}
    modules = {}
    for name in ("torch", "diffusers"):
        try:
            modules[name] = __import__(name)
            info[name] = modules[name].__version__
        except Exception as exc:  # a broken install fails in many ways; report it, whatever it is
            info[name] = None
            info[name + "_error"] = "%s: %s" % (type(exc).__name__, exc)
    if "torch" in modules:
        torch = modules["torch"]
        device = auto_device(torch)
        info["device"] = "cuda (%s)" % torch.cuda.get_device_name(0) if device == "cuda" else device
    return info


if __name__ == "__main__":
    print(json.dumps(describe()))
