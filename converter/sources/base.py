"""What every source offers the pipeline: headers first, then shard files one at a time."""
from __future__ import annotations

import os

from ..errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Small files worth carrying to the output: tokenizers, generation config, chat templates, vocabularies.
EXTRA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".vocab", ".spm")
EXTRA_MAX_BYTES = 64 << 20
# Never copied: rewritten by qckpt (config, card), or describing the source's weights (index).
EXTRA_EXCLUDED = ("config.json", "README.md", "model.safetensors.index.json", "qckpt_report.json")


class PickleCheckpointError(CheckpointError):
    """Only pickle weights (.bin/.pt): refused, because unpickling runs arbitrary code."""


def pickle_refusal(where: str, names) -> PickleCheckpointError:
    sample = ", ".join(sorted(names)[:3])
    return PickleCheckpointError(
        f"{where}: only pickle weights ({sample}); qckpt never unpickles files. Convert them to "
        "safetensors first (e.g. the Hub's safetensors convert space) and retry"
    )


def is_extra_file(relpath: str, size: int | None) -> bool:
    """Whether a file of the source is a small companion file to copy to the output."""
    parts = relpath.replace("\\", "/").split("/")
    if any(p.startswith(".") for p in parts) or relpath in EXTRA_EXCLUDED:
        return False
    if size is not None and size > EXTRA_MAX_BYTES:
        return False
    return relpath.endswith(EXTRA_SUFFIXES) and not relpath.endswith(".safetensors.index.json")


def display(path: str) -> str:
    return os.fspath(path)
