"""PagedAdamW8bit: AdamW8bit whose state lives in CUDA unified memory (cudaMallocManaged), so that a spike
in activation memory pages optimizer state out to the host instead of failing with out-of-memory.

Each state tensor is its own managed allocation (converter.kernels.optim_cuda.managed_empty), an ordinary
CUDA tensor to torch. Before a parameter's step its state is prefetched to the parameter's device on the
current stream, so the kernel that follows finds it resident rather than faulting it in page by page;
when nothing pressed it out, the prefetch finds it there already. The step itself is AdamW8bit's CUDA
kernel: the same bytes as AdamW8bit on the same device. state_dict() hands out the managed tensors as
they are; load_state_dict() copies loaded state back into managed memory.
"""
from __future__ import annotations

import torch

from ..errors import OptimizerError
from .adamw import AdamW8bit


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit (same arguments) with its state in CUDA unified memory; every parameter must be on a
    CUDA device, and the CUDA extension built (`python native/ffi/build_cuda.py`)."""

    def add_param_group(self, param_group):
        """As torch's (the constructor adds its groups through it too); CPU parameters are refused."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        for pi, param in enumerate(self.param_groups[gi]["params"]):
            _require_cuda(param, f"param group {gi} parameter {pi} {tuple(param.shape)}")

    def _update(self, param, grad, state, scalars, name):
        _require_cuda(param, name)
        from ..kernels import optim_cuda

        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                optim_cuda.prefetch(value, param.device)
        super()._update(param, grad, state, scalars, name)

    def _new_state(self, numel, dtype, device, fill):
        from ..kernels import optim_cuda

        return optim_cuda.managed_empty(numel, dtype, device).fill_(fill)

    def _copy_state(self, value, device):
        from ..kernels import optim_cuda

        flat = value.reshape(-1)
        if flat.numel() == 0:  # nothing to allocate; _validate_state reports the size mismatch
            return flat.to(device=device, copy=True)
        return optim_cuda.managed_empty(flat.numel(), flat.dtype, device).copy_(flat)


def _require_cuda(param, name: str) -> None:
    if param.device.type != "cuda":
        raise OptimizerError(
            f"PagedAdamW8bit pages optimizer state through CUDA unified memory and needs parameters on a CUDA "
            f"device; {name} is on {param.device}. On CPU use converter.optim.AdamW8bit, the same 8-bit AdamW "
            "with its state already in host memory"
        )
