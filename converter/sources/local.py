"""A checkpoint on disk: a folder (config.json + one or many .safetensors, with or without an index) or a
single .safetensors file. Files are read in place."""
from __future__ import annotations

import os

from ..errors import CheckpointError, SourceNotFoundError
from ..shards.header import Header
from ..shards.index import INDEX_NAME, read_index
from ..shards.reader import read_header
from .base import PICKLE_SUFFIXES, is_extra_file, pickle_refusal


class LocalSource:
    kind = "local"
    commit = None

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.exists(self.path):
            raise SourceNotFoundError(f"{path}: no such file or folder")
        if os.path.isfile(self.path):
            self._init_file()
        else:
            self._init_folder()
        self.description = self.path

    def _init_file(self):
        self.folder = os.path.dirname(self.path)
        name = os.path.basename(self.path)
        if name.endswith(PICKLE_SUFFIXES):
            raise pickle_refusal(self.path, [name])
        if os.path.getsize(self.path) == 0:
            raise CheckpointError(f"{self.path}: file is empty")
        self.shards = [name]
        self.weight_map = None
        self.config_dir = self.folder if os.path.isfile(os.path.join(self.folder, "config.json")) else None

    def _init_folder(self):
        self.folder = self.path
        entries = sorted(os.listdir(self.folder))
        if not entries:
            raise CheckpointError(f"{self.folder}: folder is empty")
        index = os.path.join(self.folder, INDEX_NAME)
        self.weight_map = None
        if os.path.isfile(index):
            self.weight_map = read_index(index)
            self.shards = sorted(set(self.weight_map.values()))
        elif "model.safetensors" in entries:
            self.shards = ["model.safetensors"]
        else:
            self.shards = [e for e in entries if e.endswith(".safetensors") and os.path.isfile(os.path.join(self.folder, e))]
        if not self.shards:
            pickles = [e for e in entries if e.endswith(PICKLE_SUFFIXES)]
            if pickles:
                raise pickle_refusal(self.folder, pickles)
            raise CheckpointError(f"{self.folder}: no .safetensors weights found")
        for shard in self.shards:
            if os.path.getsize(os.path.join(self.folder, shard)) == 0:
                raise CheckpointError(f"{os.path.join(self.folder, shard)}: file is empty")
        self.config_dir = self.folder if os.path.isfile(os.path.join(self.folder, "config.json")) else None

    def shard_path(self, shard: str) -> str:
        return os.path.join(self.folder, shard)

    def header(self, shard: str) -> Header:
        return read_header(self.shard_path(shard))

    def iter_shards(self, shards):
        """Yield (shard, local path); local files need no download."""
        for shard in shards:
            yield shard, self.shard_path(shard)

    def extra_files(self, exclude: str | None = None) -> list:
        """[(relative path, absolute path)] of small companion files (tokenizer, generation config...);
        `exclude` (the output folder, when it sits inside the source) is not walked."""
        if os.path.isfile(self.path) and self.config_dir is None:
            return []
        skip = os.path.abspath(exclude) if exclude else None
        found = []
        for root, dirs, files in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.join(root, d) != skip)
            for f in sorted(files):
                full = os.path.join(root, f)
                rel = os.path.relpath(full, self.folder)
                if os.path.islink(full) and not os.path.exists(full):
                    continue
                if is_extra_file(rel, os.path.getsize(full)):
                    found.append((rel, full))
        return found

    def read_readme(self) -> str | None:
        return None

    def close(self) -> None:
        pass
