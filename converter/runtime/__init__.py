"""Runtime for pre-quantized checkpoints: quantized linear modules, loader, QLoRA preparation.

Only the modules are imported eagerly (they need torch only); the loader pulls in transformers lazily.
"""
from .modules import Linear4bit, Linear8bit

__all__ = ["Linear4bit", "Linear8bit"]
