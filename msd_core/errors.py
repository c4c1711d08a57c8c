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


class NotDownloaded(ModelNotFound):
    """A Hugging Face model that is not (completely) in the local cache: download it first."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(
            f"model {model} is not downloaded yet: download it first (Download Model in Blender, "
            f"`msd-panorama models download {model}` in a shell)"
        )


class NetworkError(MSDError):
    """The Hugging Face Hub could not be reached, or the network is off limits (offline mode)."""

    kind = "network"


class UnsupportedModelFile(BadInput):
    """A model file in a format we refuse to load (pickle-based checkpoints)."""


class Cancelled(MSDError):
    """The run was interrupted on request."""

    kind = "cancelled"
