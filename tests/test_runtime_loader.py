"""load_quantized(): logits against the dequantized reference and against transformers + bitsandbytes,
greedy generation, re-saving, and clean one-line failures on broken checkpoints."""
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import converter
from converter.errors import ModelLoadError, SourceNotFoundError
from converter.runtime import Linear4bit, Linear8bit

from fakehub import fake_hub, no_network  # noqa: F401 - fixtures
from runtime_checkpoints import (STORIES, reference_model, stories260k, tiny_llama, write_bnb, write_bnb_functional,
                                 write_quantized)

# Stated tolerance on logits (max |Δ| / max |reference logit|): float32 compute agrees to float32
# rounding; bf16 compute differs where the fused small-batch kernel keeps float32 weights while the
# reference rounds them to bf16 (several layers of bf16 rounding). Measured over 150 random seeds of each
# bf16 case (fp4-128 / nf4-256): median 0.007 / 0.012, 99th percentile 0.012 / 0.019, worst 0.015 / 0.020;
# one CI run met 0.030 (seed 2759791649), where both models were 0.015 from the float32 model on the same
# weights, in opposite directions (ours against float32: at most 0.024 over 60 seeds). So 5e-2: two bf16
# computations, each within ~2.5% of float32, can differ by their sum.
LOGIT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def _assert_logits_close(a, b, dtype):
    scale = b.float().abs().max().item()
    err = (a.float() - b.float()).abs().max().item()
    assert err <= LOGIT_TOL[dtype] * scale, f"max |Δlogit| {err} > {LOGIT_TOL[dtype]} * {scale}"


def _same_bytes(a, b) -> bool:
    """Equal dtype, shape and bytes (packed codes stored as bf16 hold NaN patterns: torch.equal fails)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _read_all(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("quant_type,blocksize,dq,dtype,shards,tied", [
    ("nf4", 64, True, torch.float32, 1, False),
    ("fp4", 128, False, torch.bfloat16, 2, False),
    ("nf4", 256, False, torch.bfloat16, 1, True),
    ("fp4", 64, True, torch.float32, 2, True),
])
def test_logits_match_dequantized_reference(tmp_path, seed, quant_type, blocksize, dq, dtype, shards, tied):
    """Logits (decode-size and prefill-size inputs) equal a model whose linears hold the dequantized weights."""
    model = tiny_llama(seed, dtype=dtype, tied=tied, bias=quant_type == "fp4")
    folder = write_quantized(model, tmp_path / "q", quant_type, blocksize=blocksize, double_quant=dq,
                             compute_dtype=_DTYPE_NAMES[dtype], shards=shards)
    loaded = converter.load_quantized(folder)
    assert not loaded.training
    assert isinstance(loaded.model.layers[1].mlp.down_proj, Linear4bit)
    assert type(loaded.lm_head) is torch.nn.Linear  # not quantized in the checkpoint
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ref = reference_model(model, folder, dtype)
    gen = torch.Generator().manual_seed(seed)
    for shape in [(1, 1), (1, 6), (3, 19)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            _assert_logits_close(loaded(ids).logits, ref(ids).logits, dtype)


def test_int8_plain_path_matches_dequantized_reference(tmp_path, seed):
    """An int8 checkpoint with llm_int8_threshold 0 runs the plain dequantize path: equal to the reference."""
    model = tiny_llama(seed, bias=True)
    folder = write_quantized(model, tmp_path / "q", "int8", threshold=0.0)
    loaded = converter.load_quantized(folder)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, Linear8bit)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _assert_logits_close(loaded(ids).logits, reference_model(model, folder, torch.float32)(ids).logits,
                             torch.float32)


def test_greedy_generate_matches_reference(tmp_path, seed):
    """generate() with greedy decoding (fused decode path) gives the reference model's tokens."""
    model = tiny_llama(seed, layers=2)
    folder = write_quantized(model, tmp_path / "q", "nf4")
    loaded = converter.load_quantized(folder)
    ref = reference_model(model, folder, torch.float32)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert loaded.generate(prompt, **kwargs).tolist() == ref.generate(prompt, **kwargs).tolist()


_BNB_CASES = {
    "nf4-dq-64": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-64": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "nf4-dq-storage-bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_quant_storage=torch.bfloat16),
    "int8": dict(load_in_8bit=True),
}


@pytest.mark.bnb
@pytest.mark.parametrize("case", list(_BNB_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bnb_checkpoint_matches_bitsandbytes(tmp_path, seed, case, dtype):
    """A checkpoint saved by transformers + bitsandbytes loads without bnb and agrees with bnb's own
    forward (run with grad enabled: bnb's CPU no-grad path repacks into bf16 statistics, FORMAT.md 3.4);
    save_pretrained of our model gives the same tensors back."""
    pytest.importorskip("bitsandbytes")
    import transformers

    kwargs = dict(_BNB_CASES[case])
    if kwargs.get("load_in_4bit"):
        kwargs["bnb_4bit_compute_dtype"] = dtype
    model = tiny_llama(seed, hidden=128, inter=256, dtype=dtype)  # bnb's CPU path needs K % blocksize == 0
    folder = write_bnb(model, tmp_path / "bnb", tmp_path, **kwargs)
    loaded = converter.load_quantized(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    ref = reference_model(model, folder, dtype)
    gen = torch.Generator().manual_seed(seed)
    for shape in [(1, 4), (2, 13)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            ours = loaded(ids).logits
        with torch.enable_grad():
            bnb_logits = theirs(ids).logits.detach()
        _assert_logits_close(ours, bnb_logits, dtype)
        if case != "int8":  # LLM.int8 quantizes activations too; its oracle is bnb itself
            with torch.no_grad():
                _assert_logits_close(ours, ref(ids).logits, dtype)
    # save_pretrained of the loaded model writes the checkpoint's keys and bytes again (transformers
    # 5.24 cannot re-save a bnb model), and transformers + bitsandbytes loads the result.
    loaded.save_pretrained(tmp_path / "resaved")
    saved, resaved = _read_all(folder), _read_all(tmp_path / "resaved")
    assert set(resaved) == set(saved)
    for key, value in saved.items():
        assert _same_bytes(resaved[key], value), key
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", device_map="cpu")
    with torch.enable_grad():
        assert torch.equal(again(ids).logits, theirs(ids).logits)


@pytest.mark.bnb
@pytest.mark.parametrize("quant_type,blocksize,dq", [("nf4", 128, False), ("fp4", 128, True), ("nf4", 256, True)])
def test_bnb_functional_checkpoint_blocksizes(tmp_path, seed, quant_type, blocksize, dq):
    """Weights quantized by bitsandbytes itself at other blocksizes load and equal bnb's dequantization
    through the model (and awkward widths where blocks straddle rows)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    model = tiny_llama(seed, dtype=torch.bfloat16)
    folder = write_bnb_functional(model, tmp_path / "bnbf", quant_type, blocksize=blocksize, double_quant=dq,
                                  compute_dtype="bfloat16")
    loaded = converter.load_quantized(folder)
    layer = loaded.model.layers[0].mlp.down_proj
    qt = layer.quantized_weight()
    saved = _read_all(folder)
    prefix = "model.layers.0.mlp.down_proj.weight"
    state = bnbf.QuantState.from_dict({k[len(prefix) + 1:]: v for k, v in saved.items()
                                       if k.startswith(prefix + ".")}, device="cpu")
    theirs = bnbf.dequantize_4bit(saved[prefix], state)
    assert torch.equal(qt.dequantize(torch.bfloat16), theirs.reshape(qt.shape))
    ref = reference_model(model, folder, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        _assert_logits_close(loaded(ids).logits, ref(ids).logits, torch.bfloat16)
    assert set(loaded.state_dict()) == set(saved)


def test_resave_then_reload_round_trips(tmp_path, seed):
    """state_dict() of a loaded model, written with save_file next to the config, loads to identical logits."""
    model = tiny_llama(seed, tied=True)
    folder = write_quantized(model, tmp_path / "q", "nf4", shards=2)
    loaded = converter.load_quantized(folder)
    original = _read_all(folder)
    sd = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}  # tied, like transformers
    assert set(sd) == set(original)
    assert all(_same_bytes(sd[k], original[k]) for k in original)
    out = tmp_path / "resaved"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((tmp_path / "q" / "config.json").read_text())
    again = converter.load_quantized(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, loaded(ids).logits)


def test_dtype_override(tmp_path, seed):
    """dtype= sets the compute dtype of quantized layers and the dtype of the other float tensors."""
    model = tiny_llama(seed)
    folder = write_quantized(model, tmp_path / "q", "nf4", compute_dtype="float32")
    loaded = converter.load_quantized(folder, dtype=torch.bfloat16)
    assert loaded.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert loaded(ids).logits.dtype == torch.bfloat16
        # the same weights cast to bf16 (rotary tables kept float32, as transformers keeps them)
        ref = reference_model(tiny_llama(seed, dtype=torch.bfloat16), folder, torch.bfloat16)
        _assert_logits_close(loaded(ids).logits, ref(ids).logits, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU placement is covered by test_runtime_cuda.py")
def test_device_map_auto_on_cpu(tmp_path, seed):
    """device_map='auto' on a CPU-only machine keeps everything on the CPU with identical logits."""
    model = tiny_llama(seed)
    folder = write_quantized(model, tmp_path / "q", "nf4")
    auto = converter.load_quantized(folder, device_map="auto")
    assert {t.device.type for t in [*auto.parameters(), *auto.buffers()]} == {"cpu"}
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(auto(ids).logits, converter.load_quantized(folder)(ids).logits)


def test_loading_never_unpickles(tmp_path, seed, monkeypatch):
    """No pickle or torch.load is touched while loading."""
    folder = write_quantized(tiny_llama(seed), tmp_path / "q", "nf4")

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    converter.load_quantized(folder)


@pytest.fixture
def good_folder(tmp_path, seed):
    return write_quantized(tiny_llama(seed), tmp_path / "q", "nf4")


def _rewrite(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = _read_all(folder)
    edit(tensors)
    save_file(tensors, path)


def test_missing_tensor_is_named(good_folder):
    """A checkpoint without one norm weight fails with a one-line error naming it."""
    _rewrite(good_folder, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ModelLoadError, match=r"^model\.layers\.1\.post_attention_layernorm\.weight: missing"):
        converter.load_quantized(good_folder)


def test_missing_quant_state_piece_is_named(good_folder):
    """A quantized module lacking its nested absmax fails naming that tensor."""
    _rewrite(good_folder, lambda t: t.pop("model.layers.0.mlp.up_proj.weight.nested_absmax"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.weight\.nested_absmax"):
        converter.load_quantized(good_folder)


def test_extra_tensor_is_named(good_folder):
    """A tensor the model does not have is rejected by name."""
    _rewrite(good_folder, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"^model\.layers\.0\.extra\.weight: unexpected"):
        converter.load_quantized(good_folder)


def test_shape_mismatch_with_config_is_named(good_folder):
    """A config whose sizes disagree with the stored tensors fails naming the first mismatching tensor."""
    cfg_path = os.path.join(good_folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["intermediate_size"] += 8
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelLoadError, match=r"mlp\.(gate|up|down)_proj\.weight: quantized shape .* does not match"):
        converter.load_quantized(good_folder)


def test_unknown_quant_type_is_named(good_folder):
    """A quant-state key with an unknown type suffix fails naming the key."""
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(good_folder, lambda t: t.__setitem__(key.replace("nf4", "nf5"), t.pop(key)))
    with pytest.raises(ModelLoadError, match=r"bitsandbytes__nf5: unknown quant type 'nf5'"):
        converter.load_quantized(good_folder)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupted_file_fails_cleanly(good_folder, damage):
    """A truncated shard or a garbage header raises ModelLoadError naming the file (no crash, no pickle)."""
    path = os.path.join(good_folder, "model.safetensors")
    data = open(path, "rb").read()
    data = data[: len(data) - 100] if damage == "truncate" else data[:8] + b"{not json" + data[17:]
    open(path, "wb").write(data)
    with pytest.raises(ModelLoadError, match="model.safetensors: corrupted"):
        converter.load_quantized(good_folder)


def test_missing_folder_pieces(tmp_path):
    """A folder without config.json, or without weights, fails with one line naming what is missing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json: missing"):
        converter.load_quantized(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        converter.load_quantized(tmp_path / "empty")


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="needs ../shared/data/stories260K")
def test_end_to_end_convert_then_load(tmp_path):
    """`converter.convert` of stories260K (NF4+DQ) loads through our runtime and matches the reference."""
    pytest.importorskip("converter.pipeline")

    out = tmp_path / "nf4"
    converter.convert(STORIES, out, quant="nf4", double_quant=True, compute_dtype="float32", progress=False)
    loaded = converter.load_quantized(out)
    assert isinstance(loaded.model.layers[4].mlp.down_proj, Linear4bit)
    ref = reference_model(stories260k(), out, torch.float32)
    ids = torch.tensor([[1, 403, 407, 261, 378, 289, 1, 319]])
    with torch.no_grad():
        _assert_logits_close(loaded(ids).logits, ref(ids).logits, torch.float32)


def test_hub_repo_id_loads(fake_hub, tmp_path, seed):
    """A repo id (served by the loopback fake Hub) resolves to a snapshot and loads like the folder."""
    model = tiny_llama(seed)
    folder = write_quantized(model, tmp_path / "q", "nf4", shards=2)
    files = {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}
    fake_hub.add_repo("org/tiny-nf4", files)
    loaded = converter.load_quantized("org/tiny-nf4")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converter.load_quantized(folder)(ids).logits)
    with pytest.raises(SourceNotFoundError, match="org/missing"):
        converter.load_quantized("org/missing")


def _gpt2_reference(model, folder):
    """`model` with each Conv1D weight replaced by the checkpoint's dequantized (out, in) tensor
    transposed back to Conv1D's (in, out): the model the quantized checkpoint stands for."""
    import copy

    from converter.bnb import quantized_prefixes
    from converter.tensor import QuantizedTensor

    ref = copy.deepcopy(model)
    sd = _read_all(folder)
    prefixes = quantized_prefixes(sd)
    assert prefixes, "the converter quantized nothing"
    for prefix in prefixes:
        qt = QuantizedTensor.from_state_dict(sd, prefix)
        conv = ref.get_submodule(prefix[:-1])
        conv.weight = torch.nn.Parameter(qt.dequantize(torch.float32).t().contiguous(), requires_grad=False)
    return ref.eval()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_gpt2_conv1d_checkpoint_loads(tmp_path, seed, quant):
    """A GPT-2 converted by `converter.convert` (Conv1D weights transposed, then quantized) loads: every
    Conv1D becomes a quantized Linear (in = nx, out = nf) and the logits equal a GPT-2 whose Conv1D
    weights are the dequantized tensors transposed back."""
    pytest.importorskip("converter.pipeline")
    from runtime_checkpoints import tiny_gpt2

    model = tiny_gpt2(seed)
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    converter.convert(tmp_path / "src", out, quant=quant, compute_dtype="float32", progress=False)
    if quant == "int8":  # LLM.int8 quantizes activations too: compare the plain dequantize path here
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"]["llm_int8_threshold"] = 0.0
        (out / "config.json").write_text(json.dumps(cfg))
    loaded = converter.load_quantized(out)
    cls = Linear8bit if quant == "int8" else Linear4bit
    c_fc = loaded.transformer.h[1].mlp.c_fc
    assert isinstance(c_fc, cls) and (c_fc.in_features, c_fc.out_features) == (72, 120)
    attn = loaded.transformer.h[0].attn.c_attn
    assert isinstance(attn, cls) and (attn.in_features, attn.out_features) == (72, 216)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ref = _gpt2_reference(model, out)
    gen = torch.Generator().manual_seed(seed)
    for shape in [(1, 1), (1, 6), (3, 19)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            _assert_logits_close(loaded(ids).logits, ref(ids).logits, torch.float32)
    assert set(loaded.state_dict()) - {"lm_head.weight"} == set(_read_all(out))


@pytest.mark.bnb
@pytest.mark.parametrize("quant,dtype", [("nf4", "float32"), ("nf4", "bfloat16"), ("int8", "float32")])
def test_gpt2_conv1d_matches_bitsandbytes(tmp_path, seed, quant, dtype):
    """The same converted GPT-2 folder loaded by transformers + bitsandbytes (which also turns each
    Conv1D into a Linear over the (out, in) weight) gives our logits within the stated tolerance."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("converter.pipeline")
    import transformers
    from runtime_checkpoints import tiny_gpt2

    model = tiny_gpt2(seed, hidden=128, inner=256)  # bnb's CPU path needs K % blocksize == 0
    model.save_pretrained(tmp_path / "src")
    out = tmp_path / "q"
    converter.convert(tmp_path / "src", out, quant=quant, compute_dtype=dtype, progress=False)
    loaded = converter.load_quantized(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    for shape in [(1, 4), (2, 13)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            ours = loaded(ids).logits
        with torch.enable_grad():  # bnb's CPU no-grad path repacks the statistics (FORMAT.md 3.4)
            bnb_logits = theirs(ids).logits.detach()
        _assert_logits_close(ours, bnb_logits, torch_dtype)
