"""Publish a converted folder to the Hugging Face Hub, shard by shard.

Two entry points over one mechanism (HUB.md section 2):
- `push(folder, repo_id)`: verify the folder, create the repo (and branch) if needed, pre-upload each large
  file on its own (LFS batch + PUT + verify), then make one commit holding every file.
- `stream_shards_to_hub(repo_id)`: for `convert --push-to`; pre-upload each shard as soon as it is written,
  delete it locally, and commit once at the end, so disk use stays near one shard.

Resuming is the Hub's own content addressing: a pre-upload first asks the LFS batch endpoint, which answers
"already stored" (no actions) for objects a previous, interrupted run delivered, so a re-run sends only what
is missing. Nothing is visible in the repo until the final commit.

With `hf_xet` installed, huggingface_hub uploads through Xet on its own; HF_HUB_DISABLE_XET=1 forces the LFS
path (tests, or hosts without Xet access).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

from ._version import __version__
from .errors import HubError, SourceNotFoundError, VerificationError

# Files at least this large are pre-uploaded one by one (the Hub stores them in LFS anyway).
LARGE_FILE_BYTES = 10 * 1024 * 1024
_WEIGHT_SUFFIX = ".safetensors"


@dataclasses.dataclass(frozen=True)
class PushResult:
    """Where the files went: the commit made (None when nothing changed) and the files it holds."""

    repo_id: str
    revision: str
    commit: str | None
    commit_url: str | None
    files: tuple
    preuploaded: tuple  # the large files sent through their own pre-upload, in order

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["files"] = list(self.files)
        out["preuploaded"] = list(self.preuploaded)
        return out


@contextlib.contextmanager
def _hub_errors(repo_id: str, what: str):
    """Turn huggingface_hub's HTTP and transport failures into one-line HubErrors naming the repo."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except (HubError, SourceNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified below; anything else re-raises unchanged
        # huggingface_hub wraps a failed LFS upload in RuntimeError("Error while uploading ..."): report the
        # error underneath, which says why
        chain = []
        cause = exc
        while cause is not None and len(chain) < 10:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        http = next((c for c in chain if isinstance(c, HfHubHTTPError)), None)
        if http is not None:
            status = getattr(getattr(http, "response", None), "status_code", None)
            text = str(http).strip()
            first = text.splitlines()[0] if text else type(http).__name__
            raise HubError(f"{repo_id}: {what} failed{f' (HTTP {status})' if status else ''}: {first}") from exc
        root = chain[-1]
        transport = type(root).__module__.split(".")[0] in ("httpx2", "httpx", "httpcore", "h11")
        if not (transport or isinstance(root, (OSError, ValueError))):
            raise  # a bug, not a Hub failure
        raise HubError(f"{repo_id}: {what} failed: {type(root).__name__}: {' '.join(str(root).split())}") from exc


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """huggingface_hub's bars off for the duration when not `enabled` (its switch is process-wide, so
    it is restored after)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _api(token, endpoint):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token)


def _prepare_repo(api, repo_id: str, private: bool, revision: str | None) -> str:
    """Create the repo (a no-op if it exists) and the branch; return the revision to commit to."""
    with _hub_errors(repo_id, "creating the repo"):
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        with _hub_errors(repo_id, f"creating branch {revision!r}"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return revision or "main"


def folder_files(folder: str) -> list:
    """[(path in repo, local path)] of every file to publish: hidden files and folders (temporaries,
    caches) are left out; weights first, each group sorted, so uploads happen in a stable order."""
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            found.append((os.path.relpath(full, folder).replace(os.sep, "/"), full))
    return sorted(found, key=lambda item: (not item[0].endswith(_WEIGHT_SUFFIX), item[0]))


def _is_large(path_in_repo: str, local: str) -> bool:
    return path_in_repo.endswith(_WEIGHT_SUFFIX) or os.path.getsize(local) >= LARGE_FILE_BYTES


def push(path, repo_id: str, *, private: bool = False, revision: str | None = None, message: str | None = None,
         token=None, endpoint: str | None = None, check: bool = True) -> PushResult:
    """Upload the converted folder `path` to `repo_id` in one commit, pre-uploading large files one at a time.

    `check` runs `verify` first and refuses a folder with findings. `endpoint` defaults to HF_ENDPOINT.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise SourceNotFoundError(f"{folder}: not a folder")
    if check:
        from .verify import verify

        result = verify(folder)
        if not result.ok:
            more = f" (and {len(result.findings) - 1} more)" if len(result.findings) > 1 else ""
            raise VerificationError(f"{folder}: refusing to push, verify found {len(result.findings)} problem(s): "
                                    f"{result.findings[0]}{more}; run `qckpt verify {folder}`")
    files = folder_files(folder)
    if not files:
        raise SourceNotFoundError(f"{folder}: nothing to push (the folder is empty)")
    stream = HubShardStream(repo_id, private=private, revision=revision, token=token, endpoint=endpoint,
                            delete_local=False)
    for path_in_repo, local in files:
        if _is_large(path_in_repo, local):
            stream.add_file(local, path_in_repo)
    return stream.finish(folder, message=message)


class HubShardStream:
    """Pre-upload files to a Hub repo as they are produced; one commit at `finish()`.

    Interface for the converter (`qckpt convert --push-to REPO_ID`):

        stream = stream_shards_to_hub(repo_id, private=False, revision=None, token=None)
        for each shard, once its file is complete under its final name:
            stream.add_file(local_path, path_in_repo)   # uploads now, then deletes local_path
        stream.finish(output_folder, message=None)       # commits the shards plus every file left in the
                                                          # folder (config, index, README, report, tokenizer)
    The repo and branch are created by the constructor, so a bad token or name fails before any work.
    If the conversion fails, simply drop the object: nothing was committed, and a re-run re-sends only
    shards the Hub does not hold yet.
    """

    def __init__(self, repo_id: str, *, private: bool = False, revision: str | None = None, token=None,
                 endpoint: str | None = None, delete_local: bool = True):
        self.repo_id = repo_id
        self.token = token
        self.delete_local = delete_local
        self._api = _api(token, endpoint)
        self.revision = _prepare_repo(self._api, repo_id, private, revision)
        self._operations = {}  # path in repo -> CommitOperationAdd, already pre-uploaded
        self._finished = False
        self.progress = True  # huggingface_hub's upload bars; the converter turns them off with its own

    def add_file(self, local_path, path_in_repo: str | None = None) -> None:
        """Upload one file's content now (LFS pre-upload); with delete_local, remove the local file after."""
        from huggingface_hub import CommitOperationAdd

        if self._finished:
            raise HubError(f"{self.repo_id}: add_file after finish()")
        local = os.fspath(local_path)
        name = path_in_repo or os.path.basename(local)
        if not os.path.isfile(local):
            raise SourceNotFoundError(f"{local}: no such file to upload")
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=local)
        with _hub_errors(self.repo_id, f"uploading {name}"), _progress_bars(self.progress):
            self._api.preupload_lfs_files(self.repo_id, additions=[operation], revision=self.revision,
                                          repo_type="model")
        self._operations[name] = operation
        if self.delete_local:
            os.remove(local)

    # the converter's vocabulary: a shard is a file
    add_shard = add_file

    @property
    def uploaded(self) -> tuple:
        """Paths in the repo pre-uploaded so far, in order."""
        return tuple(self._operations)

    def finish(self, folder=None, *, message: str | None = None, extra_files=()) -> PushResult:
        """Commit every pre-uploaded file plus the files left in `folder` (and `extra_files`, as
        (local path, path in repo) pairs). Returns the commit."""
        from huggingface_hub import CommitOperationAdd

        if self._finished:
            raise HubError(f"{self.repo_id}: finish() called twice")
        operations = dict(self._operations)
        pending = list(folder_files(os.fspath(folder))) if folder is not None else []
        pending += [(name, os.fspath(local)) for local, name in extra_files]
        for name, local in pending:
            if name not in operations:
                operations[name] = CommitOperationAdd(path_in_repo=name, path_or_fileobj=local)
        if not operations:
            raise HubError(f"{self.repo_id}: nothing to commit")
        message = message or f"Upload {len(operations)} files with qckpt {__version__}"
        with _hub_errors(self.repo_id, "committing"):
            info = self._api.create_commit(self.repo_id, operations=list(operations.values()),
                                           commit_message=message, revision=self.revision, repo_type="model")
        self._finished = True
        return PushResult(
            repo_id=self.repo_id, revision=self.revision, commit=getattr(info, "oid", None),
            commit_url=getattr(info, "commit_url", None), files=tuple(sorted(operations)),
            preuploaded=tuple(self._operations),
        )


def stream_shards_to_hub(repo_id: str, *, private: bool = False, revision: str | None = None, token=None,
                         endpoint: str | None = None, delete_local: bool = True) -> HubShardStream:
    """A HubShardStream for `convert --push-to` (see its docstring for the protocol)."""
    return HubShardStream(repo_id, private=private, revision=revision, token=token, endpoint=endpoint,
                          delete_local=delete_local)
