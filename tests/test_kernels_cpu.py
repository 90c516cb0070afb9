"""Native CPU kernels (converter.kernels.cpu) against the pure-torch reference, bit for bit, on every ISA
variant this CPU has and on 1, 2 and 3 threads; plus their input checks and thread/ISA settings."""
import math

import pytest
import torch

from converter.errors import QuantizationInputError
from converter.formats import codebooks as cb
from converter.formats import reference as ref
from converter.formats.codebooks import QuantType
from converter.kernels import cpu
from bits import same_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT4 = [QuantType.NF4, QuantType.FP4]




def first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.reshape(-1), b.reshape(-1)
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} vs {list(b.shape)}"
    diff = (a != b).nonzero()
    return f"{diff.numel()} differ, first at flat index {int(diff[0])}" if diff.numel() else "bit patterns differ"


def check_4bit_all_variants(x, quant_type, blocksize, isas, threads=(1, 2)):
    """Quantize with every ISA x thread count; all must equal the reference; then dequantize likewise."""
    want_packed, want_absmax = ref.quantize_4bit(x, quant_type, blocksize)
    for isa in isas:
        for th in threads:
            packed, absmax = cpu.quantize_4bit(x, quant_type, blocksize, threads=th, isa=isa)
            assert same_bits(packed, want_packed), f"{isa} threads={th} packed: {first_diff(packed, want_packed)}"
            assert same_bits(absmax, want_absmax), f"{isa} threads={th} absmax: {first_diff(absmax, want_absmax)}"
    for dtype in DTYPES:
        want = ref.dequantize_4bit(want_packed, want_absmax, quant_type, blocksize, tuple(x.shape), dtype)
        for isa in isas:
            for th in threads:
                out = cpu.dequantize_4bit(want_packed, want_absmax, quant_type, blocksize, tuple(x.shape), dtype,
                                          threads=th, isa=isa)
                assert same_bits(out, want), f"dequantize {dtype} {isa} threads={th}: {first_diff(out, want)}"


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 37), (1, 31), (33,)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT4)
def test_quantize_4bit_tiny_shapes(shape, dtype, quant_type, cpu_isas, gen):
    """1 element, odd counts and a single partial block quantize and dequantize exactly like the reference."""
    x = torch.randn(shape, generator=gen).to(dtype)
    check_4bit_all_variants(x, quant_type, 32, cpu_isas)
    check_4bit_all_variants(x, quant_type, 64, cpu_isas, threads=(1,))


@pytest.mark.parametrize("blocksize", cb.BLOCKSIZES_4BIT)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT4)
def test_quantize_4bit_awkward_weights(blocksize, dtype, quant_type, cpu_isas, gen, awkward):
    """Blocks straddling rows, a partial tail block, 1% outliers and an all-zero block, every blocksize."""
    nb = int(torch.randint(2, 6, (1,), generator=gen))
    cols = blocksize + 1 + 2 * int(torch.randint(0, blocksize, (1,), generator=gen))  # odd, not a multiple
    rows = max(2, (nb * blocksize) // cols + 1)
    x = awkward((rows, cols), dtype, blocksize, gen)
    check_4bit_all_variants(x, quant_type, blocksize, cpu_isas)


@pytest.mark.parametrize("quant_type", QUANT4)
def test_quantize_4bit_multithreaded_split(quant_type, cpu_isas, gen, awkward):
    """A weight large enough to be split over 2 and 3 workers gives the reference bytes for every split."""
    x = awkward((97, 2051), torch.bfloat16, 64, gen)  # 198,947 elements: many blocks per worker
    check_4bit_all_variants(x, quant_type, 64, cpu_isas, threads=(1, 2, 3))


def test_fp4_special_values_on_every_variant(cpu_isas):
    """FP4 CUDA rules in native code: tiny +/- -> codes 0/8, literal-threshold ties -> smaller magnitude."""
    t = list(cb.FP4_THRESHOLDS)
    block = [1.0, 1e-6, -1e-6, -0.0, 0.0] + t + [-v for v in t]
    block += [0.0] * (32 - len(block))
    x = torch.tensor(block, dtype=torch.float32)
    want = ref.codes_fp4(x)
    assert want[1:5].tolist() == [0, 8, 0, 0]
    for isa in cpu_isas:
        packed, absmax = cpu.quantize_4bit(x, QuantType.FP4, 32, isa=isa)
        assert absmax.tolist() == [1.0]
        assert torch.equal(ref.unpack_nibbles(packed, 32), want), isa


def test_nf4_threshold_ties_on_every_variant(cpu_isas):
    """x_n exactly on NF4 thresholds takes the lower code in every native variant."""
    t = torch.tensor(cb.NF4_THRESHOLDS, dtype=torch.float32)
    x = torch.cat([torch.tensor([1.0]), t, torch.nextafter(t, torch.tensor(2.0)), torch.zeros(1)])
    for isa in cpu_isas:
        packed, _ = cpu.quantize_4bit(x, QuantType.NF4, 32, isa=isa)
        assert ref.unpack_nibbles(packed, 32).tolist() == [15] + list(range(15)) + list(range(1, 16)) + [7], isa


def test_all_zero_input_gives_zero_codes(cpu_isas):
    """An all-zero tensor: absmax 0 and NF4 bytes 0x00 (CUDA rule), except the pad nibble of an odd count."""
    x = torch.zeros(129, dtype=torch.bfloat16)
    for isa in cpu_isas:
        packed, absmax = cpu.quantize_4bit(x, QuantType.NF4, 64, isa=isa)
        assert torch.all(absmax == 0)
        assert torch.all(packed[:64] == 0) and packed[64, 0] == 0x07
        out = cpu.dequantize_4bit(packed, absmax, QuantType.NF4, 64, (129,), torch.float32, isa=isa)
        assert torch.all(out == 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_input_is_rejected_with_index(bad, dtype, cpu_isas, gen):
    """NaN/inf anywhere raises QuantizationInputError naming the value kind and its flat index."""
    x = torch.randn(3, 1000, generator=gen).to(dtype)
    index = int(torch.randint(0, 3000, (1,), generator=gen))
    x.view(-1)[index] = bad
    kind = "NaN" if math.isnan(bad) else "inf"
    for isa in cpu_isas:
        for th in (1, 2):
            with pytest.raises(QuantizationInputError, match=rf"w\.q: {kind} at flat index {index}\b"):
                cpu.quantize_4bit(x, QuantType.NF4, 64, threads=th, isa=isa, name="w.q")
    with pytest.raises(QuantizationInputError, match=rf"{kind} at flat index {index} \(row {index // 1000}\)"):
        cpu.quantize_int8_rowwise(x)


def test_first_nonfinite_is_reported_across_workers():
    """With bad values in several workers' ranges, the lowest flat index is named."""
    x = torch.zeros(300_000)
    x[250_000] = math.inf
    x[123_457] = math.nan
    with pytest.raises(QuantizationInputError, match=r"NaN at flat index 123457\b"):
        cpu.quantize_4bit(x, QuantType.FP4, 64, threads=2)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, -64])
def test_bad_blocksize_is_rejected_by_native_code(blocksize):
    """The C entry points refuse blocksizes outside the powers of two 32..4096, with the value in the message."""
    with pytest.raises(QuantizationInputError, match=rf"blocksize .*{blocksize}\b"):
        cpu.quantize_4bit(torch.ones(64), QuantType.NF4, blocksize)


def test_noncontiguous_input_is_copied_not_mutated(cpu_isas, gen):
    """A transposed (strided) input quantizes as its contiguous copy and the caller's tensor is unchanged."""
    base = torch.randn(40, 70, generator=gen).to(torch.bfloat16)
    keep = base.clone()
    view = base.t()
    assert not view.is_contiguous()
    for isa in cpu_isas:
        packed, absmax = cpu.quantize_4bit(view, QuantType.NF4, 64, isa=isa)
        want_packed, want_absmax = ref.quantize_4bit(view.contiguous(), QuantType.NF4, 64)
        assert same_bits(packed, want_packed) and same_bits(absmax, want_absmax)
        q, scb = cpu.quantize_int8_rowwise(view, isa=isa)
        want_q, want_scb = ref.quantize_int8_rowwise(view.contiguous())
        assert torch.equal(q, want_q) and same_bits(scb, want_scb)
    assert same_bits(base, keep)


def test_threads_and_isa_settings(monkeypatch):
    """threads= must be a positive int; QCKPT_THREADS is read at call time and validated; unknown ISA names
    and QCKPT_ISA values are refused; every available variant can be forced through QCKPT_ISA."""
    x = torch.randn(1000)
    want = ref.quantize_4bit(x, "nf4", 64)[0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(QuantizationInputError, match="threads must be a positive integer"):
            cpu.quantize_4bit(x, QuantType.NF4, 64, threads=bad)
    monkeypatch.setenv("QCKPT_THREADS", "two")
    with pytest.raises(QuantizationInputError, match="QCKPT_THREADS.*'two'"):
        cpu.quantize_4bit(x, QuantType.NF4, 64)
    monkeypatch.setenv("QCKPT_THREADS", "0")
    with pytest.raises(QuantizationInputError, match="QCKPT_THREADS"):
        cpu.quantize_4bit(x, QuantType.NF4, 64)
    assert torch.equal(cpu.quantize_4bit(x, QuantType.NF4, 64, threads=2)[0], want)  # explicit wins
    for value in ("1", "2", "7"):
        monkeypatch.setenv("QCKPT_THREADS", value)
        assert torch.equal(cpu.quantize_4bit(x, QuantType.NF4, 64)[0], want)
    monkeypatch.delenv("QCKPT_THREADS")
    with pytest.raises(QuantizationInputError, match="unknown ISA variant 'sse9'"):
        cpu.quantize_4bit(x, QuantType.NF4, 64, isa="sse9")
    monkeypatch.setenv("QCKPT_ISA", "neon9")
    with pytest.raises(QuantizationInputError, match="neon9"):
        cpu.quantize_4bit(x, QuantType.NF4, 64)
    for isa in ("scalar", cpu.best_isa()):
        monkeypatch.setenv("QCKPT_ISA", isa)
        assert torch.equal(cpu.quantize_4bit(x, QuantType.NF4, 64)[0], want)


def test_unsupported_isa_is_a_native_error():
    """Asking for a variant above what the CPU supports fails cleanly (only testable below AVX-512)."""
    order = ["scalar", "avx2", "avx512"]
    best = cpu.best_isa()
    if best in ("avx512", "neon"):  # neon: nothing above it; tests/test_neon_parity.py refuses avx2 there
        pytest.skip("this CPU supports every variant")
    higher = order[order.index(best) + 1]
    with pytest.raises(Exception, match="not supported by this CPU"):
        cpu.quantize_4bit(torch.ones(64), QuantType.NF4, 64, isa=higher)


# ---- 8-bit blockwise (nested absmax) ----

def _code() -> torch.Tensor:
    return torch.tensor(cb.dynamic_map_signed(), dtype=torch.float32)


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 70001])
def test_blockwise8_matches_reference(n, cpu_isas, gen):
    """8-bit blockwise codes and absmax equal the reference (nearest, ties to even); dequantize too."""
    x = torch.randn(n, generator=gen) * 0.01
    if n > 600:
        x[256:512] = 0  # an all-zero block: absmax 0, codes 0 (NaN path)
    code = _code()
    want_codes, want_absmax = ref.quantize_blockwise8(x, 256, code)
    for isa in cpu_isas:
        for th in (1, 2):
            codes, absmax = cpu.quantize_blockwise8(x, code, 256, threads=th, isa=isa)
            assert torch.equal(codes, want_codes), first_diff(codes, want_codes)
            assert same_bits(absmax, want_absmax)
            out = cpu.dequantize_blockwise8(codes, absmax, code, 256, offset=0.0123, threads=th, isa=isa)
            assert same_bits(out, ref.dequantize_absmax(want_codes, want_absmax, 0.0123, 256, code))


def test_blockwise8_exact_midpoint_ties_go_to_even(cpu_isas):
    """Values exactly on float32 midpoints of the map (with absmax 1) get the even index, on every variant."""
    code = _code()
    mids = (code[:-1] + code[1:]) * 0.5
    x = torch.cat([torch.tensor([1.0]), mids, torch.nextafter(mids, torch.tensor(2.0)),
                   torch.nextafter(mids, torch.tensor(-2.0))])
    x = torch.cat([x, torch.zeros(1024 - x.numel())])
    for isa in cpu_isas:
        codes, absmax = cpu.quantize_blockwise8(x, code, 1024, isa=isa)
        assert absmax.tolist() == [1.0]
        got = codes[1:256].long()
        assert torch.equal(got, torch.arange(255) + torch.arange(255) % 2), isa
        assert torch.equal(codes, ref.codes_nearest_even(x, code)), isa


def test_blockwise8_subnormal_absmax_blocks_match_reference(cpu_isas, gen):
    """A block whose absmax is below 2^-128 overflows the reciprocal: x * r is +inf for every positive
    element, which is code 255 in the reference (a +inf pad in the midpoint table once compared equal
    there and wrapped it to code 0)."""
    code = _code()
    x = torch.randn(256 * 5 + 17, generator=gen)
    x[:256] *= 1e-40  # subnormal absmax: r = inf
    x[256:512] = torch.tensor(-3e-41)  # only negative values: -inf -> code 0
    x[512:768] *= 2.0**-127  # normal but tiny absmax: r finite
    x[768] = 1e-45  # one positive subnormal in an otherwise zero block
    x[769:1024] = 0
    want_codes, want_absmax = ref.quantize_blockwise8(x, 256, code)
    assert want_codes[:256][x[:256] > 0].eq(255).all()  # the case under test is present
    for isa in cpu_isas:
        codes, absmax = cpu.quantize_blockwise8(x, code, 256, isa=isa)
        assert torch.equal(codes, want_codes), (isa, first_diff(codes, want_codes))
        assert same_bits(absmax, want_absmax)


def test_blockwise8_rejects_nonfinite_and_unsorted_map():
    """NaN in the input and a non-increasing code map are input errors with a precise message."""
    x = torch.zeros(600)
    x[555] = math.nan
    with pytest.raises(QuantizationInputError, match="NaN at flat index 555"):
        cpu.quantize_blockwise8(x, _code(), 256)
    bad = _code().clone()
    bad[10] = bad[11]
    with pytest.raises(QuantizationInputError, match="not strictly increasing at index 10"):
        cpu.quantize_blockwise8(torch.ones(10), bad, 256)


# ---- row-wise int8 ----

@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (64, 513), (257, 300)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rowwise_matches_reference(shape, dtype, cpu_isas, gen):
    """int8 codes and SCB equal the reference (incl. an all-zero row and exact .5 ties); dequantize too."""
    x = torch.randn(shape, generator=gen) * (1 + 10 * torch.rand(shape[0], 1, generator=gen))
    if shape[0] > 2:
        x[1] = 0
        x[2, 0] = 127.0
        x[2, 1:5] = torch.tensor([0.5, -1.5, 2.5, -126.5])  # scale exactly 1: ties round half to even
    x = x.to(dtype)
    want_q, want_scb = ref.quantize_int8_rowwise(x)
    for isa in cpu_isas:
        for th in (1, 2):
            q, scb = cpu.quantize_int8_rowwise(x, threads=th, isa=isa)
            assert torch.equal(q, want_q), first_diff(q, want_q)
            assert same_bits(scb, want_scb)
            for out_dtype in DTYPES:
                out = cpu.dequantize_int8_rowwise(q, scb, out_dtype, threads=th, isa=isa)
                assert same_bits(out, ref.dequantize_int8_rowwise(want_q, want_scb, out_dtype))
    if shape[0] > 2 and dtype != torch.float16:
        assert want_q[2, :5].tolist() == [127, 0, -2, 2, -126]


# ---- fused 4-bit matmul ----

@pytest.mark.parametrize("quant_type", QUANT4)
def test_gemm_4bit_matches_dequantized_matmul(quant_type, cpu_isas, gen):
    """gemm_4bit(x, W) equals x @ dequant(W)^T in float32 within accumulation-order tolerance."""
    n_out, k, batch = 37, 200, 3  # blocks straddle rows of W
    w = torch.randn(n_out, k, generator=gen)
    x = torch.randn(batch, k, generator=gen)
    packed, absmax = ref.quantize_4bit(w, quant_type, 64)
    dense = ref.dequantize_4bit(packed, absmax, quant_type, 64, (n_out, k), torch.float32)
    want = x.double() @ dense.double().t()
    for isa in cpu_isas:
        y = cpu.gemm_4bit(x, packed, absmax, n_out, k, 64, quant_type, isa=isa)
        assert y.shape == (batch, n_out)
        assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-4), isa


def test_large_outputs_with_huge_page_hint_are_exact(gen):
    """Outputs >= 8 MiB take the huge-page path (madvise before first touch): values still equal the
    reference, and equal a dequantize into a caller's pre-faulted out= buffer."""
    shape = (2048, 2305)  # 4.7M elements: 9.4 MB of bf16 output, odd numel, blocks straddle rows
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    packed, absmax = cpu.quantize_4bit(w, QuantType.NF4, 64)
    out = cpu.dequantize_4bit(packed, absmax, QuantType.NF4, 64, shape, torch.bfloat16)
    want = ref.dequantize_4bit(packed, absmax, QuantType.NF4, 64, shape, torch.bfloat16)
    assert same_bits(out, want), first_diff(out, want)
    buffer = torch.full(shape, 7.0, dtype=torch.bfloat16)
    assert cpu.dequantize_4bit(packed, absmax, QuantType.NF4, 64, shape, torch.bfloat16, out=buffer) is buffer
    assert same_bits(buffer, want)
    q, scb = cpu.quantize_int8_rowwise(w)
    assert same_bits(cpu.dequantize_int8_rowwise(q, scb, torch.float32), ref.dequantize_int8_rowwise(q, scb, torch.float32))


def test_dequantize_out_buffer_is_validated():
    """out= must be a contiguous CPU tensor of the requested dtype and element count."""
    packed, absmax = cpu.quantize_4bit(torch.randn(4, 64), QuantType.NF4, 64)
    for bad in (torch.empty(4, 64), torch.empty(4, 63, dtype=torch.bfloat16),
                torch.empty(64, 4, dtype=torch.bfloat16).t()):
        with pytest.raises(QuantizationInputError, match="out buffer"):
            cpu.dequantize_4bit(packed, absmax, QuantType.NF4, 64, (4, 64), torch.bfloat16, out=bad)


# ---- extreme inputs: reciprocal overflow, subnormal scales, the largest finite values ----
# 1/absmax overflows to +inf below 2^-128 and is itself subnormal above 2^126; both must give the
# reference bytes in every variant (an FTZ/DAZ flag, a clamp or an inf pad in a table would not).

F32_TINY = 2.0**-149  # smallest float32 subnormal (1e-45 rounds to it)


def _f32_next(value: float, toward: float) -> float:
    return float(torch.nextafter(torch.tensor(value, dtype=torch.float32), torch.tensor(toward, dtype=torch.float32)))


# Block absmax values of interest, as float32: subnormal, the reciprocal's overflow edge (2^-128),
# the smallest normal, CUDA's NF4 fast-path edge (kFastMinAbsmax = 2^-120) +- 1 ulp, fp16's subnormal
# and normal minimum, scales whose reciprocal is subnormal (>= 2^126), and each dtype's largest finite.
EXTREME_ABSMAX = [
    1e-40, F32_TINY, 2.0**-133, _f32_next(2.0**-128, 0.0), 2.0**-128, _f32_next(2.0**-128, 1.0), 2.0**-127,
    2.0**-126, _f32_next(2.0**-120, 0.0), 2.0**-120, _f32_next(2.0**-120, 1.0), 2.0**-24, 2.0**-14,
    65504.0, 2.0**126, _f32_next(2.0**126, math.inf), 2.0**127, float(torch.finfo(torch.bfloat16).max),
    float(torch.finfo(torch.float32).max),
]


def _representable(values, dtype) -> list:
    """The values that `dtype` holds exactly, finite and nonzero (the rest would not be the absmax)."""
    keep = []
    for v in values:
        t = torch.tensor(v, dtype=torch.float32)  # e.g. 1e-40 -> its float32 neighbour
        if t.to(dtype).to(torch.float32).item() == t.item():
            keep.append(t.item())
    return keep


def _min_subnormal(dtype) -> float:
    return {torch.float32: F32_TINY, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]


def _extreme_rows(kinds, n_rows: int, width: int, dtype, gen) -> list:
    """n_rows float32 rows of `width`, cycling through kinds: ("rand", a) random values in dtype under a,
    ("zeros", a) +-0.0 elsewhere, ("signed_zero", _) all +-0.0, ("one_subnormal", a) likewise; every kind
    but signed_zero puts +-a at a random lane, so a is the row's max |x|."""
    y = torch.rand(n_rows, width, generator=gen) * 2 - 1
    zero_signs = torch.where(torch.rand(n_rows, width, generator=gen) < 0.5, -0.0, 0.0)
    lane = torch.randint(0, width, (n_rows,), generator=gen)
    sign = torch.where(torch.rand(n_rows, generator=gen) < 0.5, -1.0, 1.0)
    rows = []
    for r in range(n_rows):
        kind, a = kinds[r % len(kinds)]
        row = (y[r] * a).to(dtype).to(torch.float32) if kind == "rand" else zero_signs[r].clone()
        if kind != "signed_zero":
            row[lane[r]] = sign[r] * a
        rows.append(row)
    return rows


def _extreme_blocks(dtype, blocksize, gen, min_numel=65537) -> torch.Tensor:
    """Whole blocks cycling through: random values under each extreme absmax (the max at a random lane,
    random sign), the same with the rest of the block +-0.0, an all +-0.0 block and a block whose only
    nonzero is +-(the dtype's smallest subnormal); enough blocks that 2 workers each get some (>= 2^16
    elements), then an odd partial tail block with a subnormal-or-tiny absmax (the scalar tail path)."""
    scales = _representable(EXTREME_ABSMAX, dtype)
    kinds = [("rand", a) for a in scales] + [("zeros", a) for a in scales]
    kinds += [("signed_zero", 0.0), ("one_subnormal", _min_subnormal(dtype))]
    nb = max(-(-min_numel // blocksize), 2 * len(kinds))
    rows = _extreme_rows(kinds, nb, blocksize, dtype, gen)
    tail = torch.rand(blocksize // 2 + 1, generator=gen) * 2 - 1
    tail_scale = _min_subnormal(dtype) * 5
    tail = (tail * tail_scale).to(dtype).to(torch.float32)
    tail[0] = tail_scale
    return torch.cat(rows + [tail]).to(dtype)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT4)
def test_quantize_4bit_extreme_absmax_blocks(blocksize, dtype, quant_type, cpu_isas, gen):
    """Blocks whose absmax is subnormal, 2^-128 +- 1 ulp, 2^-126, 2^-120 +- 1 ulp, >= 2^126 or the dtype's
    largest finite, blocks of +-0.0 and a lone subnormal: quantize and dequantize match the reference."""
    x = _extreme_blocks(dtype, blocksize, gen)
    _, want_absmax = ref.quantize_4bit(x, quant_type, blocksize)
    scales = set(_representable(EXTREME_ABSMAX, dtype))
    assert scales <= set(want_absmax.tolist())  # every extreme scale is some block's absmax
    if dtype != torch.float16:  # fp16 holds no float32 subnormal: there 1/absmax always stays finite
        assert (torch.reciprocal(want_absmax).isinf() & (want_absmax > 0)).any()
    check_4bit_all_variants(x, quant_type, blocksize, cpu_isas)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", QUANT4)
def test_quantize_4bit_lone_subnormal_block_codes(dtype, quant_type, cpu_isas):
    """A block whose only nonzero is one subnormal: absmax is that value, 1/absmax is +inf, so the value
    takes the +-1.0 code and every zero (0 * inf = NaN) code 0, in every variant and in the partial tail."""
    tiny = _min_subnormal(dtype)
    x = torch.zeros(64 + 33)
    x[5], x[64 + 31] = tiny, -tiny  # one full block (SIMD path), one partial block (scalar path)
    x[6], x[64 + 2] = -0.0, -0.0
    x = x.to(dtype)
    want_packed, want_absmax = ref.quantize_4bit(x, quant_type, 64)
    codes = ref.unpack_nibbles(want_packed, x.numel())
    one, minus_one = (15, 0) if quant_type is QuantType.NF4 else (3, 11)
    assert want_absmax.tolist() == [tiny, tiny]
    assert codes[5] == one and codes[64 + 31] == minus_one
    assert codes[[0, 6, 63, 64, 66, 96]].tolist() == [0] * 6
    check_4bit_all_variants(x, quant_type, 64, cpu_isas)


def _absmax_sets(dtype) -> dict:
    """Per-block absmax patterns for double quant, each over 1100 blocks (4 full nested blocks + a tail)."""
    tiny = _min_subnormal(dtype)
    top = float(torch.finfo(dtype).max)
    nb = 1100
    return {
        "equal_normal": [0.375] * nb,  # absmax - mean == 0 everywhere: nested absmax 0
        "equal_tiny": [tiny] * nb,
        "equal_max": [top] * nb,
        "tiny_distinct": [tiny * (1 + b % 7) for b in range(nb)],  # centred values subnormal in f32/bf16
        "tiny_two": [tiny * (1 + b % 2) for b in range(nb)],  # mean is a tie: rounds to even
        "zero_or_tiny": [tiny * (b % 2) for b in range(nb)],
        "zero_or_max": [top * (b % 2) for b in range(nb)],
    }


@pytest.mark.parametrize("pattern", list(_absmax_sets(torch.float32)))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", QUANT4)
def test_double_quant_degenerate_absmax_matches_reference(pattern, dtype, quant_type, cpu_isas, gen, monkeypatch):
    """Double quant where all block absmax are equal or tiny (absmax - mean is 0 or subnormal for whole
    256-blocks, so the nested reciprocal is inf): codes, nested absmax, offset and dequantized values
    equal the reference path, for every variant and 1 or 2 threads."""
    import converter

    scales = torch.tensor(_absmax_sets(dtype)[pattern], dtype=torch.float32)
    blocksize = 64
    nb = scales.numel()
    x = ((torch.rand(nb, blocksize, generator=gen) * 2 - 1) * scales[:, None]).to(dtype).to(torch.float32)
    lane = torch.randint(0, blocksize, (nb,), generator=gen)
    sign = torch.where(torch.rand(nb, generator=gen) < 0.5, -1.0, 1.0)
    x[torch.arange(nb), lane] = sign * scales
    x = x.reshape(-1).to(dtype)
    want_packed, want_absmax = ref.quantize_4bit(x, quant_type, blocksize)
    assert same_bits(want_absmax, scales)  # the pattern survived the cast to dtype
    want_codes, want_nested, want_offset = ref.double_quantize(want_absmax)
    if pattern.startswith("equal"):
        assert torch.all(want_nested == 0) and torch.all(want_codes == 0)
    want_scales = ref.dequantize_absmax(want_codes, want_nested, want_offset)
    for isa in cpu_isas:
        monkeypatch.setenv("QCKPT_ISA", isa)
        for th in (1, 2):
            qt = converter.quantize(x, quant_type, blocksize, double_quant=True, threads=th)
            where = f"{isa} threads={th}"
            assert same_bits(qt.data, want_packed), f"{where} packed: {first_diff(qt.data, want_packed)}"
            assert torch.equal(qt.nested.codes, want_codes), f"{where} codes: {first_diff(qt.nested.codes, want_codes)}"
            assert same_bits(qt.nested.absmax, want_nested), f"{where} nested absmax"
            got_offset = torch.tensor(qt.nested.offset, dtype=torch.float32)
            assert same_bits(got_offset, torch.tensor(want_offset, dtype=torch.float32)), f"{where} offset"
            assert same_bits(qt.nested.dequantize(), want_scales), f"{where} dequantized absmax"
            for out_dtype in DTYPES:
                want = ref.dequantize_4bit(want_packed, want_scales, quant_type, blocksize, (x.numel(),), out_dtype)
                got = converter.dequantize(qt, out_dtype, threads=th)
                assert same_bits(got, want), f"{where} dequantize {out_dtype}: {first_diff(got, want)}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rowwise_extreme_rows_match_reference(dtype, cpu_isas, gen):
    """Rows whose max is subnormal, at 127 * (1/SCB)'s overflow edge, exactly +-0.0 or the largest finite
    value: int8 codes and SCB equal the reference, and so does dequantizing them to every dtype."""
    cols = 301  # odd: the vector loops' remainder lanes run too
    scb_edge = 127.0 / float(torch.finfo(torch.float32).max)  # below about here (1/SCB) * 127 is +inf
    maxima = _representable(EXTREME_ABSMAX + [scb_edge, _f32_next(scb_edge, 0.0), _f32_next(scb_edge, 1.0)], dtype)
    kinds = [("rand", m) for m in maxima] + [("zeros", m) for m in maxima] + [("signed_zero", 0.0)]
    n_rows = max(2 * len(kinds), 2 * -(-32768 // cols) + 3)  # enough rows for 2 workers
    x = torch.stack(_extreme_rows(kinds, n_rows, cols, dtype, gen)).to(dtype)
    want_q, want_scb = ref.quantize_int8_rowwise(x)
    top = float(torch.finfo(dtype).max)
    top_rows = want_scb == top
    assert top_rows.any() and (want_q[top_rows].abs() == 127).any(dim=1).all()  # each row's max is +-127
    assert (want_scb == 0).any()
    for isa in cpu_isas:
        for th in (1, 2):
            q, scb = cpu.quantize_int8_rowwise(x, threads=th, isa=isa)
            assert torch.equal(q, want_q), f"{isa} threads={th}: {first_diff(q, want_q)}"
            assert same_bits(scb, want_scb), f"{isa} threads={th} SCB: {first_diff(scb, want_scb)}"
            for out_dtype in DTYPES:
                out = cpu.dequantize_int8_rowwise(want_q, want_scb, out_dtype, threads=th, isa=isa)
                want = ref.dequantize_int8_rowwise(want_q, want_scb, out_dtype)
                assert same_bits(out, want), f"{isa} threads={th} dequantize {out_dtype}: {first_diff(out, want)}"
