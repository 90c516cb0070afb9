"""QuantizedTensor <-> bitsandbytes' state-dict keys, dtypes, shapes and quant-state JSON (FORMAT.md 3, 4.2).

`prefix` follows torch's convention: it ends with a dot (or is empty), so keys are `{prefix}weight`, ...
"""
from __future__ import annotations

import json
import math

import torch

from ..errors import StateDictError
from ..formats.codebooks import QuantType
from ..tensor import NestedAbsmax, QuantizedTensor

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
_ALLOWED_JSON_KEYS = {
    "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
}
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    # bitsandbytes writes str(dtype).strip("torch.") -- a character-set strip; for these dtypes it
    # equals dropping the "torch." prefix.
    return str(dtype).strip("torch.")


def _dtype_from_name(name, key: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise StateDictError(f"{key}: unsupported dtype {name!r} in quant state")
    return _DTYPE_NAMES[name]


def quant_state_json(qt: QuantizedTensor) -> str:
    """The JSON blob in bitsandbytes' key order with json.dumps' default separators."""
    state = {
        "quant_type": qt.quant_type.value,
        "blocksize": qt.blocksize,
        "dtype": dtype_name(qt.dtype),
        "shape": list(qt.shape),
    }
    if qt.nested is not None:
        state["nested_blocksize"] = qt.nested.blocksize
        state["nested_dtype"] = dtype_name(qt.nested.dtype)
        state["nested_offset"] = float(qt.nested.offset)
    return json.dumps(state)


def to_bnb_state_dict(qt: QuantizedTensor, prefix: str = "") -> dict:
    """Tensors in bitsandbytes' emission order (bias, if any, is the caller's to add)."""
    p = prefix
    if qt.quant_type is QuantType.INT8:
        return {
            f"{p}weight": qt.data,
            f"{p}SCB": qt.scb,
            f"{p}weight_format": torch.tensor(0, dtype=torch.uint8),
        }
    data = qt.data if qt.storage_dtype == torch.uint8 else qt.data.reshape(-1).view(qt.storage_dtype).reshape(-1, 1)
    out = {f"{p}weight": data}
    if qt.nested is None:
        out[f"{p}weight.absmax"] = qt.absmax
        out[f"{p}weight.quant_map"] = qt.quant_map.to(qt.device)
    else:
        out[f"{p}weight.absmax"] = qt.nested.codes
        out[f"{p}weight.quant_map"] = qt.quant_map.to(qt.device)
        out[f"{p}weight.nested_absmax"] = qt.nested.absmax
        out[f"{p}weight.nested_quant_map"] = qt.nested.code
    blob = quant_state_json(qt).encode("utf-8")
    out[f"{p}{_QUANT_STATE_KEY}{qt.quant_type.value}"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(qt.device)
    return out


def quantized_prefixes(keys) -> dict:
    """Map module prefix ('model.layers.0.q_proj.') -> 'nf4'|'fp4'|'int8' for every quantized weight
    among `keys`, decided per key (quant-state blob or SCB), never by module-name rules."""
    found = {}
    for key in keys:
        if _QUANT_STATE_KEY in key:
            prefix, suffix = key.split(_QUANT_STATE_KEY, 1)
            found[prefix] = suffix
        elif key.endswith("SCB") and (key == "SCB" or key.endswith(".SCB")):
            found[key[: -len("SCB")]] = "int8"
    return found


def _take(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise StateDictError(f"missing tensor {key!r}")
    value = sd[key]
    if not isinstance(value, torch.Tensor):
        raise StateDictError(f"{key}: expected a tensor, got {type(value).__name__}")
    return value


def _expect(key: str, tensor: torch.Tensor, dtype, shape) -> None:
    if tensor.dtype != dtype:
        raise StateDictError(f"{key}: dtype {tensor.dtype}, expected {dtype}")
    if tuple(tensor.shape) != tuple(shape):
        raise StateDictError(f"{key}: shape {list(tensor.shape)}, expected {list(shape)}")


def _parse_quant_state(sd: dict, prefix: str) -> tuple[str, dict]:
    keys = [k for k in sd if k.startswith(prefix + _QUANT_STATE_KEY)]
    if len(keys) != 1:
        raise StateDictError(f"{prefix}weight: expected exactly one quant_state tensor, found {len(keys)}")
    key = keys[0]
    suffix = key[len(prefix + _QUANT_STATE_KEY):]
    if suffix not in ("nf4", "fp4"):
        raise StateDictError(f"{key}: unknown quant type {suffix!r} (expected nf4 or fp4)")
    blob = sd[key]
    try:
        state = json.loads(bytes(blob.reshape(-1).to("cpu", torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise StateDictError(f"{key}: quant state is not valid JSON ({exc})") from None
    if not isinstance(state, dict):
        raise StateDictError(f"{key}: quant state is not a JSON object")
    unknown = set(state) - _ALLOWED_JSON_KEYS
    if unknown:
        raise StateDictError(f"{key}: unknown quant state fields {sorted(unknown)}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in state:
            raise StateDictError(f"{key}: quant state lacks {field!r}")
    return key, state


def from_bnb_state_dict(sd: dict, prefix: str = "") -> QuantizedTensor:
    """Rebuild a QuantizedTensor from bitsandbytes keys; every dtype and shape is checked."""
    p = prefix
    if f"{p}SCB" in sd:
        data = _take(sd, f"{p}weight")
        scb = _take(sd, f"{p}SCB")
        if data.dtype != torch.int8 or data.dim() != 2:
            raise StateDictError(f"{p}weight: int8 weight must be a 2-D int8 tensor, got {data.dtype} {list(data.shape)}")
        _expect(f"{p}SCB", scb, torch.float32, (data.shape[0],))
        fmt = sd.get(f"{p}weight_format")
        if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
            raise StateDictError(f"{p}weight_format: only the row-major format (0) is supported, got {int(fmt.reshape(-1)[0])}")
        return QuantizedTensor(QuantType.INT8, tuple(data.shape), torch.float16, data, scb=scb)

    key, state = _parse_quant_state(sd, p)
    try:
        quant_type = QuantType.parse(state["quant_type"])
    except ValueError:
        raise StateDictError(f"{key}: unknown quant type {state['quant_type']!r}") from None
    if not quant_type.is_4bit:
        raise StateDictError(f"{key}: quant type {quant_type.value!r} is not a 4-bit type")
    blocksize = state["blocksize"]
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize & (blocksize - 1):
        raise StateDictError(f"{key}: invalid blocksize {blocksize!r}")
    shape = state["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise StateDictError(f"{key}: invalid shape {shape!r}")
    dtype = _dtype_from_name(state["dtype"], key)
    numel = math.prod(shape)
    nb = -(-numel // blocksize)

    raw = _take(sd, f"{p}weight")
    storage = raw.dtype
    packed = raw.contiguous().reshape(-1).view(torch.uint8)
    if packed.numel() < (numel + 1) // 2 or packed.numel() > (numel + 1) // 2 + raw.element_size():
        raise StateDictError(
            f"{p}weight: {packed.numel()} packed bytes do not fit shape {shape} (expected {(numel + 1) // 2})"
        )
    packed = packed[: (numel + 1) // 2].reshape(-1, 1)
    absmax_t = _take(sd, f"{p}weight.absmax")
    quant_map = _take(sd, f"{p}weight.quant_map")
    _expect(f"{p}weight.quant_map", quant_map, torch.float32, (16,))

    nested = None
    absmax = None
    if "nested_offset" in state:
        for field in ("nested_blocksize", "nested_dtype"):
            if field not in state:
                raise StateDictError(f"{key}: quant state lacks {field!r}")
        nested_bs = state["nested_blocksize"]
        if not isinstance(nested_bs, int) or nested_bs <= 0:
            raise StateDictError(f"{key}: invalid nested_blocksize {nested_bs!r}")
        nested_dtype = _dtype_from_name(state["nested_dtype"], key)
        _expect(f"{p}weight.absmax", absmax_t, torch.uint8, (nb,))
        nested_absmax = _take(sd, f"{p}weight.nested_absmax")
        nested_code = _take(sd, f"{p}weight.nested_quant_map")
        _expect(f"{p}weight.nested_absmax", nested_absmax, nested_dtype, (-(-nb // nested_bs),))
        _expect(f"{p}weight.nested_quant_map", nested_code, torch.float32, (256,))
        offset = state["nested_offset"]
        if not isinstance(offset, (int, float)) or not math.isfinite(offset):
            raise StateDictError(f"{key}: invalid nested_offset {offset!r}")
        nested = NestedAbsmax(
            codes=absmax_t, absmax=nested_absmax.to(torch.float32), offset=float(offset), code=nested_code,
            blocksize=nested_bs, dtype=nested_dtype,
        )
    else:
        _expect(f"{p}weight.absmax", absmax_t, torch.float32, (nb,))
        absmax = absmax_t
    return QuantizedTensor(
        quant_type, tuple(shape), dtype, packed, blocksize=blocksize, absmax=absmax, nested=nested,
        storage_dtype=storage,
    )
