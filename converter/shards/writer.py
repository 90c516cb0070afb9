"""Write a safetensors shard whose bytes equal `safetensors.torch.save_file(tensors, metadata=...)`, streaming
tensors to disk one at a time and renaming the file into place only when it is whole.

Why a body file: the header comes first and holds every offset, but a double-quantized weight's quant-state
JSON carries its `nested_offset` repr, whose length is known only after quantizing. So tensors are appended
to a temporary body file as they come, and `commit()` writes header + the pieces in save_file's order to a
second temporary file (hashing as it goes), then renames it. Peak memory: one tensor plus a copy buffer.
"""
from __future__ import annotations

import errno
import hashlib
import os
import tempfile

import torch

from ..errors import CheckpointError, DiskFullError
from .header import Entry, build_header, dtype_to_name, file_order

_COPY_CHUNK = 8 << 20


def _mkstemp(folder: str, prefix: str, suffix: str) -> tuple[int, str]:
    """mkstemp creates files 0600; give them the permissions an ordinary open() would (0666 & ~umask)."""
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    return fd, path


def _raise_disk(exc: OSError, path: str):
    if exc.errno == errno.ENOSPC:
        raise DiskFullError(f"disk full while writing {path}") from None
    raise exc


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (no copy when it is already contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class ShardWriter:
    """Append tensors with add(); commit() makes `path` appear atomically; abort() removes the temporaries."""

    def __init__(self, path, metadata: dict | None = None):
        self.path = os.fspath(path)
        self.metadata = {"format": "pt"} if metadata is None else dict(metadata)
        folder = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        fd, self._body_path = _mkstemp(folder, f".{base}.", ".body.tmp")
        self._body = os.fdopen(fd, "wb", buffering=0)
        self._pieces = {}  # name -> (Entry, body offset)
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pieces:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        entry = Entry(name, dtype_to_name(tensor.dtype), tuple(tensor.shape))
        data = tensor_bytes(tensor)
        try:
            self._body.write(data)
        except OSError as exc:
            _raise_disk(exc, self.path)
        self._pieces[name] = (entry, self._size)
        self._size += len(data)

    def add_raw(self, entry: Entry, data) -> None:
        """Add bytes already in file form (a pass-through tensor read from another shard)."""
        if entry.name in self._pieces:
            raise CheckpointError(f"{self.path}: tensor {entry.name!r} written twice")
        view = memoryview(data).cast("B")
        if len(view) != entry.nbytes:
            raise CheckpointError(f"{self.path}: tensor {entry.name!r} has {len(view)} bytes, expected {entry.nbytes}")
        try:
            self._body.write(view)
        except OSError as exc:
            _raise_disk(exc, self.path)
        self._pieces[entry.name] = (entry, self._size)
        self._size += len(view)

    def add_stream(self, entry: Entry, fill) -> None:
        """Add a tensor whose bytes fill(write) streams in chunks (a pass-through copy of any size)."""
        if entry.name in self._pieces:
            raise CheckpointError(f"{self.path}: tensor {entry.name!r} written twice")
        written = 0

        def write(chunk):
            nonlocal written
            try:
                self._body.write(chunk)
            except OSError as exc:
                _raise_disk(exc, self.path)
            written += len(chunk)

        fill(write)
        if written != entry.nbytes:
            raise CheckpointError(f"{self.path}: tensor {entry.name!r} streamed {written} bytes, expected {entry.nbytes}")
        self._pieces[entry.name] = (entry, self._size)
        self._size += written

    @property
    def names(self) -> list:
        return list(self._pieces)

    def entries(self) -> list:
        return [entry for entry, _ in self._pieces.values()]

    def commit(self) -> str:
        """Assemble header + data under a temporary name, fsync, rename to `path`; return its sha256."""
        self._body.close()
        entries = self.entries()
        header, _ = build_header(entries, self.metadata)
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = _mkstemp(folder, f".{os.path.basename(self.path)}.", ".tmp")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb", buffering=0) as out, open(self._body_path, "rb", buffering=0) as body:
                try:
                    out.write(header)
                    digest.update(header)
                    buf = bytearray(_COPY_CHUNK)
                    view = memoryview(buf)
                    for entry in file_order(entries):
                        _, offset = self._pieces[entry.name]
                        _copy(body, out, offset, entry.nbytes, view, digest)
                    os.fsync(out.fileno())
                except OSError as exc:
                    _raise_disk(exc, self.path)
            os.replace(tmp, self.path)
        except BaseException:
            _unlink(tmp)
            raise
        finally:
            _unlink(self._body_path)
        return digest.hexdigest()

    def abort(self) -> None:
        if not self._body.closed:
            self._body.close()
        _unlink(self._body_path)


def _copy(src, dst, offset: int, n: int, view: memoryview, digest) -> None:
    src.seek(offset)
    left = n
    while left:
        got = src.readinto(view[: min(left, len(view))])
        if not got:
            raise CheckpointError(f"temporary body file ended early ({left} bytes missing)")
        chunk = view[:got]
        dst.write(chunk)
        digest.update(chunk)
        left -= got


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def save_file(tensors: dict, path, metadata: dict | None = None) -> str:
    """Like safetensors.torch.save_file (same bytes), atomic; returns the sha256."""
    writer = ShardWriter(path, metadata)
    try:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
