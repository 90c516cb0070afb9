"""The public API: converter.quantize / dequantize / QuantizedTensor, against the reference arithmetic,
with its input checks, immutability and thread settings."""
import dataclasses
import json
import math

import pytest
import torch

import converter
from converter import QuantizedTensor, dequantize, quantize
from converter.errors import QuantizationInputError
from converter.formats import reference as ref
from converter.formats.codebooks import QuantType
from bits import same_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]




def reference_4bit(x, quant_type, blocksize, double_quant, dtype):
    """(packed, absmax used for dequantization, nested tuple or None, dequantized) by the reference alone."""
    packed, absmax = ref.quantize_4bit(x, quant_type, blocksize)
    nested = None
    if double_quant:
        codes, nested_absmax, offset = ref.double_quantize(absmax)
        nested = (codes, nested_absmax, offset)
        absmax = ref.dequantize_absmax(codes, nested_absmax, offset)
    out = ref.dequantize_4bit(packed, absmax, quant_type, blocksize, tuple(x.shape), dtype)
    return packed, absmax, nested, out


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_4bit_equals_reference(quant_type, dtype, blocksize, double_quant, gen, awkward):
    """quantize() and .dequantize() give the reference bytes, nested state and values (odd sizes, zero block)."""
    shape = (int(torch.randint(1, 9, (1,), generator=gen)) * 2 + 1, blocksize + 7)
    if blocksize == 4096:
        shape = (3, 3001)
    x = awkward(shape, dtype, blocksize, gen)
    qt = quantize(x, quant_type, blocksize=blocksize, double_quant=double_quant, threads=2)
    packed, absmax, nested, out = reference_4bit(x, quant_type, blocksize, double_quant, dtype)
    assert qt.quant_type is QuantType(quant_type) and qt.shape == shape and qt.dtype == dtype
    assert qt.blocksize == blocksize and qt.double_quant is double_quant
    assert same_bits(qt.data, packed)
    if double_quant:
        assert qt.absmax is None
        assert torch.equal(qt.nested.codes, nested[0]) and same_bits(qt.nested.absmax, nested[1])
        assert math.copysign(1, qt.nested.offset) == math.copysign(1, nested[2]) and qt.nested.offset == nested[2]
        assert qt.nested.blocksize == 256 and qt.nested.dtype == torch.float32
    else:
        assert qt.nested is None
    assert same_bits(qt.block_absmax(), absmax)
    assert same_bits(qt.dequantize(), out)
    assert same_bits(dequantize(qt), out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_int8_equals_reference(dtype, gen):
    """int8 quantize() gives the reference codes and SCB; dequantize() returns the source dtype by default."""
    x = (torch.randn(19, 301, generator=gen) * 3).to(dtype)
    qt = quantize(x, "int8")
    q, scb = ref.quantize_int8_rowwise(x)
    assert qt.quant_type is QuantType.INT8 and qt.blocksize is None and qt.nested is None
    assert torch.equal(qt.data, q) and same_bits(qt.scb, scb)
    assert same_bits(qt.dequantize(), ref.dequantize_int8_rowwise(q, scb, dtype))
    assert qt.dequantize().dtype == dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_dequantize_output_dtypes(quant_type, gen):
    """dequantize(dtype=...) gives each float dtype exactly as the float32 result cast once; others refused."""
    x = torch.randn(6, 70, generator=gen).to(torch.bfloat16)
    qt = quantize(x, quant_type, blocksize=32)
    full = qt.dequantize(torch.float32)
    assert full.shape == (6, 70)
    for dtype in DTYPES:
        out = dequantize(qt, dtype)
        assert out.dtype == dtype and out.shape == (6, 70)
        assert same_bits(out, full.to(dtype))
    for bad in (torch.float64, torch.int8, torch.uint8):
        with pytest.raises(QuantizationInputError, match=f"unsupported output dtype {bad}"):
            qt.dequantize(bad)


NAME = "model.layers.3.mlp.down_proj.weight"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_input_names_tensor_and_index(quant_type, bad, gen):
    """NaN/inf raise QuantizationInputError with the tensor name and flat index; the input is untouched."""
    x = torch.randn(4, 33, generator=gen).to(torch.bfloat16)
    x[2, 5] = bad
    keep = x.clone()
    kind = "NaN" if math.isnan(bad) else "inf"
    with pytest.raises(QuantizationInputError, match=rf"^{NAME}: {kind} at flat index 71\b"):
        quantize(x, quant_type, name=NAME)
    assert same_bits(x, keep)


@pytest.mark.parametrize(
    "make,kwargs,pattern",
    [
        (lambda: torch.ones(4, 64, dtype=torch.float64), {}, r"unsupported dtype torch\.float64 in {name}"),
        (lambda: torch.ones(4, 64, dtype=torch.int32), {}, r"unsupported dtype torch\.int32 in {name}"),
        (lambda: torch.ones(0, 64), {}, r"empty tensor in {name} \(shape \[0, 64\]\)"),
        (lambda: torch.ones(4, 64), {"blocksize": 48}, r"unsupported blocksize 48 in {name}"),
        (lambda: torch.ones(4, 64), {"blocksize": 8192}, r"unsupported blocksize 8192 in {name}"),
        (lambda: torch.ones(4, 64), {"blocksize": 16}, r"unsupported blocksize 16 in {name}"),
        (lambda: torch.ones(64), {"quant_type": "int8"}, r"2-D weight in {name}, got shape \[64\]"),
        (lambda: torch.ones(2, 3, 4), {"quant_type": "int8"}, r"2-D weight in {name}, got shape \[2, 3, 4\]"),
        (lambda: [1.0, 2.0], {}, r"expected a torch\.Tensor in {name}, got list"),
        (lambda: torch.ones(4, 64), {"quant_type": "nf3"}, r"unknown quant type 'nf3'"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(make, kwargs, pattern):
    """Each unusable input raises QuantizationInputError (a ValueError) whose message names the tensor."""
    with pytest.raises(QuantizationInputError, match=pattern.format(name=NAME.replace(".", r"\."))):
        quantize(make(), name=NAME, **kwargs)
    assert issubclass(QuantizationInputError, ValueError)


def test_noncontiguous_and_requires_grad_inputs_are_not_mutated(gen):
    """Strided views and leaf tensors needing grad quantize like their contiguous copies; nothing is modified."""
    base = torch.randn(48, 80, generator=gen).to(torch.float16)
    keep = base.clone()
    for view in (base.t(), base[:, ::2], base[5:40:3]):
        assert not view.is_contiguous()
        for quant_type in ("nf4", "fp4", "int8"):
            got = quantize(view, quant_type, blocksize=32)
            want = quantize(view.contiguous(), quant_type, blocksize=32)
            assert got.shape == tuple(view.shape)
            assert torch.equal(got.data, want.data)
    assert same_bits(base, keep)
    leaf = torch.randn(8, 64, generator=gen, requires_grad=True)
    qt = quantize(leaf)
    assert not qt.data.requires_grad and leaf.grad is None
    assert torch.equal(qt.data, quantize(leaf.detach()).data)


def test_threads_argument_and_environment(monkeypatch, gen, awkward):
    """threads=1/2/3 and QCKPT_THREADS give identical bytes; invalid values are refused by name."""
    x = awkward((101, 1537), torch.bfloat16, 64, gen)
    want = quantize(x, threads=1)
    for th in (2, 3):
        got = quantize(x, threads=th)
        assert torch.equal(got.data, want.data) and torch.equal(got.nested.codes, want.nested.codes)
        assert same_bits(got.dequantize(threads=th), want.dequantize(threads=1))
    monkeypatch.setenv("QCKPT_THREADS", "2")
    assert torch.equal(quantize(x).data, want.data)
    monkeypatch.setenv("QCKPT_THREADS", "-3")
    with pytest.raises(QuantizationInputError, match="QCKPT_THREADS must be a positive integer, got '-3'"):
        quantize(x)
    with pytest.raises(QuantizationInputError, match="threads must be a positive integer, got 0"):
        quantize(x, threads=0)


def test_quantized_tensor_is_immutable_and_deterministic(gen):
    """QuantizedTensor is frozen; quantizing the same input twice gives identical bytes."""
    x = torch.randn(16, 96, generator=gen)
    a, b = quantize(x), quantize(x)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.blocksize = 128
    assert torch.equal(a.data, b.data) and torch.equal(a.nested.codes, b.nested.codes)
    assert a.nested.offset == b.nested.offset


def test_properties_and_sizes(gen):
    """numel, quant_map, nbytes and to() report what the state dict holds."""
    x = torch.randn(10, 100, generator=gen).to(torch.bfloat16)
    qt = quantize(x, "nf4", blocksize=64)
    nb = math.ceil(1000 / 64)
    assert qt.numel == 1000 and qt.device.type == "cpu"
    assert torch.equal(qt.quant_map, ref.lut_4bit("nf4"))
    blob = len(json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [10, 100],
                           "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": qt.nested.offset}))
    assert qt.nbytes() == 500 + nb + 16 * 4 + 4 + 256 * 4 + blob
    plain = quantize(x, "fp4", double_quant=False)
    blob = len('{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [10, 100]}')
    assert plain.nbytes() == 500 + nb * 4 + 16 * 4 + blob
    assert quantize(x, "int8").nbytes() == 1000 + 10 * 4 + 1 and quantize(x, "int8").quant_map is None
    moved = qt.to("cpu")
    assert torch.equal(moved.data, qt.data) and torch.equal(moved.nested.codes, qt.nested.codes)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("int8", False)])
def test_state_dict_round_trip(quant_type, double_quant, gen):
    """from_state_dict(state_dict(prefix)) rebuilds a tensor that dequantizes to identical bits."""
    x = torch.randn(12, 77, generator=gen).to(torch.float16)
    qt = quantize(x, quant_type, blocksize=128, double_quant=double_quant)
    sd = qt.state_dict("model.layers.0.self_attn.q_proj.")
    back = QuantizedTensor.from_state_dict(sd, "model.layers.0.self_attn.q_proj.")
    assert back.shape == qt.shape and back.quant_type is qt.quant_type
    assert same_bits(back.dequantize(torch.float32), qt.dequantize(torch.float32))
    if quant_type != "int8":
        assert back.dtype == torch.float16 and back.blocksize == 128 and back.double_quant is double_quant


def test_package_import_is_lazy():
    """converter exposes quantize/dequantize/QuantizedTensor lazily and refuses unknown names."""
    assert converter.quantize is quantize and converter.QuantizedTensor is QuantizedTensor
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        converter.nope  # noqa: B018


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "meta", "no-such-device"])
def test_unavailable_or_unknown_device_is_an_input_error(device):
    """Asking for CUDA without a GPU, or for a device we cannot run on, is one clear QuantizationInputError."""
    with pytest.raises(QuantizationInputError, match="device"):
        quantize(torch.randn(64, 64), device=device)
