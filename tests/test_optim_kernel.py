"""The fused AdamW kernels (native/src/optim8*.c) against the pure-torch reference, bit for bit."""
import math

import numpy as np
import pytest
import torch

from converter.errors import OptimizerError, QuantizationInputError
from converter.formats import reference as formats_ref
from converter.kernels import optim_cpu
from converter.optim import maps
from converter.optim import reference as ref

M_MAP, V_MAP = maps.signed_map(), maps.unsigned_map()


@pytest.fixture(params=["default", "avx512-gathers"])
def cpu_isas(request, cpu_isas, monkeypatch):
    """conftest's variants; then, where AVX-512 runs, once more with QCKPT_OPTIM_NO_VBMI set, so the AVX-512
    variant's gather path is compared too on CPUs where it would take the VBMI byte-permute path."""
    if request.param == "avx512-gathers":
        if "avx512" not in cpu_isas:
            pytest.skip("no AVX-512 variant on this CPU")
        monkeypatch.setenv("QCKPT_OPTIM_NO_VBMI", "1")
        return ["avx512"]
    return cpu_isas


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.uint8 else t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _first_difference(name, ours, theirs):
    diff = (_bits(ours).reshape(-1) != _bits(theirs).reshape(-1)).nonzero().flatten()
    if diff.numel() == 0:
        return None
    i = int(diff[0])
    return f"{name}: {diff.numel()} differ, first at flat index {i}: kernel {ours.reshape(-1)[i]} vs reference {theirs.reshape(-1)[i]}"


def _state(n, gen, scale_m=1e-3, scale_v=1e-6):
    """A plausible quantized state: random moments quantized by the reference."""
    mc, ma = ref.quantize(torch.randn(n, generator=gen) * scale_m, M_MAP)
    vc, va = ref.quantize(torch.rand(n, generator=gen) * scale_v, V_MAP)
    return mc, ma, vc, va


def _scalars(step=1, lr=1e-3, weight_decay=1e-2, maximize=False, betas=(0.9, 0.999), eps=1e-8):
    return ref.AdamWScalars.for_step(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                                     step=step, maximize=maximize)


def _run_both(p, g, state, scalars, isa, threads):
    expected = ref.adamw8bit_step(p, g, *state, M_MAP, V_MAP, scalars)
    P, (mc, ma, vc, va) = p.clone(), [t.clone() for t in state]
    optim_cpu.adamw8bit_step(P, g, mc, ma, M_MAP, vc, va, V_MAP, scalars, isa=isa, threads=threads)
    return expected, (P, mc, ma, vc, va)


def _assert_same(expected, got):
    problems = [_first_difference(name, o, t) for name, o, t in
                zip(("param", "m codes", "m absmax", "v codes", "v absmax"), got, expected)]
    problems = [p for p in problems if p]
    assert not problems, "; ".join(problems)


# 4097 and below: binary-search code selection; 70001: the bucket table (>= 16384 elements per call).
@pytest.mark.parametrize("n", [1, 255, 257, 4097, 70001])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8bit_step_matches_reference(n, param_dtype, gen, cpu_isas, awkward):
    """Parameter, codes and absmax after 3 consecutive steps equal the reference exactly, for every ISA
    variant and 1 or 2 threads, with awkward gradients (outliers, an all-zero block)."""
    p0 = torch.randn(n, generator=gen).to(param_dtype)
    grads = [(awkward((n,), torch.float32, 256, gen) * 1e-3).to(param_dtype) for _ in range(3)]
    for isa in cpu_isas:
        for threads in (1, 2):
            p_ref, st_ref = p0.clone(), _state(n, gen)
            p_k, st_k = p_ref.clone(), tuple(t.clone() for t in st_ref)
            for step, g in enumerate(grads, start=1):
                s = _scalars(step=step, weight_decay=0.1 * (step % 2))
                p_ref, *st_ref = ref.adamw8bit_step(p_ref, g, *st_ref, M_MAP, V_MAP, s)
                optim_cpu.adamw8bit_step(p_k, g, st_k[0], st_k[1], M_MAP, st_k[2], st_k[3], V_MAP, s, isa=isa,
                                         threads=threads)
                _assert_same((p_ref, *st_ref), (p_k, *st_k))


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_8bit_step_mixed_dtypes_and_options(grad_dtype, gen, cpu_isas):
    """bf16 parameter with a gradient of another dtype, maximize, zero weight decay, odd betas/eps/lr."""
    n = 3000
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = (torch.randn(n, generator=gen) * 1e-2).to(grad_dtype)
    s = _scalars(step=7, lr=3e-2, weight_decay=0.0, maximize=True, betas=(0.8, 0.95), eps=1e-6)
    for isa in cpu_isas:
        _assert_same(*_run_both(p, g, _state(n, gen), s, isa, 2))


def test_zero_gradient_and_zero_state(gen, cpu_isas):
    """A zero gradient on a zero state leaves the parameter only decayed and the state zero (no NaN from
    the all-zero blocks, whose codes are 0 by the NaN rule)."""
    n = 1000
    p = torch.randn(n, generator=gen)
    state = (torch.full((n,), 127, dtype=torch.uint8), torch.zeros(4), torch.zeros(n, dtype=torch.uint8), torch.zeros(4))
    s = _scalars(weight_decay=0.5)
    for isa in cpu_isas:
        expected, got = _run_both(p, torch.zeros(n), state, s, isa, 1)
        _assert_same(expected, got)
        assert torch.equal(got[0], p * torch.tensor(s.decay))
        assert not got[2].any() and not got[4].any()


def test_exact_midpoint_ties_go_to_even_code(cpu_isas):
    """With beta1 = 0 the new first moment is the gradient itself; gradients placed exactly on map
    midpoints (block absmax 1.0) must pick the even code, as in qckpt_quantize_blockwise8."""
    mids = ((M_MAP[:-1] + M_MAP[1:]) * 0.5)
    block = torch.cat([mids, torch.tensor([1.0])])  # 256 values, absmax 1.0, x * (1/1) == x
    s = _scalars(betas=(0.0, 0.999))
    ties_up = torch.arange(255) + torch.arange(255) % 2  # tie between i and i+1 -> the even one
    # 1 block takes the binary-search path of the kernel, 80 blocks (>= 16384 elements) the bucket table.
    for blocks in (1, 80):
        g = block.repeat(blocks)
        n = g.numel()
        state = (torch.full((n,), 127, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(n, dtype=torch.uint8),
                 torch.zeros(blocks))
        for isa in cpu_isas:
            expected, got = _run_both(torch.zeros(n), g, state, s, isa, 2)
            _assert_same(expected, got)
            codes = got[1].view(blocks, 256)[:, :255].long()
            assert torch.equal(codes, ties_up.expand(blocks, 255))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_32bit_step_matches_reference(param_dtype, gen):
    """The float32-state step (small tensors) equals the reference over 3 steps, 1 and 2 threads."""
    n = 100003
    p0 = torch.randn(n, generator=gen).to(param_dtype)
    for threads in (1, 2):
        p_ref, m_ref, v_ref = p0.clone(), torch.zeros(n), torch.zeros(n)
        p_k, m_k, v_k = p0.clone(), torch.zeros(n), torch.zeros(n)
        for step in (1, 2, 3):
            g = (torch.randn(n, generator=gen) * 1e-3).to(param_dtype)
            s = _scalars(step=step)
            p_ref, m_ref, v_ref = ref.adamw32_step(p_ref, g, m_ref, v_ref, s)
            optim_cpu.adamw32_step(p_k, g, m_k, v_k, s, threads=threads)
            problems = [_first_difference(*a) for a in (("param", p_k, p_ref), ("m", m_k, m_ref), ("v", v_k, v_ref))]
            assert not any(problems), problems


def test_reference_sqrt_is_correctly_rounded(gen):
    """sqrt_f32 equals IEEE float32 sqrt (numpy's) on random magnitudes over the whole range and edges."""
    x = torch.rand(200000, generator=gen) * torch.exp(torch.randn(200000, generator=gen) * 20)
    edges = torch.tensor([0.0, 1e-45, 1.1754942e-38, 1.0, 2.0, 3.4028235e38, math.inf])
    x = torch.cat([x, edges])
    expected = torch.from_numpy(np.sqrt(x.numpy()))
    assert torch.equal(ref.sqrt_f32(x), expected)
    assert torch.isnan(ref.sqrt_f32(torch.tensor([math.nan]))).all()


def test_reference_codes_match_formats_reference(gen):
    """The optimizer reference's code rule is the one of converter.formats.reference (ties even, NaN 0)."""
    for code in (M_MAP, V_MAP):
        mids = (code[:-1] + code[1:]) * 0.5
        xn = torch.cat([torch.rand(5000, generator=gen) * 2 - 1, mids, code, torch.tensor([math.nan, 0.0, -0.0])])
        assert torch.equal(ref.nearest_codes(xn, code), formats_ref.codes_nearest_even(xn, code))


def test_kernel_refuses_bad_arguments(gen):
    """Wrong state dtype/size, a non-contiguous parameter and a non-increasing map are clear errors."""
    n = 600
    p, g = torch.randn(n), torch.randn(n)
    mc, ma, vc, va = _state(n, gen)
    s = _scalars()
    with pytest.raises(OptimizerError, match="first-moment absmax"):
        optim_cpu.adamw8bit_step(p, g, mc, ma[:-1], M_MAP, vc, va, V_MAP, s)
    with pytest.raises(OptimizerError, match="dtype"):
        optim_cpu.adamw8bit_step(p, g, mc.to(torch.int32), ma, M_MAP, vc, va, V_MAP, s)
    with pytest.raises(OptimizerError, match="not contiguous"):
        optim_cpu.adamw8bit_step(torch.randn(n, 2)[:, 0], g, mc, ma, M_MAP, vc, va, V_MAP, s)
    bad_map = V_MAP.clone()
    bad_map[10] = bad_map[9]
    with pytest.raises(QuantizationInputError, match="second-moment code map is not strictly increasing"):
        optim_cpu.adamw8bit_step(p, g, mc, ma, M_MAP, vc, va, bad_map, s)


def test_code_selection_over_all_magnitudes(gen, cpu_isas):
    """With beta1 = beta2 = 0 the new moments are g and g*g; g drawn uniformly over float32 bit patterns
    in [-1, 1] (every binade, subnormals, signed zeros), one 1.0 per block so x_n is exact: codes equal the
    reference on both kernel paths (binary search for 1 block, bucket table for 100 blocks)."""
    for blocks in (1, 100):
        n = 256 * blocks
        bits = torch.randint(0, 0x3F800001, (n,), generator=gen, dtype=torch.int64)
        sign = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64) << 31
        g = (bits | sign).to(torch.int64).to(torch.int32).view(torch.float32).clone()
        g[::256] = 1.0
        s = _scalars(betas=(0.0, 0.0))
        state = (torch.full((n,), 127, dtype=torch.uint8), torch.zeros(blocks), torch.zeros(n, dtype=torch.uint8),
                 torch.zeros(blocks))
        for isa in cpu_isas:
            _assert_same(*_run_both(torch.zeros(n), g, state, s, isa, 2))


@pytest.mark.parametrize("blocksize", [16, 200, 320, 4096])
def test_8bit_step_other_blocksizes(blocksize, gen, cpu_isas):
    """Blocks that are not a multiple of the 64-element VBMI chunk (or shorter than one) equal the reference."""
    n = 3 * blocksize + 77
    p, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 1e-3
    mc, ma = ref.quantize(torch.randn(n, generator=gen) * 1e-3, M_MAP, blocksize)
    vc, va = ref.quantize(torch.rand(n, generator=gen) * 1e-6, V_MAP, blocksize)
    s = _scalars(step=2)
    expected = ref.adamw8bit_step(p, g, mc, ma, vc, va, M_MAP, V_MAP, s, blocksize=blocksize)
    for isa in cpu_isas:
        P, state = p.clone(), [t.clone() for t in (mc, ma, vc, va)]
        optim_cpu.adamw8bit_step(P, g, state[0], state[1], M_MAP, state[2], state[3], V_MAP, s, blocksize=blocksize,
                                 isa=isa, threads=2)
        _assert_same(expected, (P, *state))
