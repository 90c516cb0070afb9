"""cffi binding of the native CPU library (native/include/qckpt.h). Loaded on first use, never at import.

Each wrapper validates what C cannot know (tensor dtype, device, contiguity), allocates outputs, calls C
with the GIL released (cffi's default in API mode) and turns a failure status into a Python exception.
"""
from __future__ import annotations

import functools

import torch

from ..errors import NativeUnavailableError, QuantizationInputError
from .status import raise_for_status
from ..formats.codebooks import QuantType
from ..settings import forced_isa, resolve_threads

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT4 = {QuantType.NF4: 0, QuantType.FP4: 1}
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "neon": 4}


@functools.cache
def load():
    """(ffi, lib) of the compiled extension; raises NativeUnavailableError with the cause chained."""
    try:
        from .. import _native_cpu
    except ImportError as exc:
        raise NativeUnavailableError(
            "the native CPU library converter._native_cpu is not built; run `pip install -e .` in the "
            f"qckpt checkout ({exc})"
        ) from exc
    return _native_cpu.ffi, _native_cpu.lib


def best_isa() -> str:
    _, lib = load()
    code = lib.qckpt_best_isa()
    return next(name for name, value in ISAS.items() if value == code)


def _exec(threads: int | None, isa: str | None):
    ffi, _ = load()
    isa = isa or forced_isa() or "auto"
    if isa not in ISAS:
        raise QuantizationInputError(f"unknown ISA variant {isa!r} (expected one of {sorted(ISAS)})")
    ex = ffi.new("qckpt_exec *")
    ex.threads = resolve_threads(threads)
    ex.isa = ISAS[isa]
    return ex


def _check(status: int, name: str = "") -> None:
    if status == 0:
        return
    ffi, lib = load()
    raise_for_status(status, ffi.string(lib.qckpt_last_error()).decode("utf-8", "replace"), name)


def _ptr(tensor: torch.Tensor, ctype: str):
    ffi, _ = load()
    return ffi.cast(ctype, tensor.data_ptr())


def _cpu_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # contiguous() copies a strided view rather than touching the caller's storage.
    return tensor.detach().to("cpu").contiguous()


def _dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise QuantizationInputError(f"unsupported dtype {dtype} (expected float32, float16 or bfloat16)")
    return _DTYPES[dtype]


def _check_blocksize(blocksize) -> None:
    # Python sizes the outputs from blocksize before C can refuse it; C checks the allowed set.
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize <= 0:
        raise QuantizationInputError(f"blocksize must be a positive integer, got {blocksize!r}")


def quantize_4bit(x: torch.Tensor, quant_type: QuantType, blocksize: int, *, threads=None, isa=None, name=""):
    """x (any shape) -> (packed uint8 ((n+1)//2, 1), absmax float32 (nb,))."""
    _, lib = load()
    _check_blocksize(blocksize)
    x = _cpu_contiguous(x)
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    status = lib.qckpt_quantize_4bit(
        _ptr(x, "void *"), _dtype_code(x.dtype), n, blocksize, _QUANT4[quant_type],
        _ptr(packed, "uint8_t *"), _ptr(absmax, "float *"), _exec(threads, isa),
    )
    _check(status, name)
    return packed, absmax


def dequantize_4bit(packed, absmax, quant_type: QuantType, blocksize: int, shape, dtype, *, threads=None, isa=None,
                    out=None):
    """`out`: an optional contiguous CPU tensor of exactly the shape's numel, reused as the destination
    (the runtime's large-batch path dequantizes into one buffer instead of allocating per call)."""
    _, lib = load()
    _check_blocksize(blocksize)
    n = 1
    for d in shape:
        n *= int(d)
    packed = _cpu_contiguous(packed)
    absmax = _cpu_contiguous(absmax).to(torch.float32)
    if packed.numel() < (n + 1) // 2 or absmax.numel() < -(-n // blocksize):
        raise QuantizationInputError(f"packed data or absmax too small for shape {list(shape)}")
    if out is None:
        out = torch.empty(tuple(shape), dtype=dtype)
    elif (out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != n):
        raise QuantizationInputError(f"out buffer must be a contiguous CPU {dtype} tensor of {n} elements")
    status = lib.qckpt_dequantize_4bit(
        _ptr(packed, "uint8_t *"), _ptr(absmax, "float *"), n, blocksize, _QUANT4[quant_type],
        _ptr(out, "void *"), _dtype_code(dtype), _exec(threads, isa),
    )
    _check(status)
    return out


def quantize_blockwise8(x: torch.Tensor, code: torch.Tensor, blocksize: int, *, threads=None, isa=None, name=""):
    """float32 x -> (uint8 codes (n,), absmax float32 (nb,))."""
    _, lib = load()
    _check_blocksize(blocksize)
    x = _cpu_contiguous(x).to(torch.float32).reshape(-1)
    code = _cpu_contiguous(code).to(torch.float32)
    n = x.numel()
    codes = torch.empty((n,), dtype=torch.uint8)
    absmax = torch.empty((-(-n // blocksize),), dtype=torch.float32)
    status = lib.qckpt_quantize_blockwise8(
        _ptr(x, "float *"), n, blocksize, _ptr(code, "float *"), _ptr(codes, "uint8_t *"),
        _ptr(absmax, "float *"), _exec(threads, isa),
    )
    _check(status, name)
    return codes, absmax


def dequantize_blockwise8(codes, absmax, code, blocksize: int, *, offset: float = 0.0, threads=None, isa=None):
    _, lib = load()
    _check_blocksize(blocksize)
    codes = _cpu_contiguous(codes).reshape(-1)
    absmax = _cpu_contiguous(absmax).to(torch.float32)
    code = _cpu_contiguous(code).to(torch.float32)
    n = codes.numel()
    if absmax.numel() < -(-n // blocksize) or code.numel() != 256:
        raise QuantizationInputError("nested absmax or code map has the wrong size")
    out = torch.empty((n,), dtype=torch.float32)
    status = lib.qckpt_dequantize_blockwise8(
        _ptr(codes, "uint8_t *"), _ptr(absmax, "float *"), n, blocksize, _ptr(code, "float *"), offset,
        _ptr(out, "float *"), _exec(threads, isa),
    )
    _check(status)
    return out


def quantize_int8_rowwise(x: torch.Tensor, *, threads=None, isa=None, name=""):
    _, lib = load()
    x = _cpu_contiguous(x)
    rows, cols = x.shape[0], x.numel() // max(1, x.shape[0])
    q = torch.empty(tuple(x.shape), dtype=torch.int8)
    scb = torch.empty((rows,), dtype=torch.float32)
    status = lib.qckpt_quantize_int8_rowwise(
        _ptr(x, "void *"), _dtype_code(x.dtype), rows, cols, _ptr(q, "int8_t *"), _ptr(scb, "float *"),
        _exec(threads, isa),
    )
    _check(status, name)
    return q, scb


def dequantize_int8_rowwise(q, scb, dtype, *, threads=None, isa=None):
    _, lib = load()
    q = _cpu_contiguous(q)
    scb = _cpu_contiguous(scb).to(torch.float32)
    rows, cols = q.shape[0], q.numel() // max(1, q.shape[0])
    out = torch.empty(tuple(q.shape), dtype=dtype)
    status = lib.qckpt_dequantize_int8_rowwise(
        _ptr(q, "int8_t *"), _ptr(scb, "float *"), rows, cols, _ptr(out, "void *"), _dtype_code(dtype),
        _exec(threads, isa),
    )
    _check(status)
    return out


def gemm_4bit(x, packed, absmax, n_out: int, k: int, blocksize: int, quant_type: QuantType, *, threads=None, isa=None):
    """x (batch, k) float32 @ dequant(W (n_out, k))^T -> (batch, n_out) float32, fused."""
    _, lib = load()
    x = _cpu_contiguous(x).to(torch.float32).reshape(-1, k)
    packed = _cpu_contiguous(packed)
    absmax = _cpu_contiguous(absmax).to(torch.float32)
    y = torch.empty((x.shape[0], n_out), dtype=torch.float32)
    status = lib.qckpt_gemm_4bit(
        _ptr(x, "float *"), x.shape[0], _ptr(packed, "uint8_t *"), _ptr(absmax, "float *"), n_out, k, blocksize,
        _QUANT4[quant_type], _ptr(y, "float *"), _exec(threads, isa),
    )
    _check(status)
    return y
