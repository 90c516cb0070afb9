"""Dispatch of quantize/dequantize to the native CPU library (or CUDA, when it exists) by device.

Nothing native is loaded at import; `cpu.load()` builds the binding on first use.
"""
from __future__ import annotations

import torch

from ..errors import QuantizationInputError
from ..formats import codebooks as cb
from ..formats.codebooks import QuantType
from ..tensor import NestedAbsmax, QuantizedTensor
from . import cpu


def _target_device(tensor: torch.Tensor, device) -> torch.device:
    try:
        target = tensor.device if device is None else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise QuantizationInputError(f"invalid device {device!r} ({exc})") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationInputError("device 'cuda' was requested but no CUDA device is available")
    if target.type not in ("cpu", "cuda"):
        raise QuantizationInputError(f"unsupported device {str(target)!r} (expected cpu or cuda)")
    return target


def quantize(tensor, quant_type: QuantType, blocksize, double_quant, *, device=None, threads=None, name=""):
    device = _target_device(tensor, device)
    if device.type != "cpu":
        from . import cuda

        # cuda.quantize stages a CPU tensor through pinned memory (a plain .to() is a pageable sync copy)
        return cuda.quantize(tensor, quant_type, blocksize, double_quant, device=device, name=name)
    source = tensor.detach()
    if source.device.type != "cpu":
        source = source.cpu()
    if quant_type is QuantType.INT8:
        data, scb = cpu.quantize_int8_rowwise(source, threads=threads, name=name)
        return QuantizedTensor(QuantType.INT8, tuple(tensor.shape), tensor.dtype, data, scb=scb)
    packed, absmax = cpu.quantize_4bit(source, quant_type, blocksize, threads=threads, name=name)
    nested = None
    if double_quant:
        nested = double_quantize(absmax, threads=threads)
        absmax = None
    return QuantizedTensor(
        quant_type, tuple(tensor.shape), tensor.dtype, packed, blocksize=blocksize, absmax=absmax, nested=nested
    )


def double_quantize(absmax: torch.Tensor, *, threads=None) -> NestedAbsmax:
    """absmax -> nested 8-bit codes around the exact float32 mean (FORMAT.md section 0)."""
    from ..formats.reference import exact_mean_f32

    offset = exact_mean_f32(absmax)
    # Subtract in chunks small enough for torch to stay on this thread (see reference._SERIAL_CHUNK):
    # its intra-op pool stalls badly when the cores are busy (e.g. with our own prefetching).
    centered = torch.empty_like(absmax, dtype=torch.float32)
    offset_t = torch.tensor(offset, dtype=torch.float32)
    for src, dst in zip(absmax.split(16384), centered.split(16384)):
        torch.sub(src, offset_t, out=dst)
    code = torch.tensor(cb.dynamic_map_signed(), dtype=torch.float32)
    codes, nested_absmax = cpu.quantize_blockwise8(centered, code, cb.NESTED_BLOCKSIZE, threads=threads)
    return NestedAbsmax(codes=codes, absmax=nested_absmax, offset=offset, code=code)


def dequantize_absmax(nested: NestedAbsmax, *, threads=None) -> torch.Tensor:
    if nested.codes.device.type != "cpu":
        from . import cuda

        return cuda.dequantize_absmax(nested)
    return cpu.dequantize_blockwise8(
        nested.codes, nested.absmax.to(torch.float32), nested.code, nested.blocksize, offset=nested.offset,
        threads=threads,
    )


def dequantize(qt: QuantizedTensor, dtype: torch.dtype, *, threads=None) -> torch.Tensor:
    if qt.device.type != "cpu":
        from . import cuda

        return cuda.dequantize(qt, dtype)
    if qt.quant_type is QuantType.INT8:
        return cpu.dequantize_int8_rowwise(qt.data, qt.scb, dtype, threads=threads)
    absmax = dequantize_absmax(qt.nested, threads=threads) if qt.nested is not None else qt.absmax
    return cpu.dequantize_4bit(qt.data, absmax, qt.quant_type, qt.blocksize, qt.shape, dtype, threads=threads)
