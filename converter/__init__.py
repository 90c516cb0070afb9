"""qckpt: convert Hugging Face checkpoints to bitsandbytes-compatible 4-bit/8-bit safetensors.

Importing this package loads no native library, queries no GPU and touches no network: the names
below resolve lazily on first access.
"""
from ._version import __version__

_EXPORTS = {
    "quantize": ("tensor", "quantize"),
    "dequantize": ("tensor", "dequantize"),
    "QuantizedTensor": ("tensor", "QuantizedTensor"),
    "QuantType": ("formats.codebooks", "QuantType"),
    "convert": ("pipeline", "convert"),
    "Report": ("report", "Report"),
    "load_quantized": ("runtime.loader", "load_quantized"),
    "prepare_for_qlora": ("runtime.qlora", "prepare_for_qlora"),
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'converter' has no attribute {name!r}")
    import importlib

    module_name, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module_name}", __name__), attr)
    globals()[name] = value
    return value
