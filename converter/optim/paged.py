"""PagedAdamW8bit: AdamW8bit whose state lives in CUDA unified memory (cudaMallocManaged), so that a spike
in activation memory pages optimizer state out to the host instead of failing with out-of-memory.

Status: pending the CUDA extension (native/cuda). Paging only means something for parameters on a CUDA
device, and neither the unified-memory allocator nor the CUDA 8-bit step kernel exists yet, so this
class refuses to be built rather than pretend: on CPU parameters it raises OptimizerError pointing to
AdamW8bit (whose state is already in host memory, with identical arithmetic); on CUDA parameters it
raises NativeUnavailableError. What remains to do once native/cuda lands:
  - allocate state1/state2/absmax1/absmax2 with cudaMallocManaged (exposed to torch as tensors through
    the CUDA extension), prefetching them to the device before each step (cudaMemPrefetchAsync);
  - run the CUDA port of qckpt_adamw8bit_step on the current stream;
  - keep state_dict()/load_state_dict() as in AdamW8bit (managed memory reads like device memory).
"""
from __future__ import annotations

from ..errors import NativeUnavailableError, OptimizerError
from .adamw import AdamW8bit


class PagedAdamW8bit(AdamW8bit):
    """Same arguments as AdamW8bit; needs CUDA parameters and the CUDA extension (not available yet)."""

    def __init__(self, params, *args, **kwargs):
        super().__init__(params, *args, **kwargs)
        devices = {p.device.type for group in self.param_groups for p in group["params"]}
        if devices != {"cuda"}:
            raise OptimizerError(
                "PagedAdamW8bit pages optimizer state through CUDA unified memory and needs parameters on a "
                f"CUDA device (got {', '.join(sorted(devices))}); on CPU use converter.optim.AdamW8bit, the "
                "same 8-bit AdamW with its state already in host memory"
            )
        raise NativeUnavailableError(
            "PagedAdamW8bit needs the CUDA 8-bit optimizer kernel and unified-memory allocator of the CUDA "
            "extension (native/cuda), which are not built yet"
        )
