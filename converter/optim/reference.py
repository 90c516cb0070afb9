"""Pure-torch reference of the blockwise 8-bit AdamW step: slow, obvious, and the definition of the
arithmetic that native/src/optim8.c must reproduce bit for bit on CPU.

Every operation is a single float32 torch op (one rounding each, no fused multiply-add, no addcdiv or
lerp whose internal order is not ours); the scalars are computed once per step in double and rounded
once to float32 (AdamWScalars), and the C kernel receives those same float32 values.

Per element (g = grad, negated when maximizing):
    m = (m0 * beta1) + (g * (1-beta1))             m0 = m_map[m_code] * m_absmax[block]
    v = (v0 * beta2) + ((g * g) * (1-beta2))       v0 = v_map[v_code] * v_absmax[block]
    p = (p * decay) - (step_size * (m / ((sqrt(v) / bias_correction2_sqrt) + eps)))
with decay = 1 - lr*weight_decay, step_size = lr / (1 - beta1^t), bias_correction2_sqrt = sqrt(1 - beta2^t):
torch.optim.AdamW's update with its bias corrections. Then m and v are re-quantized per block of 256:
absmax = max |x|, x_n = x * (1/absmax), code = nearest map entry by float32 midpoints with exact ties to
the even index, NaN -> 0 (the rule of qckpt_quantize_blockwise8, FORMAT.md 2.3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..formats.codebooks import f32_round

BLOCKSIZE = 256


@dataclass(frozen=True)
class AdamWScalars:
    """The float32 constants of one step (what the C kernel receives as qckpt_adamw_hparams)."""

    beta1: float
    beta2: float
    one_minus_beta1: float
    one_minus_beta2: float
    eps: float
    step_size: float
    bias_correction2_sqrt: float
    decay: float
    maximize: bool = False

    @classmethod
    def for_step(cls, *, lr, beta1, beta2, eps, weight_decay, step: int, maximize=False) -> "AdamWScalars":
        """Constants for step number `step` (1-based) as torch.optim.AdamW computes them, rounded to float32."""
        return cls(
            beta1=f32_round(beta1),
            beta2=f32_round(beta2),
            one_minus_beta1=f32_round(1.0 - beta1),
            one_minus_beta2=f32_round(1.0 - beta2),
            eps=f32_round(eps),
            step_size=f32_round(lr / (1.0 - beta1**step)),
            bias_correction2_sqrt=f32_round(math.sqrt(1.0 - beta2**step)),
            decay=f32_round(1.0 - lr * weight_decay),
            maximize=bool(maximize),
        )


def _c(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (IEEE sqrtf, what the C kernel's sqrtss/vsqrtps give).

    torch.sqrt on float32 CPU tensors is not correctly rounded (torch 2.13, AVX-512 build: about 18% of
    random inputs come out one ulp off), so: a float64 square root rounded to float32, then one exact
    correction step: with s and its float32 neighbours, the midpoints between them have 25 significant
    bits, so their squares are exact in float64 and the comparisons with x are exact. (No ties: x has 24
    significant bits and an odd 25-bit midpoint's square cannot.)"""
    s = torch.sqrt(x.double()).float()
    xd = x.double()
    up = torch.nextafter(s, torch.tensor(math.inf))
    down = torch.nextafter(s, torch.tensor(-math.inf))
    hi = (s.double() + up.double()) * 0.5
    lo = (s.double() + down.double()) * 0.5
    s = torch.where(xd > hi * hi, up, s)
    return torch.where((s > 0) & (xd < lo * lo), down, s)


def update(p, g, m0, v0, s: AdamWScalars):
    """float32 p, g, m0, v0 (flat) -> float32 (p, m, v) after one step, before any quantization or cast."""
    if s.maximize:
        g = -g
    m = m0 * _c(s.beta1) + g * _c(s.one_minus_beta1)
    v = v0 * _c(s.beta2) + (g * g) * _c(s.one_minus_beta2)
    denom = sqrt_f32(v) / _c(s.bias_correction2_sqrt) + _c(s.eps)
    p = p * _c(s.decay) - _c(s.step_size) * (m / denom)
    return p, m, v


def nearest_codes(xn: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """Nearest entry of the sorted map by float32 midpoints; exact ties to the even index; NaN -> 0."""
    mids = (code_map[:-1] + code_map[1:]) * 0.5
    below = torch.searchsorted(mids, xn)  # number of midpoints strictly below xn
    at = below.clamp(max=mids.numel() - 1)
    tie = (mids[at] == xn) & (below % 2 == 1)
    codes = torch.where(tie, below + 1, below)
    return torch.where(torch.isnan(xn), torch.zeros_like(codes), codes).to(torch.uint8)


def quantize(x: torch.Tensor, code_map: torch.Tensor, blocksize: int = BLOCKSIZE):
    """float32 x (n,) -> (codes uint8 (n,), absmax float32 (nb,))."""
    n = x.numel()
    nb = -(-n // blocksize)
    blocks = torch.zeros(nb * blocksize, dtype=torch.float32)
    blocks[:n] = x
    blocks = blocks.view(nb, blocksize)
    absmax = blocks.abs().amax(dim=1)
    xn = (blocks * (torch.ones_like(absmax) / absmax)[:, None]).reshape(-1)[:n]
    return nearest_codes(xn, code_map), absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor, blocksize: int = BLOCKSIZE):
    return code_map[codes.long()] * absmax.repeat_interleave(blocksize)[: codes.numel()]


def adamw8bit_step(param, grad, m_codes, m_absmax, v_codes, v_absmax, m_map, v_map, s: AdamWScalars,
                   blocksize: int = BLOCKSIZE):
    """One step; returns (new param in param's dtype and shape, m_codes, m_absmax, v_codes, v_absmax).
    Nothing passed in is modified."""
    p = param.detach().reshape(-1).to(torch.float32)
    g = grad.detach().reshape(-1).to(torch.float32)
    m0 = dequantize(m_codes.reshape(-1), m_absmax, m_map, blocksize)
    v0 = dequantize(v_codes.reshape(-1), v_absmax, v_map, blocksize)
    p, m, v = update(p, g, m0, v0, s)
    mc, ma = quantize(m, m_map, blocksize)
    vc, va = quantize(v, v_map, blocksize)
    return p.to(param.dtype).reshape(param.shape), mc, ma, vc, va


def adamw32_step(param, grad, exp_avg, exp_avg_sq, s: AdamWScalars):
    """One step with float32 moments; returns (new param, exp_avg, exp_avg_sq). Nothing passed in is modified."""
    p = param.detach().reshape(-1).to(torch.float32)
    g = grad.detach().reshape(-1).to(torch.float32)
    p, m, v = update(p, g, exp_avg.reshape(-1), exp_avg_sq.reshape(-1), s)
    return p.to(param.dtype).reshape(param.shape), m.reshape(exp_avg.shape), v.reshape(exp_avg_sq.shape)
