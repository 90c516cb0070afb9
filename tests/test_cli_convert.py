"""`qckpt convert` on bad input: exit 1, one `error:` line naming the file/tensor, nothing that looks
finished in OUTPUT; usage errors exit 2."""
import errno
import json
import os
import pickle
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from converter.cli import main
from converter.shards import writer as writer_module
from checkpoint_factory import tiny_llama

FINISHED = ("config.json", "model.safetensors", "model.safetensors.index.json", "qckpt_report.json", "README.md")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("src") / "llama", seed=1)


def _run(*args):
    result = CliRunner().invoke(main, ["convert", *map(str, args), "--quiet"])
    return result


def _assert_error(result, *words):
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def _assert_nothing_finished(out):
    if os.path.isdir(out):
        present = set(os.listdir(out))
        assert not present & set(FINISHED), present
        assert not any(p.endswith(".safetensors") for p in present), present


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _corrupt_header(folder, header_bytes, length=None, data=b""):
    path = os.path.join(folder, "model.safetensors")
    n = len(header_bytes) if length is None else length
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + header_bytes + data)


def test_missing_source(tmp_path):
    """A source path that does not exist (and is not a repo id) is one error line."""
    r = _run(tmp_path / "nope", tmp_path / "out")
    _assert_error(r, "nope", "no such file")
    _assert_nothing_finished(tmp_path / "out")


def test_empty_source_folder(tmp_path):
    """An empty folder is refused by name."""
    (tmp_path / "empty").mkdir()
    _assert_error(_run(tmp_path / "empty", tmp_path / "out"), "empty")


def test_pickle_only_checkpoint_is_refused_and_never_unpickled(tmp_path):
    """A .bin-only checkpoint is refused; its pickle (which would create a file when loaded) never runs."""
    src = tmp_path / "bin"
    src.mkdir()
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    (src / "config.json").write_text("{}")
    _assert_error(_run(src, tmp_path / "out"), "pickle", "pytorch_model.bin")
    assert not marker.exists()


def test_truncated_shard(tmp_path, llama_dir):
    """A shard cut short names the file and says it is truncated."""
    src = _copy(llama_dir, tmp_path / "src")
    path = src / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    _assert_error(_run(src, tmp_path / "out"), "model.safetensors", "truncated")
    _assert_nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("length, words", [(1 << 50, "absurdly large"), (10_000_000, "past the end")])
def test_header_size_absurd_or_beyond_file(tmp_path, llama_dir, length, words):
    """A header length past the end of the file, or absurd, is refused."""
    src = _copy(llama_dir, tmp_path / "src")
    _corrupt_header(src, b'{"a":{}}', length=length)
    _assert_error(_run(src, tmp_path / "out"), "model.safetensors", words)


def test_invalid_header_json(tmp_path, llama_dir):
    """Garbage where the JSON header should be is refused."""
    src = _copy(llama_dir, tmp_path / "src")
    _corrupt_header(src, b"{\"a\": [1, 2,, }  ")
    _assert_error(_run(src, tmp_path / "out"), "model.safetensors", "not valid")


@pytest.mark.parametrize("header, words", [
    ({"w.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}, "truncated"),
    ({"a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, "overlaps"),
    ({"w.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 32]}}, "need 48"),
    ({"w.weight": {"dtype": "Q4_K", "shape": [2, 2], "data_offsets": [0, 16]}}, "unsupported dtype"),
])
def test_bad_offsets_counts_and_dtypes(tmp_path, llama_dir, header, words):
    """Offsets out of range, overlapping offsets, byte count vs shape, unknown dtype: each refused by name."""
    src = _copy(llama_dir, tmp_path / "src")
    _corrupt_header(src, json.dumps(header).encode(), data=b"\0" * 32)
    r = _run(src, tmp_path / "out")
    _assert_error(r, "model.safetensors", words)
    assert any(name in r.output for name in header)


def test_nan_in_weight_names_the_tensor(tmp_path, llama_dir):
    """An inf (NaN/inf) inside a weight to be quantized stops the run with the tensor's name; no output appears."""
    from safetensors.torch import load_file

    src = _copy(llama_dir, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    _assert_error(_run(src, tmp_path / "out"), "model.layers.1.mlp.up_proj.weight")
    _assert_nothing_finished(tmp_path / "out")


def test_index_naming_missing_shard_or_outside_path(tmp_path, llama_dir):
    """An index naming a shard that does not exist, or a path outside the folder, is refused."""
    src = _copy(llama_dir, tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x.weight": "model-2.safetensors"}}))
    _assert_error(_run(src, tmp_path / "out"), "model-2.safetensors", "does not exist")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x.weight": "../model.safetensors"}}))
    _assert_error(_run(src, tmp_path / "out2"), "../model.safetensors", "outside")


def test_non_empty_output_needs_overwrite(tmp_path, llama_dir):
    """A non-empty OUTPUT is refused without --overwrite; with it the run succeeds and old files go."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    _assert_error(_run(llama_dir, out), "not empty", "--overwrite")
    assert (out / "old.txt").exists()
    r = _run(llama_dir, out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "old.txt").exists() and (out / "config.json").exists()


def test_disk_full(tmp_path, llama_dir, monkeypatch):
    """ENOSPC while writing a shard is one 'disk full' line; no finished-looking output remains."""
    original = writer_module.ShardWriter.__init__

    class FullDisk:
        closed = False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.closed = True

    def init(self, *a, **k):
        original(self, *a, **k)
        self._body.close()
        self._body = FullDisk()

    monkeypatch.setattr(writer_module.ShardWriter, "__init__", init)
    _assert_error(_run(llama_dir, tmp_path / "out"), "disk full")
    _assert_nothing_finished(tmp_path / "out")


@pytest.mark.parametrize("args", [["--quant", "q3"], ["--blocksize", "100"], ["--max-shard-size", "lots"],
                                  ["--threads", "0"], []])
def test_usage_errors_exit_2(tmp_path, llama_dir, args):
    """Bad option values and missing arguments are usage errors (exit 2)."""
    argv = ["convert", str(llama_dir), str(tmp_path / "out"), *args] if args else ["convert"]
    assert CliRunner().invoke(main, argv).exit_code == 2


def test_json_summary_on_stdout(tmp_path, llama_dir):
    """--json prints one JSON object with the totals; python -m converter works the same way."""
    import subprocess
    import sys

    r = CliRunner().invoke(main, ["convert", str(llama_dir), str(tmp_path / "out"), "--json", "--quant", "int8"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["quant"] == "int8" and summary["quantized_tensors"] == 14
    p = subprocess.run([sys.executable, "-m", "converter", "convert", str(llama_dir), str(tmp_path / "out2"),
                        "--json", "--quiet"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["quant"] == "nf4"


def test_cuda_without_a_device_is_an_input_error(tmp_path, llama_dir):
    """--device cuda on a machine without CUDA is one error line, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    _assert_error(_run(llama_dir, tmp_path / "out", "--device", "cuda"), "no CUDA device")
