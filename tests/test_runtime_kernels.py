"""The fused CPU 4-bit matmul (qckpt_gemm_4bit): every ISA variant against dequantize + matmul."""
import pytest
import torch

import converter
from converter.formats.codebooks import QuantType
from converter.kernels import cpu

# float32 accumulation in another order than torch: relative to max |y|.
REL_TOL = 2e-6


@pytest.mark.parametrize("n_out,k,blocksize", [(64, 4096, 64), (37, 96, 32), (50, 128, 128), (40, 72, 64),
                                               (33, 256, 4096), (17, 160, 64), (9, 48, 32)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gemm_4bit_matches_dequantized_matmul(n_out, k, blocksize, quant_type, cpu_isas, gen, awkward):
    """Batch 1..9 (groups of up to 4 x rows), shapes the SIMD rows take (k % 32 == 0) and shapes that
    fall back to scalar rows (blocks straddling rows, k % 32 != 0), for every ISA variant."""
    qt = converter.quantize(awkward((n_out, k), torch.float32, blocksize, gen), quant_type, blocksize, True)
    absmax = qt.block_absmax()
    weight = qt.dequantize(torch.float32).double()
    for batch in (1, 2, 3, 4, 5, 9):
        x = torch.randn(batch, k, generator=gen)
        ref = x.double() @ weight.T
        for isa in cpu_isas:
            y = cpu.gemm_4bit(x, qt.data, absmax, n_out, k, blocksize, QuantType.parse(quant_type), isa=isa)
            err = (y.double() - ref).abs().max().item()
            assert err <= REL_TOL * ref.abs().max().item(), (isa, batch, err)


def test_gemm_4bit_threads_do_not_change_result(gen):
    """Splitting rows over threads gives the same bytes as one thread (rows are independent)."""
    qt = converter.quantize(torch.randn(300, 512, generator=gen), "nf4", 64, False)
    x = torch.randn(3, 512, generator=gen)
    one = cpu.gemm_4bit(x, qt.data, qt.absmax, 300, 512, 64, QuantType.NF4, threads=1)
    two = cpu.gemm_4bit(x, qt.data, qt.absmax, 300, 512, 64, QuantType.NF4, threads=2)
    assert torch.equal(one, two)


@pytest.mark.parametrize("m,k,n", [(1, 4100, 9), (3, 1024, 5), (2, 2049, 7), (5, 30, 3)])
def test_int8_matmul_fp32_chunks_is_exact(m, k, n, gen):
    """The float32 K-chunked int8 product (the CUDA fallback of LLM.int8) equals torch._int_mm bit for
    bit, even where one float32 sum over all of K could not be (row 0: 127 x 127, odd products whose
    sum passes 2^24 when K > 1040)."""
    from converter.runtime.functional import int8_matmul_fp32_chunks

    ca = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    cb = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    ca[0] = 127
    cb[0] = 127
    got = int8_matmul_fp32_chunks(ca, cb)
    assert got.dtype == torch.int32 and torch.equal(got, torch._int_mm(ca, cb.t()))
    assert got[0, 0].item() == k * 127 * 127
