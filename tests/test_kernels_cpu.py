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
