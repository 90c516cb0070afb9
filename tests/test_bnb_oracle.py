"""Our quantizer against bitsandbytes' own CPU functions: identical where FORMAT.md says bnb's CPU path
equals its CUDA path (NF4 full blocks, int8 from fp16), and where bnb's CPU path deviates (FP4 zero codes
and ties, 8-bit nested codes) we show our result follows the CUDA rule of FORMAT.md 1.3 / 2.3 instead."""
import warnings

import pytest
import torch

from converter import quantize
from converter.formats import codebooks as cb
from converter.formats import reference as ref
from converter.formats.codebooks import QuantType
from converter.kernels import cpu
from bits import same_bits

pytest.importorskip("bitsandbytes")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as F

pytestmark = pytest.mark.bnb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]




def full_block_weight(rows, cols, dtype, gen):
    """Gaussian with 1% outliers; numel a multiple of every blocksize used; no all-zero block."""
    x = torch.randn(rows, cols, generator=gen)
    outliers = torch.rand(rows, cols, generator=gen) < 0.01
    return torch.where(outliers, x * 40, x).to(dtype)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_bytes_and_absmax_equal_bitsandbytes(blocksize, dtype, gen):
    """NF4 packed bytes and float32 absmax equal F.quantize_4bit on CPU (full blocks, blocks straddling rows)."""
    rows = 2 * int(torch.randint(1, 9 if blocksize <= 256 else 3, (1,), generator=gen))
    x = full_block_weight(rows, 3 * blocksize // 2, dtype, gen)  # every other block straddles two rows
    theirs, state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    ours = quantize(x, "nf4", blocksize=blocksize, double_quant=False)
    assert torch.equal(ours.data, theirs), f"{int((ours.data != theirs).sum())} bytes differ"
    assert same_bits(ours.absmax, state.absmax)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_double_quant_first_level_equals_bitsandbytes(dtype, gen):
    """With double quant the packed NF4 codes still equal bnb's; the nested offset is within an ulp of bnb's."""
    x = full_block_weight(64, 256, dtype, gen)
    theirs, state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize(x, "nf4", blocksize=64)
    assert torch.equal(ours.data, theirs)
    offset = float(state.offset)
    assert abs(ours.nested.offset - offset) <= abs(offset) * 2**-23
    assert ours.nested.offset == ref.exact_mean_f32(F.quantize_4bit(x, blocksize=64, quant_type="nf4")[1].absmax)


def test_fp4_codes_follow_cuda_where_bnb_cpu_differs(gen):
    """FORMAT.md 1.3/1.4: bnb's CPU FP4 puts tiny positives in code 8 and tiny negatives in code 0; CUDA (and
    we) do the opposite. Every other difference is an exact tie, broken by CUDA's literal thresholds."""
    x = torch.cat([torch.tensor([1.0, 1e-4, -1e-4, 0.002, -0.002]), torch.full((59,), 0.5)])
    theirs = ref.unpack_nibbles(F.quantize_4bit(x, blocksize=64, quant_type="fp4")[0], 64)
    ours = ref.unpack_nibbles(quantize(x, "fp4", double_quant=False).data, 64)
    assert theirs[1:5].tolist() == [8, 0, 8, 0]  # bnb CPU: zero codes swapped
    assert ours[1:5].tolist() == [0, 8, 0, 8]  # CUDA rule: sign bit from x < 0

    w = torch.randn(64, 256, generator=gen).to(torch.bfloat16)  # bf16 data hits exact ties often
    theirs = ref.unpack_nibbles(F.quantize_4bit(w, blocksize=64, quant_type="fp4")[0], w.numel()).long()
    ours_packed, absmax = cpu.quantize_4bit(w, QuantType.FP4, 64)
    ours = ref.unpack_nibbles(ours_packed, w.numel()).long()
    xn = (w.float().reshape(-1, 64) * torch.reciprocal(absmax)[:, None]).reshape(-1)
    assert torch.equal(ours, ref.codes_fp4(xn).long())  # our native bytes are the CUDA rule
    differ = ours != theirs
    zero_swap = (torch.minimum(ours, theirs) == 0) & (torch.maximum(ours, theirs) == 8)
    # a tie: |x_n| within 14 ulp of a CUDA literal, where literal and true midpoint disagree (FORMAT.md 1.3)
    thresholds = torch.tensor(cb.FP4_THRESHOLDS)
    gap = (xn.abs()[:, None] - thresholds[None, :]).abs() <= thresholds[None, :] * 14 * 2**-23
    assert differ.any() and zero_swap.any()
    assert torch.all(zero_swap[differ] | gap.any(dim=1)[differ])


def test_nested_8bit_codes_follow_cuda_where_bnb_cpu_differs(gen):
    """FORMAT.md 2.3: bnb's CPU quantize_blockwise uses a 65,536-bin LUT (exact 0 -> code 131, ~0.2% off the
    nearest); ours is the exact nearest with ties to even (CUDA). Shown on a real double-quant absmax."""
    code = F.create_dynamic_map(signed=True).to(torch.float32)
    assert same_bits(code, torch.tensor(cb.dynamic_map_signed()))
    x = torch.tensor([1.0, 0.0, -0.5] + [0.25] * 253)
    theirs, _ = F.quantize_blockwise(x, code=code, blocksize=256)
    ours, _ = cpu.quantize_blockwise8(x, code, 256)
    assert theirs[1] == 131 and ours[1] == 127 and code[127] == 0.0

    absmax = cpu.quantize_4bit(torch.randn(1024, 1024, generator=gen), QuantType.NF4, 64)[1]
    centered = absmax - torch.tensor(ref.exact_mean_f32(absmax))
    theirs, their_state = F.quantize_blockwise(centered, code=code, blocksize=256)
    their_absmax = their_state.absmax
    ours, our_absmax = cpu.quantize_blockwise8(centered, code, 256)
    assert same_bits(our_absmax, their_absmax)
    xn = (centered.reshape(-1, 256) * torch.reciprocal(our_absmax)[:, None]).reshape(-1)
    assert torch.equal(ours, ref.codes_nearest_even(xn, code))
    # where they differ, ours is at least as near as bnb's (bnb's LUT bins are 1/32768 wide)
    differ = ours != theirs
    assert differ.any()
    dist_ours = (code[ours.long()] - xn).abs()
    dist_theirs = (code[theirs.long()] - xn).abs()
    assert torch.all(dist_ours[differ] <= dist_theirs[differ])
    assert int(differ.sum()) < 0.01 * xn.numel()


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 512), (300, 257)])
def test_int8_equals_bitsandbytes_vectorwise_quant_for_fp16(shape, gen):
    """INT8 codes and SCB equal F.int8_vectorwise_quant on fp16 input bit for bit (FORMAT.md section 0);
    dequantization equals F.int8_vectorwise_dequant."""
    x = (torch.randn(shape, generator=gen) * (1 + 20 * torch.rand(shape[0], 1, generator=gen))).to(torch.float16)
    theirs_q, theirs_scb, _ = F.int8_vectorwise_quant(x)
    ours = quantize(x, "int8")
    assert torch.equal(ours.data, theirs_q)
    assert same_bits(ours.scb, theirs_scb.to(torch.float32))
    assert same_bits(ours.dequantize(torch.float32), F.int8_vectorwise_dequant(theirs_q, theirs_scb))


def test_int8_bf16_outside_fp16_range_stays_finite():
    """bnb casts to fp16 first, turning bf16 values above 65504 into inf; we keep the true float32 absmax."""
    x = torch.tensor([[1.0e5, -3.0, 7.0], [2.0, -1.0, 0.5]], dtype=torch.bfloat16)
    ours = quantize(x, "int8")
    assert ours.scb[0] == x.float()[0].abs().max() and torch.isfinite(ours.scb).all()
    assert ours.data[0].tolist() == [127, 0, 0]
    their_scb = F.int8_vectorwise_quant(x.to(torch.float16))[1]
    assert torch.isinf(their_scb[0])
