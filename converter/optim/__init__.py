"""8-bit optimizers for QLoRA training: AdamW with blockwise 8-bit moments on CPU or CUDA parameters (see
adamw.py), and PagedAdamW8bit, the same with its state in CUDA unified memory (paged.py).

Importing this package loads nothing native; the CPU library or the CUDA extension loads on the first step.
"""
from .adamw import AdamW8bit, state_nbytes
from .paged import PagedAdamW8bit

__all__ = ["AdamW8bit", "PagedAdamW8bit", "state_nbytes"]
