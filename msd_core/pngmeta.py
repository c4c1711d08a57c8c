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
    "omega_loss", "gradient", "scales", "pyramid", "window", "stride", "wrap", "scheduler", "model",
    "msd_core_version", SETTINGS_KEY,
)  # fmt: skip


def read_text_chunks(path) -> dict[str, str]:
    """All tEXt, zTXt and iTXt entries of the PNG at ``path`` as {keyword: text}.

    Raises ValueError for a file that is not a PNG or is cut short; chunk CRCs of text chunks are checked.
    """
    with open(path, "rb") as file:
        if file.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
            raise ValueError(f"{path} is not a PNG file (wrong signature)")
        texts = {}
        while True:
            header = file.read(8)
            if len(header) < 8:
                raise ValueError(f"{path} is truncated (no IEND chunk)")
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IEND":
                return texts
            if kind not in _DECODERS:
                file.seek(length + 4, 1)  # data and CRC
                continue
            data, crc = file.read(length), file.read(4)
            if len(crc) < 4 or struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
                raise ValueError(f"{path} has a damaged {kind.decode()} chunk")
            try:
                keyword, text = _DECODERS[kind](data)
            except (zlib.error, IndexError, UnicodeDecodeError):
                raise ValueError(f"{path} has a malformed {kind.decode()} chunk") from None
            texts[keyword] = text


def read_settings(path) -> dict | None:
    """The GenerationSettings dict stored in a panorama PNG, or None when it has none."""
    text = read_text_chunks(path).get(SETTINGS_KEY)
    return None if text is None else json.loads(text)


def _tEXt(data: bytes) -> tuple[str, str]:
    keyword, _, text = data.partition(b"\0")
    return keyword.decode("latin-1"), text.decode("latin-1")


def _zTXt(data: bytes) -> tuple[str, str]:
    keyword, _, rest = data.partition(b"\0")  # rest: compression method (0 = zlib), compressed text
    return keyword.decode("latin-1"), zlib.decompress(rest[1:]).decode("latin-1")


def _iTXt(data: bytes) -> tuple[str, str]:
    keyword, _, rest = data.partition(b"\0")
    compressed = rest[0] == 1
    _language, _, rest = rest[2:].partition(b"\0")
    _translated_keyword, _, text = rest.partition(b"\0")
    return keyword.decode("latin-1"), (zlib.decompress(text) if compressed else text).decode("utf-8")


_DECODERS = {b"tEXt": _tEXt, b"zTXt": _zTXt, b"iTXt": _iTXt}
