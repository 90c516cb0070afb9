"""error_stats: the conversion report's relative Frobenius error and max abs error of a quantized weight,
against a float64 computation, for several chunk sizes (the GPU uses larger chunks than the CPU)."""
import math

import pytest
import torch

import converter
from converter import error_stats as es


def scratch(_index, size, device):
    return torch.empty(size, dtype=torch.float32, device=device)


def float64_stats(qt, weight):
    diff = qt.dequantize(torch.float32).double().reshape(-1) - weight.double().reshape(-1)
    return float(diff.norm() / weight.double().norm()), float(diff.abs().max())


@pytest.mark.parametrize("shape", [(1,), (257, 33), (3000, 1001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_error_stats_match_float64(shape, dtype, gen, monkeypatch):
    weight = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    qt = converter.quantize(weight, "nf4", 64, True)
    want_rel, want_max = float64_stats(qt, weight)
    monkeypatch.setattr(es, "_ERROR_CHUNK", 1000)  # several chunks, a short last one
    rel, mx = es.error_stats(qt, weight, scratch)
    assert rel == pytest.approx(want_rel, rel=1e-5) and mx == want_max
    restored = qt.dequantize(torch.float32).reshape(-1)
    rel_d, mx_d = es._compare(restored, weight, scratch, 777)
    assert rel_d == pytest.approx(want_rel, rel=1e-5) and mx_d == want_max


def test_error_stats_of_exact_and_zero_weights():
    zero = torch.zeros(300)
    qt = converter.quantize(torch.ones(300), "nf4", 64, False)  # ones quantize exactly
    assert es.error_stats(qt, torch.ones(300), scratch) == (0.0, 0.0)
    restored = converter.quantize(zero, "nf4", 64, False).dequantize(torch.float32)
    assert es._compare(restored, zero, scratch, 1000) == (0.0, 0.0)
    rel, _ = es._compare(torch.ones(4), torch.zeros(4), scratch, 1000)
    assert math.isinf(rel)
