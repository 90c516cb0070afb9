"""The pure-torch reference (converter.formats.reference) against independent emulations of the rules of
FORMAT.md: transliterations of bitsandbytes' CUDA decision code, exact rational arithmetic, brute force."""
import math
import struct
from fractions import Fraction

import pytest
import torch

from converter.formats import codebooks as cb
from converter.formats import reference as ref


def f32(x) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def f32_from_bits(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def next_up(x: float) -> float:
    return float(torch.nextafter(torch.tensor(x), torch.tensor(math.inf)))


def next_down(x: float) -> float:
    return float(torch.nextafter(torch.tensor(x), torch.tensor(-math.inf)))


# ---- transliterations of bitsandbytes' CUDA device functions (csrc/kernels.cu), vectorized ----

def _lit(x: float) -> torch.Tensor:
    """A C float literal: the decimal rounded once to float32 (Python's float() is correctly rounded,
    and every literal here was checked bit-equal in test_codebooks, so double rounding cannot bite)."""
    return torch.tensor(x, dtype=torch.float32)


def cuda_quantize_fp4(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeFP4: sign from x < 0, then a nested if-tree on fabsf(x) with strict > literals."""
    sign = torch.where(x < 0, 8, 0)
    a = x.abs()
    w = torch.where
    code = w(a > _lit(0.29166667),
             w(a > _lit(0.583333), w(a > _lit(0.8333333), 0b0011, 0b0010), w(a > _lit(0.4166667), 0b101, 0b100)),
             w(a > _lit(0.0859375), w(a > _lit(0.20833333), 0b0111, 0b0110), w(a > _lit(0.00260417), 0b0001, 0b0000)))
    return (code + sign).to(torch.uint8)


def cuda_quantize_nf4(x: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4: the generated if-tree with strict > literals."""
    w = torch.where
    hi = w(x > _lit(0.3893125355243683),
           w(x > _lit(0.6427869200706482), w(x > _lit(0.8614784181118011), 15, 14), w(x > _lit(0.5016634166240692), 13, 12)),
           w(x > _lit(0.2035212516784668), w(x > _lit(0.2920137718319893), 11, 10), w(x > _lit(0.1202552504837513), 9, 8)))
    lo = w(x > _lit(-0.33967943489551544),
           w(x > _lit(-0.13791173323988914), w(x > _lit(-0.045525018125772476), 7, 6), w(x > _lit(-0.23460740596055984), 5, 4)),
           w(x > _lit(-0.6106329262256622), w(x > _lit(-0.4599952697753906), 3, 2), w(x > _lit(-0.8480964004993439), 1, 0)))
    return w(x > _lit(0.03979014977812767), hi, lo).to(torch.uint8)


def cuda_dquantize(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: 7-step binary search from pivot 127, then a float32 midpoint compare."""
    n = x.numel()
    pivot = torch.full((n,), 127)
    upper_pivot = torch.full((n,), 255)
    lower_pivot = torch.zeros(n, dtype=torch.long)
    lower = torch.full((n,), -1.0)
    upper = torch.full((n,), 1.0)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_pivot, lower = torch.where(gt, pivot, lower_pivot), torch.where(gt, val, lower)
        upper_pivot, upper = torch.where(gt, upper_pivot, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + i, pivot - i)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    result = torch.where(gt, torch.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                         torch.where(x < (lower + val) * 0.5, lower_pivot, pivot))
    return result.to(torch.uint8)


def _probe_values(thresholds, gen) -> torch.Tensor:
    """Every threshold, its float32 neighbours, their negatives, zeros, tiny values, NaN and random data."""
    pts = []
    for t in thresholds:
        for v in (t, next_up(t), next_down(t)):
            pts += [v, -v]
    pts += [0.0, -0.0, 1e-30, -1e-30, 1.0, -1.0, math.nan, f32_from_bits(1), -f32_from_bits(1)]
    rand = torch.rand(20000, generator=gen) * 2 - 1
    return torch.cat([torch.tensor(pts, dtype=torch.float32), rand, rand.bfloat16().float(), rand.half().float()])


def test_nf4_codes_equal_cuda_tree(gen):
    """reference.codes_nf4 equals the CUDA NF4 if-tree, incl. exact thresholds (ties to the lower code) and NaN."""
    x = _probe_values(cb.NF4_THRESHOLDS, gen)
    assert torch.equal(ref.codes_nf4(x), cuda_quantize_nf4(x))


def test_fp4_codes_equal_cuda_tree(gen):
    """reference.codes_fp4 equals the CUDA FP4 if-tree on thresholds +-1 ulp, signed zeros, tiny values, NaN."""
    x = _probe_values(cb.FP4_THRESHOLDS, gen)
    assert torch.equal(ref.codes_fp4(x), cuda_quantize_fp4(x))


def test_fp4_zero_codes_follow_cuda():
    """FP4 (FORMAT.md 1.3): +0 and tiny positives -> code 0; tiny negatives -> code 8; -0.0 -> code 0."""
    x = torch.tensor([0.0, 1e-6, 0.0026, -1e-6, -0.0026, -0.0], dtype=torch.float32)
    assert ref.codes_fp4(x).tolist() == [0, 0, 0, 8, 8, 0]


def test_fp4_ties_go_to_smaller_magnitude_for_both_signs():
    """An |x_n| exactly on a CUDA literal threshold takes the smaller magnitude, positive or negative."""
    t = torch.tensor(cb.FP4_THRESHOLDS, dtype=torch.float32)
    below = [cb.FP4_BUCKET_TO_CODE[i] for i in range(7)]
    assert ref.codes_fp4(t).tolist() == below
    assert ref.codes_fp4(-t).tolist() == [c | 8 for c in below]
    above = [cb.FP4_BUCKET_TO_CODE[i + 1] for i in range(7)]
    assert ref.codes_fp4(torch.nextafter(t, torch.tensor(2.0))).tolist() == above


def test_nf4_ties_go_to_lower_code():
    """x_n exactly on an NF4 threshold gets the lower code; one ulp above gets the upper code."""
    t = torch.tensor(cb.NF4_THRESHOLDS, dtype=torch.float32)
    assert ref.codes_nf4(t).tolist() == list(range(15))
    assert ref.codes_nf4(torch.nextafter(t, torch.tensor(2.0))).tolist() == list(range(1, 16))


def _dynamic_map() -> torch.Tensor:
    return torch.tensor(cb.dynamic_map_signed(), dtype=torch.float32)


def test_codes_nearest_even_equals_cuda_dquantize(gen):
    """codes_nearest_even equals the transliterated CUDA dQuantize<0> on every float32 midpoint, its
    neighbours, the map entries, NaN and 200k random values (bf16/fp16-rounded ones included)."""
    code = _dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    rand = torch.rand(30000, generator=gen) * 2 - 1
    tiny = (torch.rand(20000, generator=gen) * 2 - 1) * 1e-4
    x = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down), code, torch.tensor([math.nan, -1.0]),
                   rand, rand.bfloat16().float(), tiny, tiny.half().float()])
    assert torch.equal(ref.codes_nearest_even(x, code), cuda_dquantize(code, x))


def test_codes_nearest_even_ties_and_brute_force(gen):
    """Exact midpoints go to the even index; elsewhere the code is the truly nearest entry (exact
    rational distances), except inside the half-ulp gap where a midpoint is not representable."""
    code = _dynamic_map()
    vals = [Fraction(v) for v in code.tolist()]
    mids32 = ((code[:-1] + code[1:]) * 0.5).tolist()
    exact_ties = [i for i in range(255) if Fraction(mids32[i]) == (vals[i] + vals[i + 1]) / 2]
    assert len(exact_ties) > 100  # many midpoints are representable: the tie rule is exercised
    got = ref.codes_nearest_even(torch.tensor([mids32[i] for i in exact_ties]), code).tolist()
    assert got == [i + (i % 2) for i in exact_ties]

    # Brute force over all 256 entries in float64, where the differences of float32 values near a
    # midpoint are exact, so distance ties are real ties.
    x = torch.cat([torch.rand(20000, generator=gen) * 2 - 1, (torch.rand(5000, generator=gen) - 0.5) * 1e-3])
    x64, code64 = x.double(), code.double()
    dist = (x64[:, None] - code64[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    is_best = dist == best
    index = torch.arange(256)
    first = torch.where(is_best, index, 256).min(dim=1).values
    first_even = torch.where(is_best & (index % 2 == 0), index, 256).min(dim=1).values
    want = torch.where(is_best.sum(dim=1) > 1, first_even, first)
    # skip values between a float32 midpoint and the true midpoint (the rule uses float32 midpoints)
    true_mid = (code64[:-1] + code64[1:]) / 2
    mid32 = ((code[:-1] + code[1:]) * 0.5).double()
    gap = (x64[:, None] >= torch.minimum(true_mid, mid32)) & (x64[:, None] <= torch.maximum(true_mid, mid32))
    gap &= (true_mid != mid32)[None, :]
    keep = ~gap.any(dim=1)
    assert keep.sum() > 24000
    assert torch.equal(ref.codes_nearest_even(x, code)[keep].long(), want[keep])


def _exact_mean(values) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0)) / len(values)


def _round_f32(q: Fraction) -> float:
    """Independent float32 rounding of a rational: nearest of the two float32 neighbours, ties to even."""
    lo = f32(float(q))  # float() is correctly rounded to double; step to the float32 bracket from there
    while Fraction(lo) > q:
        lo = next_down(lo)
    while Fraction(next_up(lo)) <= q:
        lo = next_up(lo)
    hi = next_up(lo)
    if Fraction(lo) == q:
        return lo
    dl, dh = q - Fraction(lo), Fraction(hi) - q
    if dl != dh:
        return lo if dl < dh else hi
    return lo if f32_bits(lo) % 2 == 0 else hi


@pytest.mark.parametrize("kind", ["normal", "wide", "subnormal", "signed", "absmax_like"])
def test_exact_mean_f32_equals_fraction_mean(kind, gen):
    """exact_mean_f32 equals the rational mean rounded once to float32, independent of order."""
    n = int(torch.randint(1, 3000, (1,), generator=gen))
    if kind == "normal":
        x = torch.randn(n, generator=gen)
    elif kind == "wide":
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-120, 120, (n,), generator=gen).float())
    elif kind == "subnormal":
        x = torch.randint(0, 2**23, (n,), generator=gen).to(torch.int32).view(torch.float32)
        x = torch.where(torch.rand(n, generator=gen) < 0.5, -x, x)
    elif kind == "signed":
        x = torch.cat([torch.full((n,), 3.0e38), torch.full((n,), -3.0e38), torch.randn(n, generator=gen) * 1e-30])
    else:
        x = torch.randn(n, generator=gen).abs() * 0.05 + 0.01
        x[torch.rand(n, generator=gen) < 0.05] = 0.0
    want = _round_f32(_exact_mean(x.tolist()))
    got = ref.exact_mean_f32(x)
    assert f32_bits(got) == f32_bits(want)
    assert f32_bits(ref.exact_mean_f32(x[torch.randperm(x.numel(), generator=gen)])) == f32_bits(want)


def test_exact_mean_f32_over_many_chunks(gen):
    """Across many internal chunks the sum stays exact: +v and -v of 100k wide-range values cancel exactly,
    leaving the mean of the constant part, whatever order the halves come in."""
    v = torch.randn(50001, generator=gen) * torch.exp2(torch.randint(-60, 60, (50001,), generator=gen).float())
    c = torch.full((7,), 0.1)
    x = torch.cat([v, c, -v.flip(0)])
    want = _round_f32(Fraction(f32(0.1)) * 7 / x.numel())
    assert f32_bits(ref.exact_mean_f32(x)) == f32_bits(want)
    assert f32_bits(ref.exact_mean_f32(x[torch.randperm(x.numel(), generator=gen)])) == f32_bits(want)


def test_exact_mean_f32_can_differ_from_torch_mean():
    """The exact mean is not torch's float32 mean: a sum that cancels exactly is still exact here."""
    x = torch.tensor([1.0e8, 1.0, -1.0e8, 1.0], dtype=torch.float32)
    assert ref.exact_mean_f32(x) == 0.5
    with pytest.raises(ValueError, match="empty"):
        ref.exact_mean_f32(torch.tensor([]))


def test_fraction_to_f32_rounds_half_to_even():
    """Exact halfway rationals round to the even float32; just above rounds up; subnormals keep their spacing."""
    one_ulp = Fraction(1, 2**23)
    assert ref.fraction_to_f32(1 + one_ulp / 2) == 1.0
    assert ref.fraction_to_f32(1 + 3 * one_ulp / 2) == f32_from_bits(0x3F800002)
    assert ref.fraction_to_f32(1 + one_ulp / 2 + Fraction(1, 2**60)) == f32_from_bits(0x3F800001)
    assert ref.fraction_to_f32(-(1 + one_ulp / 2)) == -1.0
    assert ref.fraction_to_f32(Fraction(3, 2**150)) == f32_from_bits(2)  # 1.5 * 2^-149 -> ties to even 2
    assert ref.fraction_to_f32(Fraction(0)) == 0.0
    for q in (Fraction(1, 3), Fraction(-7, 10), Fraction(10**20, 7), Fraction(1, 10**40)):
        assert f32_bits(ref.fraction_to_f32(q)) == f32_bits(_round_f32(q))


def test_quantize_4bit_layout_and_degenerate_blocks():
    """High nibble first; odd count padded with the code of 0; an all-zero block -> absmax 0, codes 0;
    the partial last block's absmax covers only its real elements."""
    x = torch.tensor([1.0, -1.0] * 32 + [0.0] * 64 + [0.5, -0.25, 0.1], dtype=torch.float32)
    packed, absmax = ref.quantize_4bit(x, "nf4", 64)
    assert absmax.tolist() == [1.0, 0.0, 0.5]
    assert packed.shape == (66, 1) and packed.dtype == torch.uint8
    assert packed[0, 0] == 0xF0 and torch.all(packed[32:64] == 0)
    assert packed[64, 0] == (15 << 4 | ref.codes_nf4(torch.tensor([-0.5])).item()) and packed[65, 0] & 0x0F == 7
    packed, absmax = ref.quantize_4bit(x, "fp4", 64)
    assert packed[0, 0] == 0x3B and packed[65, 0] & 0x0F == 0 and torch.all(packed[32:64] == 0)


def test_dequantize_4bit_is_one_multiply_then_cast(gen):
    """dequantize = LUT[code] * absmax in float32, cast once; output shape and dtype as asked."""
    x = torch.randn(3, 37, generator=gen)
    for qt in ("nf4", "fp4"):
        packed, absmax = ref.quantize_4bit(x, qt, 32)
        out32 = ref.dequantize_4bit(packed, absmax, qt, 32, (3, 37), torch.float32)
        codes = ref.unpack_nibbles(packed, 111).long()
        lut = ref.lut_4bit(qt)
        manual = torch.tensor([lut[c].item() * 1.0 for c in codes.tolist()], dtype=torch.float32)
        manual = manual * absmax.repeat_interleave(32)[:111]
        assert torch.equal(out32.reshape(-1), manual)
        out16 = ref.dequantize_4bit(packed, absmax, qt, 32, (3, 37), torch.bfloat16)
        assert out16.dtype == torch.bfloat16 and torch.equal(out16, out32.bfloat16())


def test_double_quantize_roundtrip_rules(gen):
    """double_quantize: offset = exact mean; codes = nearest-even of (absmax - offset) / nested absmax;
    dequantize_absmax = code * nested_absmax then + offset as two float32 roundings."""
    absmax = torch.rand(700, generator=gen) * 0.1
    codes, nested, offset = ref.double_quantize(absmax)
    assert offset == ref.exact_mean_f32(absmax)
    assert codes.dtype == torch.uint8 and codes.shape == (700,) and nested.shape == (3,)
    centered = absmax - torch.tensor(offset)
    want_nested = torch.stack([centered[i:i + 256].abs().amax() for i in range(0, 700, 256)])
    assert torch.equal(nested, want_nested)
    assert torch.equal(codes, ref.codes_nearest_even(
        centered * torch.reciprocal(want_nested).repeat_interleave(256)[:700], _dynamic_map()))
    back = ref.dequantize_absmax(codes, nested, offset)
    code = _dynamic_map()
    manual = [f32(f32(code[c].item() * nested[i // 256].item()) + offset) for i, c in enumerate(codes.tolist())]
    assert back.tolist() == manual
    assert (back - absmax).abs().max() < 0.1 * 0.02


def test_int8_rowwise_reference(gen):
    """int8: SCB = row absmax; codes = round-half-even(x * ((1 / SCB) * 127)); an all-zero row gives zeros."""
    x = torch.randn(5, 33, generator=gen)
    x[2] = 0
    x[3, :4] = torch.tensor([0.5, -0.5, 1.5 / 127, 2.5 / 127]) * x[3].abs().max()
    q, scb = ref.quantize_int8_rowwise(x)
    assert torch.equal(scb, x.abs().amax(1))
    scale = (1 / scb) * 127.0  # torch's `127.0 / scb`, which is what bitsandbytes writes
    for r in (0, 1, 3, 4):
        assert torch.equal(q[r], torch.round(x[r] * scale[r]).to(torch.int8))
    assert torch.all(q[2] == 0)
    deq = ref.dequantize_int8_rowwise(q, scb, torch.float32)
    assert torch.equal(deq, (q.float() * scb[:, None]) * torch.tensor(cb.INT8_DEQUANT_SCALE))


def test_int8_scale_is_reciprocal_times_127():
    """x = SCB / 2 with SCB = 17.953125: (1/SCB)*127 rounds to 63 like bitsandbytes, not 64 as an IEEE
    127/SCB would (FORMAT.md 4.1: bnb's `127.0 / SCB` is torch's reciprocal(SCB) * 127)."""
    x = torch.tensor([[8.9765625, 17.953125, -8.9765625]])
    q, _ = ref.quantize_int8_rowwise(x)
    assert q.tolist() == [[63, 127, -63]]
    ieee = torch.round(x * (torch.tensor(127.0) / torch.tensor(17.953125)))
    assert ieee.tolist() == [[64, 127, -64]]
