"""A local stand-in for the Hugging Face Hub: a thread serving repositories on 127.0.0.1.

It answers the requests huggingface_hub makes to download (HfApi.model_info with files_metadata, then
a HEAD and a GET per file, GET with Range when resuming) in the Hub's URL layout and headers, and
records every request, so tests can check what was fetched. Point HF_ENDPOINT (or ``endpoint=``)
at ``hub.url``.

``pause_after(path, bytes)`` makes a GET of that file stop after so many bytes until ``release()``:
a download is then reliably in the middle of the file. ``headers[path]`` replaces or adds headers of
that file's answers (a hostile mirror's ETag, say); ``siblings[repo]`` replaces the model info's file list.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "a" * 40
API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
PAUSE_LIMIT = 30.0  # seconds a paused transfer waits for release() at most


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._pauses: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.siblings: dict[str, list] = {}
        self._released = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repos[repo_id] = dict(files)

    def add_folder(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
        """Serve a diffusers folder (every file in it) plus ``extra`` files; returns what is served."""
        files = {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
        files.update(extra or {})
        self.add_repo(repo_id, files)
        return files

    def fetched(self, repo_id: str) -> list[str]:
        """The files of ``repo_id`` that were downloaded (GET), in order."""
        prefix = f"/{repo_id}/resolve/"
        return [path.split("/", 5)[5] for method, path, _ in self.requests if method == "GET" and path.startswith(prefix)]

    def pause_after(self, path: str, count: int) -> None:
        self._pauses[path] = count
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: pytest shows failures, not access logs
            pass

        def do_GET(self):
            self._answer(send_body=True)

        def do_HEAD(self):
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Range")))
            if match := API.match(path):
                self._model_info(match["repo"])
            elif match := RESOLVE.match(path):
                self._file(match["repo"], match["path"], send_body)
            else:
                self._error(404, "EntryNotFound")

        def _model_info(self, repo_id: str) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                return self._error(404, "RepoNotFound")
            siblings = hub.siblings.get(repo_id) or [
                {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                for name, data in sorted(files.items())
            ]
            body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": COMMIT, "siblings": siblings}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo_id: str, name: str, send_body: bool) -> None:
            files = hub.repos.get(repo_id)
            if files is None:
                return self._error(404, "RepoNotFound")
            if name not in files:
                return self._error(404, "EntryNotFound")
            data = files[name]
            start = 0
            if match := re.match(r"bytes=(\d+)-", self.headers.get("Range") or ""):
                start = int(match[1])
            self.send_response(206 if start else 200)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Content-Length": str(len(data) - start)}
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers.update(hub.headers.get(name, {}))
            for header, value in headers.items():
                self.send_header(header, value)
            self.end_headers()
            if not send_body:
                return
            body = data[start:]
            try:
                pause = hub._pauses.get(name)
                if pause is not None and pause < len(body):
                    self.wfile.write(body[:pause])
                    self.wfile.flush()
                    hub._released.wait(PAUSE_LIMIT)
                    body = body[pause:]
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client hung up: a cancelled download

        def _error(self, status: int, code: str) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
