"""Read a safetensors file one tensor at a time with positioned reads: memory holds the tensors asked for,
never a shard. Positioned reads also let another thread read ahead on the same file (overlap.ReadAhead).

(mmap would count every touched page of the shard in the process RSS until unmapped; positioned reads
into a fresh buffer keep the peak at the tensors in use -- the conversion holds two: the current one and
the one read ahead.)
"""
from __future__ import annotations

import os

import torch

from .header import Header, TruncatedFileError, parse_header, parse_length


class SafetensorsFile:
    """An open, validated safetensors file. Use as a context manager or call close()."""

    def __init__(self, path, display_name: str | None = None):
        self.path = os.fspath(path)
        self.where = display_name or self.path
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            size = os.fstat(self._fd).st_size
            n = parse_length(os.pread(self._fd, 8, 0), size, self.where)
            raw = _pread_exact(self._fd, n, 8, self.where)
            self.header: Header = parse_header(raw, size, self.where)
        except BaseException:
            os.close(self._fd)
            raise
        self._infos = self.header.by_name()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def names(self) -> list:
        return [t.name for t in self.header.tensors]

    def info(self, name: str):
        return self._infos[name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` as a fresh CPU tensor owning its memory."""
        info = self._infos[name]
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            view = memoryview(buf.numpy()).cast("B")
            _preadinto_exact(self._fd, view, self.header.data_start + info.start, f"{self.where}: tensor {name!r}")
        return buf.view(info.torch_dtype).reshape(info.shape) if info.shape else buf.view(info.torch_dtype).reshape(())


    def copy_raw(self, name: str, write, chunk: int = 8 << 20) -> int:
        """Stream the raw bytes of `name` to write(memoryview) in chunks; memory stays at one chunk."""
        info = self._infos[name]
        buf = memoryview(bytearray(max(1, min(chunk, info.nbytes))))
        done = 0
        while done < info.nbytes:
            m = min(len(buf), info.nbytes - done)
            _preadinto_exact(self._fd, buf[:m], self.header.data_start + info.start + done,
                             f"{self.where}: tensor {name!r}")
            write(buf[:m])
            done += m
        return done


def _pread_exact(fd: int, n: int, offset: int, where: str) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise TruncatedFileError(f"{where}: file ends inside the header")
    return data


def _preadinto_exact(fd: int, view: memoryview, offset: int, where: str) -> None:
    done = 0
    total = len(view)
    while done < total:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise TruncatedFileError(f"{where}: file ends before the tensor's data does (truncated)")
        done += got


def read_header(path, display_name: str | None = None) -> Header:
    """Only the validated header of a file."""
    with SafetensorsFile(path, display_name) as f:
        return f.header
