"""CUDA path. Until the CUDA extension lands, the reference arithmetic runs with torch ops on the GPU."""
from __future__ import annotations

import torch

from ..errors import QuantizationInputError
from ..formats import reference as ref
from ..formats.codebooks import QuantType
from ..tensor import NestedAbsmax, QuantizedTensor


def quantize(tensor, quant_type, blocksize, double_quant, *, name=""):
    # Arithmetic defined on CPU tensors; run it there so the bytes are the reference's, then move back.
    from . import quantize as cpu_quantize

    qt = cpu_quantize(tensor.cpu(), quant_type, blocksize, double_quant, device="cpu", name=name)
    return qt.to(tensor.device)


def dequantize_absmax(nested: NestedAbsmax) -> torch.Tensor:
    return ref.dequantize_absmax(nested.codes.long(), nested.absmax, nested.offset, nested.blocksize, nested.code)


def dequantize(qt: QuantizedTensor, dtype) -> torch.Tensor:
    if qt.quant_type is QuantType.INT8:
        return ref.dequantize_int8_rowwise(qt.data, qt.scb, dtype)
    absmax = dequantize_absmax(qt.nested) if qt.nested is not None else qt.absmax
    packed = qt.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: qt.numel].long()
    lut = ref.lut_4bit(qt.quant_type).to(packed.device)
    scales = absmax.to(torch.float32).repeat_interleave(qt.blocksize)[: qt.numel]
    if scales.numel() != qt.numel:
        raise QuantizationInputError("absmax does not cover the tensor")
    return (lut[codes] * scales).to(dtype).reshape(qt.shape)
