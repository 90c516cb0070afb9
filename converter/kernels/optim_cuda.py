"""cffi wrappers of the CUDA AdamW steps and of unified memory (native/cuda/optim8.cu, managed.cu).

The steps mirror optim_cpu's (same arguments, same in-place updates, the CPU kernel's bytes) with every
tensor on the parameter's CUDA device; they launch on that device's current torch stream and return
without synchronizing. The maps are not checked on the device (that would cost a synchronization per
call): pass maps checked with device_maps(), as converter.optim does once per device.

Unified memory backs PagedAdamW8bit's state: managed_empty() returns an ordinary CUDA tensor whose
memory the driver may page out to the host under memory pressure; prefetch() brings it back ahead of
use. Nothing here touches CUDA at import.
"""
from __future__ import annotations

import importlib.util
import weakref

import torch

from ..errors import OptimizerError
from .cuda import _check, _on, _ptr, _stream, load
from .optim_cpu import DTYPES, check_8bit_state, check_param_and_grad, check_tensor, hparams

_MAP_SIZE = 256


def _cuda(tensor: torch.Tensor, what: str, name: str) -> torch.device:
    if tensor.device.type != "cuda":
        where = f"{name}: " if name else ""
        raise OptimizerError(f"{where}{what} is on {tensor.device}, the CUDA kernel needs CUDA tensors")
    return tensor.device


def adamw8bit_step(param, grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, scalars, *, blocksize=256,
                   name=""):
    """One fused AdamW step with blockwise 8-bit moments on param's GPU; param, m_codes/m_absmax and
    v_codes/v_absmax change in place (asynchronously, on the current stream)."""
    device = _cuda(param, "parameter", name)
    n = check_param_and_grad(param, grad, name, device)
    check_8bit_state(n, blocksize, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, name, device)
    launch_adamw8bit(StepLaunches(device), param, grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, scalars,
                     blocksize, name)


def adamw32_step(param, grad, exp_avg, exp_avg_sq, scalars, *, name=""):
    """The same step with float32 moments (small tensors); param, exp_avg, exp_avg_sq change in place."""
    device = _cuda(param, "parameter", name)
    n = check_param_and_grad(param, grad, name, device)
    check_tensor(exp_avg, "first moment", name, torch.float32, n, device)
    check_tensor(exp_avg_sq, "second moment", name, torch.float32, n, device)
    launch_adamw32(StepLaunches(device), param, grad, exp_avg, exp_avg_sq, scalars, name)


class StepLaunches:
    """What every parameter of one optimizer step on one device shares: the stream and the hyper-parameter
    structs (one per distinct scalars object). With it, launch_adamw8bit / launch_adamw32 cost a cffi call
    per parameter; the checked adamw8bit_step / adamw32_step re-validate every tensor on each call, which
    made a step over many small tensors host-bound (~30 us of Python per parameter)."""

    def __init__(self, device: torch.device):
        self.ffi, self.lib = load()
        self.device = device
        self.stream = _stream(device)
        self._hparams = {}

    def hparams(self, scalars):
        entry = self._hparams.get(id(scalars))
        if entry is None:  # keep `scalars` referenced so its id stays unique for this object's life
            entry = self._hparams[id(scalars)] = (scalars, hparams(self.ffi, scalars))
        return entry[1]


def launch_adamw8bit(launches: StepLaunches, param, grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map,
                     scalars, blocksize: int, name: str = "") -> None:
    """adamw8bit_step without the Python-side checks, for callers that made (or validated) the state
    themselves and checked param and grad: contiguous, on launches.device, matching sizes. The C side still
    checks its arguments and returns a status."""
    lib = launches.lib
    with _on(launches.device):
        status = lib.qckpt_cuda_adamw8bit_step(
            _ptr(param), DTYPES[param.dtype], _ptr(grad), DTYPES[grad.dtype], param.numel(),
            _ptr(m_codes, "uint8_t *"), _ptr(m_absmax, "float *"), _ptr(m_map, "float *"),
            _ptr(v_codes, "uint8_t *"), _ptr(v_absmax, "float *"), _ptr(v_map, "float *"), blocksize,
            launches.hparams(scalars), launches.stream,
        )
    _check(status, name)


def launch_adamw32(launches: StepLaunches, param, grad, exp_avg, exp_avg_sq, scalars, name: str = "") -> None:
    """adamw32_step without the Python-side checks (the conditions of launch_adamw8bit)."""
    with _on(launches.device):
        status = launches.lib.qckpt_cuda_adamw32_step(
            _ptr(param), DTYPES[param.dtype], _ptr(grad), DTYPES[grad.dtype], param.numel(),
            _ptr(exp_avg, "float *"), _ptr(exp_avg_sq, "float *"), launches.hparams(scalars), launches.stream,
        )
    _check(status, name)


MULTI_MAX = 512  # entries per multi-tensor launch (QCKPT_CUDA_ADAM_MULTI_MAX)
_UNIT = 256  # elements per work unit of a multi-tensor launch


def multi_eligible(eight_bit: bool, param: torch.Tensor, grad: torch.Tensor, state: tuple) -> bool:
    """Whether launch_adamw_multi takes this parameter (its 8-bit kernel needs aligned vectors)."""
    if not eight_bit:
        return True
    return param.data_ptr() % 16 == 0 and grad.data_ptr() % 16 == 0 and state[0].data_ptr() % 8 == 0 \
        and state[2].data_ptr() % 8 == 0


def launch_adamw_multi(launches: StepLaunches, eight_bit: bool, entries: list, m_map=None, v_map=None) -> None:
    """One launch stepping every (param, grad, state, scalars) of `entries`: state is (m_codes, m_absmax,
    v_codes, v_absmax) with blocksize 256 when eight_bit, else (exp_avg, exp_avg_sq). All params share a
    dtype, all grads share a dtype, everything is on launches.device and contiguous (multi_eligible for
    8-bit state), at most MULTI_MAX entries. The table of pointers is built here, copied to the device
    (stream-ordered before the kernel) and checked by the C side from its host copy."""
    ffi, lib = launches.ffi, launches.lib
    count = len(entries)
    table = ffi.new("qckpt_cuda_adam_tensor[]", count)
    first = 0
    for i, (param, grad, state, scalars) in enumerate(entries):
        entry = table[i]
        entry.param, entry.grad = _ptr(param), _ptr(grad)
        entry.n = n = param.numel()
        if eight_bit:
            entry.m_codes, entry.m_absmax = _ptr(state[0], "uint8_t *"), _ptr(state[1], "float *")
            entry.v_codes, entry.v_absmax = _ptr(state[2], "uint8_t *"), _ptr(state[3], "float *")
        else:
            entry.m32, entry.v32 = _ptr(state[0], "float *"), _ptr(state[1], "float *")
        entry.first = first
        entry.hp = launches.hparams(scalars)[0]
        first += -(-n // _UNIT)
    # through pinned memory, asynchronously: a pageable copy would block the host until the stream's
    # earlier work (the backward pass, earlier launches of this step) finished, and the host would stop
    # running ahead. torch's pinned-memory cache reuses the staging buffer only after the copy ran.
    staged = torch.empty(len(ffi.buffer(table)), dtype=torch.uint8, pin_memory=True)
    staged.copy_(torch.frombuffer(ffi.buffer(table), dtype=torch.uint8))
    device_table = staged.to(launches.device, non_blocking=True)
    on_device = ffi.cast("qckpt_cuda_adam_tensor *", device_table.data_ptr())
    pdtype, gdtype = DTYPES[entries[0][0].dtype], DTYPES[entries[0][1].dtype]
    with _on(launches.device):
        if eight_bit:
            status = lib.qckpt_cuda_adamw8bit_multi(table, on_device, count, pdtype, gdtype, _ptr(m_map, "float *"),
                                                    _ptr(v_map, "float *"), launches.stream)
        else:
            status = lib.qckpt_cuda_adamw32_multi(table, on_device, count, pdtype, gdtype, launches.stream)
    _check(status, f"AdamW step of {count} parameters")


def launch_prefetch(launches: StepLaunches, tensor: torch.Tensor) -> None:
    """prefetch() of a managed tensor on launches.device to that device, without the Python-side checks."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes:
        with _on(launches.device):
            _check(launches.lib.qckpt_cuda_prefetch(_ptr(tensor), nbytes, launches.device.index, launches.stream),
                   "prefetch")


def check_map(code_map: torch.Tensor, what: str) -> torch.Tensor:
    """`code_map` as a contiguous float32 CPU tensor of 256 strictly increasing values (what the kernels'
    code thresholds need; the CPU library checks this on every call, the device cannot cheaply)."""
    values = code_map.detach().to("cpu", torch.float32).reshape(-1).contiguous()
    if values.numel() != _MAP_SIZE:
        raise OptimizerError(f"{what} map has {values.numel()} entries, expected {_MAP_SIZE}")
    steps = values[1:] > values[:-1]
    if not bool(steps.all()):
        i = int((~steps).nonzero()[0])
        raise OptimizerError(f"{what} map is not strictly increasing at index {i}")
    return values


def device_maps(m_map: torch.Tensor, v_map: torch.Tensor, device) -> tuple:
    """(m_map, v_map) checked (check_map) and copied to the CUDA `device`."""
    return (check_map(m_map, "first-moment").to(device), check_map(v_map, "second-moment").to(device))


# ----- unified memory -----

class ManagedBuffer:
    """`nbytes` of cudaMallocManaged memory for `device`, freed when the last tensor viewing it goes away.

    torch.as_tensor keeps this object alive for as long as the tensor built from its
    __cuda_array_interface__ (and every view of that tensor) exists; the finalizer then frees the memory
    (cudaFree synchronizes the device first, so no kernel still reads it)."""

    def __init__(self, nbytes: int, device: torch.device):
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes <= 0:
            raise OptimizerError(f"managed allocation needs a positive byte count, got {nbytes!r}")
        ffi, lib = load()
        out = ffi.new("void **")
        _check(lib.qckpt_cuda_managed_alloc(nbytes, device.index, out), "managed memory")
        self.ptr = int(ffi.cast("uintptr_t", out[0]))
        self.nbytes = nbytes
        self.device = device
        # A finalizer rather than __del__: it runs once, also at interpreter exit, and never raises.
        self._free = weakref.finalize(self, _free_managed, lib, out[0])

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3,
                "strides": None}


def _free_managed(lib, ptr) -> None:
    lib.qckpt_cuda_managed_free(ptr)  # a failure here has no caller to report to


def _index(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise OptimizerError(f"managed memory is for CUDA devices, got {device}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def managed_empty(numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialized 1-D CUDA tensor of `numel` elements of `dtype` on `device`, in unified memory."""
    device = _index(device)
    if not isinstance(numel, int) or isinstance(numel, bool) or numel <= 0:
        raise OptimizerError(f"managed tensor needs a positive element count, got {numel!r}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if importlib.util.find_spec("numpy") is None:  # torch parses __cuda_array_interface__ with numpy
        raise OptimizerError("managed (paged) tensors need numpy installed: torch reads the "
                             "__cuda_array_interface__ that wraps them through numpy")
    buffer = ManagedBuffer(numel * itemsize, device)
    raw = torch.as_tensor(buffer, device=device)
    if raw.data_ptr() != buffer.ptr:  # torch copied instead of wrapping: the memory would not be managed
        raise OptimizerError(f"torch did not wrap managed memory in place on {device}")
    return raw.view(dtype)


def is_managed(tensor: torch.Tensor) -> bool:
    """Whether a CUDA tensor's memory is unified (managed) memory."""
    if tensor.device.type != "cuda":
        return False
    ffi, lib = load()
    flag = ffi.new("int32_t *")
    _check(lib.qckpt_cuda_is_managed(_ptr(tensor), flag), "managed memory query")
    return bool(flag[0])


def prefetch(tensor: torch.Tensor, device=None) -> None:
    """Migrate a managed tensor's memory to its CUDA device (or `device`: a CUDA device, or "cpu" for the
    host) in order on the current stream of the tensor's device; returns at once."""
    target = tensor.device if device is None else torch.device(device)
    if target.type not in ("cuda", "cpu"):
        raise OptimizerError(f"prefetch target must be a CUDA device or the CPU, got {target}")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    _cuda(tensor, "prefetched tensor", "")
    _, lib = load()
    index = -1 if target.type == "cpu" else _index(target).index
    with _on(tensor.device):
        _check(lib.qckpt_cuda_prefetch(_ptr(tensor), nbytes, index, _stream(tensor.device)), "prefetch")
