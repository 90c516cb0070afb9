"""CUDA path: the cffi binding of converter._native_cuda (native/cuda/qckpt_cuda.h), loaded on first use.

Nothing here touches CUDA at import. Kernels run on torch's current stream of the tensor's device and
produce the CPU library's bytes. When the extension is not built (no nvcc at install time), every
function still works: quantization runs on the CPU library and the result moves to the GPU (same bytes),
dequantization and matmul use torch ops.

Runtime entry point (converter/runtime): `gemm_4bit(x, weight, bias, workspace=...)`:
    x (..., K) bf16/fp16/fp32 on the GPU @ dequant(W (N, K))^T (+ bias) -> (..., N) in x.dtype.
    1..16 rows of bf16/fp16 with K % 32 == 0 take the fused kernel (weights read once, 4 bits each);
    anything else dequantizes W into `workspace` (a reusable CUDA tensor of >= N*K elements of x.dtype,
    or None to allocate) and calls torch.matmul (cuBLAS).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch

from ..errors import NativeUnavailableError, QuantizationInputError
from .status import raise_for_status
from ..formats import codebooks as cb
from ..formats.codebooks import QuantType
from ..tensor import NestedAbsmax, QuantizedTensor

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_QUANT4 = {QuantType.NF4: 0, QuantType.FP4: 1}
_E_NONFINITE = 2
FUSED_MAX_ROWS = 128  # the fused kernels' row limit (QCKPT_CUDA_GEMM_MAX_ROWS, qckpt_cuda_gemm_4bit)
DECODE_MAX_ROWS = 16  # rows of the decode kernel, which needs K % 32 == 0 (the prefill kernel K % 64 == 0)


@functools.cache
def load():
    """(ffi, lib) of the compiled CUDA extension; raises NativeUnavailableError with the cause chained."""
    try:
        from .. import _native_cuda
    except ImportError as exc:
        raise NativeUnavailableError(
            "the CUDA extension converter._native_cuda is not built; build it with "
            f"`python native/ffi/build_cuda.py` where nvcc is installed ({exc})"
        ) from exc
    return _native_cuda.ffi, _native_cuda.lib


def available() -> bool:
    """Whether the CUDA extension is built (it does not say whether a GPU is present)."""
    try:
        load()
    except NativeUnavailableError:
        return False
    return True


# ----- plumbing -----

def _check(status: int, name: str = "") -> None:
    if status == 0:
        return
    ffi, lib = load()
    raise_for_status(status, ffi.string(lib.qckpt_cuda_last_error()).decode("utf-8", "replace"), name)


def _ptr(tensor: torch.Tensor | None, ctype: str = "void *"):
    ffi, _ = load()
    return ffi.NULL if tensor is None else ffi.cast(ctype, tensor.data_ptr())


def _stream(device: torch.device):
    ffi, _ = load()
    return ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)


def _on(device: torch.device):
    """Make `device` current for a launch (a no-op context when it already is: the common case)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return contextlib.nullcontext() if index == torch.cuda.current_device() else torch.cuda.device(device)


def _device_contiguous(tensor: torch.Tensor, device: torch.device, align: int = 16) -> torch.Tensor:
    """Contiguous on `device`, data 16-byte aligned (a misaligned view is copied, never modified)."""
    out = tensor.detach().to(device).contiguous()
    if out.data_ptr() % align:
        out = out.clone()
    return out


# ----- host -> device staging (the converter's path: weights read into pageable host memory) -----

_PIN_MIN_BYTES = 1 << 20  # below this a plain copy costs less than the pinned round trip
_staging: dict = {}  # torch.device -> _Staging
_staging_lock = threading.Lock()


class _Staging:
    """A pinned host buffer reused for every H2D copy to one device, grown to the largest tensor seen.

    A pageable tensor.to("cuda") is synchronous and goes through the driver's small bounce buffers; a copy
    from pinned memory runs at PCIe speed as one DMA and, issued non_blocking on the current stream, is
    ordered before the kernels launched after it. The event guards the buffer: the next fill waits until
    the previous DMA has read it."""

    def __init__(self):
        self.buffer = None
        self.event = None

    def fill(self, src: torch.Tensor, device: torch.device) -> torch.Tensor:
        nbytes = src.numel() * src.element_size()
        if self.event is not None:
            self.event.synchronize()
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # drop the old one first: two large pinned buffers at once is wasteful
            size = max(nbytes, 64 << 20)
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        host = self.buffer[:nbytes].view(src.dtype).view(src.shape)
        host.copy_(src)
        out = torch.empty(src.shape, dtype=src.dtype, device=device)
        out.copy_(host, non_blocking=True)
        if self.event is None:
            self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(device))
        return out


def _cuda_device(device) -> torch.device:
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        raise QuantizationInputError(f"expected a CUDA device, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def to_device(tensor: torch.Tensor, device=None) -> torch.Tensor:
    """`tensor` contiguous (16-byte aligned) on the CUDA `device`, asynchronously on its current stream.

    A CPU tensor of >= 1 MiB goes through the reused pinned staging buffer (one host memcpy + a DMA at
    PCIe speed, not a synchronous pageable copy); the caller's tensor is never modified. Kernels launched
    on the current stream afterwards see the data; host code reading the result must synchronize."""
    device = _cuda_device(device)
    src = tensor.detach()
    if src.device.type != "cpu" or src.numel() * src.element_size() < _PIN_MIN_BYTES:
        return _device_contiguous(src, device)
    with _on(device), _staging_lock:  # (a strided view is gathered straight into the pinned buffer)
        staging = _staging.get(device)
        if staging is None:
            staging = _staging[device] = _Staging()
        return staging.fill(src, device)


def release_staging() -> None:
    """Free the pinned staging buffers (e.g. after a conversion)."""
    with _staging_lock:
        for staging in _staging.values():
            if staging.event is not None:
                staging.event.synchronize()
        _staging.clear()


def _dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise QuantizationInputError(f"unsupported dtype {dtype} (expected float32, float16 or bfloat16)")
    return _DTYPES[dtype]


def new_workspace(device) -> torch.Tensor:
    """Device scratch of one quantize call (non-finite index, exact mean); reused across calls is fine."""
    _, lib = load()
    return torch.empty(lib.QCKPT_CUDA_WORKSPACE_WORDS, dtype=torch.int64, device=device)


@functools.cache
def _dynamic_map() -> tuple:
    return cb.dynamic_map_signed()  # a constant, built with a Python loop: computed once


@functools.cache
def _nested_code_master(device: torch.device) -> torch.Tensor:
    return torch.tensor(_dynamic_map(), dtype=torch.float32).to(device)


def nested_code(device) -> torch.Tensor:
    """The signed dynamic map of double quantization, on `device`: a fresh tensor each call (it ends up
    in a QuantizedTensor), cloned on the device from a cached copy -- building it on the host meant a
    synchronous H2D copy in every quantize call."""
    return _nested_code_master(torch.device(device)).clone()


def finish(workspace: torch.Tensor, source: torch.Tensor | None = None, name: str = "", *, cols: int = 0) -> float:
    """Wait for the stream, raise QuantizationInputError on NaN/inf (naming which and where, and the row
    when `cols` is given, as the CPU library does for int8), and return the exact mean the call
    computed (the double-quant offset)."""
    ffi, lib = load()
    bad = ffi.new("int64_t *")
    mean = ffi.new("float *")
    with _on(workspace.device):
        status = lib.qckpt_cuda_read_report(_ptr(workspace, "int64_t *"), bad, mean, _stream(workspace.device))
    if status == _E_NONFINITE and source is not None:
        value = float(source.reshape(-1)[bad[0]])
        where = f"{name}: " if name else ""
        row = f" (row {bad[0] // cols})" if cols else ""
        raise QuantizationInputError(f"{where}{'NaN' if value != value else 'inf'} at flat index {bad[0]}{row}")
    _check(status, name)
    return float(mean[0])


def _scales(absmax: torch.Tensor | None, nested: NestedAbsmax | None):
    """The qckpt_cuda_scales struct (the tensors must stay alive while the call runs)."""
    ffi, _ = load()
    s = ffi.new("qckpt_cuda_scales *")
    if nested is None:
        s.absmax = _ptr(absmax, "float *")
    else:
        s.absmax = ffi.NULL
        s.codes = _ptr(nested.codes, "uint8_t *")
        s.absmax2 = _ptr(nested.absmax, "float *")
        s.code = _ptr(nested.code, "float *")
        s.offset = nested.offset
        s.blocksize2 = nested.blocksize
    return s


def _nested_on(nested: NestedAbsmax, device) -> NestedAbsmax:
    import dataclasses

    return dataclasses.replace(
        nested,
        codes=nested.codes.to(device).contiguous(),
        absmax=nested.absmax.to(device=device, dtype=torch.float32).contiguous(),
        code=nested.code.to(device=device, dtype=torch.float32).contiguous(),
    )


# ----- quantize (asynchronous launches; finish() reports) -----

def quantize_4bit(x: torch.Tensor, quant_type: QuantType, blocksize: int, *, double_quant: bool,
                  workspace: torch.Tensor, code: torch.Tensor | None = None, name: str = ""):
    """Launch the 4-bit quantization of a contiguous, 16-byte aligned CUDA tensor; no synchronization.

    Returns (packed uint8 ((n+1)//2, 1), absmax float32 (nb,), nested codes uint8 (nb,) or None,
    nested absmax float32 or None). The double-quant offset is in `workspace`: finish() returns it.
    """
    _, lib = load()
    device = x.device
    n = x.numel()
    nb = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty((nb,), dtype=torch.float32, device=device)
    stream = _stream(device)
    ws = _ptr(workspace, "int64_t *")
    _check(lib.qckpt_cuda_workspace_reset(ws, stream), name)
    # with double quant the kernel also sums absmax for the exact mean (no second pass over absmax)
    _check(lib.qckpt_cuda_quantize_4bit(_ptr(x), _dtype_code(x.dtype), n, blocksize, _QUANT4[quant_type],
                                        _ptr(packed, "uint8_t *"), _ptr(absmax, "float *"), int(double_quant), ws,
                                        stream), name)
    if not double_quant:
        return packed, absmax, None, None
    code = nested_code(device) if code is None else code
    codes = torch.empty((nb,), dtype=torch.uint8, device=device)
    absmax2 = torch.empty((-(-nb // cb.NESTED_BLOCKSIZE),), dtype=torch.float32, device=device)
    # center 2: the nested kernel takes the exact mean from the sums the 4-bit kernel left in `ws`
    _check(lib.qckpt_cuda_quantize_blockwise8(_ptr(absmax, "float *"), nb, cb.NESTED_BLOCKSIZE,
                                              _ptr(code, "float *"), 2, _ptr(codes, "uint8_t *"),
                                              _ptr(absmax2, "float *"), ws, stream), name)
    return packed, absmax, codes, absmax2


def quantize(tensor: torch.Tensor, quant_type: QuantType, blocksize: int, double_quant: bool, *,
             device=None, name: str = ""):
    """QuantizedTensor computed on the CUDA `device` (default: the tensor's own), left on that device;
    the same bytes as the CPU library. A CPU tensor is staged through pinned memory (to_device)."""
    device = _cuda_device(tensor.device if device is None and tensor.device.type == "cuda" else device)
    if not available():
        from . import quantize as dispatch_quantize

        qt = dispatch_quantize(tensor.cpu(), quant_type, blocksize, double_quant, device="cpu", name=name)
        return qt.to(device)
    with _on(device):
        x = to_device(tensor, device)
        workspace = new_workspace(device)
        if quant_type is QuantType.INT8:
            return _quantize_int8(x, tensor, workspace, name)
        code = nested_code(device) if double_quant else None
        packed, absmax, codes, absmax2 = quantize_4bit(
            x, quant_type, blocksize, double_quant=double_quant, workspace=workspace, code=code, name=name
        )
        offset = finish(workspace, x, name)
    nested = None
    if double_quant:
        nested = NestedAbsmax(codes=codes, absmax=absmax2, offset=offset, code=code)
        absmax = None
    return QuantizedTensor(
        quant_type, tuple(tensor.shape), tensor.dtype, packed, blocksize=blocksize, absmax=absmax, nested=nested
    )


def _quantize_int8(x, tensor, workspace, name):
    _, lib = load()
    rows = x.shape[0]
    cols = x.numel() // max(1, rows)
    q = torch.empty(tuple(x.shape), dtype=torch.int8, device=x.device)
    scb = torch.empty((rows,), dtype=torch.float32, device=x.device)
    stream = _stream(x.device)
    ws = _ptr(workspace, "int64_t *")
    _check(lib.qckpt_cuda_workspace_reset(ws, stream), name)
    _check(lib.qckpt_cuda_quantize_int8_rowwise(_ptr(x), _dtype_code(x.dtype), rows, cols, _ptr(q, "int8_t *"),
                                                _ptr(scb, "float *"), ws, stream), name)
    finish(workspace, x, name, cols=cols)
    return QuantizedTensor(QuantType.INT8, tuple(tensor.shape), tensor.dtype, q, scb=scb)


# ----- dequantize -----

def dequantize_absmax(nested: NestedAbsmax) -> torch.Tensor:
    """float32 block scales of a double-quantized weight: code[q] * absmax2[i // 256] + offset."""
    device = nested.codes.device
    if not available():
        from ..formats import reference as ref

        return ref.dequantize_absmax(nested.codes.long(), nested.absmax, nested.offset, nested.blocksize, nested.code)
    _, lib = load()
    with _on(device):
        nested = _nested_on(nested, device)
        n = nested.codes.numel()
        out = torch.empty((n,), dtype=torch.float32, device=device)
        _check(lib.qckpt_cuda_dequantize_blockwise8(
            _ptr(nested.codes, "uint8_t *"), _ptr(nested.absmax, "float *"), n, nested.blocksize,
            _ptr(nested.code, "float *"), nested.offset, _ptr(out, "float *"), _stream(device)))
    return out


def dequantize(qt: QuantizedTensor, dtype: torch.dtype, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense values of `qt` in `dtype` on its device; written into `out` (contiguous, qt.numel elements
    of dtype) when given, e.g. a reused buffer."""
    device = qt.device
    if not available():
        result = _dequantize_torch(qt, dtype)
        return result if out is None else out.view(qt.shape).copy_(result)
    _, lib = load()
    with _on(device):
        if out is None:
            out = torch.empty(qt.shape, dtype=dtype, device=device)
        elif out.dtype != dtype or out.numel() != qt.numel or not out.is_contiguous() or out.device != device:
            raise QuantizationInputError(f"out must be a contiguous {dtype} tensor of {qt.numel} elements on {device}")
        out = out.view(qt.shape)
        stream = _stream(device)
        if qt.quant_type is QuantType.INT8:
            data = qt.data.contiguous()
            scb = qt.scb.to(device=device, dtype=torch.float32).contiguous()
            rows = data.shape[0]
            _check(lib.qckpt_cuda_dequantize_int8_rowwise(_ptr(data, "int8_t *"), _ptr(scb, "float *"), rows,
                                                          data.numel() // max(1, rows), _ptr(out),
                                                          _dtype_code(dtype), stream))
            return out
        packed = qt.data.reshape(-1).contiguous()
        nested = None if qt.nested is None else _nested_on(qt.nested, device)
        absmax = None if qt.absmax is None else qt.absmax.to(device=device, dtype=torch.float32).contiguous()
        scales = _scales(absmax, nested)
        _check(lib.qckpt_cuda_dequantize_4bit(_ptr(packed, "uint8_t *"), scales, qt.numel, qt.blocksize,
                                              _QUANT4[qt.quant_type], _ptr(out), _dtype_code(dtype), stream))
    return out


def _dequantize_torch(qt: QuantizedTensor, dtype) -> torch.Tensor:
    """Reference arithmetic in torch ops on the GPU (used only when the extension is not built)."""
    from ..formats import reference as ref

    if qt.quant_type is QuantType.INT8:
        return ref.dequantize_int8_rowwise(qt.data, qt.scb, dtype)
    absmax = dequantize_absmax(qt.nested) if qt.nested is not None else qt.absmax
    packed = qt.data.reshape(-1)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: qt.numel].long()
    lut = ref.lut_4bit(qt.quant_type).to(packed.device)
    scales = absmax.to(torch.float32).repeat_interleave(qt.blocksize)[: qt.numel]
    return (lut[codes] * scales).to(dtype).reshape(qt.shape)


# ----- 4-bit matmul -----

def fused_supported(rows: int, n_out: int, k: int, dtype: torch.dtype) -> bool:
    """Whether fused_gemm_4bit takes `rows` activations for an (n_out, k) weight (else gemm_4bit dequantizes and
    calls cuBLAS). The decode kernel counts positions in 32-bit units of 16 elements: n_out * k < 2^36."""
    if dtype not in (torch.bfloat16, torch.float16) or not 1 <= rows <= FUSED_MAX_ROWS:
        return False
    if rows <= DECODE_MAX_ROWS:
        return k % 32 == 0 and k < 2**31 and n_out < 2**31 and n_out * (k // 16) < 2**32
    return k % 64 == 0


# Split-k workspaces of the prefill kernel, one per (device, stream): its tile counters must start zero
# and every call leaves them zero, so a zero-filled buffer is reused for as long as it is large enough.
# Per stream because two streams running at once must not share counters.
_split_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_MAX_SPLIT_WORKSPACES = 16  # streams remembered; code that makes a stream per call must not grow this


def _split_workspace(rows: int, n_out: int, k: int, blocksize: int, device: torch.device,
                     scales_expanded: bool = False) -> torch.Tensor | None:
    """The workspace of one prefill-kernel call on the current stream (None: not needed), its split-K counters
    zero; scales_expanded: the call passes the weight's expanded scales (less room needed on an H100)."""
    ffi, lib = load()
    nbytes = ffi.new("int64_t *")
    _check(lib.qckpt_cuda_gemm_4bit_workspace(rows, n_out, k, int(scales_expanded), nbytes))
    if nbytes[0] == 0:
        return None
    if torch.cuda.is_current_stream_capturing():
        # inside CUDA-graph capture a fill only runs when the graph replays: a buffer for this call alone, not
        # one for later eager calls on this stream, with only the bytes the call needs zero filled (the
        # counters, if it splits K and does not clear them itself): filling all of it took longer than the
        # matmul's scale expansion
        ws = torch.empty(nbytes[0], dtype=torch.uint8, device=device)
        _check(lib.qckpt_cuda_gemm_4bit_workspace_zeroed(rows, n_out, k, blocksize, int(scales_expanded), nbytes))
        if nbytes[0]:
            ws[: nbytes[0]].zero_()
        return ws
    key = (_cuda_device(device).index, torch.cuda.current_stream(device).cuda_stream)
    ws = _split_workspaces.get(key)
    if ws is not None and ws.numel() >= nbytes[0]:
        return ws
    ws = torch.zeros(nbytes[0], dtype=torch.uint8, device=device)
    if key not in _split_workspaces and len(_split_workspaces) >= _MAX_SPLIT_WORKSPACES:
        _split_workspaces.pop(next(iter(_split_workspaces)))  # the oldest stream's (its calls are ordered)
    _split_workspaces[key] = ws
    return ws


class _PreparedWeight:
    """A 4-bit weight's launch arguments on one device: pointers to the 16-byte aligned packed codes and
    the scales struct. Only copies made for it are kept alive here (`own`); the weight's own tensors are
    not, so that moving a model off the GPU frees its memory: their pointers are compared on each use."""

    __slots__ = ("device", "packed_ptr", "scales", "own", "quant", "source_ptr", "scale_ptrs", "expanded",
                 "expanded_versions")


# id(packed tensor) -> (weak reference to it, its _PreparedWeight). A decode step calls fused_gemm_4bit once
# per layer; rebuilding the struct, the alignment check and the device/dtype probes each time was a sizable
# part of the ~60 us an eager call cost against ~25 us of kernel. Keyed by the packed-codes tensor, not the
# QuantizedTensor: Linear4bit builds a new QuantizedTensor around the same buffers on every forward. An
# entry is used only while the weight's tensors are still the ones it was built from (pointers compared),
# so moving a module to another device or loading new buffers rebuilds it.
_prepared_weights: dict[int, tuple] = {}


def _scale_pointers(weight: QuantizedTensor) -> tuple:
    nested = weight.nested
    if nested is None:
        return (weight.absmax.data_ptr(),)
    return (nested.codes.data_ptr(), nested.absmax.data_ptr(), nested.code.data_ptr(), nested.offset, nested.blocksize)


def _prepared(weight: QuantizedTensor, device: torch.device) -> _PreparedWeight:
    source = weight.data
    entry = _prepared_weights.get(id(source))
    if entry is not None and entry[0]() is source:
        prep = entry[1]
        if (prep.device == device and prep.source_ptr == source.data_ptr() and prep.quant == _QUANT4[weight.quant_type]
                and prep.scale_ptrs == _scale_pointers(weight)):
            return prep
    own = []
    packed = source.reshape(-1)
    if packed.data_ptr() % 16:
        packed = packed.clone()
        own.append(packed)
    # the kernel reads the scales through raw pointers: they must be float32 on this device. They are
    # when QuantizedTensor.to() moved everything together; only otherwise are copies made (once, so later
    # in-place edits of such a weight's original scales are not seen).
    nested, absmax = weight.nested, weight.absmax
    probe = absmax if nested is None else nested.absmax
    if probe.device != device or probe.dtype != torch.float32 or (nested is not None and nested.codes.device != device):
        nested = None if nested is None else _nested_on(nested, device)
        absmax = None if absmax is None else absmax.to(device=device, dtype=torch.float32).contiguous()
        own.append((nested, absmax))
    prep = _PreparedWeight()
    prep.device, prep.own = device, tuple(own)
    prep.source_ptr, prep.scale_ptrs = source.data_ptr(), _scale_pointers(weight)
    prep.packed_ptr = _ptr(packed, "uint8_t *")
    prep.scales = _scales(absmax, nested)
    prep.quant = _QUANT4[weight.quant_type]
    prep.expanded, prep.expanded_versions = None, None
    key = id(source)
    _prepared_weights[key] = (weakref.ref(source, lambda _ref, key=key: _forget(key, _ref)), prep)
    return prep


def _scale_tensors(weight: QuantizedTensor) -> tuple:
    nested = weight.nested
    return (weight.absmax,) if nested is None else (nested.codes, nested.absmax, nested.code)


def _expanded_scales(prep: _PreparedWeight, weight: QuantizedTensor, device: torch.device):
    """The weight's block scales expanded for the Hopper prefill kernel (one float32 per block), made on first
    use and kept with the prepared weight, made again (into the same buffer) once the scales' version counters
    moved, as an in-place edit such as load_state_dict moves them. ffi.NULL, so that the kernel makes them in
    its workspace on every call from the live scales, where a kept copy could go stale unseen: inside CUDA-graph
    capture (a replay would keep reading the copy of capture time) and for inference tensors (no version
    counter). Writes through `.data` bypass the counters too: call converter.kernels.cuda.forget_prepared()
    after them. ffi.NULL as well where the kernel does not read them (other GPUs, shapes it does not take)."""
    ffi, lib = load()
    tensors = _scale_tensors(weight)
    if torch.cuda.is_current_stream_capturing() or any(t.is_inference() for t in tensors):
        return ffi.NULL
    versions = tuple(t._version for t in tensors)
    if prep.expanded is not None and prep.expanded_versions == versions:
        return ffi.NULL if prep.expanded is False else _ptr(prep.expanded, "float *")
    n_out, k = weight.shape
    nbytes = ffi.new("int64_t *")
    _check(lib.qckpt_cuda_gemm_4bit_scales_bytes(n_out, k, weight.blocksize, nbytes))
    if nbytes[0] == 0:
        prep.expanded, prep.expanded_versions = False, versions
        return ffi.NULL
    buf = prep.expanded if isinstance(prep.expanded, torch.Tensor) else None
    if buf is None or buf.numel() * 4 < nbytes[0]:
        buf = torch.empty(nbytes[0] // 4, dtype=torch.float32, device=device)
    _check(lib.qckpt_cuda_gemm_4bit_expand_scales(prep.scales, n_out, k, weight.blocksize, _ptr(buf, "float *"),
                                                  _stream(device)))
    # other streams may use this weight next without waiting on this one: the copy is complete before any
    # call can read it (once per weight and edit)
    torch.cuda.current_stream(device).synchronize()
    prep.expanded, prep.expanded_versions = buf, versions
    return _ptr(buf, "float *")


def forget_prepared() -> None:
    """Drop every weight's kept launch arguments and expanded scales (rebuilt on next use): after writing a
    weight's tensors in a way their version counters do not see, such as through `.data`."""
    _prepared_weights.clear()


def _forget(key: int, ref) -> None:
    entry = _prepared_weights.get(key)
    if entry is not None and entry[0] is ref:  # not an entry of a newer tensor that reused the id
        del _prepared_weights[key]


def fused_gemm_4bit(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """Fused dequantize + matmul: x (rows, K) bf16/fp16, rows <= FUSED_MAX_ROWS @ dequant(W (N, K))^T
    -> (rows, N) in x.dtype. Weights are read once (4 bits each), products on the tensor cores with
    float32 accumulation, deterministic; no synchronization. 1..16 rows take the decode kernel,
    17..128 a prefill kernel (which may split K through a cached per-stream workspace); on an H100 that one
    reads the weight's scales expanded to one float32 per block, kept with the weight (_expanded_scales)."""
    ffi, lib = load()
    n_out, k = weight.shape
    device = x.device
    x = _device_contiguous(x.reshape(-1, k), device)
    rows = x.shape[0]
    if not fused_supported(rows, n_out, k, x.dtype):
        raise QuantizationInputError(f"fused 4-bit matmul needs bf16/fp16 activations and 1..{DECODE_MAX_ROWS} rows "
                                     f"with K % 32 == 0 (N * K < 2^36) or {DECODE_MAX_ROWS + 1}..{FUSED_MAX_ROWS} rows "
                                     f"with K % 64 == 0, got {rows} rows of {x.dtype}, N={n_out}, K={k}")
    if weight.device != device:
        raise QuantizationInputError(f"weight is on {weight.device} but the activations are on {device}")
    prep = _prepared(weight, device)
    y = torch.empty((rows, n_out), dtype=x.dtype, device=device)
    with _on(device):
        prefill = rows > DECODE_MAX_ROWS
        expanded = _expanded_scales(prep, weight, device) if prefill else ffi.NULL
        ws = _split_workspace(rows, n_out, k, weight.blocksize, device, expanded != ffi.NULL) if prefill else None
        _check(lib.qckpt_cuda_gemm_4bit(_ptr(x), _dtype_code(x.dtype), rows, prep.packed_ptr, prep.scales,
                                        n_out, k, weight.blocksize, prep.quant, _ptr(y), _ptr(ws),
                                        0 if ws is None else ws.numel(), expanded, _stream(device)))
    return y


def gemm_4bit(x: torch.Tensor, weight: QuantizedTensor, bias: torch.Tensor | None = None, *,
              workspace: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ dequant(W (N, K))^T + bias -> (..., N) in x.dtype, on x's CUDA device.

    `weight` is a 4-bit QuantizedTensor on that device. Up to FUSED_MAX_ROWS rows take fused_gemm_4bit; larger ones
    dequantize W into `workspace` (flat CUDA tensor of x.dtype with >= N*K elements; None allocates)
    and multiply with cuBLAS. `bias` is added in x.dtype.
    """
    n_out, k = weight.shape
    rows = x.numel() // k if k else 0
    if available() and fused_supported(rows, n_out, k, x.dtype):
        y = fused_gemm_4bit(x, weight)
    else:
        out = None if workspace is None else workspace.reshape(-1)[: n_out * k]
        w = dequantize(weight, x.dtype, out=out) if available() else _dequantize_torch(weight, x.dtype)
        y = torch.matmul(x.reshape(rows, k), w.t())
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], n_out)
