"""Codebooks, the QuantType enum and the pure-torch reference arithmetic. Imports nothing of ours."""
from .codebooks import BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, QuantType

__all__ = ["BLOCKSIZES_4BIT", "NESTED_BLOCKSIZE", "QuantType"]
