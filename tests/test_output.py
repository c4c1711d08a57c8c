"""PNG output and the PIL-free metadata reader."""

import json
import os
import re
import zlib

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import msd_core
from msd_core.imageio import pngmeta
from msd_core.errors import BadInput
from msd_core.imageio.output import check_output_path, generation_metadata, save_png
from msd_core.settings import GenerationSettings

PROMPT = "雪山の夜明け, a misty valley — ünïcödé 🌄"


def _image(color=(200, 30, 90), size=(16, 8)):
    return Image.new("RGB", size, color)


def _leftovers(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def test_metadata_round_trips_through_the_png_with_a_unicode_prompt(tmp_path):
    settings = GenerationSettings(prompt=PROMPT, negative_prompt="blurry", width=128, height=64, model="tiny", seed=7)
    resolved = {"levels": 2, "window": 64, "stride": 8, "view_batch": 4, "device": "cpu", "dtype": "float32"}
    metadata = generation_metadata(settings, resolved)

    assert set(pngmeta.METADATA_KEYS) <= set(metadata) and "levels" not in metadata
    assert metadata["view_batch"] == "4" and metadata["device"] == "cpu"
    assert metadata["prompt"] == PROMPT and metadata["seed"] == "7" and metadata["wrap"] == "true"
    assert metadata["scales"] == "2" and metadata["window"] == "64"  # what was used, not the None asked for
    assert metadata["pyramid"] == "global" and metadata["coarse_noise"] == "drawn"
    assert metadata["msd_core_version"] == msd_core.__version__

    path = save_png(_image(), tmp_path / "panorama.png", metadata)
    assert pngmeta.read_text_chunks(path) == metadata
    assert GenerationSettings.from_dict(pngmeta.read_settings(path)) == settings
    with Image.open(path) as written:
        assert written.mode == "RGB" and written.size == (16, 8) and written.getpixel((3, 3)) == (200, 30, 90)
        assert written.info.get("srgb") == 0
    assert _leftovers(tmp_path) == []


def test_an_existing_file_is_never_replaced_without_overwrite(tmp_path):
    target = tmp_path / "panorama.png"
    save_png(_image((1, 2, 3)), target, {"prompt": "first"})
    before = target.read_bytes()
    with pytest.raises(BadInput, match="exists; to replace it, turn on overwrite"):
        check_output_path(target, overwrite=False)
    with pytest.raises(BadInput, match="exists; to replace it, turn on overwrite"):
        save_png(_image((9, 9, 9)), target, {"prompt": "second"})
    assert target.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path):
    """The existence check is repeated atomically when the file is put in place."""
    target = tmp_path / "panorama.png"

    class ImageWhileAnotherProcessWrites:
        def convert(self, mode):
            target.write_bytes(b"written meanwhile")
            return _image().convert(mode)

    with pytest.raises(BadInput, match="exists"):
        save_png(ImageWhileAnotherProcessWrites(), target, {})
    assert target.read_bytes() == b"written meanwhile"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces_the_file(tmp_path):
    target = tmp_path / "panorama.png"
    save_png(_image((1, 2, 3)), target, {"prompt": "first"})
    assert check_output_path(target, overwrite=True) == target
    save_png(_image((9, 9, 9), size=(4, 4)), target, {"prompt": "second"}, overwrite=True)
    with Image.open(target) as written:
        assert written.size == (4, 4) and written.getpixel((0, 0)) == (9, 9, 9)
    assert pngmeta.read_text_chunks(target) == {"prompt": "second"}
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="empty image"):
        save_png(Image.new("RGB", (0, 0)), tmp_path / "panorama.png", {})
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_png(_image(), tmp_path / "panorama.png", {})
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("name, message", [
    ("missing/panorama.png", "folder .*missing does not exist"),
    ("a-file.txt/panorama.png", "folder .*a-file.txt does not exist"),
    ("panorama.jpg", "must end in .png"),
    ("folder.png", "is a folder"),
])  # fmt: skip
def test_bad_output_paths_are_refused_before_generating(tmp_path, name, message):
    (tmp_path / "a-file.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(BadInput, match=message):
        check_output_path(tmp_path / name, overwrite=True)
    with pytest.raises(BadInput, match=message):
        save_png(_image(), tmp_path / name, {}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a-file.txt", "folder.png"]


def test_an_unwritable_folder_is_refused(unwritable_folder):
    message = re.escape(f"the output folder {unwritable_folder} is not writable")
    with pytest.raises(BadInput, match=message):
        check_output_path(unwritable_folder / "panorama.png", overwrite=False)
    with pytest.raises(BadInput, match=message):
        save_png(_image(), unwritable_folder / "panorama.png", {})
    assert os.listdir(unwritable_folder) == []


# --- pngmeta ---------------------------------------------------------------------------------------------


def test_pngmeta_reads_compressed_and_international_text(tmp_path):
    info = PngInfo()
    info.add_text("plain", "latin-1 text: café")
    info.add_text("long", "a long Latin-1 value " * 40, zip=True)
    info.add_itxt("unicode", PROMPT, lang="ja", tkey="プロンプト")
    info.add_itxt("unicode_zipped", PROMPT * 10, zip=True)
    path = tmp_path / "chunks.png"
    _image().save(path, pnginfo=info)
    data = path.read_bytes()
    assert b"tEXt" in data and b"zTXt" in data and b"iTXt" in data

    assert pngmeta.read_text_chunks(path) == {
        "plain": "latin-1 text: café",
        "long": "a long Latin-1 value " * 40,
        "unicode": PROMPT,
        "unicode_zipped": PROMPT * 10,
    }
    assert pngmeta.read_settings(path) is None


def test_pngmeta_rejects_files_that_are_not_intact_pngs(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a PNG"):
        pngmeta.read_text_chunks(text)

    good = save_png(_image(), tmp_path / "good.png", {"prompt": "a valley"})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) - 12])  # IEND cut off
    with pytest.raises(ValueError, match="truncated"):
        pngmeta.read_text_chunks(truncated)

    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(data.replace(b"a valley", b"a vAlley"))
    with pytest.raises(ValueError, match="damaged tEXt"):
        pngmeta.read_text_chunks(damaged)


def _with_chunks(tmp_path, *chunks: tuple[bytes, bytes]):
    """A small valid PNG with extra (kind, payload) chunks after its IHDR."""
    path = tmp_path / "carrier.png"
    _image().save(path)
    data = path.read_bytes()
    extra = b"".join(
        len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
        for kind, payload in chunks
    )
    path.write_bytes(data[:33] + extra + data[33:])  # after the signature and IHDR
    return path


def test_pngmeta_reports_a_malformed_compressed_chunk(tmp_path):
    path = _with_chunks(tmp_path, (b"zTXt", b"key\0\0" + b"not zlib data"))
    with pytest.raises(ValueError, match="malformed zTXt"):
        pngmeta.read_text_chunks(path)
    cut = zlib.compress(b"a text that is cut off")[:-6]
    with pytest.raises(ValueError, match="malformed iTXt"):
        pngmeta.read_text_chunks(_with_chunks(tmp_path, (b"iTXt", b"key\0\1\0\0\0" + cut)))


def test_pngmeta_skips_and_reports_decompression_bombs_and_floods(tmp_path):
    """A 100 MB zTXt fits in 100 KB; it is skipped after inflating at most its budget, and reported."""
    bomb = zlib.compress(b"\0" * 100 * 2**20, 9)
    assert len(bomb) < 200_000
    chunks = [(b"tEXt", b"prompt\0a valley"), (b"zTXt", b"bomb\0\0" + bomb), (b"iTXt", b"ibomb\0\1\0\0\0" + bomb),
              (b"tEXt", b"huge\0" + b"x" * (pngmeta.MAX_TEXT_BYTES + 1))]  # fmt: skip
    dropped = []
    texts = pngmeta.read_text_chunks(_with_chunks(tmp_path, *chunks), dropped)
    assert texts == {"prompt": "a valley"}
    assert dropped == [
        f"zTXt chunk 2 ({len(chunks[1][1])} bytes): too large once decompressed",
        f"iTXt chunk 3 ({len(chunks[2][1])} bytes): too large once decompressed",
        f"tEXt chunk 4 ({len(chunks[3][1])} bytes): too large",
    ]

    flood = [(b"tEXt", b"k%d\0v" % n) for n in range(pngmeta.MAX_TEXT_CHUNKS + 3)]
    dropped = []
    texts = pngmeta.read_text_chunks(_with_chunks(tmp_path, *flood), dropped)
    assert len(texts) == pngmeta.MAX_TEXT_CHUNKS and len(dropped) == 3
    assert dropped[0].endswith("too many text chunks")

    # In all at most MAX_TOTAL_TEXT_BYTES: five chunks just under the per-chunk limit do not all fit.
    almost = pngmeta.MAX_TEXT_BYTES - 16
    many = [(b"zTXt", b"z%d\0\0" % n + zlib.compress(b"y" * almost)) for n in range(5)]
    dropped = []
    texts = pngmeta.read_text_chunks(_with_chunks(tmp_path, *many), dropped)
    assert sum(map(len, texts.values())) <= pngmeta.MAX_TOTAL_TEXT_BYTES
    assert len(texts) == 4 and dropped == [dropped[0]] and "too large" in dropped[0]


def test_settings_json_keeps_the_prompt_readable(tmp_path):
    metadata = generation_metadata(GenerationSettings(prompt=PROMPT), {})
    assert PROMPT in metadata["settings"]
    assert json.loads(metadata["settings"])["prompt"] == PROMPT


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("blocker, message", [
    ("folder", "HDR companion .*pano.exr is a folder"),
    ("dangling", "pano.exr is a link to .*missing.exr, which does not exist"),
])  # fmt: skip
def test_the_exr_path_is_checked_like_the_png_before_generating(tmp_path, blocker, message, overwrite):
    if blocker == "folder":
        (tmp_path / "pano.exr").mkdir()
    else:
        os.symlink(tmp_path / "missing.exr", tmp_path / "pano.exr")
    if blocker == "dangling" and overwrite:  # replacing the link is what overwrite means
        assert check_output_path(tmp_path / "pano.png", overwrite=True, exr=True) == tmp_path / "pano.png"
        return
    with pytest.raises(BadInput, match=message):
        check_output_path(tmp_path / "pano.png", overwrite=overwrite, exr=True)


def test_metadata_that_is_not_valid_unicode_is_stored_escaped_not_lost(tmp_path):
    name = os.fsdecode(b"sky-\xff.png")
    settings = GenerationSettings(prompt="a lake", model=os.fsdecode(b"/models/m\xe9.safetensors"))
    metadata = {**generation_metadata(settings, {}), "source": name, "other": "\ud800"}
    path = save_png(_image(), tmp_path / "pano.png", metadata)
    stored = pngmeta.read_text_chunks(path)
    assert stored["source"] == "sky-\\xff.png" and stored["model"] == "/models/m\\xe9.safetensors"
    assert stored["other"] == "\\ud800"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_in_the_prompt_is_bad_input(field):
    settings = GenerationSettings(**{"prompt": "a lake", field: "a lake \ud83d at dawn"})
    with pytest.raises(BadInput, match="unpaired surrogate U[+]D83D") as error:
        settings.validate()
    assert error.value.field == field


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def full(self, file, *args, **kwargs):
        file.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(BadInput, match=re.escape(f"could not write {tmp_path / 'pano.png'}: No space left on device")):
        save_png(_image(), tmp_path / "pano.png", {})
    assert os.listdir(tmp_path) == []
