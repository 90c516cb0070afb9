"""cffi wrappers of the fused AdamW steps (qckpt_adamw8bit_step, qckpt_adamw32_step in native/include/qckpt.h).

Unlike the quantization wrappers these update their arguments in place (the parameter and its optimizer
state), so they take tensors exactly as they are and refuse anything the C code cannot write through:
non-CPU, non-contiguous, or of the wrong dtype or size. The caller (converter.optim) arranges that.
"""
from __future__ import annotations

import torch

from ..errors import OptimizerError
from .cpu import _check, _exec, _ptr, load

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # qckpt_dtype codes
MAX_BLOCKSIZE = 4096  # QK_OPTIM_MAX_BLOCK
_HPARAM_FIELDS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "step_size",
                  "bias_correction2_sqrt", "decay")


def check_tensor(tensor: torch.Tensor, what: str, name: str, dtype=None, numel=None, device=None) -> None:
    """Raise OptimizerError unless `tensor` is contiguous, on `device` (default: the CPU), of `dtype` (one
    dtype or a tuple) and `numel` elements; shared with the CUDA bindings (optim_cuda)."""
    where = f"{name}: " if name else ""
    if device is None:
        if tensor.device.type != "cpu":
            raise OptimizerError(f"{where}{what} is on {tensor.device}, the CPU kernel needs CPU tensors")
    elif tensor.device != device:
        raise OptimizerError(f"{where}{what} is on {tensor.device}, expected {device} (the parameter's device)")
    if not tensor.is_contiguous():
        raise OptimizerError(f"{where}{what} is not contiguous")
    if dtype is not None and tensor.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise OptimizerError(f"{where}{what} has dtype {tensor.dtype}, expected {dtype}")
    if numel is not None and tensor.numel() != numel:
        raise OptimizerError(f"{where}{what} has {tensor.numel()} elements, expected {numel}")


def hparams(ffi, scalars):
    """A qckpt_adamw_hparams of `ffi` (the CPU or the CUDA extension's) from an object with the float32
    fields (converter.optim.reference.AdamWScalars)."""
    hp = ffi.new("qckpt_adamw_hparams *")
    for field in _HPARAM_FIELDS:
        setattr(hp, field, getattr(scalars, field))
    hp.maximize = 1 if scalars.maximize else 0
    return hp


def check_param_and_grad(param, grad, name, device=None) -> int:
    """The element count of a parameter and its gradient, after checking both (see check_tensor)."""
    floats = tuple(DTYPES)
    check_tensor(param, "parameter", name, floats, device=device)
    check_tensor(grad, "gradient", name, floats, param.numel(), device=device)
    if param.numel() == 0:
        raise OptimizerError(f"{name or 'parameter'}: empty tensor")
    return param.numel()


def check_8bit_state(n, blocksize, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, name, device=None) -> None:
    """Codes (n,) uint8, absmax (ceil(n/blocksize),) float32 and maps (256,) float32 of both moments."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or not 1 <= blocksize <= MAX_BLOCKSIZE:
        raise OptimizerError(f"{name or 'parameter'}: blocksize must be an integer in [1, {MAX_BLOCKSIZE}], "
                             f"got {blocksize!r}")
    nb = -(-n // blocksize)
    for tensor, what, dtype, numel in (
        (m_codes, "first-moment codes", torch.uint8, n), (v_codes, "second-moment codes", torch.uint8, n),
        (m_absmax, "first-moment absmax", torch.float32, nb), (v_absmax, "second-moment absmax", torch.float32, nb),
        (m_map, "first-moment map", torch.float32, 256), (v_map, "second-moment map", torch.float32, 256),
    ):
        check_tensor(tensor, what, name, dtype, numel, device=device)


def adamw8bit_step(param, grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, scalars, *, blocksize=256,
                   threads=None, isa=None, name=""):
    """One fused AdamW step with blockwise 8-bit moments; param, m_codes/m_absmax, v_codes/v_absmax change in place."""
    ffi, lib = load()
    n = check_param_and_grad(param, grad, name)
    check_8bit_state(n, blocksize, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, name)
    status = lib.qckpt_adamw8bit_step(
        _ptr(param, "void *"), DTYPES[param.dtype], _ptr(grad, "void *"), DTYPES[grad.dtype], n,
        _ptr(m_codes, "uint8_t *"), _ptr(m_absmax, "float *"), _ptr(m_map, "float *"),
        _ptr(v_codes, "uint8_t *"), _ptr(v_absmax, "float *"), _ptr(v_map, "float *"), blocksize,
        hparams(ffi, scalars), _exec(threads, isa),
    )
    _check(status, name)


def adamw32_step(param, grad, exp_avg, exp_avg_sq, scalars, *, threads=None, isa=None, name=""):
    """The same step with float32 moments (small tensors); param, exp_avg, exp_avg_sq change in place."""
    ffi, lib = load()
    n = check_param_and_grad(param, grad, name)
    check_tensor(exp_avg, "first moment", name, torch.float32, n)
    check_tensor(exp_avg_sq, "second moment", name, torch.float32, n)
    status = lib.qckpt_adamw32_step(
        _ptr(param, "void *"), DTYPES[param.dtype], _ptr(grad, "void *"), DTYPES[grad.dtype], n,
        _ptr(exp_avg, "float *"), _ptr(exp_avg_sq, "float *"), hparams(ffi, scalars), _exec(threads, isa),
    )
    _check(status, name)
