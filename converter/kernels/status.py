"""Native status codes (qckpt.h's qckpt_status, shared by the CPU and CUDA libraries) -> Python exceptions."""
from __future__ import annotations

from ..errors import NativeError, QuantizationInputError

# QCKPT_E_INVALID, QCKPT_E_NONFINITE: the caller's data is at fault, not the library.
INPUT_ERRORS = (1, 2)


def raise_for_status(status: int, message: str, name: str = "") -> None:
    """Do nothing for QCKPT_OK; otherwise raise with the library's message, prefixed by the tensor name."""
    if status == 0:
        return
    where = f"{name}: " if name else ""
    if status in INPUT_ERRORS:
        raise QuantizationInputError(where + message)
    raise NativeError(f"{where}{message} (status {status})")
