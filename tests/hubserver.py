"""A local stand-in for the Hugging Face Hub, for tests that must not touch the internet.

It serves a directory laid out as `<root>/<org>/<repo>/<files>` with the endpoints
`huggingface_hub` uses to list and download a repository (`model_info`,
`list_repo_tree`, `hf_hub_download` / `snapshot_download`):

- `GET /api/models/{org}/{repo}[/revision/{rev}]`  -> id, sha, siblings
- `GET /api/models/{org}/{repo}/tree/{rev}[/{path}]` -> file entries
- `HEAD|GET /{org}/{repo}/resolve/{rev}/{path}`     -> the bytes, with X-Repo-Commit and ETag

Each repo has one branch, `main`, whose commit hash is derived from the files'
names and contents at request time: editing the directory makes a new commit, as a
push would. Errors carry the `X-Error-Code` header the client maps to its typed
exceptions. Every request is recorded in `requests` so tests can assert what was
(and was not) downloaded. Repos listed in `tokens` answer only to that bearer
token, like private repos.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

#: Nothing listens there: a client that tries the network fails fast instead of hanging.
DEAD_ENDPOINT = "http://127.0.0.1:9"


def seed_cache(cache: Path, repo_id: str, files: dict[str, bytes], ref: str = "main") -> str:
    """Lay files out the way huggingface_hub's cache does (blobs, snapshots, refs)."""
    commit = hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest()
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        depth = len(Path(name).parts) + 1
        link.symlink_to(Path(*[".."] * depth, "blobs", blob.name))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return commit


class HubServer:
    """Serve `root` as a Hub on 127.0.0.1; use as a context manager, point HF_ENDPOINT at `.url`."""

    def __init__(self, root: Path, tokens: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.tokens = dict(tokens or {})
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def downloads(self) -> list[str]:
        """`repo_id/path` of every file body served (GET on /resolve/)."""
        out = []
        for method, path in self.requests:
            parts = path.split("/")
            if method == "GET" and len(parts) > 5 and parts[3] == "resolve":
                out.append(f"{parts[1]}/{parts[2]}/{'/'.join(parts[5:])}")
        return out

    # ----------------------------------------------------------------------------------

    def repo_files(self, repo_id: str) -> dict[str, Path]:
        base = self.root / repo_id
        return {
            p.relative_to(base).as_posix(): p
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }

    def commit(self, repo_id: str) -> str:
        h = hashlib.sha1()
        for name, path in self.repo_files(repo_id).items():
            h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._dispatch(body=False)

            def do_GET(self) -> None:
                self._dispatch(body=True)

            # -- helpers ------------------------------------------------------------

            def _send(
                self,
                status: int,
                payload: bytes = b"",
                headers: dict[str, str] | None = None,
                body: bool = True,
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if body:
                    self.wfile.write(payload)

            def _json(self, data: object, body: bool) -> None:
                payload = json.dumps(data).encode()
                self._send(200, payload, {"Content-Type": "application/json"}, body)

            def _error(self, status: int, code: str, body: bool, commit: str = "") -> None:
                headers = {"X-Error-Code": code, "Content-Type": "application/json"}
                if commit:
                    headers["X-Repo-Commit"] = commit
                payload = json.dumps({"error": code}).encode()
                self._send(status, payload, headers, body)

            def _dispatch(self, body: bool) -> None:
                path = urlsplit(self.path).path
                with hub._lock:
                    hub.requests.append((self.command, path))
                parts = [unquote(p) for p in path.strip("/").split("/")]
                if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
                    self._api(parts[2:], body)
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
                else:
                    self._error(404, "NotFound", body)

            def _repo_ok(self, repo_id: str, body: bool) -> bool:
                if not (hub.root / repo_id).is_dir():
                    self._error(404, "RepoNotFound", body)
                    return False
                token = hub.tokens.get(repo_id)
                if token and self.headers.get("Authorization") != f"Bearer {token}":
                    self._error(401, "RepoNotFound", body)
                    return False
                return True

            def _rev_ok(self, repo_id: str, rev: str, body: bool) -> bool:
                if rev not in ("main", hub.commit(repo_id)):
                    self._error(404, "RevisionNotFound", body)
                    return False
                return True

            def _api(self, parts: list[str], body: bool) -> None:
                repo_id = "/".join(parts[:2])
                rest = parts[2:]
                if not self._repo_ok(repo_id, body):
                    return
                files = hub.repo_files(repo_id)
                commit = hub.commit(repo_id)
                if not rest or (rest[0] == "revision" and len(rest) == 2):
                    if rest and not self._rev_ok(repo_id, rest[1], body):
                        return
                    siblings = [{"rfilename": name} for name in files]
                    self._json({"id": repo_id, "sha": commit, "siblings": siblings}, body)
                elif rest[0] == "tree" and len(rest) >= 2:
                    if not self._rev_ok(repo_id, rest[1], body):
                        return
                    self._json(list(self._tree(files, "/".join(rest[2:]))), body)
                else:
                    self._error(404, "NotFound", body)

            def _tree(self, files: dict[str, Path], under: str) -> Iterator[dict[str, object]]:
                prefix = f"{under}/" if under else ""
                for name, path in files.items():
                    if name.startswith(prefix):
                        data = path.read_bytes()
                        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                        yield {"type": "file", "path": name, "size": len(data), "oid": oid}

            def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
                if not self._repo_ok(repo_id, body) or not self._rev_ok(repo_id, rev, body):
                    return
                commit = hub.commit(repo_id)
                path = hub.repo_files(repo_id).get(name)
                if path is None:
                    self._error(404, "EntryNotFound", body, commit)
                    return
                data = path.read_bytes()
                etag = f'"{hashlib.sha256(data).hexdigest()}"'
                headers = {"X-Repo-Commit": commit, "ETag": etag}
                rng = self.headers.get("Range", "")
                if body and rng.startswith("bytes=") and rng[6:].endswith("-"):
                    start = int(rng[6:-1])
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                    self._send(206, data[start:], headers, body)
                else:
                    self._send(200, data, headers, body)

        return Handler
