"""Errors with a machine-readable kind, shared by the CLI, the worker and the add-on.

An error about one setting also carries ``field``, the setting's name (as in GenerationSettings and the
worker protocol), and is written as a template in which ``{field}`` stands for that setting. Each front
end renders it with its own name for the setting (``render``): the CLI says "--omega", the worker
protocol "omega", Blender the panel's label. ``str()`` is the protocol's wording.
"""

from __future__ import annotations

from typing import Callable


class MSDError(Exception):
    """Base class: ``kind`` names the failure for the worker protocol, ``str()`` is for people.

    ``MSDError("plain text")`` is a finished message. ``MSDError("{field} must be ≥ 0, got {value!r}",
    field="omega", value=x)`` is a template: ``{field}`` and the keyword values are filled in when the
    message is rendered (values are substituted, never parsed, so user text in them is safe).
    """

    kind = "internal"

    def __init__(self, message: str, *, field: str | None = None, **values):
        self.template = message
        self.field = field
        self.values = values
        super().__init__(self.render())

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with the setting called ``name_of(field)`` (default: the field name itself)."""
        if self.field is None and not self.values:
            return self.template
        name = (name_of or str)(self.field) if self.field is not None else ""
        return self.template.format(field=name, **self.values)


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

    @classmethod
    def check(cls, interrupt) -> None:
        """Raise when ``interrupt`` (a threading.Event, or None: never) is set: work too long to finish
        after a cancel (a large decode) calls this between its parts."""
        if interrupt is not None and interrupt.is_set():
            raise cls("generation cancelled")


class NonFiniteResult(MSDError):
    """Sampling or decoding produced NaN or infinite values: the image would be black, so none is written."""

    kind = "internal"
