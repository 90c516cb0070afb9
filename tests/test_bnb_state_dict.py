"""Our bitsandbytes serialization (converter.bnb.state_dict) against bitsandbytes itself: identical keys,
dtypes, shapes and JSON; our state dicts load in bitsandbytes and theirs load in ours; malformed state
dicts fail with the key named."""
import json
import warnings

import pytest
import torch

from converter import QuantizedTensor, quantize
from converter.bnb.state_dict import quantized_prefixes
from converter.errors import StateDictError
from bits import same_bits

bnb = pytest.importorskip("bitsandbytes")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as F

pytestmark = pytest.mark.bnb

PREFIX = "model.layers.0.mlp.up_proj."




def equal_but_fp4_zero_sign(ours, theirs, quant_type) -> bool:
    """Bit-identical, except that FP4 code 8 decodes to -0.0 in ours (the CUDA LUT) and +0.0 in bnb's
    AVX-512 CPU LUT (FORMAT.md 1.1): only zeros may differ, and only in sign."""
    if quant_type == "nf4":
        return same_bits(ours, theirs)
    view = torch.int32 if ours.dtype == torch.float32 else torch.int16
    differ = ours.view(view) != theirs.view(view)
    return torch.equal(ours, theirs) and bool(torch.all(ours[differ] == 0))


def bnb_linear4bit_state_dict(w, quant_type, blocksize, double_quant, storage=torch.uint8, bias=None):
    """state_dict of a bitsandbytes Linear4bit holding w, quantized by bitsandbytes on CPU."""
    n, k = w.shape
    module = bnb.nn.Linear4bit(k, n, bias=bias is not None, compress_statistics=double_quant, quant_type=quant_type,
                               quant_storage=storage)
    module.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant, quant_type=quant_type,
                                      blocksize=blocksize, quant_storage=storage)._quantize("cpu")
    if bias is not None:
        module.bias = torch.nn.Parameter(bias, requires_grad=False)
    return module.state_dict(), module


def blob_json(sd, key) -> str:
    return bytes(sd[key].tolist()).decode("utf-8")


def strip(sd: dict, prefix: str) -> dict:
    """QuantState.from_dict wants the keys after `weight.` (FORMAT.md 3.3)."""
    return {k[len(prefix) + len("weight."):]: v for k, v in sd.items() if k.startswith(prefix + "weight.")}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_state_dict_layout_equals_linear4bit(quant_type, double_quant, dtype, gen):
    """Keys (in order), dtypes, shapes and the quant-state JSON equal a bitsandbytes Linear4bit's state dict;
    NF4 tensors (full blocks, no zero block) are byte-identical too."""
    w = torch.randn(48, 128, generator=gen).to(dtype)
    theirs, _ = bnb_linear4bit_state_dict(w, quant_type, 64, double_quant)
    ours = quantize(w, quant_type, blocksize=64, double_quant=double_quant).state_dict()
    theirs = {k: v for k, v in theirs.items() if k != "bias"}
    assert list(ours) == list(theirs)
    qs_key = f"weight.quant_state.bitsandbytes__{quant_type}"
    for key in ours:  # the JSON blob's length varies with the digits of nested_offset: compared below
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape or (key == qs_key and double_quant), key
    ours_json, theirs_json = json.loads(blob_json(ours, qs_key)), json.loads(blob_json(theirs, qs_key))
    assert list(ours_json) == list(theirs_json)
    if double_quant:  # the offset is a float32 mean whose summation order differs (FORMAT.md section 0)
        ours_offset, theirs_offset = ours_json.pop("nested_offset"), theirs_json.pop("nested_offset")
        assert abs(ours_offset - theirs_offset) <= 2 * abs(theirs_offset) * 2**-23
    assert ours_json == theirs_json
    assert same_bits(ours["weight.quant_map"], theirs["weight.quant_map"])
    if double_quant:
        assert same_bits(ours["weight.nested_quant_map"], theirs["weight.nested_quant_map"])
    if quant_type == "nf4":
        assert torch.equal(ours["weight"], theirs["weight"])
        if not double_quant:
            assert same_bits(ours["weight.absmax"], theirs["weight.absmax"])


def test_quant_state_json_text_is_byte_identical(gen):
    """The JSON blob uses json.dumps' default separators and bnb's key order: same bytes as bnb's as_dict."""
    w = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    _, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    qt = quantize(w, "nf4", blocksize=64)
    ours = qt.state_dict()["weight.quant_state.bitsandbytes__nf4"]
    # Put bnb's offset into our text (offsets may differ by an ulp) and compare the full bytes.
    theirs_text = bytes(theirs.tolist()).decode()
    ours_text = bytes(ours.tolist()).decode().replace(repr(qt.nested.offset), repr(float(state.offset)))
    assert ours_text == theirs_text
    assert ours.dtype == torch.uint8 and ours.dim() == 1


def test_fp4_quant_map_is_bnb_python_table(gen):
    """The stored FP4 quant_map is bnb's Python table (+0.0 at code 8), bit for bit, although our
    dequantization LUT keeps CUDA's -0.0 there (FORMAT.md 1.1)."""
    w = torch.randn(8, 64, generator=gen)
    qt = quantize(w, "fp4", double_quant=False)
    theirs = F.quantize_4bit(w, blocksize=64, quant_type="fp4")[1].as_dict(packed=True)["quant_map"]
    assert same_bits(qt.state_dict()["weight.quant_map"], theirs)
    minus_zero = torch.tensor([-0.0])
    block = torch.cat([torch.tensor([1.0, -1e-6]), torch.zeros(62)])
    assert same_bits(quantize(block, "fp4", double_quant=False).dequantize()[1:2], minus_zero)


# Shapes where bitsandbytes' CPU dequantize is correct: last dim a multiple of the blocksize, odd last dim
# (torch fallback), blocksize >= 2048 (torch fallback). FORMAT.md 1.5 documents its AVX-512 bug otherwise.
SAFE_SHAPES = [((64, 128), 64), ((33, 256), 128), ((5, 37), 32), ((9, 101), 64), ((3, 4096), 4096), ((4, 3001), 2048)]


@pytest.mark.parametrize("shape,blocksize", SAFE_SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_our_state_dict_loads_in_bitsandbytes(shape, blocksize, quant_type, double_quant, dtype, gen, awkward):
    """QuantState.from_dict(our keys) + F.dequantize_4bit gives bit-identical values to our dequantize()."""
    w = awkward(shape, dtype, blocksize, gen)
    qt = quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)
    sd = qt.state_dict(PREFIX)
    state = F.QuantState.from_dict(strip(sd, PREFIX), device="cpu")
    assert state.dtype == dtype and tuple(state.shape) == shape and state.blocksize == blocksize
    theirs = F.dequantize_4bit(sd[PREFIX + "weight"], state)
    assert equal_but_fp4_zero_sign(qt.dequantize(), theirs, quant_type)


def test_bnb_avx512_dequant_bug_is_not_ours(gen):
    """For a last dim that is a multiple of 16 but not of the blocksize, our dequantize follows FORMAT.md 1.5
    (flat block index) even where bitsandbytes' CPU AVX-512 path indexes absmax per row."""
    w = torch.randn(4, 96, generator=gen)
    qt = quantize(w, "nf4", blocksize=64, double_quant=False)
    codes = torch.stack([qt.data.reshape(-1) >> 4, qt.data.reshape(-1) & 15], 1).reshape(-1).long()
    lut = F.get_4bit_type("nf4", device="cpu").to(torch.float32)
    manual = lut[codes] * qt.absmax.repeat_interleave(64)
    assert same_bits(qt.dequantize().reshape(-1), manual)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32, torch.int8])
def test_bitsandbytes_state_dict_loads_in_ours(quant_type, double_quant, storage, gen):
    """A Linear4bit state dict written by bitsandbytes (any quant_storage, with a prefix and a bias) loads
    through QuantizedTensor.from_state_dict, dequantizes equal to bnb and re-serializes to the same tensors."""
    w = torch.randn(40, 128, generator=gen).to(torch.bfloat16)
    bias = torch.randn(40, generator=gen).to(torch.bfloat16)
    theirs, module = bnb_linear4bit_state_dict(w, quant_type, 64, double_quant, storage, bias)
    sd = {PREFIX + k: v for k, v in theirs.items()}
    sd["model.norm.weight"] = torch.ones(128)  # unrelated keys are ignored
    assert quantized_prefixes(sd) == {PREFIX: quant_type}
    qt = QuantizedTensor.from_state_dict(sd, PREFIX)
    assert qt.storage_dtype == storage and qt.shape == (40, 128) and qt.dtype == torch.bfloat16
    want = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    assert equal_but_fp4_zero_sign(qt.dequantize(), want, quant_type)
    again = qt.state_dict(PREFIX)
    for key, value in again.items():
        assert same_bits(value, sd[key]), key
    assert set(again) == set(sd) - {PREFIX + "bias", "model.norm.weight"}


@pytest.mark.parametrize("double_quant", [True, False])
def test_as_dict_packed_loads_in_ours(double_quant, gen):
    """F.quantize_4bit's QuantState.as_dict(packed=True) + the packed weight load through ours, equal values."""
    w = torch.randn(3, 999, generator=gen).to(torch.float16)
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=double_quant)
    sd = {"weight": packed, **{"weight." + k: v for k, v in state.as_dict(packed=True).items()}}
    qt = QuantizedTensor.from_state_dict(sd)
    assert same_bits(qt.dequantize(), F.dequantize_4bit(packed, state))


def test_int8_state_dict_equals_linear8bitlt(gen):
    """int8: keys weight/SCB/weight_format with bnb's dtypes, shapes and values (fp16 input); loads back."""
    w = torch.randn(24, 96, generator=gen).to(torch.float16)
    module = bnb.nn.Linear8bitLt(96, 24, bias=False, has_fp16_weights=False)
    module.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    theirs = module.to("cpu").state_dict()
    ours = quantize(w, "int8").state_dict()
    assert list(ours) == list(theirs) == ["weight", "SCB", "weight_format"]
    for key in ours:
        assert same_bits(ours[key], theirs[key]), key
    back = QuantizedTensor.from_state_dict({PREFIX + k: v for k, v in theirs.items()}, PREFIX)
    assert torch.equal(back.data, theirs["weight"]) and same_bits(back.scb, theirs["SCB"])
    assert quantized_prefixes({PREFIX + k: v for k, v in theirs.items()}) == {PREFIX: "int8"}


def _good_nested_sd(gen):
    return quantize(torch.randn(8, 64, generator=gen), "nf4").state_dict(PREFIX)


def _set_json(sd, **changes):
    key = PREFIX + "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()).decode())
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    sd[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize(
    "mutate,pattern",
    [
        (lambda sd: sd.pop(PREFIX + "weight.absmax"), r"missing tensor '.*up_proj\.weight\.absmax'"),
        (lambda sd: sd.pop(PREFIX + "weight.quant_state.bitsandbytes__nf4"), r"up_proj\.weight: expected exactly one"),
        (lambda sd: sd.__setitem__(PREFIX + "weight.absmax", torch.zeros(2, dtype=torch.float32)),
         r"weight\.absmax: dtype torch\.float32, expected torch\.uint8"),
        (lambda sd: sd.__setitem__(PREFIX + "weight.nested_absmax", torch.zeros(3)),
         r"weight\.nested_absmax: shape \[3\], expected \[1\]"),
        (lambda sd: sd.__setitem__(PREFIX + "weight", torch.zeros(7, 1, dtype=torch.uint8)),
         r"up_proj\.weight: 7 packed bytes do not fit shape \[8, 64\]"),
        (lambda sd: _set_json(sd, bogus=1), r"unknown quant state fields \['bogus'\]"),
        (lambda sd: _set_json(sd, dtype="float64"), r"unsupported dtype 'float64'"),
        (lambda sd: _set_json(sd, blocksize=48), r"invalid blocksize 48"),
        (lambda sd: _set_json(sd, shape=None), r"lacks 'shape'"),
        (lambda sd: _set_json(sd, nested_offset="x"), r"invalid nested_offset 'x'"),
        (lambda sd: sd.__setitem__(PREFIX + "weight.quant_state.bitsandbytes__nf4",
                                   torch.tensor(list(b"{not json"), dtype=torch.uint8)), r"not valid JSON"),
    ],
)
def test_malformed_state_dicts_name_the_key(mutate, pattern, gen):
    """Each broken invariant raises StateDictError (a ValueError) naming the offending key or field."""
    sd = _good_nested_sd(gen)
    mutate(sd)
    with pytest.raises(StateDictError, match=pattern):
        QuantizedTensor.from_state_dict(sd, PREFIX)


def test_malformed_int8_state_dicts():
    """int8: a non-int8 weight, a wrong SCB shape and a non-row weight_format are refused by key."""
    good = quantize(torch.randn(4, 8), "int8").state_dict(PREFIX)
    for key, value, pattern in [
        ("weight", torch.zeros(4, 8), r"int8 weight must be a 2-D int8 tensor"),
        ("SCB", torch.zeros(5), r"SCB: shape \[5\], expected \[4\]"),
        ("weight_format", torch.tensor(1, dtype=torch.uint8), r"weight_format: only the row-major format"),
    ]:
        sd = dict(good)
        sd[PREFIX + key] = value
        with pytest.raises(StateDictError, match=pattern):
            QuantizedTensor.from_state_dict(sd, PREFIX)


def test_transformers_saved_checkpoint_loads_in_ours(tmp_path, seed):
    """A tiny Llama quantized by transformers + bitsandbytes (NF4, double quant) and saved with
    save_pretrained: every quantized tensor loads through ours and dequantizes like bnb's module, and our
    own quantization of the source weight gives the same NF4 bytes (full blocks)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    source = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "src")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=bnb_config,
                                                                  dtype=torch.bfloat16)
        model.save_pretrained(tmp_path / "q")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    prefixes = quantized_prefixes(sd)
    assert len(prefixes) == 7 and set(prefixes.values()) == {"nf4"}
    for prefix in prefixes:
        qt = QuantizedTensor.from_state_dict(sd, prefix)
        weight = model.get_submodule(prefix[:-1]).weight
        assert same_bits(qt.dequantize(), F.dequantize_4bit(weight.data, weight.quant_state)), prefix
        ours = quantize(source.get_submodule(prefix[:-1]).weight.detach(), "nf4", blocksize=64)
        assert torch.equal(ours.data, sd[prefix + "weight"]), prefix
        assert ours.state_dict(prefix).keys() == {k for k in sd if k.startswith(prefix + "weight")}
