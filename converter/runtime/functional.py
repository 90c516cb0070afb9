"""Functional ops of the runtime: dequantize a weight, 4-bit matmul, LLM.int8 matmul, and the autograd
functions QLoRA trains through (gradient w.r.t. the input and bias; quantized weights stay frozen).

CPU 4-bit matmul picks one of two paths by the number of activation rows (batch * seq):
- rows <= `FUSED_MAX_ROWS`: the native fused dequantize+matmul (`kernels.cpu.gemm_4bit`), which never
  materialises the dense weight (decode is memory bound: reading 4 bits per weight wins);
- more rows: dequantize into a reused `Workspace` buffer, then torch's matmul (compute bound: a dense
  GEMM amortises one dequantization over many rows).
The threshold is measured by scripts/bench_matmul.py. On CUDA, `kernels.cuda.gemm_4bit` makes the same
choice with its own kernels (torch ops when the CUDA extension is not built).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..formats.codebooks import QuantType
from ..tensor import QuantizedTensor

# Rows up to which the fused CPU kernel beats dequantize + torch matmul (scripts/bench_matmul.py, 2-core
# AVX-512 dev box, 4096x4096 bf16, one thread: fused 0.5/1.2/2.5/3.7 ms at 1/4/8/12 rows against
# 3.3-4 ms for dequantize + matmul).
FUSED_MAX_ROWS = 8

# LLM.int8 constants of bitsandbytes' CPU/default backend (FORMAT.md 4.1, 4.3), kept bit for bit.
_INT8_MM_SCALE = 6.200124e-05  # ~1/127^2 with bitsandbytes' digit typo
_INT8_DEQUANT_SCALE = 7.874015718698502e-3  # 1/127


class Workspace:
    """Grow-only scratch memory for dense dequantized weights, shared by the quantized layers of one
    model (one buffer per dtype, the size of the largest weight), so large-batch forwards do not
    allocate and page-fault a dense weight per layer per call. Not safe for concurrent forwards."""

    def __init__(self):
        self._buffers: dict = {}

    def buffer(self, numel: int, dtype: torch.dtype, device=None) -> torch.Tensor:
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel]


def dequantize_weight(qt: QuantizedTensor, dtype: torch.dtype, *, workspace: Workspace | None = None) -> torch.Tensor:
    """The dense (N, K) weight in `dtype`; on CPU with a workspace, written into its reused buffer (the
    result is then only valid until the next call that uses the same workspace)."""
    if qt.device.type != "cpu" or workspace is None:
        return kernels.dequantize(qt, dtype)
    if qt.quant_type is QuantType.INT8:
        return kernels.dequantize(qt, dtype)
    out = workspace.buffer(qt.numel, dtype).view(qt.shape)
    return kernels.cpu.dequantize_4bit(
        qt.data, qt.block_absmax(), qt.quant_type, qt.blocksize, qt.shape, dtype, out=out
    )


def matmul_4bit(
    x: torch.Tensor,
    qt: QuantizedTensor,
    bias: torch.Tensor | None = None,
    *,
    workspace: Workspace | None = None,
    fused_max_rows: int = FUSED_MAX_ROWS,
) -> torch.Tensor:
    """x (..., K) @ dequant(W (N, K))^T + bias -> (..., N), computed in x.dtype (the compute dtype)."""
    n_out, k = qt.shape
    rows = x.numel() // k if k else 0
    if x.device.type == "cuda":  # the CUDA kernels pick fused vs dequantize + cuBLAS themselves
        from ..kernels import cuda

        buf = None if workspace is None else workspace.buffer(qt.numel, x.dtype, x.device)
        return cuda.gemm_4bit(x, qt, bias, workspace=buf)
    if x.device.type == "cpu" and 0 < rows <= fused_max_rows:
        y = kernels.cpu.gemm_4bit(x.reshape(rows, k), qt.data, qt.block_absmax(), n_out, k, qt.blocksize, qt.quant_type)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], n_out)
    weight = dequantize_weight(qt, x.dtype, workspace=workspace if x.device.type == "cpu" else None)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def matmul_int8(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None = None, *, threshold: float = 6.0):
    """x (..., K) @ W (N, K)^T for a row-wise int8 weight, output in x.dtype.

    threshold > 0: LLM.int8 as bitsandbytes runs it in eval mode (FORMAT.md 4.3): activations cast to
    fp16 and quantized per row with every |a| >= threshold treated as an outlier; the int8 product is
    exact (int32 on every device: `int8_matmul_exact`), and outlier columns are added back in x.dtype
    against the dequantized weight columns.
    threshold <= 0: the plain path, dequantize the weight to x.dtype and multiply.
    """
    n_out, k = qt.shape
    if threshold <= 0:
        weight = kernels.dequantize(qt, x.dtype)
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    a = x.reshape(-1, k)
    a16 = a.to(torch.float16)
    outliers = a16.abs() >= threshold
    cols = None
    if bool(outliers.any()):
        cols = torch.argwhere(outliers.any(dim=0)).view(-1)
        a16 = a16.masked_fill(outliers, 0)
    sca = a16.abs().amax(dim=1).float()
    # An all-zero row has SCA 0; its codes are 0 either way (bitsandbytes would compute 0 * inf).
    inv = torch.where(sca > 0, 127.0 / sca, torch.zeros_like(sca))
    ca = torch.round(a16 * inv.unsqueeze(-1)).to(torch.int8)
    if a.shape[0] > 1 and cols is not None:
        ca[:, cols] = 0
    cb = qt.data.to(a.device)
    scb = qt.scb.to(a.device)
    acc = int8_matmul_exact(ca, cb)
    out = acc * (sca.unsqueeze(-1) * scb.unsqueeze(0)) * _INT8_MM_SCALE
    if bias is not None:
        out = out + bias.to(x.dtype)
    out = out.to(x.dtype)
    if cols is not None:
        sub_w = (cb[:, cols].float() * scb.view(-1, 1) * _INT8_DEQUANT_SCALE).to(x.dtype)
        out = out.addmm(a[:, cols], sub_w.t())
    return out.reshape(*x.shape[:-1], n_out)


# Largest K-chunk whose int8 dot products a float32 matmul sums exactly: every partial sum is an
# integer of magnitude <= K * 128 * 128 (codes lie in [-128, 127]), and 1024 * 2^14 = 2^24, float32's
# exact-integer range. Inputs in [-128, 127] are exact in fp32, TF32 (11 bits) and bf16 (8 bits), so the
# chunked product is exact whatever float32_matmul_precision the user has set.
_EXACT_FP32_K = 1024


def int8_matmul_exact(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K)^T int8 -> (M, N) int32, exactly, on any device.

    CPU: torch._int_mm. CUDA: torch._int_mm (cuBLASLt int8, int32 accumulation) where its shape rules
    allow (M > 16, K and N multiples of 8), else float32 matmuls over K-chunks of at most 1024 (each
    chunk's sum is an exact integer in float32, see _EXACT_FP32_K) added up in int32. Every branch
    gives the same integers, so the result does not depend on the device or the shapes."""
    m, k = ca.shape
    n = cb.shape[0]
    if ca.device.type == "cpu":
        return torch._int_mm(ca, cb.t())
    if m > 16 and k % 8 == 0 and n % 8 == 0:
        try:
            return torch._int_mm(ca, cb.t())
        except RuntimeError:  # a GPU/cuBLAS without int8 GEMM for this layout: the exact float path below
            pass
    return int8_matmul_fp32_chunks(ca, cb)


def int8_matmul_fp32_chunks(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The exact float32 fallback of `int8_matmul_exact` (device-agnostic, so CPU tests can check it)."""
    acc = torch.zeros((ca.shape[0], cb.shape[0]), dtype=torch.int32, device=ca.device)
    for k0 in range(0, ca.shape[1], _EXACT_FP32_K):
        a = ca[:, k0:k0 + _EXACT_FP32_K].float()
        b = cb[:, k0:k0 + _EXACT_FP32_K].float()
        acc += (a @ b.t()).to(torch.int32)
    return acc


class QuantizedLinearFunction(torch.autograd.Function):
    """y = x @ W^T + b through a frozen quantized W: backward gives grad w.r.t. x (and b when it
    trains) by multiplying with the re-dequantized weight; nothing dense is kept between passes."""

    @staticmethod
    def forward(ctx, x, bias, forward_fn, qt, workspace):
        ctx.qt = qt
        ctx.workspace = workspace
        ctx.has_bias = bias is not None
        return forward_fn(x, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            workspace = ctx.workspace if grad_out.device.type == "cpu" else None
            weight = dequantize_weight(ctx.qt, grad_out.dtype, workspace=workspace)
            grad_x = grad_out @ weight
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None, None, None


def quantized_linear(x, bias, forward_fn, qt, workspace=None):
    """forward_fn(x, bias) with autograd through the quantized weight when a gradient is needed."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return forward_fn(x, bias)
    return QuantizedLinearFunction.apply(x, bias, forward_fn, qt, workspace)
