"""One call of each hot kernel on Llama-8B MLP shapes, for Nsight Compute (ncu) to read counters from:

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
        -k regex:'quantize_4bit|gemm_4bit' python scripts/cuda_tune/profile_kernels.py

Warm-up calls run first on other tensors so that the profiled calls find the tables built and the
weights not in L2 (ncu flushes caches between kernels by default anyway).
"""
import sys

import torch

from converter.formats.codebooks import QuantType
from converter.kernels import cuda as kcuda


def main() -> None:
    torch.manual_seed(0)
    rows = [int(r) for r in sys.argv[1:]] or [1, 16, 128]
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
    qt = kcuda.quantize(w, QuantType.NF4, 64, True)  # warm-up + the weight the matmuls use
    torch.cuda.synchronize()
    kcuda.quantize(w, QuantType.NF4, 64, True)  # the profiled quantize (NF4 + double quant)
    for r in rows:
        x = torch.randn(r, 4096, device="cuda", dtype=torch.bfloat16)
        kcuda.fused_gemm_4bit(x, qt)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
