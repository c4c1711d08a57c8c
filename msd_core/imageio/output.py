"""PNG output: the metadata that lets a panorama be regenerated, the checks made before a long run,
and an atomic write that never clobbers a file unless asked to; with HDR on, a linear OpenEXR
beside the PNG (same name, ``.exr``; see ``hdr``) written the same way.

The key names and value format are documented in ``pngmeta`` (which reads them back without PIL).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .. import __version__
from . import cubemap, hdr
from ..worker.environment import process_alive
from ..errors import BadInput
from .pngmeta import METADATA_KEYS, SETTINGS_KEY, storable_text
from ..settings import GenerationSettings

SRGB_PERCEPTUAL = b"\x00"  # sRGB chunk payload: rendering intent 0 (perceptual)
# Temporary files of atomic writes: ".<name>.png.<pid>-<random>.tmp" (or .exr), hidden beside the target;
# the pid tells whether the process that made one is still writing it.
PID_DIGITS = 10  # more digits than any pid: the name is not one of ours
TEMPORARY = re.compile(r"^\..+\.(?:png|exr)\.(\d+)-[0-9a-f]{8}\.tmp$")


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
    return {
        key: storable_text(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        for key, value in values.items()
    }


def check_output_path(path, overwrite: bool, *, exr: bool = False) -> pathlib.Path:
    """Refuse an output path that would fail or clobber a file, before any time is spent generating;
    with ``exr``, the EXR beside it too.

    The folder is not created: a missing folder is more likely a typo than a wish.
    """
    if "\0" in os.fspath(path):
        raise BadInput("the {field} path contains a NUL character", field="output")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:  # an unpaired surrogate that is no escaped byte: no file can have this name
        raise BadInput("the {field} path {path} cannot be a file name here (it is not valid Unicode)", field="output",
                       path=storable_text(os.fspath(path))) from None
    target = pathlib.Path(os.path.expanduser(os.fspath(path))).absolute()
    if target.suffix.lower() != ".png":
        raise BadInput("the {field} file {target} must end in .png", field="output", target=target)
    if target.is_dir():
        raise BadInput("the {field} {target} is a folder; give a file name ending in .png", field="output",
                       target=target)
    folder = target.parent
    if not folder.is_dir():
        raise BadInput("the {field} folder {folder} does not exist; create it first or choose another",
                       field="output", folder=folder)
    check_writable_folder(folder, "output")
    _check_target(target, overwrite)
    if exr:  # the EXR is written after the PNG: a problem with it must not surface after the run
        if exr_path_for(target).is_dir():
            raise BadInput("the {field} {target}'s HDR companion {exr} is a folder; give another name",
                           field="output", target=target, exr=exr_path_for(target))
        _check_target(exr_path_for(target), overwrite)
    return target


def _check_target(target: pathlib.Path, overwrite: bool) -> None:
    if target.is_symlink() and not target.exists() and not overwrite:
        raise BadInput("the {field} {target} is a link to {link}, which does not exist; give another name",
                       field="output", target=target, link=os.readlink(target))
    if target.exists() and not overwrite:
        raise _exists(target)


def exr_path_for(png_path) -> pathlib.Path:
    """Where the HDR companion of a panorama PNG goes: the same name ending in .exr."""
    return pathlib.Path(png_path).with_suffix(".exr")


def check_writable_folder(folder: pathlib.Path, field: str) -> None:
    """Refuse a folder this process cannot create files in (permissions, a read-only mount)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise BadInput("the {field} folder {folder} is not writable", field=field, folder=folder)


def remove_stale_temporaries(folder) -> list[pathlib.Path]:
    """Delete save_png's temporary files in ``folder`` whose writing process is gone (killed mid-write);
    a live process's files are left alone. Returns what was removed."""
    removed = []
    try:
        with os.scandir(folder) as found:
            for entry in found:
                match = TEMPORARY.match(entry.name)
                if match and len(match.group(1)) <= PID_DIGITS and entry.is_file(follow_symlinks=False) and (
                    not process_alive(int(match.group(1)))
                ):
                    try:
                        os.unlink(entry.path)
                        removed.append(pathlib.Path(entry.path))
                    except OSError:
                        pass  # another user's, or gone already
    except (OSError, ValueError):  # a sweep is housekeeping: it never fails the run it precedes
        pass
    return removed


def save_png(image: Image.Image, path, metadata: dict[str, str], *, overwrite: bool = False) -> pathlib.Path:
    """Write ``image`` as an 8-bit sRGB PNG with ``metadata`` as text chunks; return the absolute path.

    Written atomically, never replacing a file without ``overwrite`` (see _write_atomically).
    """
    target = check_output_path(path, overwrite)
    info = PngInfo()
    info.add(b"sRGB", SRGB_PERCEPTUAL)
    for key, value in metadata.items():
        info.add_text(key, storable_text(value))  # tEXt, or iTXt (UTF-8) for text outside Latin-1
    _write_atomically(target, lambda file: image.convert("RGB").save(file, format="PNG", pnginfo=info), overwrite)
    return target


def save_exr(
    image: Image.Image, png_path, metadata: dict[str, str], *, knee: float, peak: float, overwrite: bool = False
) -> pathlib.Path:
    """Write the HDR companion of the panorama ``image`` (the pixels saved as ``png_path``) beside it:
    a linear half-float OpenEXR whose pixels are the PNG's, linearised, with highlights above ``knee``
    expanded up to ``peak`` (hdr.linear_hdr), and ``metadata`` plus the curve as string attributes.
    Return its absolute path. Made from the 8-bit pixels so that below the knee it equals the PNG."""
    target = exr_path_for(check_output_path(png_path, overwrite=True))
    if target.exists() and not overwrite:
        raise _exists(target)
    rgb = hdr.linear_hdr(np.asarray(image.convert("RGB")), knee, peak)
    attributes = {**{key: storable_text(value) for key, value in metadata.items()}, "hdr_knee": json.dumps(knee), "hdr_peak": json.dumps(peak)}
    latlong = image.width == 2 * image.height
    _write_atomically(target, lambda file: hdr.write_exr(file, rgb, attributes, latlong=latlong), overwrite)
    return target


def check_cubemap_paths(png_path, overwrite: bool, *, exr: bool = False) -> list[pathlib.Path]:
    """Refuse cube map faces (``cubemap.face_paths``) that would clobber files, before any time is spent."""
    paths = [*cubemap.face_paths(png_path).values(), *(cubemap.face_paths(png_path, ".exr").values() if exr else ())]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise _exists(path)
    return paths


def save_cubemap(image: Image.Image, png_path, metadata: dict[str, str], *, hdr_curve: tuple[float, float] | None = None,
                 overwrite: bool = False) -> list[pathlib.Path]:
    """Write the six cube map faces of the equirectangular ``image`` (saved as ``png_path``) beside it:
    ``<stem>_px.png`` … ``<stem>_nz.png`` (``cubemap``'s convention), each with ``metadata``; with
    ``hdr_curve`` = (knee, peak) also linear OpenEXR faces sampled from the HDR companion's pixels.
    Return the paths written. Only a 2:1 world has faces."""
    if image.width != 2 * image.height:
        raise BadInput("a cube map needs a 2:1 equirectangular 360° world; this panorama is {width}×{height}",
                       field="cubemap", width=image.width, height=image.height)
    check_cubemap_paths(png_path, overwrite, exr=hdr_curve is not None)
    pixels = np.asarray(image.convert("RGB"))
    written = []
    faces = cubemap.cube_faces(pixels.astype(np.float64))
    for face, path in cubemap.face_paths(png_path).items():
        face_image = Image.fromarray(np.clip(np.rint(faces[face]), 0, 255).astype(np.uint8))
        written.append(save_png(face_image, path, {**metadata, "cubemap_face": face}, overwrite=overwrite))
    if hdr_curve is not None:
        knee, peak = hdr_curve
        linear = cubemap.cube_faces(hdr.linear_hdr(pixels, knee, peak))
        attributes = {**metadata, "hdr_knee": json.dumps(knee), "hdr_peak": json.dumps(peak)}
        for face, path in cubemap.face_paths(png_path, ".exr").items():
            rgb = linear[face].astype(np.float32)
            _write_atomically(path.absolute(), lambda file, rgb=rgb, face=face: hdr.write_exr(
                file, rgb, {**attributes, "cubemap_face": face}), overwrite)
            written.append(path.absolute())
    return written


def _write_atomically(target: pathlib.Path, write, overwrite: bool) -> None:
    """Call ``write(file)`` on a temporary file in the target's folder, then put it in place in one step,
    so no reader ever sees a half-written file; the temporary file is removed if anything fails.
    Without ``overwrite`` it is put in place with os.link, which fails if the name exists by then:
    a file created during a long run is still never replaced. Filesystems without hard links (FAT,
    some network shares) fall back to checking just before an os.replace.
    """
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        # os.open rather than tempfile: the file gets the usual permissions (0666 less the umask).
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError:
        raise BadInput("the {field} folder {folder} is not writable", field="output", folder=target.parent) from None
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
        if overwrite:
            os.replace(temporary, target)
        else:
            _place_new(temporary, target)
    except OSError as exc:  # a full disk, a quota, a share gone away: say where, and that nothing was written
        raise BadInput("could not write {target}: {reason}; nothing was written there", field="output",
                       target=target, reason=exc.strerror or type(exc).__name__) from None
    finally:
        temporary.unlink(missing_ok=True)


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
    return BadInput("{target} exists; to replace it, turn on {field}", field="overwrite", target=target)
