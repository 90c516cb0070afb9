"""A checkpoint on the Hugging Face Hub: pinned to a commit sha at start, headers read with Range
requests, shards downloaded one at a time (the next prefetched in a thread while the current one is
quantized), each checked against its sha256 and deleted after use unless it was already in the user's cache.

The only module (with publish.py) that imports huggingface_hub; it honours HF_ENDPOINT, HF_TOKEN, HF_HOME
and HF_HUB_OFFLINE the way huggingface_hub does.
"""
from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import shutil
import time

from ..errors import CheckpointError, DiskFullError, HubError, SourceNotFoundError
from ..shards.digest import sha256_file
from ..shards.header import Header, parse_header, parse_length
from ..shards.index import INDEX_NAME, parse_weight_map
from .base import PICKLE_SUFFIXES, is_extra_file, pickle_refusal

_FIRST_RANGE = 100_000  # one request usually covers the 8-byte prefix and the whole header


class HubSource:
    kind = "hub"

    def __init__(self, repo_id: str, *, revision=None, token=None, work_dir=None, retries=None, backoff=0.5):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.token = token
        self.retries = 3 if retries is None else max(1, int(retries))
        self.backoff = backoff
        self.progress = False
        self.api = HfApi(token=token)
        self.work_dir = os.path.abspath(work_dir or os.path.join(os.getcwd(), ".qckpt-download"))
        os.makedirs(self.work_dir, exist_ok=True)
        info = self._call(lambda: self.api.model_info(repo_id, revision=revision, files_metadata=True),
                          what=f"revision {revision}" if revision else None)
        if not info.sha:
            raise HubError(f"{repo_id}: the Hub did not return a commit sha for revision {revision or 'main'}")
        self.commit = info.sha
        self.revision = revision
        self.description = repo_id
        self.files = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs is not None else None) for s in (info.siblings or [])}
        self.weight_map = None
        if INDEX_NAME in self.files:
            with open(self.download_small(INDEX_NAME), encoding="utf-8") as f:
                try:
                    obj = json.load(f)
                except ValueError as exc:
                    raise CheckpointError(f"{self._where(INDEX_NAME)}: not valid JSON ({exc})") from None
            self.weight_map = parse_weight_map(obj, self._where(INDEX_NAME))
            self.shards = sorted(set(self.weight_map.values()))
            for shard in self.shards:
                if shard not in self.files:
                    raise SourceNotFoundError(f"{self._where(INDEX_NAME)}: names shard {shard!r}, which is not in the repo")
        elif "model.safetensors" in self.files:
            self.shards = ["model.safetensors"]
        else:
            self.shards = sorted(f for f in self.files if f.endswith(".safetensors") and "/" not in f)
        if not self.shards:
            pickles = [f for f in self.files if f.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise pickle_refusal(f"{repo_id}@{self.commit}", pickles)
            raise CheckpointError(f"{repo_id}@{self.commit}: no .safetensors weights in the repo")
        self.config_dir = None
        if "config.json" in self.files:
            self.download_small("config.json")
            self.config_dir = os.path.join(self.work_dir, "meta")

    # -- errors -------------------------------------------------------------------------------------
    def _where(self, filename: str) -> str:
        return f"{self.repo_id}@{self.commit[:12] if getattr(self, 'commit', None) else 'main'}/{filename}"

    def display_name(self, shard: str) -> str:
        return self._where(shard)

    def _call(self, fn, what=None, filename=None):
        """Run a Hub call with this source's retries; failures become one-line errors naming the file."""
        where = self._where(filename) if filename else None
        return call_hub(fn, self.repo_id, token=self.token, retries=self.retries, backoff=self.backoff,
                        what=what, where=where)

    # -- headers ------------------------------------------------------------------------------------
    def _get_range(self, filename: str, start: int, end: int) -> bytes:
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        url = hf_hub_url(self.repo_id, filename, revision=self.commit, endpoint=self.api.endpoint)
        headers = build_hf_headers(token=self.token)
        headers["Range"] = f"bytes={start}-{end}"

        def fetch():
            r = get_session().get(url, headers=headers, follow_redirects=True)
            hf_raise_for_status(r)
            return r.content

        return self._call(fetch, filename=filename)

    def header(self, shard: str) -> Header:
        size = self.files.get(shard, (None, None))[0]
        where = self._where(shard)
        if size is None:
            raise SourceNotFoundError(f"{where}: file not found in the repo")
        first = self._get_range(shard, 0, min(size, _FIRST_RANGE) - 1)
        n = parse_length(first[:8], size, where)
        raw = first[8:8 + n] if len(first) >= 8 + n else self._get_range(shard, 8, 8 + n - 1)
        if len(raw) != n:
            raise CheckpointError(f"{where}: the Hub returned {len(raw)} header bytes, expected {n}")
        return parse_header(raw, size, where)

    # -- files --------------------------------------------------------------------------------------
    def download_small(self, filename: str) -> str:
        """Download a small file (config, index, tokenizer, card) of the pinned commit into the work
        folder's meta/ and return its local path; errors are the same one-line errors as every Hub call."""
        from huggingface_hub import hf_hub_download

        return self._call(lambda: hf_hub_download(
            self.repo_id, filename, revision=self.commit, local_dir=os.path.join(self.work_dir, "meta"),
            token=self.token, endpoint=self.api.endpoint), filename=filename)

    def _fetch(self, shard: str) -> tuple[str, bool]:
        """(local path, delete after use). A file already in the user's cache is used in place."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        size, sha = self.files.get(shard, (None, None))
        cached = try_to_load_from_cache(self.repo_id, shard, revision=self.commit)
        if isinstance(cached, str) and os.path.isfile(cached):
            blob = os.path.basename(os.path.realpath(cached))
            if sha is None or blob == sha or sha256_file(cached) == sha:
                return cached, False
        folder = os.path.join(self.work_dir, "shards")
        path = self._call(lambda: hf_hub_download(
            self.repo_id, shard, revision=self.commit, local_dir=folder, token=self.token,
            endpoint=self.api.endpoint), filename=shard)
        if size is not None and os.path.getsize(path) != size:
            os.unlink(path)
            raise HubError(f"{self._where(shard)}: downloaded {os.path.getsize(path)} bytes, the listing says {size}")
        if sha is not None:
            got = sha256_file(path)
            if got != sha:
                os.unlink(path)
                raise HubError(f"{self._where(shard)}: sha256 mismatch after download (got {got[:16]}..., "
                               f"expected {sha[:16]}...)")
        return path, True

    def iter_shards(self, shards):
        """Yield (shard, local path), downloading the next shard in a thread while the caller works."""
        shards = list(shards)
        if not shards:
            return
        self._quiet_downloads()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qckpt-prefetch") as pool:
            future = pool.submit(self._fetch, shards[0])
            pending = None
            try:
                for i, shard in enumerate(shards):
                    path, delete = future.result()
                    pending = (path, delete)
                    future = pool.submit(self._fetch, shards[i + 1]) if i + 1 < len(shards) else None
                    yield shard, path
                    if delete:
                        _unlink(path)
                    pending = None
            finally:
                if pending is not None and pending[1]:
                    _unlink(pending[0])
                if future is not None:
                    try:
                        path, delete = future.result()
                        if delete:
                            _unlink(path)
                    except Exception:  # noqa: BLE001 - the run is already failing; keep its error
                        pass

    def extra_files(self, exclude: str | None = None) -> list:
        found = []
        for name, (size, _) in sorted(self.files.items()):
            if is_extra_file(name, size):
                found.append((name, self.download_small(name)))
        return found

    def _quiet_downloads(self) -> None:
        """huggingface_hub's own download bars follow our progress setting (restored in close())."""
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        if not self.progress and not are_progress_bars_disabled():
            disable_progress_bars()
            self._reenable_bars = True

    def close(self) -> None:
        shutil.rmtree(os.path.join(self.work_dir, "shards"), ignore_errors=True)
        if getattr(self, "_reenable_bars", False):
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
            self._reenable_bars = False


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def call_hub(fn, repo_id: str, *, token=None, retries: int = 3, backoff: float = 0.5, what=None, where=None):
    """Run a Hub call; retry server errors and dropped connections; turn failures into one-line errors.
    `where` names the file for messages (default: the repo)."""
    from huggingface_hub import errors as e

    last = None
    for attempt in range(retries):
        try:
            return fn()
        except e.GatedRepoError:
            raise HubError(f"{repo_id}: gated repository; accept its terms on the Hub and pass --token "
                           "(or set HF_TOKEN)") from None
        except e.RevisionNotFoundError:
            raise SourceNotFoundError(f"{repo_id}: {what or 'revision'} not found") from None
        except e.RepositoryNotFoundError:
            hint = "" if token else " (if it is private or gated, pass --token or set HF_TOKEN)"
            raise SourceNotFoundError(f"{repo_id}: repository not found or not accessible on the Hub{hint}") from None
        except e.LocalEntryNotFoundError as exc:  # the Hub was unreachable (it is an EntryNotFoundError too)
            last = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        except e.EntryNotFoundError:
            raise SourceNotFoundError(f"{(where or repo_id)}: file not found in the repo") from None
        except e.OfflineModeIsEnabled:
            raise HubError(f"{repo_id}: HF_HUB_OFFLINE is set and the files are not in the local cache") from None
        except e.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is not None and status < 500 and status != 429:
                if status in (401, 403):
                    raise HubError(f"{repo_id}: access denied (HTTP {status}); pass --token or set HF_TOKEN") from None
                raise HubError(f"{repo_id}: HTTP {status} from the Hub for {where or 'the repo'}") from None
            last = f"HTTP {status}"
        except OSError as exc:
            if isinstance(exc, HubError):
                raise
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full while downloading {(where or repo_id)}") from None
            last = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        except Exception as exc:  # noqa: BLE001 - httpx2 transport errors have no common public base here
            if type(exc).__module__.split(".")[0] not in ("httpx2", "httpx", "httpcore", "h11"):
                raise
            last = f"{type(exc).__name__}: {exc}"
        if attempt + 1 < retries:
            time.sleep(backoff * (attempt + 1))
    target = where or repo_id
    raise HubError(f"{target}: Hub request failed after {retries} attempts ({last})")


def snapshot(repo_id: str, *, revision=None, token=None, allow_patterns=None, retries: int = 3) -> str:
    """Download (or reuse from the user's cache) the files of `repo_id` matching `allow_patterns`, pinned
    to the commit `revision` resolves to; return the local snapshot folder. Used by the runtime loader,
    whose tensors stay memory-mapped from these files, so they are kept (unlike HubSource's shards)."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(token=token)
    info = call_hub(lambda: api.model_info(repo_id, revision=revision), repo_id, token=token, retries=retries,
                    what=f"revision {revision}" if revision else None)
    return call_hub(lambda: snapshot_download(repo_id, revision=info.sha, token=token, allow_patterns=allow_patterns),
                    repo_id, token=token, retries=retries)
