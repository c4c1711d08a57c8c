"""Read the text chunks (generation metadata) of a PNG. Pure Python on purpose: Blender's Python,
which has neither PIL nor torch, reads a panorama's settings with it.

Metadata keys (plain lowercase words, no prefix; PNG's registered keywords are capitalised, so they
cannot clash): see METADATA_KEYS. Every value is text: strings as they are, everything else as JSON
("true", "10.0", "[4, 2, 1]", "null"). The "settings" key holds the complete GenerationSettings as
JSON, as requested (auto values left as None); the other keys record what was actually used.
"""

from __future__ import annotations

import json
import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTINGS_KEY = "settings"
METADATA_KEYS = (
    "prompt", "negative_prompt", "seed", "width", "height", "steps", "guidance", "method", "omega",
    "omega_loss", "gradient", "scales", "pyramid", "global_window", "global_move", "coarse_noise", "fine_start", "fine_join", "tile_starts", "fine_steps", "window", "stride", "wrap", "scheduler", "model",
    "msd_core_version", SETTINGS_KEY,
)  # fmt: skip
# Also ours: what the pipeline resolved for the run, and a refined panorama's source (msd_core.refine).
# "loras" (only when the run used LoRAs): [{"name": file name, "sha256": hex digest, "weight": w}] in order;
# "pole_caps" (only a 360° world's, --poles sphere): {"size": view px, "windows_per_step": the most a step runs}.
LORAS_KEY = "loras"
# "global_window_size" (only with a wide global window): its [height, width] in pixels.
RUN_KEYS = ("view_batch", "device", "dtype", "windows", "windows_per_level", "global_window_size", "unet_windows",
            "family", "guided_steps", LORAS_KEY, "pole_caps")
REFINE_KEYS = ("source", "strength", "start_step")
OWN_KEYS = METADATA_KEYS + RUN_KEYS + REFINE_KEYS
# Bounds on what a PNG's text may cost to read (our own metadata is a few KB).
MAX_TEXT_BYTES = 2**20  # per chunk, compressed and inflated
MAX_TOTAL_TEXT_BYTES = 4 * 2**20
MAX_TEXT_CHUNKS = 256


def read_text_chunks(path, dropped: list[str] | None = None, stop_at_data: bool = False) -> dict[str, str]:
    """All tEXt, zTXt and iTXt entries of the PNG at ``path`` as {keyword: text}, within bounds.

    A text chunk longer than MAX_TEXT_BYTES (compressed or inflated: a few KB of zlib can inflate to
    gigabytes), text beyond MAX_TOTAL_TEXT_BYTES in all, and text chunks after the first
    MAX_TEXT_CHUNKS are skipped; each skip is described in ``dropped`` (when given) so the caller can warn.
    Raises ValueError for a file that is not a PNG or is cut short; chunk CRCs of text chunks are checked.
    With ``stop_at_data`` only the chunks before the pixels (IDAT) are read: where our writer (Pillow)
    puts the text, so a listing of many files reads a few bytes of each.
    """
    with open(path, "rb") as file:
        if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise ValueError(f"{path} is not a PNG file (wrong signature)")
        texts = {}
        total = chunks = 0
        while True:
            header = file.read(8)
            if len(header) < 8:
                raise ValueError(f"{path} is truncated (no IEND chunk)")
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND" or (stop_at_data and kind == b"IDAT"):
                return texts
            if kind not in _DECODERS:
                file.seek(length + 4, 1)  # data and CRC
                continue
            chunks += 1
            budget = min(MAX_TEXT_BYTES, MAX_TOTAL_TEXT_BYTES - total)
            if chunks > MAX_TEXT_CHUNKS or length > budget:
                file.seek(length + 4, 1)
                _drop(dropped, kind, chunks, length, "too many text chunks" if chunks > MAX_TEXT_CHUNKS else "too large")
                continue
            data, crc = file.read(length), file.read(4)
            if len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
                raise ValueError(f"{path} has a damaged {kind.decode()} chunk")
            try:
                keyword, text = _DECODERS[kind](data, budget)
            except _TooLarge:
                _drop(dropped, kind, chunks, length, "too large once decompressed")
                continue
            except (zlib.error, IndexError, UnicodeDecodeError):
                raise ValueError(f"{path} has a malformed {kind.decode()} chunk") from None
            total += len(text.encode("utf-8"))
            texts[keyword] = text


def read_settings(path) -> dict | None:
    """The GenerationSettings dict stored in a panorama PNG, or None when it has none."""
    text = read_text_chunks(path).get(SETTINGS_KEY)
    return None if text is None else json.loads(text)


def storable_text(text: str) -> str:
    """``text`` as it can be stored in a PNG or EXR (UTF-8): itself when it is valid Unicode; else the
    bytes of a file name that is not UTF-8 (Python's surrogate escapes) written as \\xNN, and any other
    unpaired surrogate as \\uDXXX: nothing is lost, and nothing fails when the file is written."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _TooLarge(Exception):
    """A text chunk's text exceeds its budget."""


def _drop(dropped: list[str] | None, kind: bytes, number: int, length: int, why: str) -> None:
    if dropped is not None:
        dropped.append(f"{kind.decode()} chunk {number} ({length} bytes): {why}")


def _inflate(data: bytes, budget: int) -> bytes:
    """zlib-decompress at most ``budget`` bytes; _TooLarge beyond, zlib.error for a cut-off stream."""
    inflater = zlib.decompressobj()
    text = inflater.decompress(data, budget + 1)
    if len(text) > budget:
        raise _TooLarge
    if not inflater.eof:
        raise zlib.error("incomplete or truncated stream")
    return text


def _tEXt(data: bytes, budget: int) -> tuple[str, str]:
    keyword, _, text = data.partition(b"\0")
    return keyword.decode("latin-1"), text.decode("latin-1")


def _zTXt(data: bytes, budget: int) -> tuple[str, str]:
    keyword, _, rest = data.partition(b"\0")  # rest: compression method (0 = zlib), compressed text
    return keyword.decode("latin-1"), _inflate(rest[1:], budget).decode("latin-1")


def _iTXt(data: bytes, budget: int) -> tuple[str, str]:
    keyword, _, rest = data.partition(b"\0")
    compressed = rest[0] == 1
    _language, _, rest = rest[2:].partition(b"\0")
    _translated_keyword, _, text = rest.partition(b"\0")
    return keyword.decode("latin-1"), (_inflate(text, budget) if compressed else text).decode("utf-8")


_DECODERS = {b"tEXt": _tEXt, b"zTXt": _zTXt, b"iTXt": _iTXt}
