"""Linear4bit / Linear8bit against references: the dequantized weight with F.linear, and bitsandbytes."""
import pytest
import torch
import torch.nn.functional as F

import converter
from converter.errors import ModelLoadError
from converter.runtime import Linear4bit, Linear8bit
from converter.runtime import functional as rf

# Stated tolerances (max |y - y_ref| relative to max |y_ref|): the fused CPU kernel multiplies float32
# weights and accumulates in float32 in another order than torch, then rounds once to the compute
# dtype; the reference rounds the weight to the compute dtype first.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _close(y, ref, dtype):
    scale = ref.abs().max().item() or 1.0
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max error {err} > {REL_TOL[dtype]} * {scale}"


@pytest.mark.parametrize("quant_type,blocksize,dq", [("nf4", 64, True), ("fp4", 128, False), ("nf4", 32, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_matches_dequantized_reference(quant_type, blocksize, dq, dtype, gen, awkward):
    """Fused (few rows) and dequantize+matmul (many rows) paths equal F.linear on the dequantized weight."""
    n_out, k = 37, 100  # blocks straddle rows
    qt = converter.quantize(awkward((n_out, k), torch.float32, blocksize, gen), quant_type, blocksize, dq)
    bias = torch.randn(n_out, generator=gen)
    module = Linear4bit.from_quantized(qt, bias, compute_dtype=dtype)
    weight = qt.dequantize(dtype)
    for shape in [(1, k), (3, 2, k), (5, 13, k)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        with torch.no_grad():
            y = module(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], n_out)
        _close(y, F.linear(x, weight, bias.to(dtype)), dtype)


def test_linear4bit_large_batch_path_is_exact(gen):
    """Above the fused threshold the output is bit-identical to F.linear on the dequantized weight."""
    qt = converter.quantize(torch.randn(64, 96, generator=gen), "nf4", 64, True)
    module = Linear4bit.from_quantized(qt, compute_dtype=torch.bfloat16)
    x = torch.randn(rf.FUSED_MAX_ROWS + 5, 96, generator=gen).bfloat16()
    with torch.no_grad():
        assert torch.equal(module(x), F.linear(x, qt.dequantize(torch.bfloat16)))


def test_linear4bit_output_in_input_dtype(gen):
    """A float32 input through a bf16-compute layer comes back float32 (bitsandbytes' convention)."""
    qt = converter.quantize(torch.randn(16, 64, generator=gen), "nf4")
    module = Linear4bit.from_quantized(qt, compute_dtype=torch.bfloat16)
    assert module(torch.randn(2, 64, generator=gen)).dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 9])
def test_linear4bit_backward_gives_input_grad_only(rows, gen):
    """Autograd through the quantized weight: grad wrt x equals grad_y @ W_dequant; bias grad is the sum."""
    qt = converter.quantize(torch.randn(24, 80, generator=gen), "fp4", 64, True)
    bias = torch.randn(24, generator=gen)
    module = Linear4bit.from_quantized(qt, bias, compute_dtype=torch.float32)
    module.bias.requires_grad_(True)
    x = torch.randn(rows, 80, generator=gen, requires_grad=True)
    g = torch.randn(rows, 24, generator=gen)
    module(x).backward(g)
    torch.testing.assert_close(x.grad, g @ qt.dequantize(torch.float32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.bias.grad, g.sum(0))
    assert all(b.grad is None for b in module.buffers())


def test_linear4bit_state_dict_round_trip(gen):
    """state_dict() gives bitsandbytes' keys, bytes equal to QuantizedTensor.state_dict; load restores it."""
    qt = converter.quantize(torch.randn(40, 72, generator=gen).bfloat16(), "nf4", 64, True)
    bias = torch.randn(40, generator=gen).bfloat16()
    module = Linear4bit.from_quantized(qt, bias)
    sd = module.state_dict()
    expected = qt.state_dict()
    assert list(sd) == ["weight", "bias", *[k for k in expected if k != "weight"]]
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    fresh = Linear4bit(72, 40, True, compute_dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 72, generator=gen).bfloat16()
    with torch.no_grad():
        assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("dq", [True, False])
def test_linear4bit_dtype_cast_keeps_quant_state(dq, gen):
    """module.to(torch.bfloat16) / .half() move nothing but the bias: the float32 absmax and nested
    statistics keep their bytes, so the output is unchanged."""
    qt = converter.quantize(torch.randn(24, 64, generator=gen), "nf4", 64, dq)
    module = Linear4bit.from_quantized(qt, torch.randn(24, generator=gen), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in module.state_dict().items() if k != "bias"}
    x = torch.randn(3, 64, generator=gen)
    with torch.no_grad():
        y = module(x)
        module.to(torch.bfloat16)
        module.half()
        after = module.state_dict()
        assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
        torch.testing.assert_close(module(x), y, rtol=1e-2, atol=1e-2)  # only the bias lost precision


def test_linear4bit_load_rejects_wrong_shape(gen):
    """A quantized weight whose shape differs from the module's features is refused, naming the tensor."""
    sd = Linear4bit.from_quantized(converter.quantize(torch.randn(8, 64, generator=gen), "nf4")).state_dict()
    with pytest.raises(RuntimeError, match="weight: quantized shape"):
        Linear4bit(64, 16, False).load_state_dict(sd)
    with pytest.raises(ModelLoadError, match="does not match"):
        Linear4bit(64, 16, False).set_quantized(converter.quantize(torch.randn(8, 64, generator=gen), "nf4"))


def _bnb_linear8bit(weight, bias, threshold):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias is not None, has_fp16_weights=False,
                                threshold=threshold)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return layer.to("cpu").eval()


@pytest.mark.bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear8bit_matches_bitsandbytes_llm_int8(dtype, gen):
    """LLM.int8 (threshold 6, outlier columns) equals bitsandbytes' Linear8bitLt bit for bit on CPU."""
    w = torch.randn(48, 90, generator=gen).to(torch.float16)
    bias = torch.randn(48, generator=gen).to(dtype)
    ref = _bnb_linear8bit(w, bias, 6.0)
    qt = converter.quantize(w, "int8")
    assert torch.equal(qt.data, ref.weight.data) and torch.equal(qt.scb, ref.weight.SCB)
    ours = Linear8bit.from_quantized(qt, bias, compute_dtype=dtype, threshold=6.0)
    for rows in (1, 7):
        x = (torch.randn(rows, 90, generator=gen) * 2).to(dtype)
        x[0, 5] = 9.0  # an outlier column
        with torch.no_grad():
            assert torch.equal(ours(x), ref(x))


def test_linear8bit_plain_path_is_dequantized_matmul(gen):
    """threshold 0 is the plain path: F.linear with the dequantized int8 weight."""
    qt = converter.quantize(torch.randn(20, 33, generator=gen), "int8")
    module = Linear8bit.from_quantized(qt, compute_dtype=torch.float32, threshold=0.0)
    x = torch.randn(4, 33, generator=gen) * 10
    with torch.no_grad():
        assert torch.equal(module(x), F.linear(x, qt.dequantize(torch.float32)))


def test_linear8bit_backward_uses_dequantized_weight(gen):
    """Through an LLM.int8 layer the input gradient is grad_y @ dequant(W), as bitsandbytes computes it."""
    qt = converter.quantize(torch.randn(20, 33, generator=gen), "int8")
    module = Linear8bit.from_quantized(qt, compute_dtype=torch.float32, threshold=6.0)
    x = torch.randn(4, 33, generator=gen, requires_grad=True)
    g = torch.randn(4, 20, generator=gen)
    module(x).backward(g)
    torch.testing.assert_close(x.grad, g @ qt.dequantize(torch.float32))


def test_linear8bit_state_dict_keys(gen):
    """Linear8bit writes weight, bias, SCB, weight_format like bitsandbytes, and reloads them."""
    qt = converter.quantize(torch.randn(12, 30, generator=gen), "int8")
    module = Linear8bit.from_quantized(qt, torch.randn(12, generator=gen))
    sd = module.state_dict()
    assert list(sd) == ["weight", "bias", "SCB", "weight_format"]
    assert sd["weight"].dtype == torch.int8 and int(sd["weight_format"]) == 0
    fresh = Linear8bit(30, 12, True)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, qt.data) and torch.equal(fresh.SCB, qt.scb)


def test_peft_wraps_linear4bit(gen):
    """peft's default dispatcher turns our Linear4bit into lora.Linear; only adapter weights train."""
    peft = pytest.importorskip("peft")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            qt = converter.quantize(torch.randn(32, 64, generator=gen), "nf4")
            # peft needs at least one base parameter to find the model's device: the bias.
            self.proj = Linear4bit.from_quantized(qt, torch.zeros(32), compute_dtype=torch.float32)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    assert isinstance(model.base_model.model.proj, peft.tuners.lora.Linear)
    x = torch.randn(3, 64, generator=gen)
    model(x).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
