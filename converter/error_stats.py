"""How far a quantized weight is from the original: relative Frobenius error and max abs error, measured
in chunks into reused float32 scratch buffers (the conversion report's per-tensor figures)."""
from __future__ import annotations

import math

import torch

_ERROR_CHUNK = 1 << 20  # elements per error-measuring pass: 4 MB scratch buffers, no full-size temporaries
_DEVICE_CHUNK = 1 << 24  # on a GPU: larger passes (64 MB scratch), the launches cost more than the memory


def error_stats(qt, weight: torch.Tensor, scratch) -> tuple[float, float]:
    """(relative Frobenius error, max abs error) of the dequantized weight.

    Chunked ops into reused float32 scratch buffers: fresh full-size temporaries cost more in page faults
    than the arithmetic and would double the memory held for the largest weight."""
    restored = qt.dequantize(torch.float32).reshape(-1)
    if restored.device.type != "cpu":
        return _compare(restored, weight, scratch, _DEVICE_CHUNK)
    with _single_threaded_torch():
        return _compare(restored, weight, scratch, _ERROR_CHUNK)


class _single_threaded_torch:
    """These passes are memory-bound: torch's intra-op pool adds a thread sync per op and no speed (and
    stalls badly on a busy machine), so run them on one thread and restore the caller's setting after."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _compare(restored, weight, scratch, chunk) -> tuple[float, float]:
    """The figures over chunks of `chunk` elements. The running sums (float64, each chunk's float32 dot
    added in order) and extremes stay tensors on the weight's device and are read once per tensor: on a
    GPU, reading four scalars per chunk made this pass the largest stage of `convert --device cuda`
    (5-6 s of a 5 GB conversion on an H100 host)."""
    n = restored.numel()
    size = min(n, chunk)
    ref = scratch(0, size, restored.device)
    diff = scratch(1, size, restored.device)
    flat = weight.reshape(-1)
    sums = torch.zeros(2, dtype=torch.float64, device=restored.device)  # error^2, reference^2
    extremes = torch.zeros(2, dtype=torch.float32, device=restored.device)  # min, max difference
    for i in range(0, n, size):
        m = min(size, n - i)
        r, d = ref[:m], diff[:m]
        r.copy_(flat[i:i + m])
        torch.sub(restored[i:i + m], r, out=d)
        sums += torch.stack((torch.dot(d, d), torch.dot(r, r))).double()
        mn, mx = torch.aminmax(d)
        extremes[0] = torch.minimum(extremes[0], mn)
        extremes[1] = torch.maximum(extremes[1], mx)
    (err2, ref2), (lo, hi) = sums.tolist(), extremes.tolist()
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    return rel, max(-lo, hi)
