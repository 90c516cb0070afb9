"""Where checkpoints come from: a local path, or a Hub repo id (sources.hub, imported only when needed)."""
from __future__ import annotations

import os
import re

from ..errors import SourceNotFoundError
from .local import LocalSource

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def open_source(source, *, revision=None, token=None, work_dir=None, retries=None):
    """An existing local path wins; otherwise a Hub repo id (huggingface_hub reads HF_ENDPOINT etc.)."""
    text = os.fspath(source)
    if os.path.exists(text):
        return LocalSource(text)
    if not _REPO_ID.match(text) or text.endswith((".safetensors", ".json", ".bin")):
        raise SourceNotFoundError(f"{text}: no such file or folder (and not a Hub repo id)")
    from .hub import HubSource

    return HubSource(text, revision=revision, token=token, work_dir=work_dir, retries=retries)
