"""A small in-process Hugging Face hub for tests: the part of the protocol that
`hf_hub_download` and `HfApi.list_repo_files` speak, over real HTTP on 127.0.0.1.

Resolve URLs answer like the real hub does for LFS files: a 302 to a blob URL carrying
`X-Repo-Commit`, `X-Linked-Etag` (the sha256) and `X-Linked-Size`. The blob URL is on the
same host, so the client follows it even for its HEAD: it answers with the commit and
the sha256 as ETag too, and honours `Range: bytes=N-`. Errors carry `X-Error-Code` as the hub's do, since the client picks its
exception from that header. Faults (a status, or a connection cut after N body bytes) are
set per file so a test can stage an outage. The server runs on daemon threads, times out
idle connections, and shuts itself down after `lifetime_s` in case a test forgets.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"

_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/]+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")


@dataclass
class Fault:
    """What to do instead of serving a file: answer `status` (with `error_code` as
    `X-Error-Code`), or send the headers and only `cut_after` body bytes, `times` times."""

    status: int | None = None
    error_code: str | None = None
    cut_after: int | None = None
    times: int = 1_000_000


@dataclass
class FakeHub:
    """Repos and files to serve, faults to inject, and a log of the requests seen."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    lifetime_s: float = 60.0
    body_delay_s: float = 0.0  # wait before each file body, so concurrent clients overlap
    url: str = ""
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo_id: str, filename: str, content: bytes) -> str:
        """Serve `content` as `repo_id/filename`; returns its sha256."""
        self.repos.setdefault(repo_id, {})[filename] = content
        return hashlib.sha256(content).hexdigest()

    def blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for content in files.values():
                if hashlib.sha256(content).hexdigest() == sha:
                    return content
        return None

    def fail(self, filename: str, status: int, error_code: str | None = None, times: int = 1_000_000) -> None:
        """Answer requests for `filename` (or `tree`, the file listing) with `status`."""
        self.faults[filename] = Fault(status=status, error_code=error_code, times=times)

    def cut(self, repo_id: str, filename: str, after: int, times: int = 1_000_000) -> None:
        """Drop the connection after `after` body bytes of `filename`, `times` times."""
        sha = hashlib.sha256(self.repos[repo_id][filename]).hexdigest()
        self.faults[sha] = Fault(cut_after=after, times=times)

    def take_fault(self, key: str) -> Fault | None:
        """The fault staged for `key` (a filename, `tree`, or a blob's sha256), used up after `times`."""
        with self._lock:
            fault = self.faults.get(key)
            if fault is None:
                return None
            fault.times -= 1
            if fault.times <= 0:
                del self.faults[key]
            return fault

    def gets(self) -> int:
        """How many file bodies were asked for (blob GETs)."""
        return sum(1 for method, path in self.requests if method == "GET" and path.startswith("/blobs/"))

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self._watchdog = threading.Timer(self.lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            self._watchdog.cancel()
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _HubHandler(BaseHTTPRequestHandler):
    state: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 10  # an idle or stuck client connection cannot hold a thread for long

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Quiet: the request log lives in `FakeHub.requests`."""

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's naming
        self._route(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._route(body=True)

    def end_headers(self) -> None:
        # One request per connection: once `stop()` returns, no pooled connection is served.
        self.send_header("Connection", "close")
        self.close_connection = True
        super().end_headers()

    def _route(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.state.requests.append((self.command, path))
        if match := _RESOLVE.match(path):
            self._resolve(match["repo"], match["revision"], match["path"])
        elif match := _BLOB.match(path):
            self._blob(match["sha"], body)
        elif match := _TREE.match(path):
            self._tree(match["repo"], match["revision"])
        else:
            self._error(404, None)

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        files = self.state.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound")
        if revision not in ("main", COMMIT):
            return self._error(404, "RevisionNotFound")
        fault = self.state.take_fault(filename)
        if fault is not None and fault.status is not None:
            return self._error(fault.status, fault.error_code)
        if filename not in files:
            return self._error(404, "EntryNotFound")
        content = files[filename]
        sha = hashlib.sha256(content).hexdigest()
        self.send_response(302)
        self.send_header("Location", f"{self.state.url}/blobs/{sha}")
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(content)))
        self.send_header("ETag", '"0000000000000000000000000000000000000000"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _blob(self, sha: str, body: bool) -> None:
        content = self.state.blob(sha)
        if content is None:
            return self._error(404, None)
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
            start = int(match[1])
        part = content[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        self.send_header("Content-Length", str(len(part)))
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Repo-Commit", COMMIT)  # the client follows same-host redirects for its HEAD
        self.end_headers()
        if not body:
            return
        # Event.wait, not time.sleep: tests patch time.sleep to skip the client's back-off.
        threading.Event().wait(self.state.body_delay_s)
        fault = self.state.take_fault(sha)
        if fault is not None and fault.cut_after is not None:
            self.wfile.write(part[: fault.cut_after])
            self.wfile.flush()
            return
        self.wfile.write(part)

    def _tree(self, repo_id: str, revision: str) -> None:
        files = self.state.repos.get(repo_id)
        if files is None:
            return self._error(404, "RepoNotFound")
        fault = self.state.take_fault("tree")
        if fault is not None and fault.status is not None:
            return self._error(fault.status, fault.error_code)
        entries = [
            {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
            for name, content in sorted(files.items())
        ]
        self._send_json(200, entries)

    def _error(self, status: int, error_code: str | None) -> None:
        payload = json.dumps({"error": error_code or f"HTTP {status}"}).encode()
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_json(self, status: int, value: object) -> None:
        payload = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
