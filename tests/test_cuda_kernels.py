"""CUDA kernels (converter.kernels.cuda) against the CPU library: the same bytes for every quantize and
dequantize, on random inputs of awkward sizes; the fused 4-bit matmul within tolerance of dequantize +
float64 matmul. Skipped without a GPU or without the built extension (scripts/gpu_check.sh runs them)."""
import pytest
import torch

import converter
from converter.errors import QuantizationInputError
from converter.formats import codebooks as cb
from converter.formats import reference as ref
from converter.formats.codebooks import QuantType
from converter.kernels import cpu
from converter.kernels import cuda as kcuda
from cuda_required import require_cuda_extension
from bits import same_bits

pytestmark = pytest.mark.cuda
require_cuda_extension()

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT4 = [QuantType.NF4, QuantType.FP4]




def where_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} vs {list(b.shape)}"
    if a.is_floating_point():
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(view), b.view(view)
    idx = (a != b).nonzero()
    return f"{idx.numel()} differ, first at {int(idx[0])}: {a[idx[0]].item()} vs {b[idx[0]].item()}" if idx.numel() else ""


def tricky_weight(n: int, blocksize: int, dtype, gen) -> torch.Tensor:
    """Gaussian blocks at scales from 2^-130 to 2^100, outliers, an all-zero block, -0.0, and elements
    that land exactly on (and one ulp beside) every NF4/FP4 threshold after normalization."""
    flat = torch.randn(n, generator=gen)
    nb = -(-n // blocksize)
    lo, hi = (-14, 6) if dtype is torch.float16 else (-20, 20)  # fp16 overflows past 65504
    scale = torch.exp2(torch.randint(lo, hi, (nb,), generator=gen).float())
    if dtype is torch.float32:
        scale[torch.rand(nb, generator=gen) < 0.1] = 2.0**-130  # subnormal absmax: reciprocal overflows
        scale[torch.rand(nb, generator=gen) < 0.05] = 2.0**100
    flat = flat * scale.repeat_interleave(blocksize)[:n]
    flat[torch.rand(n, generator=gen) < 0.01] *= 50
    flat[torch.rand(n, generator=gen) < 0.01] = -0.0
    tiny = torch.rand(n, generator=gen) < 0.01  # float32/bf16 subnormals: x * (1 / absmax) underflows
    flat[tiny] = 1e-40 * torch.sign(torch.randn(int(tiny.sum()), generator=gen))
    if nb >= 3:
        b = int(torch.randint(0, nb - 1, (1,), generator=gen))
        flat[b * blocksize:(b + 1) * blocksize] = 0
        # a block with absmax exactly 1: its elements are the thresholds themselves (x_n == t is a tie)
        b = (b + 1) % (nb - 1)
        thr = torch.tensor(cb.NF4_THRESHOLDS + cb.FP4_THRESHOLDS, dtype=torch.float32)
        ties = torch.cat([torch.ones(1), thr, -thr, torch.nextafter(thr, torch.ones(1)), torch.nextafter(-thr, torch.ones(1))])
        width = min(blocksize, ties.numel(), n - b * blocksize)
        flat[b * blocksize:b * blocksize + width] = ties[:width]
    return flat.to(dtype)


def assert_same_qt(got, want, label):
    assert same_bits(got.data, want.data), f"{label} packed: {where_diff(got.data, want.data)}"
    if want.nested is not None:
        assert same_bits(got.nested.codes, want.nested.codes), f"{label} nested codes: {where_diff(got.nested.codes, want.nested.codes)}"
        assert same_bits(got.nested.absmax, want.nested.absmax), f"{label} nested absmax"
        assert same_bits(torch.tensor(got.nested.offset), torch.tensor(want.nested.offset)), f"{label} offset"
    elif want.absmax is not None:
        assert same_bits(got.absmax, want.absmax), f"{label} absmax: {where_diff(got.absmax, want.absmax)}"
    if want.scb is not None:
        assert same_bits(got.scb, want.scb), f"{label} scb: {where_diff(got.scb, want.scb)}"


@pytest.mark.parametrize("quant_type", QUANT4)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_same_bytes_as_cpu(quant_type, dtype, gen):
    """converter.quantize on a CUDA tensor gives the CPU library's bytes for every blocksize, odd sizes,
    partial blocks, zero blocks, subnormal scales and exact threshold ties, with and without double quant."""
    for blocksize in cb.BLOCKSIZES_4BIT:
        n = int(torch.randint(1, 6 * blocksize, (1,), generator=gen)) | 1  # odd: padded last nibble
        for shape in ((n,), (7, 4 * blocksize + 3)):
            x = tricky_weight(int(torch.tensor(shape).prod()), blocksize, dtype, gen).reshape(shape)
            for dq in (False, True):
                want = converter.quantize(x, quant_type, blocksize, dq)
                got = converter.quantize(x.cuda(), quant_type, blocksize, dq)
                assert got.device.type == "cuda"
                assert_same_qt(got, want, f"{quant_type.value} {dtype} bs={blocksize} shape={shape} dq={dq}")


def test_quantize_4bit_large_same_bytes(gen):
    """A weight of 3.2M elements (a persistent grid loops many times) matches the CPU bytes."""
    x = tricky_weight(1792 * 1793, 64, torch.bfloat16, gen).reshape(1792, 1793)
    for quant_type in QUANT4:
        want = converter.quantize(x, quant_type, 64, True)
        got = converter.quantize(x.cuda(), quant_type, 64, True)
        assert_same_qt(got, want, f"large {quant_type.value}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_rowwise_same_bytes_as_cpu(dtype, gen):
    """Row-wise int8 on the GPU: same codes and SCB as the CPU library, an all-zero row included."""
    rows, cols = int(torch.randint(1, 300, (1,), generator=gen)), int(torch.randint(1, 3000, (1,), generator=gen))
    x = (torch.randn(rows, cols, generator=gen) * torch.exp2(torch.randint(-10, 10, (rows, 1), generator=gen).float()))
    x[rows // 2] = 0
    x = x.to(dtype)
    want = converter.quantize(x, "int8")
    got = converter.quantize(x.cuda(), "int8")
    assert_same_qt(got, want, f"int8 {dtype} {rows}x{cols}")
    for out_dtype in DTYPES:
        assert same_bits(converter.dequantize(got, out_dtype), converter.dequantize(want, out_dtype)), out_dtype


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises_like_cpu(bad, gen):
    """NaN/inf in a CUDA tensor raises QuantizationInputError with the CPU's message (the first index)."""
    x = torch.randn(5000, generator=gen)
    first = int(torch.randint(0, 4000, (1,), generator=gen))
    x[first] = bad
    x[first + 700] = float("nan")
    for quant_type in ("nf4", "int8"):
        shaped = x.reshape(50, 100) if quant_type == "int8" else x
        with pytest.raises(QuantizationInputError) as want:
            converter.quantize(shaped, quant_type, name="w")
        with pytest.raises(QuantizationInputError) as got:
            converter.quantize(shaped.cuda(), quant_type, name="w")
        assert str(got.value) == str(want.value)


def test_blockwise8_and_exact_mean_match_cpu(gen):
    """The 8-bit blockwise quantizer (awkward blocksizes, exact midpoint ties) and the exact mean equal
    the CPU library and reference.exact_mean_f32 on values spanning subnormals to 2^100."""
    _, lib = kcuda.load()
    code = kcuda.nested_code("cuda")
    mids = ((code[:-1] + code[1:]) * 0.5).cpu()
    for blocksize in (1, 7, 256, 1000):
        n = int(torch.randint(1, 20000, (1,), generator=gen))
        x = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 30, (n,), generator=gen).float())
        # block 0: the midpoints themselves with absmax exactly 1, so x_n hits every tie exactly
        head = min(n, blocksize)
        x[:head] = torch.rand(head, generator=gen) * 2 - 1
        x[: min(head, 255)] = mids[: min(head, 255)]
        x[head - 1] = 1.0
        if n >= 2 * blocksize:  # a block with a subnormal absmax: the reciprocal overflows, x * r = +-inf
            x[blocksize:2 * blocksize] = torch.randn(blocksize, generator=gen) * 1e-40
        want_codes, want_absmax = cpu.quantize_blockwise8(x, code.cpu(), blocksize)
        xd = x.cuda()
        ws = kcuda.new_workspace("cuda")
        codes = torch.empty(n, dtype=torch.uint8, device="cuda")
        absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device="cuda")
        stream = kcuda._stream(xd.device)
        kcuda._check(lib.qckpt_cuda_workspace_reset(kcuda._ptr(ws, "int64_t *"), stream))
        kcuda._check(lib.qckpt_cuda_quantize_blockwise8(
            kcuda._ptr(xd, "float *"), n, blocksize, kcuda._ptr(code, "float *"), 0, kcuda._ptr(codes, "uint8_t *"),
            kcuda._ptr(absmax, "float *"), kcuda._ptr(ws, "int64_t *"), stream))
        kcuda.finish(ws)
        assert same_bits(codes, want_codes), f"bs={blocksize}: {where_diff(codes, want_codes)}"
        assert same_bits(absmax, want_absmax)
    for trial in range(8):
        n = int(torch.randint(1, 200000, (1,), generator=gen))
        v = torch.rand(n, generator=gen) * torch.exp2(torch.randint(-140, 100, (n,), generator=gen).float())
        if trial % 2:
            v = torch.full((n,), float(v[0]))  # every value equal: the mean must be that value exactly
        ws = kcuda.new_workspace("cuda")
        vd = v.cuda()
        stream = kcuda._stream(vd.device)
        kcuda._check(lib.qckpt_cuda_workspace_reset(kcuda._ptr(ws, "int64_t *"), stream))
        kcuda._check(lib.qckpt_cuda_exact_mean(kcuda._ptr(vd, "float *"), n, kcuda._ptr(ws, "int64_t *"), stream))
        got = kcuda.finish(ws)
        assert same_bits(torch.tensor(got), torch.tensor(ref.exact_mean_f32(v))), (n, got, ref.exact_mean_f32(v))


def test_nested_quantize_takes_the_mean_from_the_4bit_sums(gen):
    """Double quantization as quantize_4bit launches it: the 4-bit kernel sums absmax into the workspace
    and the nested kernel computes the exact mean from those sums (center 2) -- through the warp-per-block
    kernel and, with its input misaligned, the general one: the same mean, codes and nested absmax as the
    reference mean and the CPU library's 8-bit quantizer on the same absmax."""
    _, lib = kcuda.load()
    code = kcuda.nested_code("cuda")
    for n, misaligned in ((64 * 1000 + 17, False), (64 * 3001, True), (5, False)):
        nb = -(-n // 64)
        w = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-60, 60, (nb,), generator=gen).float()).repeat_interleave(64)[:n]
        wd = w.to(torch.bfloat16).cuda()
        ws = kcuda.new_workspace("cuda")
        stream = kcuda._stream(wd.device)
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device="cuda")
        buf = torch.empty(nb + 4, dtype=torch.float32, device="cuda")
        absmax = buf[1:nb + 1] if misaligned else buf[:nb]
        codes = torch.empty(nb, dtype=torch.uint8, device="cuda")
        absmax2 = torch.empty(-(-nb // 256), dtype=torch.float32, device="cuda")
        kcuda._check(lib.qckpt_cuda_workspace_reset(kcuda._ptr(ws, "int64_t *"), stream))
        kcuda._check(lib.qckpt_cuda_quantize_4bit(kcuda._ptr(wd), kcuda._dtype_code(wd.dtype), n, 64,
                                                  kcuda._QUANT4[QuantType.NF4], kcuda._ptr(packed, "uint8_t *"),
                                                  kcuda._ptr(absmax, "float *"), 1, kcuda._ptr(ws, "int64_t *"), stream))
        kcuda._check(lib.qckpt_cuda_quantize_blockwise8(
            kcuda._ptr(absmax, "float *"), nb, 256, kcuda._ptr(code, "float *"), 2, kcuda._ptr(codes, "uint8_t *"),
            kcuda._ptr(absmax2, "float *"), kcuda._ptr(ws, "int64_t *"), stream))
        mean = kcuda.finish(ws)
        host_absmax = absmax.cpu()
        want_mean = ref.exact_mean_f32(host_absmax)
        assert same_bits(torch.tensor(mean), torch.tensor(want_mean)), (n, mean, want_mean)
        want_codes, want_absmax2 = cpu.quantize_blockwise8(host_absmax - want_mean, code.cpu(), 256)
        assert same_bits(codes, want_codes), f"n={n}: {where_diff(codes, want_codes)}"
        assert same_bits(absmax2, want_absmax2)


@pytest.mark.parametrize("quant_type", QUANT4)
def test_dequantize_same_bytes_as_cpu(quant_type, gen):
    """4-bit dequantize on the GPU (plain and double-quantized scales, every output dtype, odd sizes and
    misaligned outputs) equals the CPU library bit for bit; so does dequantize_absmax."""
    for blocksize in (32, 64, 256, 4096):
        n = int(torch.randint(1, 10 * blocksize, (1,), generator=gen))
        x = tricky_weight(n, blocksize, torch.float32, gen)
        for dq in (False, True):
            cpu_qt = converter.quantize(x, quant_type, blocksize, dq)
            gpu_qt = cpu_qt.to("cuda")
            if dq:
                assert same_bits(gpu_qt.nested.dequantize(), cpu_qt.nested.dequantize())
            for dtype in DTYPES:
                want = converter.dequantize(cpu_qt, dtype)
                got = converter.dequantize(gpu_qt, dtype)
                assert got.device.type == "cuda"
                assert same_bits(got, want), f"bs={blocksize} n={n} dq={dq} {dtype}: {where_diff(got, want)}"
                buf = torch.empty(n + 1, dtype=dtype, device="cuda")[1:]  # misaligned: the scalar path
                kcuda.dequantize(gpu_qt, dtype, out=buf)
                assert same_bits(buf, want.reshape(-1))


def reference_matmul(x, qt):
    """float64 product of x with the weight dequantized to x.dtype (what the prefill kernels multiply; the
    decode kernel rounds the code values to x.dtype first, then scales the sums or the weights, within the same
    tolerance)."""
    w = converter.dequantize(qt.to("cpu"), x.dtype).double()
    return x.cpu().double() @ w.t()


def rel_err(got, want):
    got = got.cpu().double()
    assert torch.isfinite(got).all()
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_4bit_fused_matches_reference(dtype, gen):
    """The decode kernel for 1..16 rows (one and two batch tiles; one and two row tiles per warp; short and
    long K; K % 128 != 0, so warps make steps past K; N not a multiple of 16), plain and nested scales,
    blocksizes 32..256, in both mappings (wide: 1 row, 3 and 8 rows of the N >= 8500 shapes on an H100, and
    blocksize 32 or K % 64 == 32; post-scaled per 64-wide chunk: the rest) is within bf16/fp16 rounding of
    dequantize + float64 matmul: 1e-2 relative for bf16, 2e-3 for fp16 -- and bit-identical when repeated
    (fixed reduction order). On a GPU of ~100-140 multiprocessors the N >= 6000 shapes give blocks several
    row tiles, and those with K >= 1056 give each warp several steps of a tile, so loads run ahead across
    tile boundaries mid-K."""
    shapes = [(333, 4096 + 96), (4096, 14336 // 4), (64, 8192 + 160), (8500, 256), (17000, 64), (40, 96), (16, 32),
              (6000, 1056), (6000, 2048), (17000, 2144)]
    schemes = [(QuantType.NF4, True, 64), (QuantType.FP4, False, 64), (QuantType.NF4, True, 32),
               (QuantType.FP4, False, 128), (QuantType.NF4, True, 256)]
    for i, (n_out, k) in enumerate(shapes):
        w = torch.randn(n_out, k, generator=gen) * 0.02
        for quant_type, dq, bs in schemes[:2] if i % 2 else schemes:
            qt = converter.quantize(w.cuda(), quant_type, bs, dq)
            for rows in (1, 3, 8, 9, 16):
                x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
                y = kcuda.gemm_4bit(x, qt)
                assert y.shape == (rows, n_out) and y.dtype == dtype
                err = rel_err(y, reference_matmul(x, qt))
                # the reference rounds each dequantized weight to x.dtype; post-scaled, the kernel multiplies the
                # code values rounded to x.dtype and applies the float32 scale to the sums; wide, its weights are
                # the code values rounded to x.dtype times the scale (bf16: a bf16 scale), rounded to x.dtype
                assert err < (1e-2 if dtype is torch.bfloat16 else 2e-3), (n_out, k, rows, quant_type, bs, err)
                assert torch.equal(kcuda.gemm_4bit(x, qt).view(torch.int16), y.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_4bit_prefill_kernel_matches_reference(dtype, gen):
    """The tiled kernel for 17..128 rows: both tile heights (<= 32 rows, more), rows that fill no tile
    exactly, N not a multiple of its 128-output tiles, one k-tile (K 64) up to grids that split K (few
    output tiles, long K), plain and nested scales, blocksizes 32..256; within rounding of dequantize +
    float64 matmul, and bit-identical when repeated (the split-K sum runs in a fixed order)."""
    cases = [(333, 4096 + 64, 17), (4096, 2048, 32), (100, 14336 // 2, 33), (8500, 256, 64), (64, 64, 100),
             (1000, 1024, 128), (40, 8192, 77)]
    for n_out, k, rows in cases:
        w = torch.randn(n_out, k, generator=gen) * 0.02
        for quant_type, dq, bs in ((QuantType.NF4, True, 64), (QuantType.FP4, False, 32), (QuantType.NF4, False, 256)):
            qt = converter.quantize(w.cuda(), quant_type, bs, dq)
            x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
            y = kcuda.gemm_4bit(x, qt)
            assert y.shape == (rows, n_out) and y.dtype == dtype
            err = rel_err(y, reference_matmul(x, qt))
            assert err < (1e-2 if dtype is torch.bfloat16 else 2e-3), (n_out, k, rows, quant_type, bs, err)
            assert torch.equal(kcuda.gemm_4bit(x, qt).view(torch.int16), y.view(torch.int16)), (n_out, k, rows)


def test_gemm_4bit_prefill_split_workspace_stays_usable(gen):
    """Calls of different shapes share one cached split-K workspace per stream: its tile counters must be
    left zero by every call, or the next call would add the wrong partial sums. Alternate shapes (split
    and unsplit grids, different tile counts) and check each against the first result of its shape."""
    weights = [converter.quantize((torch.randn(n, k, generator=gen) * 0.05).cuda(), "nf4", 64, True)
               for n, k in ((256, 8192), (4096, 512), (128, 16384))]
    xs = [torch.randn(rows, qt.shape[1], generator=gen).bfloat16().cuda() for rows, qt in zip((40, 20, 128), weights)]
    first = [kcuda.gemm_4bit(x, qt) for x, qt in zip(xs, weights)]
    for _ in range(3):
        for x, qt, want in zip(xs, weights, first):
            assert torch.equal(kcuda.gemm_4bit(x, qt).view(torch.int16), want.view(torch.int16))
    for x, qt, y in zip(xs, weights, first):
        assert rel_err(y, reference_matmul(x, qt)) < 1e-2


def test_gemm_4bit_prefill_workspace_needs_only_its_zeroed_prefix(gen):
    """A fresh workspace (as each call inside CUDA-graph capture gets) needs only its first
    qckpt_cuda_gemm_4bit_workspace_zeroed bytes zero: filled with 0xFF elsewhere, a call that splits K gives
    the cached-workspace result bit for bit, twice in a row (the counters are left zero), with the scales
    expanded per call and with the kept copy. The query names the counters when the call must find them zero
    and nothing when the shapes do not split; a workspace that is not 16-byte aligned is refused."""
    ffi, lib = kcuda.load()
    n_out, k, rows, bs = 256, 8192, 40, 64  # 2 output tiles: k splits
    qt = converter.quantize((torch.randn(n_out, k, generator=gen) * 0.05).cuda(), "nf4", bs, True)
    x = torch.randn(rows, k, generator=gen).bfloat16().cuda()
    want = kcuda.fused_gemm_4bit(x, qt)
    prep = kcuda._prepared_weights[id(qt.data)][1]
    kept = prep.expanded if isinstance(prep.expanded, torch.Tensor) else None
    nbytes = ffi.new("int64_t *")
    for expanded in [ffi.NULL] + ([] if kept is None else [kcuda._ptr(kept, "float *")]):
        given = int(expanded != ffi.NULL)
        kcuda._check(lib.qckpt_cuda_gemm_4bit_workspace(rows, n_out, k, given, nbytes))
        ws = torch.full((nbytes[0],), 0xFF, dtype=torch.uint8, device="cuda")
        kcuda._check(lib.qckpt_cuda_gemm_4bit_workspace_zeroed(rows, n_out, k, bs, given, nbytes))
        zeroed = nbytes[0]
        hopper = kept is not None  # the Hopper kernel runs where it keeps expanded scales
        assert zeroed == (0 if hopper and not given else 4096), (given, zeroed)
        ws[:zeroed] = 0
        for _ in range(2):
            y = torch.full_like(want, float("nan"))  # a tile the call leaves unwritten shows
            kcuda._check(lib.qckpt_cuda_gemm_4bit(kcuda._ptr(x), kcuda._dtype_code(x.dtype), rows, prep.packed_ptr,
                                                  prep.scales, n_out, k, bs, prep.quant, kcuda._ptr(y),
                                                  kcuda._ptr(ws), ws.numel(), expanded, kcuda._stream(x.device)))
            assert torch.equal(y.view(torch.int16), want.view(torch.int16)), given
    kcuda._check(lib.qckpt_cuda_gemm_4bit_workspace_zeroed(128, 14336, 4096, bs, 1, nbytes))
    assert nbytes[0] == 0  # 112 output tiles cover the GPU unsplit
    with pytest.raises(Exception, match="workspace must be 16-byte aligned"):  # the partial sums are float4s
        kcuda._check(lib.qckpt_cuda_gemm_4bit(kcuda._ptr(x), kcuda._dtype_code(x.dtype), rows, prep.packed_ptr,
                                              prep.scales, n_out, k, bs, prep.quant, kcuda._ptr(y),
                                              kcuda._ptr(ws[4:]), ws.numel() - 4, ffi.NULL, kcuda._stream(x.device)))
    assert rel_err(want, reference_matmul(x, qt)) < 1e-2


def test_gemm_4bit_other_paths_match_reference(gen):
    """Inputs outside the fused kernels (129+ rows, float32, K % 32 != 0, 17+ rows with K % 64 != 0, 3-D
    activations with a bias) take dequantize + cuBLAS, into a caller's workspace when given, and stay
    within tolerance."""
    cases = [(64, 512, 129, torch.bfloat16), (96, 200, 4, torch.bfloat16), (128, 256, 5, torch.float32),
             (80, 96, 20, torch.float16)]
    for n_out, k, rows, dtype in cases:
        assert not kcuda.fused_supported(rows, n_out, k, dtype)
        qt = converter.quantize((torch.randn(n_out, k, generator=gen) * 0.05).cuda(), "nf4", 64, True)
        x = torch.randn(rows, k, generator=gen).to(dtype).cuda()
        ws = torch.empty(n_out * k + 5, dtype=dtype, device="cuda")
        y = kcuda.gemm_4bit(x, qt, workspace=ws)
        tol = 1e-5 if dtype is torch.float32 else 1e-2
        assert rel_err(y, reference_matmul(x, qt)) < tol
    qt = converter.quantize((torch.randn(48, 64, generator=gen)).cuda(), "nf4", 64, False)
    x = torch.randn(2, 3, 64, generator=gen).to(torch.bfloat16).cuda()
    bias = torch.randn(48, generator=gen).cuda()
    y = kcuda.gemm_4bit(x, qt, bias)
    want = reference_matmul(x.reshape(6, 64), qt) + bias.cpu().to(torch.bfloat16).double()
    assert y.shape == (2, 3, 48) and rel_err(y.reshape(6, 48), want) < 1e-2


def test_fused_gemm_4bit_prepares_each_weight_once(gen):
    """A weight's launch arguments are built on its first call and reused while its tensors are the same
    (also through a new QuantizedTensor around them, as Linear4bit makes per forward); new tensors get
    their own; the entry goes with the packed tensor; results are unchanged."""
    import dataclasses
    import gc

    qt = converter.quantize((torch.randn(256, 512, generator=gen) * 0.05).cuda(), "nf4", 64, True)
    x = torch.randn(3, 512, generator=gen).bfloat16().cuda()
    y1 = kcuda.fused_gemm_4bit(x, qt)
    prep = kcuda._prepared_weights[id(qt.data)][1]
    same_buffers = dataclasses.replace(qt)
    y2 = kcuda.fused_gemm_4bit(x, same_buffers)
    assert kcuda._prepared_weights[id(qt.data)][1] is prep and torch.equal(y1, y2)
    other = converter.quantize((torch.randn(256, 512, generator=gen) * 0.05).cuda(), "nf4", 64, False)
    assert rel_err(kcuda.fused_gemm_4bit(x, other), reference_matmul(x, other)) < 1e-2
    assert kcuda._prepared_weights[id(other.data)][1] is not prep
    key = id(qt.data)
    del qt, same_buffers, prep
    gc.collect()
    assert key not in kcuda._prepared_weights


def test_gemm_4bit_prefill_expanded_scales_match_and_follow_edits(gen):
    """On an H100 the prefill kernel reads the weight's scales expanded to one float32 per block, kept with the
    weight: the result is bit-identical to one made with the scales expanded in the workspace per call (NULL;
    N 301 and 41 rows over 2 k splits put that copy at an offset that is not a multiple of 16 bytes unless
    rounded), and after the scales are edited in place (as load_state_dict does) the next call sees the new
    values. Elsewhere the kept buffer is absent and the same checks hold for the tiled kernel."""
    ffi, lib = kcuda.load()
    n_out, k, rows = 301, 1024, 41
    for dq, bs in ((False, 64), (True, 32)):
        qt = converter.quantize((torch.randn(n_out, k, generator=gen) * 0.05).cuda(), "nf4", bs, dq)
        x = torch.randn(rows, k, generator=gen).bfloat16().cuda()
        y = kcuda.fused_gemm_4bit(x, qt)
        prep = kcuda._prepared_weights[id(qt.data)][1]
        fresh = torch.empty_like(y)
        ws = kcuda._split_workspace(rows, n_out, k, bs, x.device)
        kcuda._check(lib.qckpt_cuda_gemm_4bit(kcuda._ptr(x), kcuda._dtype_code(x.dtype), rows, prep.packed_ptr,
                                              prep.scales, n_out, k, bs, prep.quant, kcuda._ptr(fresh),
                                              kcuda._ptr(ws), 0 if ws is None else ws.numel(), ffi.NULL,
                                              kcuda._stream(x.device)))
        assert torch.equal(fresh.view(torch.int16), y.view(torch.int16)), (dq, bs)
        (qt.nested.absmax if dq else qt.absmax).mul_(2.0)  # nested: code * absmax2 + offset changes too
        y2 = kcuda.fused_gemm_4bit(x, qt)
        assert rel_err(y2, reference_matmul(x, qt)) < 1e-2, (dq, bs)
        assert not torch.equal(y2.view(torch.int16), y.view(torch.int16))


def test_gemm_4bit_prefill_graph_replay_and_inference_tensors_read_live_scales(gen):
    """A CUDA graph captured around a prefill call keeps following the weight's scales (no copy of capture
    time is baked in), and weights made under torch.inference_mode (tensors without version counters) work."""
    qt = converter.quantize((torch.randn(256, 2048, generator=gen) * 0.05).cuda(), "nf4", 64, False)
    x = torch.randn(40, 2048, generator=gen).bfloat16().cuda()
    want = kcuda.gemm_4bit(x, qt)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kcuda.gemm_4bit(x, qt)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
    qt.absmax.mul_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, reference_matmul(x, qt)) < 1e-2
    with torch.inference_mode():
        frozen = converter.quantize((torch.randn(256, 2048, generator=gen) * 0.05).cuda(), "nf4", 64, True)
        got = kcuda.gemm_4bit(x, frozen)
    assert rel_err(got, reference_matmul(x, frozen)) < 1e-2


def test_fused_gemm_4bit_rejects_unsupported_shapes(gen):
    qt = converter.quantize((torch.randn(64, 96, generator=gen)).cuda(), "nf4", 32, False)
    with pytest.raises(QuantizationInputError, match="17..128 rows with K % 64"):
        kcuda.fused_gemm_4bit(torch.randn(20, 96, generator=gen).bfloat16().cuda(), qt)


def test_quantize_cpu_tensor_on_cuda_device_same_bytes(gen):
    """converter.quantize(cpu_tensor, device="cuda") -- the converter's path: small tensors copied plainly,
    large ones staged through the reused pinned buffer (grown, then reused back to back) -- gives the CPU
    bytes, leaves the caller's tensor untouched and returns the result on the GPU."""
    sizes = [(300, 1001), (1024, 1031), (2053, 1537), (515, 1029)]  # < 1 MiB, then larger: growth and reuse
    for dtype in (torch.bfloat16, torch.float32):
        pending = []
        for shape in sizes:
            x = tricky_weight(shape[0] * shape[1], 64, dtype, gen).reshape(shape)
            before = x.clone()
            pending.append((x, before, converter.quantize(x, "nf4", 64, True, device="cuda")))
        for x, before, got in pending:
            assert got.device.type == "cuda"
            assert same_bits(x, before)
            assert_same_qt(got, converter.quantize(x, "nf4", 64, True), f"staged {dtype} {tuple(x.shape)}")
    x = torch.randn(700, 1500, generator=gen).to(torch.float16)
    assert_same_qt(converter.quantize(x, "int8", device="cuda"), converter.quantize(x, "int8"), "staged int8")


def test_to_device_copies_exactly():
    """to_device: non-contiguous and misaligned CPU views, above and below the staging threshold, arrive
    bit-exact, contiguous and 16-byte aligned; a following copy does not overwrite the previous result."""
    base = torch.randn(1200, 1300).to(torch.bfloat16)
    views = [base.t(), base[:, 1:], base.reshape(-1)[3:1003], base[::2]]
    outs = [kcuda.to_device(v, "cuda") for v in views]
    for v, out in zip(views, outs):
        assert out.device.type == "cuda" and out.is_contiguous() and out.data_ptr() % 16 == 0
        assert same_bits(out.cpu(), v.contiguous())
