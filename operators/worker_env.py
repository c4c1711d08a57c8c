"""The worker's Python environment: install it (a venv with torch and diffusers) and check it.

Blender's own Python has no torch, so the generator runs in another Python. "Install Worker" makes a
virtual environment in the extension's user folder with a system Python ≥ 3.10 and pip-installs
msd_core's worker requirements into it, one command after another, polled from a timer so Blender
stays responsive; the output goes to a log file next to it. Subprocesses never use a shell.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import bpy
from bpy.types import Operator

from ..msd_core.errors import BadInput
from ..msd_core.worker.requirements import WORKER_REQUIREMENTS
from ..preferences import ADDON_DIR, get_preferences, managed_worker_python, user_folder, worker_python

MIN_PYTHON = (3, 10)
BASE_PYTHON_NAMES = ("python3.13", "python3.12", "python3.11", "python3.10", "python3", "python")
CHECK_TIMEOUT = 120.0  # seconds; importing torch and diffusers the first time can take a while
INSTALL_POLL_INTERVAL = 0.5
LOG_TAIL_BYTES = 4096
FAMILY_NAMES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}


@dataclass
class WorkerCheck:
    ok: bool
    message: str
    details: dict = field(default_factory=dict)


def check_worker(python: str, timeout: float = CHECK_TIMEOUT) -> WorkerCheck:
    """Run ``python`` and report whether torch and diffusers import and which device torch sees."""
    if not python:
        return WorkerCheck(False, "the worker is not installed: click Install Worker or set Worker Python in the preferences")
    try:
        # In the extension's folder, so `-m` finds the msd_core shipped with it (as the worker does).
        result = subprocess.run(
            [python, "-m", "msd_core.worker.environment"], cwd=ADDON_DIR, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError:
        return WorkerCheck(False, f"worker Python not found: {python}")
    except PermissionError:
        return WorkerCheck(False, f"worker Python is not executable: {python}")
    except OSError as exc:
        return WorkerCheck(False, f"cannot run the worker Python {python}: {exc.strerror}")
    except subprocess.TimeoutExpired:
        return WorkerCheck(False, f"the worker Python {python} did not answer within {timeout:g} s")
    try:
        info = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return WorkerCheck(False, f"{python} is not a working Python (exit status {result.returncode}): {last}")
    version = tuple(int(part) for part in info["python"].split(".")[:2])
    if version < MIN_PYTHON:
        return WorkerCheck(False, f"{python} is Python {info['python']}; the worker needs 3.10 or newer", info)
    missing = [f"{name} is missing ({info[name + '_error']})" for name in ("torch", "diffusers") if info[name] is None]
    if missing:
        return WorkerCheck(False, f"{python}: " + "; ".join(missing), info)
    families = ", ".join(FAMILY_NAMES.get(family, family) for family in info.get("families", ["sd"]))
    return WorkerCheck(
        True,
        f"Python {info['python']}, torch {info['torch']}, diffusers {info['diffusers']}, device {info['device']}; "
        f"models: {families}",
        info,
    )


def python_version(python: str) -> tuple[int, int] | None:
    """(major, minor) of a Python executable, None if it does not run."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, timeout=30
        )
        major, minor = result.stdout.split()
        return int(major), int(minor)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def find_base_python(preferred: str = "") -> str:
    """A Python ≥ 3.10 to create the worker environment with: ``preferred`` if given, else the first
    one found on PATH (then the Python running Blender). Raises BadInput when there is none."""
    if preferred:
        version = python_version(preferred)
        if version is None or version < MIN_PYTHON:
            found = "does not run" if version is None else "is Python %d.%d" % version
            raise BadInput(f"the Base Python {preferred} {found}; the worker needs Python 3.10 or newer")
        return preferred
    candidates = [shutil.which(name) for name in BASE_PYTHON_NAMES] + [sys.executable]
    for candidate in dict.fromkeys(c for c in candidates if c):
        version = python_version(candidate)
        if version is not None and version >= MIN_PYTHON:
            return candidate
    raise BadInput("no Python 3.10 or newer found on this system: install one, or set Base Python in the preferences")


def install_commands(base_python: str, env_dir: str, env_python: str) -> list[tuple[str, list[str]]]:
    """(description, argv) of each step that makes the worker environment."""
    return [
        ("Creating the environment", [base_python, "-m", "venv", "--clear", env_dir]),
        ("Updating pip", [env_python, "-m", "pip", "install", "--upgrade", "pip"]),
        ("Installing PyTorch and diffusers", [env_python, "-m", "pip", "install", *WORKER_REQUIREMENTS]),
    ]


class CommandSequence:
    """Runs commands one after another without waiting: each poll() starts the next one when the
    previous has ended. All output goes to ``log_path``."""

    def __init__(self, steps: list[tuple[str, list[str]]], log_path: str):
        self.steps = steps
        self.log_path = log_path
        self.index = -1
        self.process: subprocess.Popen | None = None
        self.error = ""
        self._log = open(log_path, "w", encoding="utf-8")

    @property
    def description(self) -> str:
        return self.steps[max(self.index, 0)][0]

    @property
    def progress(self) -> float:
        return max(self.index, 0) / len(self.steps)

    def poll(self) -> str:
        """'RUNNING', 'FINISHED' (every command succeeded) or 'FAILED' (``error`` says why)."""
        if self.error:
            return 'FAILED'
        if self.process is not None:
            returncode = self.process.poll()
            if returncode is None:
                return 'RUNNING'
            if returncode != 0:
                return self._fail(f"{self.description} failed (exit status {returncode}): {self.last_log_line()}")
        self.index += 1
        if self.index == len(self.steps):
            self.process = None
            self._log.close()
            return 'FINISHED'
        description, command = self.steps[self.index]
        self._log.write(f"$ {' '.join(command)}\n")
        self._log.flush()
        try:
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            return self._fail(f"{description} failed: cannot run {command[0]}: {exc.strerror}")
        return 'RUNNING'

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait()
        self._fail("stopped")

    def last_log_line(self) -> str:
        self._log.flush()
        with open(self.log_path, "rb") as log:
            log.seek(max(0, os.path.getsize(self.log_path) - LOG_TAIL_BYTES))
            lines = log.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else ""

    def _fail(self, message: str) -> str:
        self.error = self.error or message
        if not self._log.closed:
            self._log.close()
        return 'FAILED'


@dataclass
class InstallState:
    job: CommandSequence | None = None
    message: str = ""  # the outcome of the last install, or of the last check
    failed: bool = False


install_state = InstallState()


def start_install(prefs) -> CommandSequence:
    """Start making the worker environment; raises BadInput when it cannot start."""
    if not bpy.app.online_access:
        raise BadInput(
            "online access is disabled: installing the worker downloads PyTorch and diffusers from PyPI. "
            "Allow it in Preferences › System › Network, or set Worker Python to a Python that has them"
        )
    base_python = find_base_python(bpy.path.abspath(prefs.install_python))
    folder = user_folder()
    steps = install_commands(base_python, os.path.join(folder, "worker"), managed_worker_python())
    install_state.job = CommandSequence(steps, os.path.join(folder, "install-worker.log"))
    install_state.message, install_state.failed = "", False
    return install_state.job


def _poll_install():
    """bpy.app.timers callback: advance the install; None unregisters the timer when it is over."""
    job = install_state.job
    if job is None:
        return None
    outcome = job.poll()
    for window in bpy.context.window_manager.windows:
        for area in window.screen.areas:
            area.tag_redraw()
    if outcome == 'RUNNING':
        return INSTALL_POLL_INTERVAL
    install_state.job = None
    install_state.failed = outcome == 'FAILED'
    install_state.message = job.error + f" (log: {job.log_path})" if install_state.failed else "Worker installed"
    return None


class MSD_OT_install_worker(Operator):
    """Create a Python environment with PyTorch and diffusers for the generator (downloads several GB)"""

    bl_idname = "msd.install_worker"
    bl_label = "Install Worker"

    @classmethod
    def poll(cls, context):
        return install_state.job is None

    def execute(self, context):
        try:
            start_install(get_preferences(context))
        except BadInput as exc:
            self.report({'ERROR'}, str(exc))
            return {'CANCELLED'}
        bpy.app.timers.register(_poll_install, first_interval=0.0)
        self.report({'INFO'}, f"Installing the worker; log: {install_state.job.log_path}")
        return {'FINISHED'}


class MSD_OT_check_worker(Operator):
    """Check that the worker's Python has torch and diffusers, and which device it would use"""

    bl_idname = "msd.check_worker"
    bl_label = "Check Worker"

    def execute(self, context):
        result = check_worker(worker_python(get_preferences(context)))
        install_state.message, install_state.failed = result.message, not result.ok
        self.report({'INFO'} if result.ok else {'ERROR'}, result.message)
        return {'FINISHED'} if result.ok else {'CANCELLED'}


classes = (MSD_OT_install_worker, MSD_OT_check_worker)


def unregister():
    if bpy.app.timers.is_registered(_poll_install):
        bpy.app.timers.unregister(_poll_install)
    if install_state.job is not None:
        install_state.job.stop()
        install_state.job = None
