"""A small Hugging Face Hub-compatible HTTP server for tests, on 127.0.0.1 only.

It implements the endpoints the real ``huggingface_hub`` 2.x client calls to create a model repo, upload files in
one commit and download them again, with the same status codes and headers the client relies on:

* ``POST /api/repos/create``                          create a repo (409 when it exists)
* ``POST /api/validate-yaml``                         README.md metadata check before a commit
* ``POST /api/models/{repo}/preupload/{rev}``         "regular" (small text) or "lfs" (binary or >= 10 MiB) per file
* ``POST /{repo}.git/info/lfs/objects/batch``         git-lfs batch API, "basic" transfer, with a verify action
* ``PUT  /_lfs/{oid}``, ``POST /_lfs/verify``          LFS upload (sha256 and size checked) and verification
* ``POST /api/models/{repo}/commit/{rev}``            NDJSON commit: header, file (base64), lfsFile, deletedFile
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``           download, with X-Repo-Commit / ETag / X-Linked-* headers
* ``GET  /api/models/{repo}[/revision/{rev}]``        model info (sha, siblings)
* ``GET  /api/models/{repo}/tree/{rev}``              file listing

Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound) so the client raises its usual
exceptions. Repos named ``readonly-*`` refuse commits (403). Writes need ``Authorization: Bearer <token>``.
The server is bounded: it serves at most ``max_requests`` requests and stops itself after ``lifetime_s`` seconds
(or when the ``with`` block ends). Nothing is stored on disk. Every request is recorded in :attr:`HubServer.log`
so tests can see what the client did.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SIZE_LIMIT = 10 * 1024 * 1024
USER = "hf-int8-tester"
READ_ONLY_PREFIX = "readonly-"
"""Repos whose name starts with this refuse commits with 403 (to test how clients report a failed upload)."""


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[tuple[str, dict[str, StoredFile]]] = field(default_factory=list)  # (sha, files), oldest first

    def files_at(self, revision: str) -> tuple[str, dict[str, StoredFile]] | None:
        if not self.commits:
            return ("0" * 40, {}) if revision == "main" else None
        if revision == "main":
            return self.commits[-1]
        for sha, files in self.commits:
            if sha == revision:
                return sha, files
        return None


class HubServer:
    """Start with ``with HubServer(token) as hub:``; ``hub.endpoint`` is the URL to give ``HF_ENDPOINT``."""

    def __init__(self, token: str, max_requests: int = 2000, lifetime_s: float = 300.0) -> None:
        self.token = token
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._timer: threading.Timer | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_state = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()  # never called from the serving thread itself: handlers run in their own threads
            server.server_close()

    # -- helpers for tests -------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        state = self.repos[repo_id].files_at(revision)
        assert state is not None
        return state[1]

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, int]]:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]


_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"


class _Handler(BaseHTTPRequestHandler):
    server_state: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None, head: bool = False
    ) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        hub = self.server_state
        with hub.lock:
            hub.log.append((self.command, self.path, status))

    def _error(self, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server_state.token}"

    def _dispatch(self, method: str) -> None:
        hub = self.server_state
        with hub.lock:
            served = len(hub.log)
        if served >= hub.max_requests:
            self._error(503, None, "test hub server: request budget exhausted")
            hub.stop()
            return
        path = unquote(urlsplit(self.path).path)
        for verb, pattern, handler in _ROUTES:
            if verb == method:
                match = re.fullmatch(pattern, path)
                if match:
                    handler(self, **match.groupdict())
                    return
        self._error(404, None, f"test hub server: no route for {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # -- repo lookup -------------------------------------------------------------------------------------------
    def _repo(self, repo: str, head: bool = False) -> Repo | None:
        found = self.server_state.repos.get(repo)
        if found is None or (found.private and not self._authorized()):
            self._error(404 if found is None else 401, "RepoNotFound", f"Repository {repo} not found", head=head)
            return None
        return found

    # -- endpoints ---------------------------------------------------------------------------------------------
    def create_repo(self) -> None:
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        payload = json.loads(self._body() or b"{}")
        if payload.get("type", "model") != "model":
            self._error(400, None, f"only model repos are supported, got {payload.get('type')!r}")
            return
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        hub = self.server_state
        with hub.lock:
            if repo_id in hub.repos:
                exists = True
            else:
                exists = False
                private = payload.get("visibility") == "private" or bool(payload.get("private"))
                hub.repos[repo_id] = Repo(repo_id, private)
        url = f"{self.server_state.endpoint}/{repo_id}"
        if exists:  # like the Hub, the conflict still says where the repo is (the client reads it with exist_ok)
            self._send(
                409,
                {"error": "You already created this model repo", "url": url},
                {"X-Error-Message": "You already created this model repo"},
            )
            return
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        import yaml

        content = json.loads(self._body() or b"{}").get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            return
        try:
            data = yaml.safe_load(match.group(1))
        except yaml.YAMLError as exc:
            self._send(400, {"errors": [{"message": str(exc)}], "warnings": []})
            return
        if data is not None and not isinstance(data, dict):
            self._send(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo: str, rev: str) -> None:
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        found = self._repo(repo)
        if found is None:
            return
        state = found.files_at(rev)
        existing = state[1] if state else {}
        files = []
        for entry in json.loads(self._body())["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["size"] >= LFS_SIZE_LIMIT or b"\0" in sample
            old = existing.get(entry["path"])
            oid = None if old is None else (old.sha256 if old.lfs else old.git_oid)
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": files, "commitOid": state[0] if state else None})

    def lfs_batch(self, repo: str) -> None:
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        if self._repo(repo) is None:
            return
        payload = json.loads(self._body())
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.server_state.lfs_objects:
                base = self.server_state.endpoint
                entry["actions"] = {
                    "upload": {"href": f"{base}/_lfs/{obj['oid']}?size={obj['size']}"},
                    "verify": {"href": f"{base}/_lfs/verify"},
                }
            objects.append(entry)
        self._send(
            200,
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def lfs_put(self, oid: str) -> None:
        data = self._body()
        query = dict(p.split("=", 1) for p in urlsplit(self.path).query.split("&") if "=" in p)
        if hashlib.sha256(data).hexdigest() != oid or int(query.get("size", len(data))) != len(data):
            self._error(400, None, f"LFS object {oid}: content does not match its sha256 or size")
            return
        with self.server_state.lock:
            self.server_state.lfs_objects[oid] = data
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self) -> None:
        payload = json.loads(self._body())
        data = self.server_state.lfs_objects.get(payload["oid"])
        if data is None or len(data) != payload["size"]:
            self._error(404, None, f"LFS object {payload['oid']} was not uploaded")
            return
        self._send(200, {"oid": payload["oid"], "size": payload["size"]})

    def commit(self, repo: str, rev: str) -> None:
        if not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header")
            return
        found = self._repo(repo)
        if found is None:
            return
        if repo.split("/")[1].startswith(READ_ONLY_PREFIX):
            self._error(403, None, f"You don't have the rights to push to {repo}")
            return
        state = found.files_at(rev)
        if state is None:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found")
            return
        files = dict(state[1])
        summary = ""
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                if value.get("encoding") != "base64":
                    self._error(400, None, f"unsupported encoding {value.get('encoding')!r}")
                    return
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                data = self.server_state.lfs_objects.get(value["oid"])
                if data is None:
                    self._error(400, None, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = StoredFile(data, lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/")
                for path in [p for p in files if p == prefix or p.startswith(prefix + "/")]:
                    del files[path]
            else:
                self._error(400, None, f"unsupported commit operation {key!r}")
                return
        sha = hashlib.sha1(f"{repo}:{len(found.commits)}:{summary}:{time.time_ns()}".encode()).hexdigest()
        with self.server_state.lock:
            found.commits.append((sha, files))
        base = self.server_state.endpoint
        self._send(
            200,
            {"commitUrl": f"{base}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None, "success": True},
        )

    def resolve(self, repo: str, rev: str, path: str, head: bool = False) -> None:
        found = self._repo(repo, head=head)
        if found is None:
            return
        state = found.files_at(rev)
        if state is None:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found", head=head)
            return
        sha, files = state
        stored = files.get(path)
        if stored is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {rev}", head=head)
            return
        data = stored.data
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{stored.git_oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(len(data))})
        status = 200
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and not head:
            start = int(ranged.group(1))
            end = int(ranged.group(2)) if ranged.group(2) else len(data) - 1
            data, status = data[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{len(stored.data)}"
        headers["Content-Length"] = str(len(data))
        self._send(status, data, headers, head=head)

    def model_info(self, repo: str, rev: str = "main") -> None:
        found = self._repo(repo)
        if found is None:
            return
        state = found.files_at(rev)
        if state is None:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found")
            return
        sha, files = state
        self._send(
            200,
            {
                "id": repo,
                "modelId": repo,
                "sha": sha,
                "private": found.private,
                "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)],
                "author": repo.split("/")[0],
            },
        )

    def tree(self, repo: str, rev: str, sub: str | None = None) -> None:
        found = self._repo(repo)
        if found is None:
            return
        state = found.files_at(rev)
        if state is None:
            self._error(404, "RevisionNotFound", f"Revision {rev} not found")
            return
        entries = []
        for path, stored in sorted(state[1].items()):
            if sub and not path.startswith(sub.rstrip("/") + "/"):
                continue
            entry = {"type": "file", "path": path, "size": len(stored.data), "oid": stored.git_oid}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": 134}
            entries.append(entry)
        self._send(200, entries)


_ROUTES = [
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/_lfs/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("POST", r"/_lfs/verify", _Handler.lfs_verify),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
    (
        "HEAD",
        rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)",
        lambda self, **kw: _Handler.resolve(self, head=True, **kw),
    ),
    ("GET", rf"/api/models/{_REPO}", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _Handler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?", _Handler.tree),
]
