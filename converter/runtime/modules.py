"""Linear4bit / Linear8bit: nn.Linear look-alikes that hold a quantized weight (no bitsandbytes).

They subclass nn.Linear so that peft (which dispatches on module type) wraps them with its LoRA
`Linear`, and transformers treats them as linear layers; but nn.Linear.__init__ is not run: `weight` is
a frozen *buffer* holding the packed codes exactly as bitsandbytes stores them (uint8 nibbles, or int8
rows), and the other pieces of the quantized state are buffers too, so `.to()`, accelerate's
dispatch and `named_buffers()` all see them. `state_dict()` writes bitsandbytes' keys byte for byte
(FORMAT.md 3.1, 4.2), and `load_state_dict()` reads them back.
"""
from __future__ import annotations

import torch
from torch import nn

from ..bnb.state_dict import from_bnb_state_dict
from ..errors import ModelLoadError, StateDictError
from ..formats.codebooks import QuantType
from ..tensor import NestedAbsmax, QuantizedTensor
from . import functional as rf

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(dtype, what):
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what} must be float32, float16 or bfloat16, got {dtype}")


class _QuantizedLinear(nn.Linear):
    """Shared plumbing: shape bookkeeping, bias, the quantized buffers and (de)serialization."""

    _BUFFERS: tuple = ()

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype=torch.float32,
                 device=None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no dense weight is ever allocated
        _check_dtype(compute_dtype, "compute_dtype")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.compute_dtype = compute_dtype
        self.qt_meta: dict = {}
        for name in self._BUFFERS:
            self.register_buffer(name, None, persistent=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # nn.Linear.reset_parameters would try to initialise a dense weight.
    def reset_parameters(self) -> None:
        pass

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() cast every floating buffer; the quantization state (float32
        # absmax, nested statistics, code maps) must keep its dtype and bits, so only the device follows.
        saved = {name: self._buffers.pop(name) for name in self._BUFFERS if name in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in saved.items():
                if buf is not None:
                    moved = fn(buf)
                    buf = moved if moved.dtype == buf.dtype else buf.to(moved.device)
                self._buffers[name] = buf
        return self

    @classmethod
    def _build(cls, qt: QuantizedTensor, bias, compute_dtype, kwargs) -> "_QuantizedLinear":
        """A module of qt's shape holding qt, with `bias` (if any) frozen in the compute dtype."""
        n_out, k = qt.shape
        module = cls(k, n_out, bias is not None, compute_dtype=compute_dtype, device=qt.device, **kwargs)
        module.set_quantized(qt)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().to(module.compute_dtype).clone(), requires_grad=False)
        return module

    @property
    def is_loaded(self) -> bool:
        return self.weight is not None and self.weight.device.type != "meta"

    def set_quantized(self, qt: QuantizedTensor, name: str = "") -> None:
        """Install a quantized weight as this module's buffers (they stay on the tensor's device)."""
        if tuple(qt.shape) != (self.out_features, self.in_features):
            raise ModelLoadError(
                f"{name or 'weight'}: quantized shape {list(qt.shape)} does not match the model's "
                f"[{self.out_features}, {self.in_features}]"
            )
        self._install(qt)

    def quantized_weight(self) -> QuantizedTensor:
        if not self.is_loaded:
            raise RuntimeError(f"{type(self).__name__} has no quantized weight loaded")
        return self._rebuild()

    def extra_repr(self) -> str:
        kind = self.qt_meta.get("quant_type", "?")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant={getattr(kind, 'value', kind)}, compute_dtype={self.compute_dtype}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.quantized_weight().state_dict(prefix)
        # bitsandbytes' emission order: weight, bias, then the quant state (FORMAT.md 3.1, 4.2).
        weight_key = prefix + "weight"
        destination[weight_key] = sd.pop(weight_key)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(sd)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = {k: v for k, v in state_dict.items() if k.startswith(prefix) and self._owns(k[len(prefix):])}
        if not ours:  # a partial state dict (e.g. peft loading adapters only): report, keep what we hold
            missing_keys.append(prefix + "weight")
            if self.bias is not None and prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            return
        try:
            qt = from_bnb_state_dict(ours, prefix)
        except StateDictError as exc:
            error_msgs.append(str(exc))
            return
        if qt.quant_type not in self._QUANT_TYPES:
            error_msgs.append(f"{prefix}weight: a {qt.quant_type.value} weight cannot load into {type(self).__name__}")
            return
        try:
            self.set_quantized(qt, prefix + "weight")
        except ModelLoadError as exc:
            error_msgs.append(str(exc))
            return
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key not in state_dict:
                missing_keys.append(bias_key)
            else:
                value = state_dict[bias_key]
                if tuple(value.shape) != (self.out_features,):
                    error_msgs.append(f"{bias_key}: shape {list(value.shape)}, expected [{self.out_features}]")
                else:
                    with torch.no_grad():
                        self.bias = nn.Parameter(value.to(self.compute_dtype).to(self.weight.device).clone(),
                                                 requires_grad=self.bias.requires_grad)
        if strict:  # a leaf module: every other key under its prefix is unexpected
            for key in state_dict:
                if key.startswith(prefix) and key != bias_key and not self._owns(key[len(prefix):]):
                    unexpected_keys.append(key)


class Linear4bit(_QuantizedLinear):
    """A linear layer over an NF4/FP4 weight: y = x @ dequant(W)^T + b, computed in `compute_dtype`
    (input cast to it, output cast back to the input dtype, as bitsandbytes does)."""

    _BUFFERS = ("weight", "absmax", "nested_absmax", "nested_quant_map")
    _QUANT_TYPES = (QuantType.NF4, QuantType.FP4)

    def __init__(self, in_features, out_features, bias=True, *, compute_dtype=torch.float32, device=None,
                 workspace: rf.Workspace | None = None, fused_max_rows: int = rf.FUSED_MAX_ROWS):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device)
        # A plain attribute, not a submodule or buffer: shared scratch, never serialized or moved.
        self.__dict__["workspace"] = workspace if workspace is not None else rf.Workspace()
        self.fused_max_rows = fused_max_rows

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, *, compute_dtype=None, **kwargs):
        """A module around an existing QuantizedTensor (compute dtype defaults to its source dtype)."""
        if not qt.quant_type.is_4bit:
            raise ValueError(f"Linear4bit needs an nf4/fp4 weight, got {qt.quant_type.value}")
        return cls._build(qt, bias, compute_dtype or qt.dtype, kwargs)

    @staticmethod
    def _owns(suffix: str) -> bool:
        return suffix == "weight" or suffix.startswith("weight.")

    def _install(self, qt: QuantizedTensor) -> None:
        if not qt.quant_type.is_4bit:
            raise ModelLoadError(f"Linear4bit cannot hold a {qt.quant_type.value} weight")
        self.weight = qt.data
        if qt.nested is not None:
            self.absmax = qt.nested.codes
            self.nested_absmax = qt.nested.absmax
            self.nested_quant_map = qt.nested.code
        else:
            self.absmax = qt.absmax
            self.nested_absmax = self.nested_quant_map = None
        self.qt_meta = {
            "quant_type": qt.quant_type, "shape": tuple(qt.shape), "dtype": qt.dtype, "blocksize": qt.blocksize,
            "storage_dtype": qt.storage_dtype,
            "nested": None if qt.nested is None else (qt.nested.offset, qt.nested.blocksize, qt.nested.dtype),
        }

    def _rebuild(self) -> QuantizedTensor:
        m = self.qt_meta
        nested = absmax = None
        if m["nested"] is not None:
            offset, nbs, ndtype = m["nested"]
            nested = NestedAbsmax(codes=self.absmax, absmax=self.nested_absmax, offset=offset,
                                  code=self.nested_quant_map, blocksize=nbs, dtype=ndtype)
        else:
            absmax = self.absmax
        return QuantizedTensor(m["quant_type"], m["shape"], m["dtype"], self.weight, blocksize=m["blocksize"],
                               absmax=absmax, nested=nested, storage_dtype=m["storage_dtype"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qt = self.quantized_weight()
        inp_dtype = x.dtype
        workspace = self.workspace
        rows = self.fused_max_rows

        def fwd(xc, bias):
            return rf.matmul_4bit(xc, qt, bias, workspace=workspace, fused_max_rows=rows)

        y = rf.quantized_linear(x.to(self.compute_dtype), self.bias, fwd, qt, workspace)
        return y.to(inp_dtype)


class Linear8bit(_QuantizedLinear):
    """A linear layer over a row-wise int8 weight (LLM.int8 checkpoint format).

    threshold > 0 (the config's `llm_int8_threshold`, default 6.0) runs bitsandbytes' LLM.int8 outlier
    decomposition; threshold 0 dequantizes the weight to the compute dtype and multiplies."""

    _BUFFERS = ("weight", "SCB")
    _QUANT_TYPES = (QuantType.INT8,)

    def __init__(self, in_features, out_features, bias=True, *, compute_dtype=torch.float32, device=None,
                 threshold: float = 6.0):
        super().__init__(in_features, out_features, bias, compute_dtype=compute_dtype, device=device)
        self.threshold = float(threshold)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, *, compute_dtype=torch.float32,
                       **kwargs):
        if qt.quant_type is not QuantType.INT8:
            raise ValueError(f"Linear8bit needs an int8 weight, got {qt.quant_type.value}")
        return cls._build(qt, bias, compute_dtype, kwargs)

    @staticmethod
    def _owns(suffix: str) -> bool:
        return suffix in ("weight", "SCB", "weight_format")

    def _install(self, qt: QuantizedTensor) -> None:
        if qt.quant_type is not QuantType.INT8:
            raise ModelLoadError(f"Linear8bit cannot hold a {qt.quant_type.value} weight")
        self.weight = qt.data
        self.SCB = qt.scb
        self.qt_meta = {"quant_type": qt.quant_type, "shape": tuple(qt.shape), "dtype": qt.dtype}

    def _rebuild(self) -> QuantizedTensor:
        m = self.qt_meta
        return QuantizedTensor(QuantType.INT8, m["shape"], m["dtype"], self.weight, scb=self.SCB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qt = self.quantized_weight()
        inp_dtype = x.dtype
        threshold = self.threshold

        def fwd(xc, bias):
            return rf.matmul_int8(xc, qt, bias, threshold=threshold)

        y = rf.quantized_linear(x.to(self.compute_dtype), self.bias, fwd, qt, None)
        return y.to(inp_dtype)

