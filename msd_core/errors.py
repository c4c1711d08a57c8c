"""Errors with a machine-readable kind, shared by the CLI, the worker and the add-on."""


class MSDError(Exception):
    """Base class: ``kind`` names the failure for the worker protocol, ``str()`` is for people."""

    kind = "internal"


class BadInput(MSDError, ValueError):
    """A setting or argument is invalid; nothing was started or written."""

    kind = "bad_input"


class ModelNotFound(MSDError):
    """The model could not be found locally, and the Hub could not (or may not) be asked."""

    kind = "model_not_found"


class UnsupportedModelFile(BadInput):
    """A model file in a format we refuse to load (pickle-based checkpoints)."""


class Cancelled(MSDError):
    """The run was interrupted on request."""

    kind = "cancelled"
