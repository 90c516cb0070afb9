"""`qckpt convert --device cuda` writes the same shards, index and config as `--device cpu` (weights staged
through pinned memory, quantized on the GPU, error pass on the GPU). Skipped without a GPU."""
import os

import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from checkpoint_factory import tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _convert(src, out, device, *extra):
    result = CliRunner().invoke(main, ["convert", str(src), str(out), "--device", device, "--quiet", *extra])
    assert result.exit_code == 0, (result.output, result.exception)
    return out


def _files(folder) -> dict:
    """{name: bytes} of everything a reader loads (the report holds timings and the device: left out)."""
    keep = {n for n in os.listdir(folder) if n.endswith((".safetensors", ".json")) and n != "qckpt_report.json"}
    return {n: (folder / n).read_bytes() for n in sorted(keep)}


@pytest.mark.parametrize("options", [(), ("--quant", "nf4", "--no-double-quant"), ("--quant", "fp4", "--blocksize", "128"),
                                     ("--quant", "int8")])
def test_convert_cuda_same_bytes_as_cpu(tmp_path, seed, options):
    """A small Llama (MLP weights of 1 MiB take the pinned staging path; several output shards) converts
    to byte-identical files on CPU and GPU."""
    src = tiny_llama(tmp_path / "src", seed=seed, hidden=512)
    cpu = _files(_convert(src, tmp_path / "cpu", "cpu", "--max-shard-size", "1MB", *options))
    gpu = _files(_convert(src, tmp_path / "gpu", "cuda", "--max-shard-size", "1MB", *options))
    assert len([n for n in cpu if n.endswith(".safetensors")]) > 1
    assert cpu.keys() == gpu.keys()
    assert [n for n in cpu if cpu[n] != gpu[n]] == []


def test_convert_cuda_transposed_conv1d_same_bytes(tmp_path, seed):
    """GPT-2's Conv1D weights (transposed before quantizing) come out the same on CPU and GPU."""
    src = tiny_gpt2(tmp_path / "src", seed=seed)
    cpu = _files(_convert(src, tmp_path / "cpu", "cpu"))
    gpu = _files(_convert(src, tmp_path / "gpu", "cuda"))
    assert cpu.keys() == gpu.keys() and [n for n in cpu if cpu[n] != gpu[n]] == []
