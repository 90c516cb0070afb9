"""8-bit optimizers for QLoRA training: AdamW with blockwise 8-bit moments (see adamw.py).

Importing this package loads nothing native; the CPU kernel loads on the first step.
"""
from .adamw import AdamW8bit, state_nbytes
from .paged import PagedAdamW8bit

__all__ = ["AdamW8bit", "PagedAdamW8bit", "state_nbytes"]
