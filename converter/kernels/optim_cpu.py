"""cffi wrappers of the fused AdamW steps (qckpt_adamw8bit_step, qckpt_adamw32_step in native/include/qckpt.h).

Unlike the quantization wrappers these update their arguments in place (the parameter and its optimizer
state), so they take tensors exactly as they are and refuse anything the C code cannot write through:
non-CPU, non-contiguous, or of the wrong dtype or size. The caller (converter.optim) arranges that.
"""
from __future__ import annotations

import torch

from ..errors import OptimizerError
from .cpu import _check, _exec, _ptr, load

_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_HPARAM_FIELDS = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "eps", "step_size",
                  "bias_correction2_sqrt", "decay")


def _require(tensor: torch.Tensor, what: str, name: str, dtype=None, numel=None) -> None:
    where = f"{name}: " if name else ""
    if tensor.device.type != "cpu":
        raise OptimizerError(f"{where}{what} is on {tensor.device}, the CPU kernel needs CPU tensors")
    if not tensor.is_contiguous():
        raise OptimizerError(f"{where}{what} is not contiguous")
    if dtype is not None and tensor.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        raise OptimizerError(f"{where}{what} has dtype {tensor.dtype}, expected {dtype}")
    if numel is not None and tensor.numel() != numel:
        raise OptimizerError(f"{where}{what} has {tensor.numel()} elements, expected {numel}")


def _hparams(scalars):
    """A qckpt_adamw_hparams from an object with the float32 fields (converter.optim.reference.AdamWScalars)."""
    ffi, _ = load()
    hp = ffi.new("qckpt_adamw_hparams *")
    for field in _HPARAM_FIELDS:
        setattr(hp, field, getattr(scalars, field))
    hp.maximize = 1 if scalars.maximize else 0
    return hp


def _param_and_grad(param, grad, name):
    floats = tuple(_DTYPES)
    _require(param, "parameter", name, floats)
    _require(grad, "gradient", name, floats, param.numel())
    if param.numel() == 0:
        raise OptimizerError(f"{name or 'parameter'}: empty tensor")
    return param.numel()


def adamw8bit_step(param, grad, m_codes, m_absmax, m_map, v_codes, v_absmax, v_map, scalars, *, blocksize=256,
                   threads=None, isa=None, name=""):
    """One fused AdamW step with blockwise 8-bit moments; param, m_codes/m_absmax, v_codes/v_absmax change in place."""
    _, lib = load()
    n = _param_and_grad(param, grad, name)
    nb = -(-n // blocksize)
    for tensor, what, dtype, numel in (
        (m_codes, "first-moment codes", torch.uint8, n), (v_codes, "second-moment codes", torch.uint8, n),
        (m_absmax, "first-moment absmax", torch.float32, nb), (v_absmax, "second-moment absmax", torch.float32, nb),
        (m_map, "first-moment map", torch.float32, 256), (v_map, "second-moment map", torch.float32, 256),
    ):
        _require(tensor, what, name, dtype, numel)
    status = lib.qckpt_adamw8bit_step(
        _ptr(param, "void *"), _DTYPES[param.dtype], _ptr(grad, "void *"), _DTYPES[grad.dtype], n,
        _ptr(m_codes, "uint8_t *"), _ptr(m_absmax, "float *"), _ptr(m_map, "float *"),
        _ptr(v_codes, "uint8_t *"), _ptr(v_absmax, "float *"), _ptr(v_map, "float *"), blocksize,
        _hparams(scalars), _exec(threads, isa),
    )
    _check(status, name)


def adamw32_step(param, grad, exp_avg, exp_avg_sq, scalars, *, threads=None, isa=None, name=""):
    """The same step with float32 moments (small tensors); param, exp_avg, exp_avg_sq change in place."""
    _, lib = load()
    n = _param_and_grad(param, grad, name)
    _require(exp_avg, "first moment", name, torch.float32, n)
    _require(exp_avg_sq, "second moment", name, torch.float32, n)
    status = lib.qckpt_adamw32_step(
        _ptr(param, "void *"), _DTYPES[param.dtype], _ptr(grad, "void *"), _DTYPES[grad.dtype], n,
        _ptr(exp_avg, "float *"), _ptr(exp_avg_sq, "float *"), _hparams(scalars), _exec(threads, isa),
    )
    _check(status, name)
