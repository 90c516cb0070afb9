"""Bitwise tensor comparison shared by the parity tests (torch.equal treats -0.0 == 0.0 and NaN != NaN)."""
import torch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when dtype, shape and every bit agree (compared on the CPU)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(view), b.view(view)
    return torch.equal(a, b)
