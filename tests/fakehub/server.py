"""A Hub-compatible HTTP server on 127.0.0.1 for tests: repos in memory, the read endpoints that
huggingface_hub 2.x calls (HUB.md section 3), fault injection, and a route hook for more endpoints.

    hub = FakeHub().start(); sha = hub.add_repo("org/model", {"config.json": b"{}"})
    hub.add_route("POST", r"/api/repos/create", handler)   # handler(req, match) -> None (req: the handler)
    hub.fail(r"/resolve/.*model.safetensors", status=500, times=2)
    hub.drop(r"/resolve/.*model.safetensors", after=1000, times=1)   # close the connection mid-file
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import urllib.parse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".model", ".gguf")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
    files: dict  # path -> bytes
    commit: str
    branches: dict
    private: bool = False
    gated: bool = False
    # sha256 to advertise instead of the real one (to test integrity checks)
    fake_sha256: dict = dataclasses.field(default_factory=dict)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        item = {"type": "file", "path": path, "size": len(data), "oid": git_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            sha = self.fake_sha256.get(path) or hashlib.sha256(data).hexdigest()
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        return item


class FakeHub:
    def __init__(self):
        self.repos = {}
        self.tokens = {"hf_good"}
        self.log = []  # (method, path) of every request
        self._routes = []  # (method, compiled regex, handler) checked before the built-in ones
        self._faults = []  # dicts: regex, kind, status/after, times
        self._lock = threading.Lock()
        self._server = None
        self._thread = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="fakehub")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- content ------------------------------------------------------------------------------------
    def add_repo(self, repo_id: str, files: dict, *, private=False, gated=False, branch="main") -> str:
        """Create (or add a commit to) a repo; return the new commit sha."""
        with self._lock:
            commit = hashlib.sha1(json.dumps([repo_id, sorted((k, git_sha1(v)) for k, v in files.items()),
                                              len(self.log)]).encode()).hexdigest()
            repo = self.repos.get(repo_id)
            if repo is None:
                repo = Repo(dict(files), commit, {branch: commit}, private, gated)
                self.repos[repo_id] = repo
            else:
                repo.files, repo.commit = dict(files), commit
                repo.branches[branch] = commit
            repo.snapshots = getattr(repo, "snapshots", {})
            repo.snapshots[commit] = dict(files)
            return commit

    def add_route(self, method: str, pattern: str, handler) -> None:
        """Serve `method` requests whose path (no query) fully matches `pattern` with handler(req, match)."""
        self._routes.append((method.upper(), re.compile(pattern), handler))

    def fail(self, pattern: str, status: int = 500, times: int = 1, error_code: str | None = None) -> None:
        self._faults.append({"regex": re.compile(pattern), "kind": "status", "status": status, "times": times,
                             "code": error_code})

    def drop(self, pattern: str, after: int, times: int = 1) -> None:
        """Send headers and `after` bytes of a GET, then close the connection."""
        self._faults.append({"regex": re.compile(pattern), "kind": "drop", "after": after, "times": times})

    def take_fault(self, method: str, path: str, kind: str):
        with self._lock:
            for f in self._faults:
                if f["kind"] == kind and f["times"] > 0 and f["regex"].search(path):
                    if kind == "drop" and method != "GET":
                        continue
                    f["times"] -= 1
                    return f
        return None

    def snapshot(self, repo: Repo, rev: str):
        """(commit, files) for a branch name or a commit sha, or None."""
        commit = repo.branches.get(rev, rev)
        files = getattr(repo, "snapshots", {}).get(commit)
        return (commit, files) if files is not None else None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub = None

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------------
    def read_body(self) -> bytes:
        if getattr(self, "_body", None) is None:
            n = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(n) if n else b""
        return self._body

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def send_json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def error(self, status: int, code: str | None, message: str, headers: dict | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self.send_json({"error": message}, status, h)

    def _dispatch(self, method: str) -> None:
        self._body = None
        if method in ("POST", "PUT"):
            self.read_body()
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        self.query = urllib.parse.parse_qs(parsed.query)
        self.fake.log.append((method, path))
        fault = self.fake.take_fault(method, path, "status")
        if fault is not None:
            return self.error(fault["status"], fault["code"], f"injected {fault['status']}")
        for m, regex, handler in self.fake._routes:
            match = regex.fullmatch(path)
            if m == method and match:
                return handler(self, match)
        for m, regex, name in _BUILTIN:
            match = regex.fullmatch(path)
            if (m == method or (m == "GET" and method == "HEAD")) and match:
                return getattr(self, name)(match, head=method == "HEAD")
        self.error(404, None, f"no route for {method} {path}")

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    # -- access -------------------------------------------------------------------------------------
    def repo_or_error(self, repo_id: str, head=False):
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self.error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        if repo.private or repo.gated:
            auth = self.headers.get("authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if token not in self.fake.tokens:
                if repo.gated:
                    self.error(401 if token is None else 403, "GatedRepo", f"Access to {repo_id} is restricted")
                else:
                    self.error(401, "RepoNotFound", f"Repository {repo_id} not found")
                return None
        return repo

    def resolve_rev(self, repo, repo_id, rev):
        snap = self.fake.snapshot(repo, urllib.parse.unquote(rev))
        if snap is None:
            self.error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return snap

    def open_snapshot(self, repo_id: str, rev: str):
        """(repo, commit, files, view) of a readable repo at `rev`, or None once the error is sent;
        `view` lists entries with the repo's advertised (possibly fake) sha256."""
        repo = self.repo_or_error(repo_id)
        snap = None if repo is None else self.resolve_rev(repo, repo_id, rev)
        if snap is None:
            return None
        commit, files = snap
        return repo, commit, files, Repo(files, commit, repo.branches, fake_sha256=repo.fake_sha256)

    # -- built-in read endpoints ---------------------------------------------------------------------
    def model_info(self, m, head=False):
        opened = self.open_snapshot(m["repo"], m["rev"] or "main")
        if opened is None:
            return
        repo, commit, files, view = opened
        siblings = []
        for path in sorted(files):
            e = view.entry(path)
            s = {"rfilename": path, "size": e["size"], "blobId": e["oid"]}
            if "lfs" in e:
                s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        self.send_json({"id": m["repo"], "modelId": m["repo"], "sha": commit, "private": repo.private,
                        "gated": repo.gated, "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def tree(self, m, head=False):
        opened = self.open_snapshot(m["repo"], m["rev"])
        if opened is None:
            return
        repo, commit, files, view = opened
        prefix = (m["path"] or "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
        items, dirs = [], set()
        for path in sorted(files):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                dirs.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                continue
            if recursive:
                parts = path.split("/")[:-1]
                for i in range(len(prefix.split("/")) if prefix else 0, len(parts)):
                    dirs.add("/".join(parts[: i + 1]))
            items.append(view.entry(path))
        items = [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in sorted(dirs)] + items
        self.send_json(items)

    def paths_info(self, m, head=False):
        opened = self.open_snapshot(m["repo"], m["rev"])
        if opened is None:
            return
        repo, commit, files, view = opened
        form = urllib.parse.parse_qs(self.read_body().decode())
        self.send_json([view.entry(p) for p in form.get("paths", []) if p in files])

    def resolve(self, m, head=False):
        opened = self.open_snapshot(m["repo"], m["rev"])
        if opened is None:
            return
        repo, commit, files, view = opened
        path = m["path"]
        if path not in files:
            return self.error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": commit})
        data = files[path]
        entry = view.entry(path)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers["X-Linked-Etag"] = f'"{entry["lfs"]["oid"]}"'
            headers["X-Linked-Size"] = str(len(data))
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng:
            mm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if mm:
                start = int(mm[1])
                end = min(int(mm[2]) if mm[2] else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return self.send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        if not head:
            fault = self.fake.take_fault("GET", self.path.split("?")[0], "drop")
            if fault is not None:
                self.send_response(status)
                headers["Content-Length"] = str(len(body))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: fault["after"]])
                self.wfile.flush()
                self.close_connection = True
                import socket

                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        self.send(status, body, headers, head)


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_BUILTIN = [
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("POST", re.compile(rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)"), "paths_info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]
