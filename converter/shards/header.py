"""The safetensors header: parsing with one named error per broken invariant, and building it byte for byte
as `safetensors.torch.save_file` does (tensors ordered by dtype rank descending, then name; 8-byte padding).

Layout of a file: 8-byte little-endian header length N, N bytes of JSON, then the data section; every
tensor's `data_offsets` are relative to the start of the data section.
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct

import torch

from ..errors import CheckpointError

# The largest header we accept: the safetensors library itself refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000


# name in files -> (torch dtype, bytes per element, rank in safetensors' Dtype enum). save_file orders
# tensors by that rank, largest first; the ranks below were read off save_file's output.
_DTYPES = {
    "BOOL": (torch.bool, 1, 0),
    "U8": (torch.uint8, 1, 1),
    "I8": (torch.int8, 1, 2),
    "F8_E5M2": (torch.float8_e5m2, 1, 3),
    "F8_E4M3": (torch.float8_e4m3fn, 1, 4),
    "I16": (torch.int16, 2, 5),
    "U16": (torch.uint16, 2, 6),
    "F16": (torch.float16, 2, 7),
    "BF16": (torch.bfloat16, 2, 8),
    "I32": (torch.int32, 4, 9),
    "U32": (torch.uint32, 4, 10),
    "F32": (torch.float32, 4, 11),
    "F64": (torch.float64, 8, 12),
    "I64": (torch.int64, 8, 13),
    "U64": (torch.uint64, 8, 14),
}
_NAME_OF = {torch_dtype: name for name, (torch_dtype, _, _) in _DTYPES.items()}


class HeaderTooLargeError(CheckpointError):
    """The declared header length is absurd or runs past the end of the file."""


class HeaderJSONError(CheckpointError):
    """The header bytes are not a UTF-8 JSON object of the safetensors shape."""


class TruncatedFileError(CheckpointError):
    """The file ends before the header or before a tensor's data."""


class OffsetError(CheckpointError):
    """A tensor's data_offsets are malformed, reversed, overlapping or outside the data section."""


class DtypeError(CheckpointError):
    """A tensor's dtype is not one safetensors/torch know."""


class ByteCountError(CheckpointError):
    """A tensor's byte count does not equal numel * itemsize for its dtype and shape."""


def dtype_from_name(name: str) -> torch.dtype:
    return _DTYPES[name][0]


def dtype_to_name(dtype: torch.dtype) -> str:
    if dtype not in _NAME_OF:
        raise DtypeError(f"dtype {dtype} cannot be stored in safetensors by qckpt")
    return _NAME_OF[dtype]


def itemsize(name: str) -> int:
    return _DTYPES[name][1]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are (relative to the data section)."""

    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)


@dataclasses.dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order (by offset), metadata, and where the data section starts."""

    tensors: tuple  # of TensorInfo, sorted by start offset
    metadata: dict
    data_start: int  # absolute offset of the data section: 8 + header length
    file_size: int

    def by_name(self) -> dict:
        return {t.name: t for t in self.tensors}


def parse_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise TruncatedFileError(f"{where}: file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise HeaderTooLargeError(f"{where}: header length {n} is absurdly large (limit {MAX_HEADER_BYTES})")
    if 8 + n > file_size:
        raise HeaderTooLargeError(f"{where}: header length {n} runs past the end of the {file_size}-byte file")
    if n < 2:
        raise HeaderJSONError(f"{where}: header length {n} is too small to hold a JSON object")
    return n


def parse_header(raw: bytes, file_size: int, where: str) -> Header:
    """Validate the JSON of a header (`raw` without the 8-byte prefix) against a file of `file_size` bytes."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderJSONError(f"{where}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise HeaderJSONError(f"{where}: header is not a JSON object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderJSONError(f"{where}: __metadata__ must map strings to strings")
    tensors = []
    for name, entry in obj.items():
        tensors.append(_parse_entry(name, entry, data_size, where))
    tensors.sort(key=lambda t: (t.start, t.end))
    previous = None
    for t in tensors:
        if previous is not None and t.start < previous.end and t.nbytes and previous.nbytes:
            raise OffsetError(f"{where}: tensor {t.name!r} overlaps {previous.name!r} "
                              f"(offsets {t.start}..{t.end} vs {previous.start}..{previous.end})")
        if t.nbytes:
            previous = t
    return Header(tuple(tensors), dict(metadata), data_start, file_size)


def _parse_entry(name: str, entry, data_size: int, where: str) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise HeaderJSONError(f"{where}: tensor {name!r} lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise DtypeError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HeaderJSONError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise OffsetError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if end < start:
        raise OffsetError(f"{where}: tensor {name!r} has reversed data_offsets [{start}, {end}]")
    if end > data_size:
        raise TruncatedFileError(
            f"{where}: tensor {name!r} ends at byte {end} of the data section but only {data_size} bytes remain "
            "(truncated file or offsets out of range)"
        )
    expected = math.prod(shape) * _DTYPES[dtype][1]
    if end - start != expected:
        raise ByteCountError(
            f"{where}: tensor {name!r} holds {end - start} bytes but dtype {dtype} and shape {shape} need {expected}"
        )
    return TensorInfo(name, dtype, tuple(shape), start, end)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A tensor to write: name, safetensors dtype, shape (its byte count follows)."""

    name: str
    dtype: str
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _DTYPES[self.dtype][1]


def file_order(entries) -> list:
    """The order save_file writes tensors in: dtype rank descending, then name ascending."""
    return sorted(entries, key=lambda e: (-_DTYPES[e.dtype][2], e.name))


def build_header(entries, metadata: dict | None = None) -> tuple[bytes, dict]:
    """(8-byte length + padded JSON, {name: data-relative start}) exactly as save_file lays them out."""
    ordered = file_order(entries)
    parts = []
    if metadata:
        parts.append('"__metadata__":' + _dumps(dict(metadata)))
    offsets = {}
    position = 0
    for e in ordered:
        offsets[e.name] = position
        end = position + e.nbytes
        parts.append(_dumps(e.name) + ":" + _dumps({"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [position, end]}))
        position = end
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def _dumps(value) -> str:
    # serde_json's compact form: no spaces, non-ASCII written raw
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
