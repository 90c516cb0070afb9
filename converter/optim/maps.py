"""The two 256-entry code maps of the 8-bit optimizer states (data only, built exactly as bitsandbytes builds them).

First moment: the signed dynamic map of FORMAT.md 2.2 (`codebooks.dynamic_map_signed()`).
Second moment (never negative): the unsigned dynamic map, bitsandbytes'
`create_dynamic_map(signed=False, max_exponent_bits=7, total_bits=8)`. Construction, for i = 0..6:
  1. `b = torch.linspace(0.1, 1, 2**(i+1) + 1)` in float32 (twice the signed map's fraction items:
     the sign bit is spent on resolution instead);
  2. `means = (b[:-1] + b[1:]) / 2` in float32;
  3. values `10**(i-6) * means`, a float32 tensor times a Python scalar (rounded once to float32).
That gives 2+4+...+128 = 254 magnitudes over the decades 1e-6 .. 1e0; 0.0 and 1.0 are appended and
the 256 values sorted: code[0] = 0.0, code[255] = 1.0, all distinct (tests/test_optim_maps.py checks the
values bit for bit against bitsandbytes).
"""
from __future__ import annotations

import functools

import torch

from ..formats.codebooks import dynamic_map_signed, f32_round


def dynamic_map_unsigned() -> tuple:
    """The 256-entry unsigned dynamic map (ascending float32 values as Python floats)."""
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2
        values += (means * (10 ** (i - 6))).tolist()
    values += [0.0, 1.0]
    return tuple(sorted(f32_round(v) for v in values))


@functools.cache
def _maps() -> tuple:
    # Cached tuples of floats are immutable; callers get fresh tensors from signed_map()/unsigned_map().
    return dynamic_map_signed(), dynamic_map_unsigned()


def signed_map() -> torch.Tensor:
    """The first-moment map as a fresh float32 tensor (256,)."""
    return torch.tensor(_maps()[0], dtype=torch.float32)


def unsigned_map() -> torch.Tensor:
    """The second-moment map as a fresh float32 tensor (256,)."""
    return torch.tensor(_maps()[1], dtype=torch.float32)
