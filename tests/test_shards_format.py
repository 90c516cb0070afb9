"""safetensors shards: byte-exact writer, per-tensor reader, one named error per broken header invariant."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file as reference_save

from converter.shards import SafetensorsFile, ShardWriter, read_header, save_file
from converter.shards import header as h
from converter.shards.index import IndexPathError, read_index
from converter.errors import SourceNotFoundError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.int32, torch.int64,
          torch.float64, torch.bool, torch.int16]


def _random_tensors(gen):
    out = {}
    n = int(torch.randint(3, 12, (1,), generator=gen))
    for i in range(n):
        dtype = DTYPES[int(torch.randint(0, len(DTYPES), (1,), generator=gen))]
        shape = tuple(int(d) for d in torch.randint(0, 7, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen))
        name = f"m.{int(torch.randint(0, 1000, (1,), generator=gen))}.w{i}" + ("é" if i == 2 else "")
        out[name] = (torch.randn(shape, generator=gen) * 100).to(dtype)
    return out


def test_writer_bytes_equal_safetensors_save_file(tmp_path, gen):
    """Random names, dtypes, shapes (incl. 0-d and empty): our bytes equal save_file's; the sha256 returned is the file's."""
    import hashlib

    for trial in range(5):
        tensors = _random_tensors(gen)
        reference_save(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
        sha = save_file(tensors, tmp_path / "ours.safetensors")
        ours = (tmp_path / "ours.safetensors").read_bytes()
        assert ours == (tmp_path / "ref.safetensors").read_bytes()
        assert sha == hashlib.sha256(ours).hexdigest()
        with SafetensorsFile(tmp_path / "ours.safetensors") as f:
            for name, t in tensors.items():
                assert torch.equal(f.read(name), t), name
    assert sorted(os.listdir(tmp_path)) == ["ours.safetensors", "ref.safetensors"]  # no temporaries left


def test_writer_abort_leaves_nothing(tmp_path):
    """An aborted writer removes its temporary file and never creates the final name."""
    w = ShardWriter(tmp_path / "model.safetensors")
    w.add("a", torch.ones(3))
    w.abort()
    assert os.listdir(tmp_path) == []


def _write_raw(path, header_obj, data=b"", length=None, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


@pytest.mark.parametrize("case, error, words", [
    ("short", h.TruncatedFileError, "too short"),
    ("absurd", h.HeaderTooLargeError, "absurdly large"),
    ("beyond", h.HeaderTooLargeError, "past the end"),
    ("json", h.HeaderJSONError, "not valid"),
    ("out_of_range", h.TruncatedFileError, "truncated"),
    ("overlap", h.OffsetError, "overlaps"),
    ("reversed", h.OffsetError, "reversed"),
    ("bytes", h.ByteCountError, "holds 12 bytes"),
    ("dtype", h.DtypeError, "unsupported dtype"),
])
def test_header_invariants_each_have_a_named_error(tmp_path, case, error, words):
    """Every broken header invariant raises its own CheckpointError subclass naming the file (and tensor)."""
    p = tmp_path / "bad.safetensors"
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    if case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "absurd":
        _write_raw(p, good, b"\0" * 16, length=1 << 40)
    elif case == "beyond":
        _write_raw(p, good, b"\0" * 16, length=10_000)
    elif case == "json":
        _write_raw(p, None, b"", raw_header=b"{not json")
    elif case == "out_of_range":
        _write_raw(p, good, b"\0" * 8)
    elif case == "overlap":
        _write_raw(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 24)
    elif case == "reversed":
        _write_raw(p, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8)
    elif case == "bytes":
        _write_raw(p, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16)
    elif case == "dtype":
        _write_raw(p, {"w": {"dtype": "Q4", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(error) as info:
        read_header(p)
    assert words in str(info.value) and "bad.safetensors" in str(info.value)


def test_reader_detects_truncation_after_open(tmp_path):
    """A file cut after the header was validated fails on read with a TruncatedFileError naming the tensor."""
    p = tmp_path / "m.safetensors"
    reference_save({"w": torch.ones(64)}, p)
    f = SafetensorsFile(p)
    os.truncate(p, os.path.getsize(p) - 10)
    with pytest.raises(h.TruncatedFileError, match="'w'"):
        f.read("w")
    f.close()


def test_index_rejects_paths_outside_and_missing_shards(tmp_path):
    """An index naming ../x or an absolute path is an IndexPathError; a missing shard a SourceNotFoundError."""
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(IndexPathError, match="outside"):
        read_index(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "/etc/passwd"}}))
    with pytest.raises(IndexPathError):
        read_index(tmp_path / "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-1.safetensors"}}))
    with pytest.raises(SourceNotFoundError, match="m-1.safetensors"):
        read_index(tmp_path / "model.safetensors.index.json")


def test_streamed_pass_through_equals_save_file(tmp_path, gen):
    """Tensors streamed chunk by chunk from another file (copy_raw -> add_stream) give save_file's bytes."""
    from converter.shards.header import Entry

    tensors = {"emb.weight": torch.randn(300, 7, generator=gen).to(torch.bfloat16), "b": torch.arange(5)}
    reference_save(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    w = ShardWriter(tmp_path / "out.safetensors")
    with SafetensorsFile(tmp_path / "src.safetensors") as f:
        for name in f.names():
            info = f.info(name)
            w.add_stream(Entry(name, info.dtype, info.shape), lambda write, n=name: f.copy_raw(n, write, chunk=100))
    w.commit()
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "src.safetensors").read_bytes()
