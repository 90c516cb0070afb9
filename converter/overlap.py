"""Background I/O for the conversion loop: the next tensor is read while the current one is quantized,
and finished tensors are appended to their shard while the next one is read and quantized.

Why: the loop was serial -- read, copy to the GPU, quantize, measure the error, write -- so the GPU path
spent most of its time waiting on the host (BENCHMARKS.md, convert --device cuda). File reads (positional,
so the reader is shared safely) and writes release the GIL, so one thread each overlaps them with the main
thread's work. Memory stays bounded by the largest tensor: at most one tensor read ahead and a few
quantized outputs (a quarter of their input each) waiting to be written.
"""
from __future__ import annotations

import collections
import concurrent.futures


class OrderedWorker:
    """Runs submitted calls one at a time, in submission order, on one thread. The first error is raised
    by the next submit() or by drain(); at most `depth` calls wait, so their arguments stay bounded."""

    def __init__(self, name: str, depth: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending = collections.deque()
        self._depth = depth

    def submit(self, fn, *args) -> None:
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._depth):
            self._pending.popleft().result()  # raises the call's error here, in the caller's thread
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every submitted call; raise the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pending.clear()

    def close(self) -> None:
        """Wait for what is running, drop the rest (after an error), stop the thread."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)


class ReadAhead:
    """reader.read(name) for `names` in order, each started while the previous one is being used."""

    def __init__(self, reader, names: list):
        self._reader = reader
        self._names = list(names)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qckpt-read")
        self._futures = {}
        self._next = 0

    def _start(self, i: int) -> None:
        if i < len(self._names) and self._names[i] not in self._futures:
            self._futures[self._names[i]] = self._pool.submit(self._reader.read, self._names[i])

    def read(self, name: str):
        """The tensor `name` (the next in order, or any other: read now); starts reading the one after."""
        if self._next < len(self._names) and self._names[self._next] == name:
            self._start(self._next)
            self._next += 1
            self._start(self._next)
            return self._futures.pop(name).result()
        return self._reader.read(name)

    def close(self) -> None:
        """Wait for a read still running (the reader is closed next), drop what was read ahead."""
        self._pool.shutdown(wait=True)
        self._futures.clear()
