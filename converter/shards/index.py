"""`model.safetensors.index.json`: read with validation (shards must exist inside the folder), write atomically."""
from __future__ import annotations

import json
import os

from ..errors import CheckpointError, SourceNotFoundError

INDEX_NAME = "model.safetensors.index.json"


class IndexError_(CheckpointError):
    """The index is not valid JSON or not of the {"weight_map": {tensor: shard}} shape."""


class IndexPathError(CheckpointError):
    """The index names a shard path that escapes the folder."""


def shard_name(i: int, n: int) -> str:
    """transformers' shard naming; a single shard is plain model.safetensors."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def read_index(path) -> dict:
    """{tensor name: shard file name} of an index in a local folder, each shard checked to exist inside it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IndexError_(f"{path}: not valid JSON ({exc})") from None
    weight_map = parse_weight_map(obj, path)
    for tensor, shard in weight_map.items():
        full = os.path.join(folder, shard)
        if not os.path.isfile(full):
            raise SourceNotFoundError(f"{path}: tensor {tensor!r} is in shard {shard!r}, which does not exist")
    return dict(weight_map)


def parse_weight_map(obj, where: str) -> dict:
    """The validated {tensor: shard} of a parsed index object (shard names must stay inside the folder)."""
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise IndexError_(f"{where}: no weight_map object")
    for tensor, shard in weight_map.items():
        check_shard_name(shard, where, tensor)
    return dict(weight_map)


def check_shard_name(shard, where: str, tensor: str = "") -> None:
    """A shard must be a relative path that stays inside the checkpoint folder."""
    what = f" (tensor {tensor!r})" if tensor else ""
    if not isinstance(shard, str) or not shard:
        raise IndexError_(f"{where}: invalid shard name {shard!r}{what}")
    norm = os.path.normpath(shard)
    if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) or "\\" in shard or "\x00" in shard:
        raise IndexPathError(f"{where}: shard path {shard!r}{what} points outside the checkpoint folder")


def index_json(weight_map: dict, total_size: int, total_parameters: int | None = None) -> str:
    """The index text as transformers writes it (indent 2, sorted weight_map)."""
    metadata = {"total_size": int(total_size)}
    if total_parameters is not None:
        metadata["total_parameters"] = int(total_parameters)
    obj = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"
