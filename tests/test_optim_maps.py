"""The 8-bit optimizer code maps (converter/optim/maps.py) against bitsandbytes' create_dynamic_map."""
import pytest
import torch

from converter.optim import maps


@pytest.mark.bnb
@pytest.mark.parametrize("signed", [True, False])
def test_maps_equal_bitsandbytes_bit_for_bit(signed):
    """Both maps are bitsandbytes' create_dynamic_map(signed=...) to the last bit."""
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    ours = maps.signed_map() if signed else maps.unsigned_map()
    theirs = bnb_functional.create_dynamic_map(signed=signed).to(torch.float32)
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))


def test_unsigned_map_shape():
    """256 strictly increasing values from exactly 0.0 to exactly 1.0 (what the kernel requires)."""
    code = maps.unsigned_map()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert bool((code[1:] > code[:-1]).all())
    assert code[0].item() == 0.0 and code[255].item() == 1.0


def test_maps_are_fresh_tensors():
    """Each call returns a new tensor, so a caller writing to one cannot change another's map."""
    a = maps.signed_map()
    a.zero_()
    assert maps.signed_map()[255].item() == 1.0
