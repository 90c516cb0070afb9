"""The sha256 of a file, read in chunks: what the report records, --resume re-checks, a Hub download is
verified against, and `verify` compares (one implementation for all four)."""
from __future__ import annotations

import hashlib

_CHUNK = 8 << 20


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
