"""converter.overlap: the background writer keeps order and surfaces its errors; the read-ahead returns
exactly what the reader returns and starts the next read early; a write that fails in the background fails
the conversion with nothing finished-looking left behind."""
import os
import random
import threading
import time

import pytest
import torch

import converter
from converter import pipeline
from converter.errors import DiskFullError
from converter.overlap import OrderedWorker, ReadAhead
from converter.shards.writer import ShardWriter
from checkpoint_factory import tiny_llama


def test_ordered_worker_keeps_order_bounds_depth_and_raises(seed):
    rnd = random.Random(seed)
    done, running = [], []
    worker = OrderedWorker("test", depth=2)

    def job(i):
        running.append(i)
        time.sleep(rnd.random() * 0.003)
        done.append(i)

    for i in range(40):
        worker.submit(job, i)
        assert len(running) - len(done) <= 1  # one thread
        assert i - len(done) <= 2  # at most `depth` calls wait
    worker.drain()
    assert done == list(range(40))

    def fail():
        raise DiskFullError("disk full while writing x")

    worker.submit(fail)
    with pytest.raises(DiskFullError):
        worker.drain()
    worker.submit(fail)
    time.sleep(0.05)
    with pytest.raises(DiskFullError):  # the next submit raises a finished call's error
        worker.submit(job, 99)
    worker.close()


class _Reader:
    """reader.read stand-in: tensors by name, recording which thread read what and when."""

    def __init__(self, gen):
        self.tensors = {f"t{i}": torch.randn(int(torch.randint(1, 50, (1,), generator=gen)), generator=gen)
                        for i in range(6)}
        self.log = []
        self.gate = threading.Event()

    def read(self, name):
        self.log.append((name, threading.current_thread().name))
        if name == "t1":
            self.gate.wait(5)  # held until the test has seen it start
        return self.tensors[name].clone()


def test_read_ahead_returns_what_the_reader_does_and_reads_the_next_early(gen):
    reader = _Reader(gen)
    names = ["t0", "t1", "t2", "t3"]
    reads = ReadAhead(reader, names)
    got = reads.read("t0")
    assert torch.equal(got, reader.tensors["t0"])
    for _ in range(100):  # t1 was started in the background as soon as t0 was asked for
        if any(n == "t1" for n, _ in reader.log):
            break
        time.sleep(0.01)
    threads = dict(reader.log)
    assert "t1" in threads and threads["t1"].startswith("qckpt-read")
    reader.gate.set()
    for name in names[1:]:
        assert torch.equal(reads.read(name), reader.tensors[name])
    assert torch.equal(reads.read("t5"), reader.tensors["t5"])  # not in the list: read at once
    reads.close()
    assert [n for n, _ in reader.log] == ["t0", "t1", "t2", "t3", "t5"]  # each read once


def test_background_write_error_fails_the_conversion_cleanly(tmp_path, seed, monkeypatch):
    src = tiny_llama(tmp_path / "src", seed=seed)
    want = converter.convert(src, tmp_path / "fresh", max_shard_size="80KB", progress=False)
    original = ShardWriter.add
    calls = {"n": 0, "threads": set()}

    def add(self, name, tensor):
        calls["n"] += 1
        calls["threads"].add(threading.current_thread().name)
        if calls["n"] == 9:
            raise DiskFullError(f"disk full while writing {self.path}")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(DiskFullError):
        converter.convert(src, tmp_path / "out", max_shard_size="80KB", progress=False)
    assert any(t.startswith("qckpt-write") for t in calls["threads"])  # the adds ran in the background
    assert os.listdir(tmp_path / "out") == [pipeline.STAGING]  # nothing that looks finished
    monkeypatch.setattr(ShardWriter, "add", original)
    again = converter.convert(src, tmp_path / "out", max_shard_size="80KB", progress=False, resume=True)
    assert [t.name for t in again.tensors] == [t.name for t in want.tensors]
    for name in os.listdir(tmp_path / "fresh"):
        if name.endswith(".safetensors"):
            with open(tmp_path / "fresh" / name, "rb") as a, open(tmp_path / "out" / name, "rb") as b:
                assert a.read() == b.read(), name
