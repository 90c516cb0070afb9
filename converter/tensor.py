"""QuantizedTensor: one quantized weight, immutable, with the public quantize()/dequantize() API.

The arithmetic lives in `formats.reference` (definition) and `kernels` (fast, bit-identical); the
bitsandbytes key layout lives in `bnb.state_dict`. This module validates inputs and ties them together.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .errors import QuantizationInputError
from .formats import codebooks as cb
from .formats.codebooks import QuantType

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class NestedAbsmax:
    """Double-quantized block scales: absmax[i] = code[codes[i]] * absmax2[i // blocksize] + offset."""

    codes: torch.Tensor  # uint8 (nb,)
    absmax: torch.Tensor  # float32 (ceil(nb / blocksize),)
    offset: float  # a float32 value, kept as a Python float
    code: torch.Tensor  # float32 (256,): the signed dynamic map
    blocksize: int = cb.NESTED_BLOCKSIZE
    dtype: torch.dtype = torch.float32

    def dequantize(self) -> torch.Tensor:
        from . import kernels

        return kernels.dequantize_absmax(self)


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight. 4-bit: packed nibbles + block scales; int8: row codes + SCB."""

    quant_type: QuantType
    shape: tuple
    dtype: torch.dtype  # the source dtype: dequantize() returns it by default
    data: torch.Tensor  # 4-bit: uint8 ((numel+1)//2, 1); int8: int8 shape
    blocksize: int | None = None  # 4-bit only
    absmax: torch.Tensor | None = None  # 4-bit without double quant: float32 (nb,)
    nested: NestedAbsmax | None = None  # 4-bit with double quant
    scb: torch.Tensor | None = None  # int8: float32 (rows,)
    storage_dtype: torch.dtype = torch.uint8  # bnb quant_storage: how `data` is typed in files

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def quant_map(self) -> torch.Tensor | None:
        """The 16-entry table bitsandbytes stores as `weight.quant_map` (4-bit only)."""
        if not self.quant_type.is_4bit:
            return None
        from .formats.reference import lut_4bit

        table = lut_4bit(self.quant_type)
        # bitsandbytes writes its Python table, where FP4 code 8 is +0.0 (the literal `-0` is an int);
        # dequantization keeps the CUDA LUT's -0.0 (FORMAT.md 1.1). Same values, same file bytes as bnb.
        return torch.where(table == 0, torch.zeros_like(table), table)

    def block_absmax(self) -> torch.Tensor:
        """The float32 scale of every block (dequantizing the nested state when there is one)."""
        if self.nested is not None:
            return self.nested.dequantize()
        return self.absmax

    def nbytes(self) -> int:
        """Bytes of every tensor this weight serializes to, the quant-state JSON blob included."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def dequantize(self, dtype: torch.dtype | None = None, *, threads: int | None = None) -> torch.Tensor:
        return dequantize(self, dtype, threads=threads)

    def state_dict(self, prefix: str = "") -> dict:
        """bitsandbytes' serialization: keys `{prefix}weight`, `{prefix}weight.absmax`, ... (FORMAT.md 3/4)."""
        from .bnb.state_dict import to_bnb_state_dict

        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_state_dict(cls, state_dict: dict, prefix: str = "") -> "QuantizedTensor":
        """Read a weight written by qckpt or by bitsandbytes/transformers (any quant_storage)."""
        from .bnb.state_dict import from_bnb_state_dict

        return from_bnb_state_dict(state_dict, prefix)

    def to(self, device) -> "QuantizedTensor":
        def move(t):
            return None if t is None else t.to(device)

        nested = self.nested
        if nested is not None:
            nested = dataclasses.replace(
                nested, codes=move(nested.codes), absmax=move(nested.absmax), code=move(nested.code)
            )
        return dataclasses.replace(
            self, data=move(self.data), absmax=move(self.absmax), scb=move(self.scb), nested=nested
        )


def _check_input(tensor, quant_type: QuantType, blocksize: int, name: str) -> None:
    where = f" in {name}" if name else ""
    if not isinstance(tensor, torch.Tensor):
        raise QuantizationInputError(f"expected a torch.Tensor{where}, got {type(tensor).__name__}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise QuantizationInputError(
            f"unsupported dtype {tensor.dtype}{where} (expected float32, float16 or bfloat16)"
        )
    if tensor.numel() == 0:
        raise QuantizationInputError(f"cannot quantize an empty tensor{where} (shape {list(tensor.shape)})")
    if quant_type.is_4bit:
        if blocksize not in cb.BLOCKSIZES_4BIT:
            raise QuantizationInputError(
                f"unsupported blocksize {blocksize!r}{where} (expected one of {list(cb.BLOCKSIZES_4BIT)})"
            )
    elif tensor.dim() != 2:
        raise QuantizationInputError(
            f"int8 quantization is row-wise and needs a 2-D weight{where}, got shape {list(tensor.shape)}"
        )


def quantize(
    tensor: torch.Tensor,
    quant_type="nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    device=None,
    *,
    threads: int | None = None,
    name: str = "",
) -> QuantizedTensor:
    """Quantize a weight to NF4/FP4 (blockwise, optional double quant) or row-wise INT8.

    `double_quant` and `blocksize` only apply to 4-bit. The caller's tensor is never modified.
    `device` picks where the work runs (default: where the tensor is). `name` is used in errors.
    """
    try:
        quant_type = QuantType.parse(quant_type)
    except ValueError as exc:
        raise QuantizationInputError(str(exc)) from None
    _check_input(tensor, quant_type, blocksize, name)
    from . import kernels

    return kernels.quantize(tensor, quant_type, blocksize, double_quant, device=device, threads=threads, name=name)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype | None = None, *, threads: int | None = None) -> torch.Tensor:
    """Values of `qt` in `dtype` (default: the dtype it was quantized from), on qt's device."""
    dtype = qt.dtype if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise QuantizationInputError(f"unsupported output dtype {dtype} (expected float32, float16 or bfloat16)")
    from . import kernels

    return kernels.dequantize(qt, dtype, threads=threads)
