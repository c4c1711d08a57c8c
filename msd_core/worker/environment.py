"""What a Python environment can offer the worker: ``python -m msd_core.worker.environment`` prints it as JSON.

The add-on's "Check Worker" runs this with the worker's Python. It must run in environments that lack
torch or diffusers (to say so), so it imports them inside ``describe`` only and keeps to plain syntax.
"""

import json
import os
import sys


def auto_device(torch) -> str:
    """The device "auto" means: CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def physical_cores() -> int:
    """CPU cores this process may use, counting each physical core once (hyper-threads share a core's
    arithmetic units, so they add little to torch's throughput)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        usable = os.cpu_count() or 1
    cores = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as file:
            package = None
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    package = value.strip()
                elif key.strip() == "core id":
                    cores.add((package, value.strip()))
    except OSError:
        pass
    return max(1, min(usable, len(cores) or usable))


def threads(requested=None):
    """torch's CPU thread count: ``requested`` if given (≥ 1; at most the machine's logical cores: more
    threads only contend), else OMP_NUM_THREADS if set, else one thread per physical core less one,
    left to Blender and the desktop: max(1, cores − 1)."""
    if requested:
        return min(requested, os.cpu_count() or requested)
    try:
        configured = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        configured = 0
    return configured if configured > 0 else max(1, physical_cores() - 1)


MAX_PID = 2**31 - 1  # pids are C ints; Linux's pid_max is at most 2**22


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (another user's counts as alive). On Windows, where signal 0
    would be CTRL_C_EVENT, every process counts as alive: nothing is ever swept there."""
    if sys.platform == "win32":
        return True
    if not 0 < pid <= MAX_PID:  # a name anyone can give a file: no process has such an id (os.kill would overflow)
        return True  # not a pid we know: counted as alive, so its file is never swept
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # another user's, or nothing we may touch
        return True
    return True


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
    if "diffusers" in modules:  # the model families this diffusers can load and convert
        info["families"] = ["sd"] + (["sdxl"] if hasattr(modules["diffusers"], "StableDiffusionXLPipeline") else [])
    if "torch" in modules:
        torch = modules["torch"]
        device = auto_device(torch)
        info["device"] = "cuda (%s)" % torch.cuda.get_device_name(0) if device == "cuda" else device
    return info


if __name__ == "__main__":
    print(json.dumps(describe()))
