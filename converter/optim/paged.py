"""PagedAdamW8bit: AdamW8bit whose state lives in CUDA unified memory (cudaMallocManaged), so that a spike
in activation memory pages optimizer state out to the host instead of failing with out-of-memory.

A parameter's state is one managed allocation (converter.kernels.optim_cuda.managed_empty), viewed as
ordinary CUDA tensors by torch. Before a parameter's step its state is prefetched to the parameter's device
on the current stream, so the kernel that follows finds it resident rather than faulting it in page by
page; when nothing pressed it out, the prefetch finds it there already. The step itself is AdamW8bit's
CUDA kernel: the same bytes as AdamW8bit on the same device. state_dict() copies the state to host
memory; load_state_dict() copies it back into managed memory (one allocation per tensor).
"""
from __future__ import annotations

import torch

from ..errors import OptimizerError
from .adamw import AdamW8bit


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit (same arguments) with its state in CUDA unified memory; every parameter must be on a
    CUDA device, and the CUDA extension built (`python native/ffi/build_cuda.py`)."""

    def __init__(self, params, *args, **kwargs):
        self._arenas = {}  # parameter -> the managed allocation holding all of its state
        super().__init__(params, *args, **kwargs)

    def state_dict(self):
        """As torch's, with every state tensor copied out of its parameter's shared allocation (torch.save
        refuses tensors of different dtypes viewing one storage) into host memory: a copy on the GPU could
        run out of device memory, which this optimizer exists to avoid. load_state_dict moves it back."""
        saved = super().state_dict()
        saved["state"] = {pid: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) and k != "step" else v
                                for k, v in values.items()}
                          for pid, values in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict):
        self._arenas.clear()  # loaded state comes in allocations of its own
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group):
        """As torch's (the constructor adds its groups through it too); CPU parameters are refused before
        the group is added, so a caught error leaves the optimizer as it was."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        gi = len(self.param_groups)
        for pi, param in enumerate(params):
            _require_cuda(param, f"param group {gi} parameter {pi} {tuple(param.shape)}")
        super().add_param_group({**param_group, "params": params})

    def _preflight(self, param, state, name):
        _require_cuda(param, name)
        super()._preflight(param, state, name)

    def _before_cuda_update(self, param, state, launches):
        # One prefetch for a parameter whose state shares one allocation (as _allocate_state makes it);
        # loaded state has one allocation per tensor. A prefetch of memory already on the device is cheap
        # on the GPU but costs a driver call on the host, hence one call per parameter, not per tensor.
        from ..kernels import optim_cuda

        arena = self._arenas.get(param)
        if arena is not None and arena.data_ptr() == state.get("state1", state.get("exp_avg")).data_ptr():
            optim_cuda.launch_prefetch(launches, arena)
            return
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                optim_cuda.launch_prefetch(launches, value)

    def _allocate_state(self, param, specs):
        """All of a parameter's state in one managed allocation (16-byte aligned pieces)."""
        from ..kernels import optim_cuda

        offsets, total = [], 0
        for numel, dtype, _ in specs:
            offsets.append(total)
            total += -(-numel * torch.empty((), dtype=dtype).element_size() // 16) * 16
        arena = optim_cuda.managed_empty(total, torch.uint8, param.device)
        self._arenas[param] = arena
        pieces = []
        for (numel, dtype, fill), offset in zip(specs, offsets):
            size = numel * torch.empty((), dtype=dtype).element_size()
            pieces.append(arena[offset:offset + size].view(dtype).fill_(fill))
        return pieces

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
