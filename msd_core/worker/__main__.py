"""`python -m msd_core.worker`: start the generator process (``process``).

Some libraries print to stdout when they are imported, so the real stdout is claimed for the protocol
before torch is imported; a Python without the worker's packages exits with one line and
EXIT_MISSING_PACKAGES, which the client turns into its message.
"""

import logging
import os
import signal
import sys

from .client import EXIT_MISSING_PACKAGES

MISSING_PACKAGES_HINT = (
    "install the worker (Install Worker in Blender's Panorama panel) or point Worker Python at a Python with "
    "the packages of msd_core/worker/requirements.py"
)


def take_stdout():
    """Keep the real stdout for the protocol; send everything else written to stdout to stderr."""
    sys.stdout.flush()
    protocol_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # C-level writes to fd 1 too
    sys.stdout = sys.stderr
    return open(protocol_fd, "w", encoding="utf-8", newline="\n", buffering=1)


protocol_stream = take_stdout()
# Ctrl+C in a terminal reaches every process of its group: a worker driven through pipes leaves it to its
# client (which cancels the run and shuts it down) instead of dying with a traceback mid-request.
if not sys.stdin.isatty():
    signal.signal(signal.SIGINT, signal.SIG_IGN)

try:
    import diffusers  # noqa: F401  (and torch, transformers): checked here, at start-up
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:
    # One line for the client to show (Blender reports it), not an import traceback.
    sys.stderr.write(f"{sys.executable} cannot run the worker: {exc}; {MISSING_PACKAGES_HINT}\n")
    sys.exit(EXIT_MISSING_PACKAGES)

from .process import main  # noqa: E402

status = main(protocol_stream=protocol_stream)
# Everything is cleaned up and "bye" was sent: skip the interpreter's teardown, which collects every
# torch and diffusers object and can take seconds on a busy machine, while the client waits.
logging.shutdown()
sys.stderr.flush()
os._exit(status)
