"""Upload endpoints for the loopback FakeHub (HUB.md section 2, LFS path with Xet disabled), attached through
its `add_route` hook:

    hub = FakeHub().start(); uploads = attach_uploads(hub)
    ... HfApi().create_repo / preupload_lfs_files / create_commit / upload_folder ...
    uploads.puts            # [(repo_id, oid, size)] of every LFS object body received
    uploads.commits         # [(repo_id, branch, commit, {path: kind})] of every commit made

State: LFS objects per repo (sha256 -> bytes) -- the LFS batch endpoint answers "already stored" (no actions)
for objects held there, which is what makes an interrupted push resumable. A commit builds a new snapshot
from the branch head plus the commit's operations and registers it with FakeHub.add_repo, so the read
endpoints serve pushed files like any other.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading

from .server import LFS_SUFFIXES, FakeHub, git_sha1

_REPO = r"(?P<repo>[^/]+/[^/]+)"
# Files the preupload endpoint sends to LFS: weight suffixes, or anything at least this large.
LFS_MIN_BYTES = 10 * 1024 * 1024


class Uploads:
    """The upload side's state and log; see the module docstring."""

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self.objects = {}  # repo_id -> {sha256: bytes}, verified at PUT time
        self.puts = []  # (repo_id, oid, size)
        self.batches = []  # (repo_id, oid, "upload" | "stored")
        self.commits = []  # (repo_id, branch, commit, {path: "lfs" | "regular" | "deleted"})
        self._lock = threading.Lock()

    # -- helpers --------------------------------------------------------------------------------------
    def _store(self, repo_id: str) -> dict:
        with self._lock:
            return self.objects.setdefault(repo_id, {})

    def _head_files(self, repo_id: str, branch: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return None
        snap = self.hub.snapshot(repo, branch)
        return None if snap is None else dict(snap[1])

    def _write_access(self, req, repo_id: str) -> bool:
        """Writes need a token the hub knows (HF_TOKEN=hf_good in tests), like the real Hub."""
        auth = req.headers.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token not in self.hub.tokens:
            req.error(401, None, f"Invalid credentials for {repo_id}: a write token is required")
            return False
        if repo_id not in self.hub.repos:
            req.error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return False
        return True

    # -- endpoints ------------------------------------------------------------------------------------
    def create_repo(self, req, match):
        body = json.loads(req.read_body() or b"{}")
        name, org = body.get("name"), body.get("organization")
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.hub.url}/{repo_id}"
        auth = req.headers.get("authorization", "")
        if auth[len("Bearer "):] not in self.hub.tokens:
            return req.error(401, None, "Invalid credentials: a write token is required")
        if repo_id in self.hub.repos:
            return req.send_json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("private") is True or body.get("visibility") == "private"
        self.hub.add_repo(repo_id, {}, private=private)
        req.send_json({"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, req, match):
        repo_id, branch = match["repo"], match["branch"]
        if not self._write_access(req, repo_id):
            return
        repo = self.hub.repos[repo_id]
        if branch in repo.branches:
            return req.error(409, None, f"Branch {branch} already exists")
        body = json.loads(req.read_body() or b"{}")
        start = body.get("startingPoint") or "main"
        snap = self.hub.snapshot(repo, start)
        if snap is None:
            return req.error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        repo.branches[branch] = snap[0]
        req.send_json({})

    def validate_yaml(self, req, match):
        req.read_body()  # an unread body corrupts the keep-alive connection (HUB.md 3, gotchas)
        req.send_json({"errors": [], "warnings": []})

    def preupload(self, req, match):
        repo_id, rev = match["repo"], match["rev"]
        if not self._write_access(req, repo_id):
            return
        files = self._head_files(repo_id, rev) or {}
        answer = []
        for item in json.loads(req.read_body())["files"]:
            path, size = item["path"], int(item["size"])
            mode = "lfs" if path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES else "regular"
            entry = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in files:  # lets the client drop unchanged files from the commit
                data = files[path]
                entry["oid"] = hashlib.sha256(data).hexdigest() if mode == "lfs" else git_sha1(data)
            answer.append(entry)
        req.send_json({"files": answer, "commitOid": None})

    def lfs_batch(self, req, match):
        repo_id = match["repo"]
        if not self._write_access(req, repo_id):
            return
        body = json.loads(req.read_body())
        if body.get("operation") != "upload":
            return req.error(400, None, "only the upload operation is implemented")
        store = self._store(repo_id)
        objects = []
        for obj in body["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if oid in store and len(store[oid]) == size:
                objects.append({"oid": oid, "size": size})  # no actions: already stored
                self.batches.append((repo_id, oid, "stored"))
                continue
            href = f"{self.hub.url}/__lfs/{repo_id}/{oid}"
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": href, "header": {}},
                "verify": {"href": f"{self.hub.url}/__lfs-verify/{repo_id}/{oid}"},
            }})
            self.batches.append((repo_id, oid, "upload"))
        req.send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                 {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, req, match):
        repo_id, oid = match["repo"], match["oid"]
        data = req.read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            return req.error(400, None, f"content does not hash to {oid}")
        self._store(repo_id)[oid] = data
        self.puts.append((repo_id, oid, len(data)))
        req.send(200, b"")

    def lfs_verify(self, req, match):
        repo_id, oid = match["repo"], match["oid"]
        body = json.loads(req.read_body() or b"{}")
        data = self._store(repo_id).get(oid)
        if data is None or body.get("size") not in (None, len(data)):
            return req.error(404, None, f"object {oid} not stored")
        req.send_json({})

    def commit(self, req, match):
        repo_id, branch = match["repo"], match["rev"]
        if not self._write_access(req, repo_id):
            return
        files = self._head_files(repo_id, branch)
        if files is None:
            return req.error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        store = self._store(repo_id)
        kinds = {}
        header = None
        for line in req.read_body().decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
                kinds[value["path"]] = "regular"
            elif key == "lfsFile":
                data = store.get(value["oid"])
                if data is None or len(data) != int(value["size"]):
                    return req.error(422, None, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                files[value["path"]] = data
                kinds[value["path"]] = "lfs"
            elif key == "deletedFile":
                files.pop(value["path"], None)
                kinds[value["path"]] = "deleted"
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(prefix)]:
                    files.pop(path)
                    kinds[path] = "deleted"
            else:
                return req.error(400, None, f"unsupported commit line {key!r}")
        if header is None:
            return req.error(400, None, "commit without a header line")
        commit = self.hub.add_repo(repo_id, files, branch=branch)
        self.commits.append((repo_id, branch, commit, kinds))
        req.send_json({"success": True, "commitOid": commit,
                       "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}"})

    # -- queries for tests ----------------------------------------------------------------------------
    def put_oids(self, repo_id: str) -> list:
        return [oid for repo, oid, _ in self.puts if repo == repo_id]


def attach_uploads(hub: FakeHub) -> Uploads:
    """Register the upload endpoints on a running (or not yet started) FakeHub; return their state."""
    up = Uploads(hub)
    hub.add_route("POST", r"/api/repos/create", up.create_repo)
    hub.add_route("POST", r"/api/validate-yaml", up.validate_yaml)
    hub.add_route("POST", rf"/api/models/{_REPO}/branch/(?P<branch>.+)", up.create_branch)
    hub.add_route("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", up.preupload)
    hub.add_route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", up.lfs_batch)
    hub.add_route("PUT", rf"/__lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})", up.lfs_put)
    hub.add_route("POST", rf"/__lfs-verify/{_REPO}/(?P<oid>[0-9a-f]{{64}})", up.lfs_verify)
    hub.add_route("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", up.commit)
    return up
