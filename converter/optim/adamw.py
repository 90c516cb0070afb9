"""AdamW with blockwise 8-bit moments (the optimizer of QLoRA training), on the native CPU or CUDA kernel.

State per parameter of >= min_8bit_size elements (bitsandbytes' names, so the layout reads familiar):
  state1 / absmax1: first moment, uint8 codes of the signed dynamic map + one float32 absmax per 256
  state2 / absmax2: second moment, uint8 codes of the unsigned dynamic map + float32 absmax per 256
i.e. 2 + 8/256 = 2.03 bytes per parameter instead of AdamW's 8. Smaller tensors (biases, norms, small
LoRA adapters) keep float32 exp_avg / exp_avg_sq: quantizing them saves little and costs accuracy.
Every update is one fused native kernel: the CPU library's, one call per CPU parameter; the CUDA
extension's on the parameter's device (its current stream), a few multi-tensor launches per device and
step; the same bytes either way;
converter/optim/reference.py defines the arithmetic. A parameter's state lives on the parameter's device.
"""
from __future__ import annotations

import torch

from ..errors import OptimizerError
from . import maps
from .reference import BLOCKSIZE, AdamWScalars

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements after which collected CUDA parameters are launched without waiting for the rest of the step:
# ~0.1 ms of GPU work (16 bytes an element) against ~30 us of host time per launch.
_LAUNCH_ELEMENTS = 1 << 24
_STATE8 = ("state1", "absmax1", "state2", "absmax2")
_STATE32 = ("exp_avg", "exp_avg_sq")
_ZERO_CODE_SIGNED = 127  # signed map entry 127 is exactly 0.0 (FORMAT.md 2.2); unsigned entry 0 is 0.0


class AdamW8bit(torch.optim.Optimizer):
    """Drop-in for torch.optim.AdamW (same hyper-parameters and defaults) with 8-bit optimizer state.

    amsgrad, capturable and differentiable are not supported (a clear error); foreach and fused are
    accepted for signature compatibility and ignored: every update is one fused native kernel.
    `min_8bit_size`: parameters with fewer elements keep 32-bit state. `threads`: native worker count of
    the CPU kernel (default: QCKPT_THREADS, else every core this process may use).
    Parameters may be CPU or CUDA tensors, also mixed within a group: each parameter's state is kept on
    its own device (CUDA steps need the CUDA extension, `python native/ffi/build_cuda.py`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 min_8bit_size=4096, threads=None):
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise OptimizerError(f"invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise OptimizerError(f"invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise OptimizerError(f"invalid beta parameters: {tuple(betas)} (each must be in [0, 1))")
        if not 0.0 <= weight_decay:
            raise OptimizerError(f"invalid weight_decay value: {weight_decay}")
        if amsgrad:
            raise OptimizerError("AdamW8bit does not support amsgrad=True (its running maximum of the second "
                                 "moment would need a third state); use torch.optim.AdamW for AMSGrad")
        if capturable or differentiable:
            raise OptimizerError("AdamW8bit supports neither capturable=True nor differentiable=True")
        if int(min_8bit_size) < 1:
            raise OptimizerError(f"min_8bit_size must be >= 1, got {min_8bit_size}")
        self._threads = threads
        # The two code maps, built once per optimizer (constants; the kernel only reads them).
        self._m_map, self._v_map = maps.signed_map(), maps.unsigned_map()
        self._device_maps = {}  # torch.device -> (m_map, v_map) copies for the CUDA kernel
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=False,
                        maximize=maximize, min_8bit_size=int(min_8bit_size))
        super().__init__(params, defaults)

    # ---- one step ----

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        launches = {}  # CUDA devices -> their shared launch arguments for this step
        pending = {}  # (device, 8-bit?, param dtype, grad dtype) -> [elements, CUDA parameters stepped together]
        try:
            for gi, group in enumerate(self.param_groups):
                self._collect_group(gi, group, launches, pending)
        except BaseException:
            # parameters collected for a multi-tensor launch have had their step counted: step them too, so
            # that a caller who catches the error keeps consistent state; the first error is the one raised
            try:
                self._launch_pending(launches, pending)
            except Exception:  # noqa: BLE001
                pass
            raise
        self._launch_pending(launches, pending)
        return loss

    def _collect_group(self, gi, group, launches, pending) -> None:
        """Step (CPU) or collect for a launch (CUDA) every parameter of group gi that has a gradient."""
        if group.get("amsgrad"):
            raise OptimizerError(f"param group {gi}: AdamW8bit does not support amsgrad=True")
        beta1, beta2 = group["betas"]
        scalars_by_step = {}  # parameters of a group are usually on the same step: compute once
        for pi, param in enumerate(group["params"]):
            if param.grad is None or param.numel() == 0:
                continue
            name = _describe(gi, pi, param)
            grad = self._checked_grad(param, name)
            state = self.state[param]
            if not state:
                _init_state(param, state, group.get("min_8bit_size", self.defaults["min_8bit_size"]),
                            self._allocate_state)
            self._preflight(param, state, name)  # every check before the step is counted
            state["step"] += 1
            step = int(state["step"].item())
            if step not in scalars_by_step:
                scalars_by_step[step] = AdamWScalars.for_step(
                    lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=step, maximize=group.get("maximize", False),
                )
            self._update(param, grad, state, scalars_by_step[step], name, launches, pending)

    def _preflight(self, param, state, name) -> None:
        """Checks that must pass before a parameter's step is counted."""
        if param.device.type == "cuda" and next(v for k, v in state.items() if k != "step").device != param.device:
            raise OptimizerError(f"{name} is on {param.device} but its optimizer state is not (was the model moved "
                                 "after the first step? move it before creating the optimizer)")

    def _checked_grad(self, param, name):
        grad = param.grad
        if grad.is_sparse:
            raise OptimizerError(f"{name}: AdamW8bit does not support sparse gradients")
        if param.device.type not in ("cpu", "cuda"):
            raise OptimizerError(f"{name} is on {param.device}: AdamW8bit runs on CPU and CUDA devices")
        if param.dtype not in _PARAM_DTYPES or grad.dtype not in _PARAM_DTYPES:
            raise OptimizerError(f"{name}: parameter dtype {param.dtype} / gradient dtype {grad.dtype} not "
                                 "supported (float32, bfloat16 or float16)")
        if grad.device != param.device or grad.shape != param.shape:
            raise OptimizerError(f"{name}: gradient {tuple(grad.shape)} on {grad.device} does not match the "
                                 f"parameter {tuple(param.shape)} on {param.device}")
        return grad.contiguous()

    def _update(self, param, grad, state, scalars, name, launches, pending):
        # The kernel writes through the pointer: a non-contiguous parameter is stepped in a copy.
        target = param.data if param.data.is_contiguous() else param.data.contiguous()
        if param.device.type == "cuda":
            # The unchecked launches: this optimizer made the state (or validated it on load, including
            # its device), _checked_grad checked the gradient, and the C side checks its arguments.
            from ..kernels import optim_cuda

            device = param.device
            shared = launches.get(device)
            if shared is None:
                shared = launches[device] = optim_cuda.StepLaunches(device)
            self._before_cuda_update(param, state, shared)
            eight_bit = "state1" in state
            tensors = ((state["state1"], state["absmax1"], state["state2"], state["absmax2"]) if eight_bit
                       else (state["exp_avg"], state["exp_avg_sq"]))
            if optim_cuda.multi_eligible(eight_bit, target, grad, tensors):
                # stepped with other such parameters of the device in one launch (_launch_pending); a
                # batch goes as soon as it holds _LAUNCH_ELEMENTS, so the GPU works while Python goes on
                key = (device, eight_bit, target.dtype, grad.dtype)
                batch = pending.setdefault(key, [0, []])
                batch[0] += target.numel()
                batch[1].append((target, grad, tensors, scalars, param))
                if batch[0] >= _LAUNCH_ELEMENTS:
                    self._launch_pending(launches, {key: pending.pop(key)})
                return
            if eight_bit:
                m_map, v_map = self._maps_on(device)
                optim_cuda.launch_adamw8bit(shared, target, grad, *tensors[:2], m_map, *tensors[2:], v_map, scalars,
                                            BLOCKSIZE, name)
            else:
                optim_cuda.launch_adamw32(shared, target, grad, *tensors, scalars, name)
        else:
            from ..kernels import optim_cpu

            if "state1" in state:
                optim_cpu.adamw8bit_step(
                    target, grad, state["state1"], state["absmax1"], self._m_map, state["state2"],
                    state["absmax2"], self._v_map, scalars, blocksize=BLOCKSIZE, threads=self._threads,
                    name=name,
                )
            else:
                optim_cpu.adamw32_step(target, grad, state["exp_avg"], state["exp_avg_sq"], scalars,
                                       threads=self._threads, name=name)
        if target.data_ptr() != param.data.data_ptr():
            param.data.copy_(target)

    def _launch_pending(self, launches, pending) -> None:
        """Step the CUDA parameters _update collected: one launch per device, kind of state and dtype pair
        (per MULTI_MAX parameters), then copy back parameters that were stepped in a contiguous copy."""
        if not pending:
            return
        from ..kernels import optim_cuda

        for (device, eight_bit, _, _), (_, entries) in pending.items():
            maps = self._maps_on(device) if eight_bit else (None, None)
            for start in range(0, len(entries), optim_cuda.MULTI_MAX):
                chunk = [entry[:4] for entry in entries[start:start + optim_cuda.MULTI_MAX]]
                optim_cuda.launch_adamw_multi(launches[device], eight_bit, chunk, *maps)
            for target, _, _, _, param in entries:
                if target.data_ptr() != param.data.data_ptr():
                    param.data.copy_(target)

    def _before_cuda_update(self, param, state, launches) -> None:
        """Hook run before a CUDA parameter's step (PagedAdamW8bit prefetches its state here)."""

    def _maps_on(self, device: torch.device) -> tuple:
        """The code maps on a CUDA device, copied there (and checked) once."""
        maps_there = self._device_maps.get(device)
        if maps_there is None:
            from ..kernels import optim_cuda

            maps_there = self._device_maps[device] = optim_cuda.device_maps(self._m_map, self._v_map, device)
        return maps_there

    # ---- state memory (PagedAdamW8bit allocates it elsewhere) ----

    def _allocate_state(self, param, specs) -> list:
        """New 1-D state tensors on param's device, one per (numel, dtype, fill) of `specs`."""
        return [torch.full((numel,), fill, dtype=dtype, device=param.device) for numel, dtype, fill in specs]

    def _copy_state(self, value: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A loaded state tensor as this optimizer's own flat copy on `device`."""
        return value.reshape(-1).to(device=device, copy=True).contiguous()

    # ---- state_dict round trip ----

    def load_state_dict(self, state_dict):
        """As torch's, except that state tensors keep their dtype: torch would cast every floating-point
        state tensor to the parameter's dtype (absmax and 32-bit moments of a bf16 parameter to bf16).
        A torch.optim.AdamW state dict loads too: its moments continue as 32-bit state."""
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        saved = {pid: dict(values) for pid, values in state_dict["state"].items()}
        # torch would first convert every state tensor to its parameter's dtype and device (uint8 codes of
        # an fp32 parameter become float32: AdamW's memory, all at once); the state is filled in below
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            if pid not in saved:
                continue
            values = saved[pid]
            state = self.state[param]
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    if key == "step":
                        value = value.to(device="cpu", dtype=torch.float32, copy=True)
                    else:
                        value = self._copy_state(value.to(torch.float32) if key in _STATE32 else value, param.device)
                state[key] = value
            _validate_state(param, state, f"loaded state of parameter {pid} {tuple(param.shape)}")


def _describe(gi: int, pi: int, param) -> str:
    return f"param group {gi} parameter {pi} {tuple(param.shape)}"


def _init_state(param, state, min_8bit_size: int, allocate) -> None:
    """Zero moments, from `allocate(param, [(numel, dtype, fill), ...])` (AdamW8bit._allocate_state)."""
    n = param.numel()
    if n >= min_8bit_size:
        nb = -(-n // BLOCKSIZE)
        specs = [(n, torch.uint8, _ZERO_CODE_SIGNED), (nb, torch.float32, 0.0), (n, torch.uint8, 0),
                 (nb, torch.float32, 0.0)]
        made = dict(zip(_STATE8, allocate(param, specs)))
    else:
        made = dict(zip(_STATE32, allocate(param, [(n, torch.float32, 0.0), (n, torch.float32, 0.0)])))
    # all or nothing: a failed allocation (out of memory) leaves no half state behind for the next step
    state.update(step=torch.tensor(0.0, dtype=torch.float32), **made)


def _validate_state(param, state, where: str) -> None:
    n = param.numel()
    nb = -(-n // BLOCKSIZE)
    if "step" not in state:
        raise OptimizerError(f"{where}: no 'step' entry")
    if all(k in state for k in _STATE8):
        expected = {"state1": (torch.uint8, n), "state2": (torch.uint8, n),
                    "absmax1": (torch.float32, nb), "absmax2": (torch.float32, nb)}
    elif all(k in state for k in _STATE32):
        expected = {"exp_avg": (torch.float32, n), "exp_avg_sq": (torch.float32, n)}
    else:
        raise OptimizerError(f"{where}: expected either {list(_STATE8)} or {list(_STATE32)}, got {sorted(state)}")
    for key, (dtype, numel) in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.numel() != numel:
            got = f"{value.dtype} x {value.numel()}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise OptimizerError(f"{where}: '{key}' should be {dtype} x {numel}, got {got}")
        state[key] = value.reshape(-1).contiguous()


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by an optimizer's per-parameter state tensors (any torch optimizer)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
