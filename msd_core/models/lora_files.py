"""LoRA files without torch: the command line's FILE[:WEIGHT], their hashes, and finding them again.

Pure Python: Blender's Python uses it to restore the LoRAs of a panorama (*Use Settings*). Loading a
LoRA into a model is ``msd_core.models.lora``. docs/lora.md describes the rules.
"""

from __future__ import annotations

import hashlib
import math
import os

from ..errors import BadInput

SUFFIX = ".safetensors"
HASH_CHUNK = 2**20


def lora_name(path: str) -> str:
    """The file name a LoRA is recorded under."""
    return os.path.basename(os.path.expanduser(path).replace("\\", "/"))


def parse_lora_argument(text: str) -> dict:
    """``--lora FILE[:WEIGHT]`` → {"path", "weight"} (weight 1 when none is given).

    The rule: an argument ending in .safetensors (any case) is a file name, whatever colons it holds
    (C:\\loras\\style.safetensors). Otherwise the weight is what follows the last colon and must be a
    number (C:\\loras\\style.safetensors:0.8, style.safetensors:-0.5)."""
    if text.lower().endswith(SUFFIX):
        return {"path": _absolute(text), "weight": 1.0}
    path, colon, weight = text.rpartition(":")
    if not colon or not path:
        raise BadInput("{field} {value!r} is not FILE or FILE:WEIGHT with a .safetensors FILE, e.g. "
                       "style.safetensors:0.8", field="loras", value=text)
    try:
        number = float(weight)
    except ValueError:
        raise BadInput("{field} {value!r}: the weight {weight!r} after the last colon is not a number; write "
                       "FILE:WEIGHT, e.g. style.safetensors:0.8", field="loras", value=text, weight=weight) from None
    if not math.isfinite(number):
        raise BadInput("{field} {value!r}: the weight must be a finite number", field="loras", value=text)
    return {"path": _absolute(path), "weight": number}


def _absolute(path: str) -> str:
    """Absolute, so the path stored in the PNG still finds the file from another folder."""
    return os.path.abspath(os.path.expanduser(path))


def sha256_of(path: str) -> str:
    """The SHA-256 of a file, read in chunks (a LoRA can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def restore_loras(loras: list, records, folders: list[str]) -> tuple[list[dict], list[str]]:
    """The stored LoRAs of a panorama that are found on this machine, and a sentence for each one that is not.

    ``loras``: the stored settings' [{"path", "weight"}]; ``records``: the PNG's "loras" metadata
    [{"name", "sha256", "weight"}] in the same order (None for a file that has none); ``folders``: where
    else to look for a file of the same name (the LoRA folder, the panorama's own folder). A candidate is
    taken when its SHA-256 is the recorded one (without a record: when it exists). A LoRA not found is
    left out of the returned list; nothing here raises for a missing file.
    """
    if not isinstance(records, list) or len(records) != len(loras):
        records = [None] * len(loras)
    found, missing = [], []
    for entry, record in zip(loras, records):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            missing.append(f"a stored LoRA entry is damaged ({entry!r:.60}) and was left out")
            continue
        sha256 = record.get("sha256") if isinstance(record, dict) else None
        name = lora_name(entry["path"])
        candidates = [os.path.expanduser(entry["path"])] + [os.path.join(folder, name) for folder in folders if folder]
        different = []
        for candidate in dict.fromkeys(candidates):
            if not os.path.isfile(candidate):
                continue
            if sha256 is None or _sha256_or_none(candidate) == sha256:
                found.append({**entry, "path": os.path.abspath(candidate)})
                break
            different.append(candidate)
        else:
            where = ", ".join(dict.fromkeys(os.path.dirname(c) or "." for c in candidates))
            detail = f"; {', '.join(different)} has other content (SHA-256 differs)" if different else ""
            missing.append(f"LoRA {name} (weight {entry.get('weight')}) was not found in {where}{detail}: restored "
                           "without it")
    return found, missing


def _sha256_or_none(path: str) -> str | None:
    try:
        return sha256_of(path)
    except OSError:
        return None
