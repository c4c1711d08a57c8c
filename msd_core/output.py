"""PNG output: the metadata that lets a panorama be regenerated, the checks made before a long run,
and an atomic write that never clobbers a file unless asked to.

The key names and value format are documented in ``pngmeta`` (which reads them back without PIL).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .errors import BadInput
from .pngmeta import METADATA_KEYS, SETTINGS_KEY
from .settings import GenerationSettings

SRGB_PERCEPTUAL = b"\x00"  # sRGB chunk payload: rendering intent 0 (perceptual)


def generation_metadata(settings: GenerationSettings, resolved: dict) -> dict[str, str]:
    """PNG text entries for one panorama: the settings' values, overridden and extended by ``resolved``
    (what the pipeline actually used: "levels", "window", "stride", "view_batch", "device", "dtype",
    "timings", …; the levels are stored as "scales", the setting they resolve), the package version,
    and the full settings as JSON under "settings"."""
    values = {key: getattr(settings, key) for key in METADATA_KEYS if hasattr(settings, key)}
    values.update(resolved)
    if "levels" in values:
        values["scales"] = values.pop("levels")
    values["msd_core_version"] = __version__
    values[SETTINGS_KEY] = settings.to_dict()
    return {key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False) for key, value in values.items()}


def check_output_path(path, overwrite: bool) -> pathlib.Path:
    """Refuse an output path that would fail or clobber a file, before any time is spent generating.

    The folder is not created: a missing folder is more likely a typo than a wish.
    """
    target = pathlib.Path(os.path.expanduser(os.fspath(path))).absolute()
    if target.suffix.lower() != ".png":
        raise BadInput(f"the output file {target} must end in .png")
    if target.is_dir():
        raise BadInput(f"the output {target} is a folder; give a file name ending in .png")
    folder = target.parent
    if not folder.is_dir():
        raise BadInput(f"the output folder {folder} does not exist; create it first or choose another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput(f"the output folder {folder} is not writable")
    if target.exists() and not overwrite:
        raise _exists(target)
    return target


def save_png(image: Image.Image, path, metadata: dict[str, str], *, overwrite: bool = False) -> pathlib.Path:
    """Write ``image`` as an 8-bit sRGB PNG with ``metadata`` as text chunks; return the absolute path.

    The PNG is written to a temporary file in the target's folder and then put in place in one step,
    so no reader ever sees a half-written file, and the temporary file is removed if anything fails.
    Without ``overwrite`` it is put in place with os.link, which fails if the name exists by then:
    a file created during a long run is still never replaced. Filesystems without hard links (FAT,
    some network shares) fall back to checking just before an os.replace.
    """
    target = check_output_path(path, overwrite)
    info = PngInfo()
    info.add(b"sRGB", SRGB_PERCEPTUAL)
    for key, value in metadata.items():
        info.add_text(key, value)  # tEXt, or iTXt (UTF-8) for text outside Latin-1
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open rather than tempfile: the file gets the usual permissions (0666 less the umask).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError:
        raise BadInput(f"the output folder {target.parent} is not writable") from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            image.convert("RGB").save(file, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(temporary, target)
        else:
            _place_new(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _place_new(temporary: pathlib.Path, target: pathlib.Path) -> None:
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise _exists(target) from None
    except OSError:  # no hard links here
        if target.exists():
            raise _exists(target) from None
        os.replace(temporary, target)


def _exists(target: pathlib.Path) -> BadInput:
    return BadInput(f"{target} exists; pass --overwrite to replace it")
