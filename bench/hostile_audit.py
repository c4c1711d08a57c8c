"""Hostile-input audit of the surfaces v0.3 added (issue 21): refine, download/Hub, the worker protocol,
History and the panel, drafts, HDR. Each case runs a checkout's CLI, worker or add-on as a user would
(subprocesses, raw protocol lines, a fake Hub on 127.0.0.1, Blender headless) and says whether the
behaviour meets docs/bad-input.md's contract: one line and exit 2, one final event of the right kind
and field, a report in Blender; nothing written, nothing lost, nothing hung.

    python bench/hostile_audit.py [--repo CHECKOUT] [--json RESULTS]

``--repo`` (default: this checkout) lets the same cases run against an older tree, e.g. one made with
`git archive 7196c16 | tar -x -C /tmp/v03`, for a before/after count. Times here are bounds (a case
passes if it ends in far less than the fault took), measured on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import queue
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
TINY = ["--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "3", "--gradient", "fast", "-q"]
WAIT = 120
SETTINGS = {"prompt": "a lake", "model": "tiny", "width": 128, "height": 64, "steps": 2, "device": "cpu",
            "gradient": "fast"}  # fmt: skip


# -- files --------------------------------------------------------------------------------------------


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


SIGNATURE = b"\x89PNG\r\n\x1a\n"


def source_png(path: Path, width=128, height=64) -> Path:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[: height // 2], pixels[height // 2 :] = (110, 160, 240), (70, 120, 40)
    Image.fromarray(pixels).save(path)
    return path


def png_with_chunk(path: Path, kind: bytes, body: bytes) -> Path:
    data = source_png(path).read_bytes()
    path.write_bytes(data[:33] + chunk(kind, body) + data[33:])
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def padded_png(path: Path, count: int, kind: bytes) -> Path:
    """16×8 px with ``count`` empty chunks of ``kind`` before the pixels (teST: slow header; IDAT: slow decode)."""
    pixels = zlib.compress(b"".join(b"\0" + b"\x80" * 48 for _ in range(8)))
    header = struct.pack(">IIBBBBB", 16, 8, 8, 2, 0, 0, 0)
    path.write_bytes(SIGNATURE + chunk(b"IHDR", header) + chunk(kind, b"") * count + chunk(b"IDAT", pixels)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def settings_png(path: Path, settings_text: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("settings", settings_text)
    info.add_text("prompt", "x")
    Image.new("RGB", (128, 64), (90, 120, 160)).save(path, pnginfo=info)
    return path


# -- running a checkout -------------------------------------------------------------------------------


class Checkout:
    def __init__(self, repo: Path, scratch: Path):
        self.repo, self.scratch = repo, scratch
        self.env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                    "MSD_WORKER_NICENESS": "0", "MSD_PANORAMA_CACHE": str(scratch / "cache"),
                    "HF_HOME": str(scratch / "hf-home"), "TMPDIR": str(scratch / "tmp")}  # fmt: skip
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)

    def cli(self, *args, cwd: Path, env: dict | None = None, timeout=WAIT, file_limit=None):
        def limit():
            if file_limit is not None:  # a full disk, as a write beyond RLIMIT_FSIZE fails like one
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

        started = time.monotonic()
        try:
            result = subprocess.run([sys.executable, "-m", "msd_core.cli", *args], cwd=cwd, capture_output=True,
                                    env={**self.env, **(env or {})}, timeout=timeout, preexec_fn=limit)  # fmt: skip
        except subprocess.TimeoutExpired:
            return None, "", f"hung for more than {timeout} s", timeout
        return (result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"),
                time.monotonic() - started)  # fmt: skip

    def worker(self, env: dict | None = None) -> "RawWorker":
        return RawWorker(self, env or {})


class RawWorker:
    """The worker over raw pipes (no client-side checks or escaping): lines in, events out."""

    def __init__(self, checkout: Checkout, env: dict):
        self.process = subprocess.Popen([sys.executable, "-u", "-m", "msd_core.worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=checkout.repo,
                                        env={**checkout.env, **env})  # fmt: skip
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.next(lambda e: e.get("event") == "ready")

    def _read(self):
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "unreadable", "line": line[:200]})
        self.events.put(None)

    def send_line(self, line: bytes):
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()

    def send(self, message: dict):
        self.send_line(json.dumps(message).encode())

    def next(self, predicate, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if event is None or predicate(event):
                return event

    def final(self, request_id, timeout=WAIT):
        return self.next(lambda e: e.get("id") == request_id and e.get("event") in ("done", "error", "pong"), timeout)

    def close(self):
        try:
            self.send({"op": "shutdown", "id": "bye"})
            self.process.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()


def one_line_exit_2(result, words: str) -> tuple[bool, str]:
    """Exit 2 and one error line (the last; a run that had started may have said what it runs first)."""
    code, _out, err, _ = result
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("msd-panorama: error: ")]
    ok = code == 2 and errors == lines[-1:] and words in lines[-1] and "Traceback" not in err
    return ok, f"exit {code}: {lines[-1][:160] if lines else ''}"


# -- cases --------------------------------------------------------------------------------------------

CASES: list[tuple[str, str, object]] = []


def case(area: str):
    def register(function):
        CASES.append((area, function.__name__, function))
        return function

    return register


def refine_cli(c: Checkout, d: Path, source: str, *extra, output="out.png"):
    return c.cli("refine", source, "--prompt", "a lake", "-o", output, *TINY, *extra, cwd=d)


@case("refine")
def eps_named_png(c, d):
    (d / "doc.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 8\nshowpage\n")
    return one_line_exit_2(refine_cli(c, d, "doc.png"), "not an image that can be read")


@case("refine")
def gif_named_png(c, d):
    Image.new("RGB", (16, 8)).save(d / "anim.png", format="GIF")
    return one_line_exit_2(refine_cli(c, d, "anim.png"), "not an image that can be read")


@case("refine")
def float_tiff_with_inf_and_nan(c, d):
    pixels = np.full((64, 128), 0.4, np.float32)
    pixels[3, 5], pixels[9, 9] = np.inf, np.nan
    Image.fromarray(pixels, "F").save(d / "hdr.tif")
    result = refine_cli(c, d, "hdr.tif")
    if result[0] != 0:
        return False, f"exit {result[0]}: {result[2].strip()[-160:]}"
    mean = float(np.asarray(Image.open(d / "out.png"), np.float32).mean())
    return mean > 10, f"mean pixel {mean:.1f} of 255"


@case("refine")
def source_name_not_utf8(c, d):
    source = os.path.join(os.fsencode(d), b"caf\xe9.png")
    source_png(Path(os.fsdecode(source)))
    result = refine_cli(c, d, os.fsdecode(source))
    return result[0] == 0 and (d / "out.png").is_file(), f"exit {result[0]}: {result[2].strip()[-160:]}"


@case("refine")
def output_is_the_source(c, d):
    source_png(d / "src.png")
    before = (d / "src.png").read_bytes()
    result = refine_cli(c, d, "src.png", "--overwrite", output="src.png")
    ok, detail = one_line_exit_2(result, "is the source image")
    return ok and (d / "src.png").read_bytes() == before, detail


@case("refine")
def oversized_iccp(c, d):
    png_with_chunk(d / "icc.png", b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 80_000_000, 9))
    return one_line_exit_2(refine_cli(c, d, "icc.png"), "cannot read the source image")


@case("refine")
def oversized_ztxt(c, d):
    png_with_chunk(d / "z.png", b"zTXt", b"Comment\0\0" + zlib.compress(b"\0" * 80_000_000, 9))
    return one_line_exit_2(refine_cli(c, d, "z.png"), "cannot read the source image")


@case("refine")
def scale_inf(c, d):
    source_png(d / "src.png")
    return one_line_exit_2(refine_cli(c, d, "src.png", "--scale", "inf"), "--scale")


@case("refine")
def scale_1e308(c, d):
    source_png(d / "src.png")
    return one_line_exit_2(refine_cli(c, d, "src.png", "--scale", "1e308"), "--scale")


@case("refine")
def source_is_a_folder(c, d):
    (d / "dir.png").mkdir()
    return one_line_exit_2(refine_cli(c, d, "dir.png"), "is a folder")


@case("refine")
def source_is_a_fifo(c, d):
    os.mkfifo(d / "pipe.png")
    return one_line_exit_2(refine_cli(c, d, "pipe.png"), "not a regular file")


@case("refine")
def source_links_to_dev_zero(c, d):
    os.symlink("/dev/zero", d / "zero.png")
    return one_line_exit_2(refine_cli(c, d, "zero.png"), "not a regular file")


@case("refine")
def source_link_loop(c, d):
    os.symlink(d / "loop.png", d / "loop.png")
    return one_line_exit_2(refine_cli(c, d, "loop.png"), "leads back to itself")


@case("refine")
def tall_74_byte_png(c, d):
    header_only_png(d / "tall.png", 8, 16_000_000)
    result = refine_cli(c, d, "tall.png", "--width", "128", "--height", "64")
    ok, detail = one_line_exit_2(result, "decoding it")
    return ok and result[3] < 30, f"{detail} ({result[3]:.1f} s)"


@case("refine")
def stored_settings_with_a_lone_surrogate(c, d):
    settings_png(d / "ours.png", '{"prompt": "x", "model": "m\\ud800"}')
    result = c.cli("refine", "ours.png", "--prompt", "a lake", "-o", "out.png", "--device", "cpu", "--steps", "2", "-q",
                   cwd=d)  # the model comes from the stored settings
    return one_line_exit_2(result, "")


@case("refine")
def worker_refine_iccp_is_bad_input_with_field(c, d):
    png_with_chunk(d / "icc.png", b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 80_000_000, 9))
    c.shared.send({"op": "generate", "id": "icc", "settings": SETTINGS, "output": str(d / "o.png"),
                   "refine": {"source": str(d / "icc.png")}})  # fmt: skip
    event = c.shared.final("icc")
    ok = event is not None and (event["event"], event.get("kind"), event.get("field")) == ("error", "bad_input", "refine")
    return ok, str(event)[:200]


@case("refine")
def worker_cancel_during_source_decode(c, d):
    padded_png(d / "slow.png", 1_000_000, b"IDAT")  # about 10 s to decode
    w = c.shared
    w.send({"op": "generate", "id": "slow", "settings": SETTINGS, "output": str(d / "o.png"),
            "refine": {"source": str(d / "slow.png")}})  # fmt: skip
    if w.next(lambda e: e.get("id") == "slow" and e.get("event") in ("loading", "error")) is None:
        return False, "no loading event"
    time.sleep(1)
    started = time.monotonic()
    w.send({"op": "cancel", "id": "slow"})
    event = w.final("slow")
    seconds = time.monotonic() - started
    ok = event is not None and event.get("kind") == "cancelled" and seconds < 5 and not (d / "o.png").exists()
    return ok, f"{event and event.get('kind')} {seconds:.2f} s after the cancel"


@case("refine")
def worker_refine_onto_its_source(c, d):
    source_png(d / "src.png")
    c.shared.send({"op": "generate", "id": "self", "settings": SETTINGS, "output": str(d / "src.png"),
                   "overwrite": True, "refine": {"source": str(d / "src.png")}})  # fmt: skip
    event = c.shared.final("self")
    return event is not None and event.get("kind") == "bad_input" and event.get("field") == "output", str(event)[:200]


# download / Hub: a fake Hub on 127.0.0.1 (tests/fake_hub.py) serving the tiny model


def tiny_files() -> dict[str, bytes]:
    from msd_core.models import loading

    folder = loading.tiny_model_dir()
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def hub_case(headers=None, sibling=None, words="", extra_files=None, corrupt=None):
    """``headers`` for model_index.json; ``corrupt``: a file whose ETag (its SHA-256) is another's."""
    def run(c, d):
        from fake_hub import FakeHub

        files = {**c.tiny, **(extra_files or {})}
        with FakeHub() as server:
            server.add_repo("test/tiny", files)
            if headers:
                server.headers["model_index.json"] = headers
            if sibling:
                server.siblings["test/tiny"] = [{"rfilename": n, "size": len(b)} for n, b in files.items()] + [sibling]
            if corrupt:  # a corrupting proxy or mirror
                server.headers[corrupt] = {"ETag": '"%s"' % hashlib.sha256(b"other bytes").hexdigest()}
            env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(d / "hf")}
            result = c.cli("models", "download", "test/tiny", "--dtype", "float32", cwd=d, env=env)
            fetched = server.fetched("test/tiny")
        escaped = [p for p in d.rglob("*") if "escaped" in p.name]
        if extra_files:  # only the configs a component reads
            extra = [name for name in fetched if name in extra_files]
            return result[0] == 0 and not extra, f"exit {result[0]}, {len(extra)} of {len(extra_files)} extra files fetched"
        ok, detail = one_line_exit_2(result, words)
        return ok and not escaped, detail + (f"; wrote {escaped}" if escaped else "")

    return run


for _name, _kwargs in {
    "commit_with_dots": {"headers": {"X-Repo-Commit": "../../../../escaped"}, "words": "plain hash"},
    "etag_with_dots": {"headers": {"ETag": '"../../../../escaped.pth"'}, "words": "plain hash"},
    "linked_etag_with_dots": {"headers": {"X-Linked-Etag": '"../../../../escaped.pth"'}, "words": "plain hash"},
    "file_over_50_gb": {"sibling": {"rfilename": "unet/diffusion_pytorch_model.safetensors", "size": 60 * 10**9},
                        "words": "larger than"},
    "size_not_a_number": {"sibling": {"rfilename": "unet/config.json", "size": "12"}, "words": "malformed"},
    "name_not_text": {"sibling": {"rfilename": 7, "size": 1}, "words": "malformed"},
    "thousands_of_configs": {"extra_files": {f"unet/extra-{n}.json": b"{}" for n in range(300)}},
    "weights_not_matching_their_hash": {"corrupt": "unet/diffusion_pytorch_model.safetensors", "words": "SHA-256"},
}.items():
    CASES.append(("download", _name, hub_case(**_kwargs)))


@case("download")
def huge_index_in_the_cache(c, d):
    unet = d / "hf" / "models--x--y" / "snapshots" / ("a" * 40) / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    with open(unet / "diffusion_pytorch_model.safetensors.index.json", "wb") as index:
        index.truncate(232 * 10**6)  # sparse: 232 MB of zeros
    (d / "hf" / "models--x--z" / "snapshots" / ("b" * 40) / "unet").mkdir(parents=True)
    os.symlink("/dev/zero", d / "hf" / "models--x--z" / "snapshots" / ("b" * 40) / "unet" /
               "diffusion_pytorch_model.safetensors.index.json")  # fmt: skip
    result = c.cli("models", "list", cwd=d, env={"HF_HUB_CACHE": str(d / "hf")}, timeout=60)
    return result[0] == 0 and result[3] < 10, f"exit {result[0]} in {result[3]:.1f} s"


# worker protocol


@case("protocol")
def lone_surrogate_id_gets_one_answer(c, d):
    c.shared.send_line(b'{"op": "ping", "id": "\\ud800"}')
    event = c.shared.next(lambda e: e.get("event") in ("pong", "error"), timeout=20)
    return event is not None, str(event)[:120]


@case("protocol")
def lone_surrogate_prompt_is_bad_input(c, d):
    settings = json.dumps({**SETTINGS, "prompt": "a XX lake"}).replace("XX", "\\ud83d")  # JSON's escape, unpaired
    c.shared.send_line(('{"op": "generate", "id": "sur", "output": %s, "settings": %s}'
                        % (json.dumps(str(d / "o.png")), settings)).encode())
    event = c.shared.final("sur", timeout=60)
    return event is not None and event.get("kind") == "bad_input" and event.get("field") == "prompt", str(event)[:200]


@case("protocol")
def slow_header_never_delays_ping(c, d):
    padded_png(d / "slow.png", 1_000_000, b"teST")
    c.shared.send({"op": "generate", "id": "hdr", "settings": SETTINGS, "output": str(d / "o.png"),
                   "refine": {"source": str(d / "slow.png")}})  # fmt: skip
    started = time.monotonic()
    c.shared.send({"op": "ping", "id": "p1"})
    pong = c.shared.next(lambda e: e.get("id") == "p1")
    seconds = time.monotonic() - started
    c.shared.send({"op": "cancel", "id": "hdr"})
    end = c.shared.final("hdr")
    return pong is not None and seconds < 1 and end is not None, f"pong after {seconds:.2f} s; {end and end.get('kind')}"


@case("protocol")
def line_of_20_mb(c, d):
    c.shared.send_line(b'{"op": "ping", "id": "big", "pad": "' + b"x" * 20_000_000 + b'"}')
    c.shared.send({"op": "ping", "id": "after"})
    pong = c.shared.next(lambda e: e.get("id") == "after")
    return pong is not None and pong["event"] == "pong", str(pong)[:120]


@case("protocol")
def number_of_4001_digits_is_not_echoed(c, d):
    c.shared.send_line(b'{"op": "generate", "id": "n", "output": "' + str(d / "o.png").encode() + b'", "settings": '
                       + json.dumps(SETTINGS).encode() + b', "preview_every": ' + b"9" * 4001 + b"}")  # fmt: skip
    event = c.shared.final("n", timeout=30)
    return event is not None and len(event.get("message", "")) < 300, f"{len((event or {}).get('message', ''))} characters"


@case("protocol")
def threads_above_the_cores(c, d):
    c.shared.send({"op": "generate", "id": "t", "settings": SETTINGS, "output": str(d / "o.png"), "threads": 1024})
    loading = c.shared.next(lambda e: e.get("id") == "t" and e.get("event") in ("loading", "error"))
    c.shared.final("t")
    threads = (loading or {}).get("threads")
    return threads is not None and threads <= os.cpu_count(), f"loading reports {threads} threads ({os.cpu_count()} cores)"


@case("protocol")
def previews_folder_named_with_an_absurd_pid(c, d):
    (Path(c.env["TMPDIR"]) / "msd-worker-previews-99999999999-x").mkdir(exist_ok=True)
    worker = c.worker()
    ok = worker.ready is not None and worker.ready.get("event") == "ready"
    worker.close()
    return ok, str(worker.ready)[:100]


@case("protocol")
def temp_file_named_with_an_absurd_pid(c, d):
    (d / ".a.png.99999999999-x.tmp").write_bytes(b"")
    c.shared.send({"op": "generate", "id": "tmp", "settings": SETTINGS, "output": str(d / "a.png")})
    event = c.shared.final("tmp")
    return event is not None and event["event"] == "done", str(event)[:160]


# HDR


@case("hdr")
def exr_path_is_a_folder(c, d):
    (d / "pano.exr").mkdir()
    result = c.cli("generate", "a lake", "-o", "pano.png", "--hdr", "--width", "128", "--height", "64", *TINY, cwd=d)
    ok, detail = one_line_exit_2(result, "pano.exr")
    return ok and not (d / "pano.png").exists(), detail


@case("hdr")
def exr_path_is_a_dangling_link(c, d):
    os.symlink(d / "missing.exr", d / "pano.exr")
    result = c.cli("generate", "a lake", "-o", "pano.png", "--hdr", "--width", "128", "--height", "64", *TINY, cwd=d)
    ok, detail = one_line_exit_2(result, "pano.exr")
    return ok and not (d / "pano.png").exists(), detail


@case("hdr")
def disk_full_while_writing(c, d):
    result = c.cli("generate", "a lake", "-o", "pano.png", "--hdr", "--width", "128", "--height", "64", *TINY, cwd=d,
                   file_limit=4096)  # fmt: skip
    ok, detail = one_line_exit_2(result, "could not write")
    leftovers = [p.name for p in d.iterdir()]
    return ok and not leftovers, detail + (f"; left {leftovers}" if leftovers else "")


@case("hdr")
def threads_of_4001_digits(c, d):
    result = c.cli("generate", "a lake", "-o", "pano.png", "--threads", "9" * 4001, *TINY, cwd=d)
    ok, detail = one_line_exit_2(result, "--threads")
    return ok and len(result[2]) < 300, detail[:120]


# History / panel and drafts: the checkout's add-on in Blender (bpy), in a process of its own


BLENDER_CASES = r'''
import json, os, shutil, sys, time
sys.path.insert(0, sys.argv[2])  # this checkout's tests/ (blender_env)
import bpy
from blender_env import MODULE, build_extension_zip, install_extension
from PIL import Image
from PIL.PngImagePlugin import PngInfo
repo, scratch = sys.argv[1], sys.argv[3]
install_extension(build_extension_zip(os.path.join(scratch, "zip"), repo))
addon = sys.modules[MODULE]
prefs = bpy.context.preferences.addons[MODULE].preferences
out = os.path.join(scratch, "out"); os.makedirs(out)
prefs.output_folder = out
history = sys.modules[MODULE + ".operators.history"]
results = {}

class Layout:  # accepts every layout call
    def __getattr__(self, name):
        return lambda *a, **k: Layout() if name not in ("icon",) else 0
    def __setattr__(self, name, value):
        pass

def draw():
    bpy.types.MSD_PT_history.draw(type("P", (), {"layout": Layout()})(), bpy.context)

def ours(path, prompt, seed, settings=None):
    info = PngInfo()
    info.add_text("prompt", prompt)
    info.add_text("settings", settings or json.dumps({"prompt": prompt[:50], "model": "tiny", "width": 64,
                                                      "height": 32, "seed": seed, "steps": 2}))
    info.add_text("seed", str(seed)); info.add_text("width", "64"); info.add_text("height", "32")
    Image.new("RGB", (64, 32), (40, 90, 160)).save(path, pnginfo=info)

def bump():
    os.utime(out, ns=(0, os.stat(out).st_mtime_ns + 10**9))

def check(name, function):
    try:
        results[name] = function()
    except Exception as exc:
        results[name] = [False, f"{type(exc).__name__}: {str(exc)[:150]}"]

def long_prompts():
    for n in range(20):
        ours(os.path.join(out, f"long{n}.png"), "a long prompt " * 70_000, n)
    bump()
    started = time.perf_counter(); draw(); first = time.perf_counter() - started
    return [first < 0.5, f"first redraw after the folder changed: {first:.3f} s"]

def odd_name():
    shutil.copy(os.path.join(out, "long0.png"), os.path.join(os.fsencode(out), b"caf\xe9.png")); bump()
    draw(); time.sleep(2); draw()
    return [True, "drawn"]

def broken_png():
    with open(os.path.join(out, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    bump(); draw()
    for _ in range(100):
        time.sleep(0.1)
        listed = history.list_panoramas(out)
        if listed:
            break
    return [len(listed) >= 20, f"{len(listed)} listed beside a broken PNG"]

def behind_foreign_pngs():
    plain = os.path.join(out, "plain.png"); Image.new("RGB", (8, 8)).save(plain)
    for n in range(250):
        path = os.path.join(out, f"foreign{n:03d}.png"); shutil.copy(plain, path)
        os.utime(path, (4e9 + n, 4e9 + n))
    listed = history.list_panoramas(out)
    return [len(listed) >= 20, f"{len(listed)} of ours found behind 250 newer foreign PNGs"]

def surrogate_settings():
    group = bpy.context.scene.msd_panorama
    group.prompt, group.steps = "my own prompt", 33
    path = os.path.join(scratch, "sur.png")
    ours(path, "x", 1, '{"prompt": "x", "negative_prompt": "y", "model": "m\\ud800"}')
    try:
        bpy.ops.msd.restore_settings(filepath=path)
        raised = "no error"
    except RuntimeError as exc:
        raised = str(exc)
    ok = "Traceback" not in raised and raised != "no error" and (group.prompt, group.steps) == ("my own prompt", 33)
    return [ok, raised.strip().splitlines()[-1][:150] + f"; panel prompt {group.prompt!r}"]

def drafts_in_the_same_second():
    prefs.worker_python, prefs.model, prefs.device, prefs.precision = sys.executable, "tiny", "cpu", "float32"
    group = bpy.context.scene.msd_panorama
    group.prompt, group.aspect, group.width, group.height, group.steps = "a lake", "CUSTOM", 256, 128, 2
    group.random_seed, group.seed, group.target = False, 5, "BACKDROP"
    drafts = os.path.join(out, "drafts"); os.makedirs(drafts, exist_ok=True)
    now = time.time()
    for ahead in range(120):  # an earlier run's drafts for every second the next run may start in
        stem = "msd_" + time.strftime("%Y%m%d-%H%M%S", time.localtime(now + ahead)) + "_5"
        for index in range(1, 3):
            Image.new("RGB", (8, 8)).save(os.path.join(drafts, f"{stem}_v{index:02d}.png"))
    try:
        result = bpy.ops.msd.generate_variations(count=2, wait=True)
    except RuntimeError as exc:
        return [False, str(exc).strip().splitlines()[-1][:150]]
    return [result == {"FINISHED"}, str(result)]

def use_variation_twice_with_backdrop():
    before = len(bpy.data.objects)
    bpy.ops.msd.use_variation(index=0)
    bpy.ops.msd.use_variation(index=1)
    added = len(bpy.data.objects) - before
    return [added == 1, f"{added} backdrop objects after two drafts used"]

check("long_prompts_redraw", long_prompts)
check("file_name_not_utf8", odd_name)
check("one_broken_png", broken_png)
check("ours_behind_foreign_pngs", behind_foreign_pngs)
check("use_settings_with_lone_surrogate", surrogate_settings)
check("drafts:two_runs_in_the_same_second", drafts_in_the_same_second)
check("drafts:use_variation_backdrop_twice", use_variation_twice_with_backdrop)
print("RESULTS " + json.dumps(results))
'''


def blender_cases(c: Checkout, d: Path) -> dict:
    env = {**c.env, "BLENDER_USER_RESOURCES": str(d / "blender")}
    env.pop("PYTHONPATH")  # bpy's own; the add-on comes from the zip built from the checkout
    script = d / "blender_cases.py"
    script.write_text(BLENDER_CASES)
    result = subprocess.run([sys.executable, str(script), str(c.repo), str(HERE / "tests"), str(d)], cwd=d,
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    line = next((l for l in result.stdout.splitlines() if l.startswith("RESULTS ")), None)
    if line is None:
        return {"blender": [False, (result.stderr.strip().splitlines() or ["no output"])[-1][:200]]}
    return json.loads(line[len("RESULTS "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=HERE)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only", help="areas, comma-separated")
    parser.add_argument("--case", help="one case (of the CLI, worker and Hub areas) by name")
    arguments = parser.parse_args()
    areas = set(arguments.only.split(",")) if arguments.only else None
    results = []
    with tempfile.TemporaryDirectory(prefix="msd-audit-") as scratch:
        checkout = Checkout(arguments.repo.resolve(), Path(scratch))
        checkout.tiny = tiny_files()
        checkout.shared = checkout.worker()
        for number, (area, name, function) in enumerate(CASES):
            if (areas and area not in areas) or (arguments.case and name != arguments.case):
                continue
            folder = Path(scratch) / f"case-{number}"
            folder.mkdir()
            try:
                ok, detail = function(checkout, folder)
            except Exception as exc:  # the audit goes on; the case counts as failed
                ok, detail = False, f"audit error {type(exc).__name__}: {str(exc)[:150]}"
            results.append({"area": area, "case": name, "ok": bool(ok), "detail": detail})
            print(f"{'ok  ' if ok else 'FAIL'} {area:9} {name:42} {detail}", flush=True)
        checkout.shared.close()
        if not arguments.case and (not areas or {"history", "drafts"} & areas):
            folder = Path(scratch) / "blender"
            folder.mkdir()
            for name, (ok, detail) in blender_cases(checkout, folder).items():
                area, _, name = name.rpartition(":")
                area = area or "history"
                results.append({"area": area, "case": name, "ok": bool(ok), "detail": detail})
                print(f"{'ok  ' if ok else 'FAIL'} {area:9} {name:42} {detail}", flush=True)
    counts = {}
    for result in results:
        tried, passed = counts.get(result["area"], (0, 0))
        counts[result["area"]] = (tried + 1, passed + result["ok"])
    print("\n" + "  ".join(f"{area}: {passed}/{tried}" for area, (tried, passed) in counts.items()))
    if arguments.json:
        arguments.json.write_text(json.dumps({"repo": str(arguments.repo), "results": results}, indent=1))


if __name__ == "__main__":
    main()
