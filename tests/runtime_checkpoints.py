"""Quantized checkpoints for the runtime tests, made without the converter pipeline.

`write_quantized` quantizes every nn.Linear of a model (lm_head excluded, like transformers' default)
with `converter.quantize` and writes bitsandbytes' keys with safetensors + config.json with
`quantization_config`; `write_bnb` makes the same kind of folder with transformers + bitsandbytes
(saved before any forward pass: FORMAT.md 3.4). `reference_model` is the oracle model whose linear
weights are the dequantized tensors.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

import converter
from converter.bnb import quantization_config

from shared_data import STORIES, TINYSTORIES  # noqa: F401 - re-exported to the tests


def tiny_llama(seed: int, *, hidden=72, inter=120, layers=2, heads=4, kv_heads=2, vocab=97, tied=False,
               dtype=torch.float32, bias=False):
    """A random LlamaForCausalLM with awkward sizes (blocks straddle rows when hidden % 64 != 0)."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=128,
        attention_bias=bias, mlp_bias=bias, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # default init is tiny (std 0.02): unit-gain weights make errors visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            elif p.dim() == 1 and bias:
                p.normal_(0, 0.1)
    rotary = {n: b.clone() for n, b in model.named_buffers()}
    model = model.to(dtype).eval()
    for name, value in rotary.items():  # transformers keeps rotary tables in float32 at any dtype
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value
    return model


def tiny_gpt2(seed: int, *, hidden=72, inner=120, layers=2, heads=4, vocab=97):
    """A random GPT2LMHeadModel (Conv1D layers, tied lm_head), unit-gain weights, float32."""
    import transformers

    config = transformers.GPT2Config(n_embd=hidden, n_inner=inner, n_layer=layers, n_head=heads, vocab_size=vocab,
                                     n_positions=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # Conv1D weights are (in, out): fan-in is dim 0; embeddings get unit rows
                p.normal_(0, (p.shape[0] if "wte" not in name and "wpe" not in name else p.shape[1]) ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def stories260k():
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def quantized_linears(model, skip=("lm_head",)):
    return [(name, m) for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in skip]


def write_quantized(model, folder, quant_type="nf4", *, blocksize=64, double_quant=True, compute_dtype="float32",
                    shards=1, threshold=6.0) -> str:
    """Quantize `model`'s linear weights and write a bnb-format checkpoint folder (1 or 2 shards)."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    quantized = dict(quantized_linears(model))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    for name, param in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if module_name in quantized and name.endswith(".weight"):
            qt = converter.quantize(param, quant_type, blocksize, double_quant)
            tensors.update(qt.state_dict(module_name + "."))
        elif name not in tied:
            tensors[name] = param.detach().clone().contiguous()
    names = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    else:  # split in the middle of the key list: one quantized module may straddle the two files
        half = len(names) // 2
        weight_map = {}
        for i, part in enumerate((names[:half], names[half:])):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: tensors[k] for k in part}, os.path.join(folder, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype, threshold=threshold)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return folder


def write_bnb(model, folder, tmp, **bnb_kwargs) -> str:
    """transformers + bitsandbytes: quantize `model` on load, save_pretrained before any forward."""
    import transformers

    src = os.path.join(tmp, "bnb_src")
    model.save_pretrained(src)
    qmodel = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=transformers.BitsAndBytesConfig(**bnb_kwargs), dtype=model.dtype,
        device_map="cpu",
    )
    qmodel.save_pretrained(folder)
    return folder


def write_bnb_functional(model, folder, quant_type="nf4", *, blocksize=64, double_quant=True,
                         compute_dtype="float32") -> str:
    """bitsandbytes' own quantize_4bit + QuantState.as_dict(packed=True) for every linear (how to get a
    bnb-written checkpoint at blocksizes transformers' BitsAndBytesConfig cannot ask for)."""
    import bitsandbytes.functional as bnbf

    os.makedirs(folder, exist_ok=True)
    quantized = dict(quantized_linears(model))
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    tensors = {}
    for name, param in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if module_name in quantized and name.endswith(".weight"):
            packed, state = bnbf.quantize_4bit(param.detach().contiguous(), blocksize=blocksize,
                                               compress_statistics=double_quant, quant_type=quant_type)
            tensors[name] = packed
            for key, value in state.as_dict(packed=True).items():
                tensors[f"{name}.{key}"] = value
        elif name not in tied:
            tensors[name] = param.detach().clone().contiguous()
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    cfg["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return folder


def reference_model(model, folder, compute_dtype):
    """`model` with each quantized linear replaced by the dequantized weight, computing like our layers:
    input cast to `compute_dtype`, F.linear, output cast back. The weights come from the checkpoint."""
    import copy

    from safetensors import safe_open

    from converter.bnb import quantized_prefixes
    from converter.tensor import QuantizedTensor

    ref = copy.deepcopy(model)
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors")]
    sd = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            sd.update({k: f.get_tensor(k) for k in f.keys()})
    for prefix in quantized_prefixes(sd):
        qt = QuantizedTensor.from_state_dict(sd, prefix)
        name = prefix[:-1]
        parent, _, child = name.rpartition(".")
        old = ref.get_submodule(name)
        setattr(ref.get_submodule(parent), child, _DequantLinear(qt.dequantize(compute_dtype), old.bias, compute_dtype))
    return ref.eval()


class _DequantLinear(nn.Module):
    def __init__(self, weight, bias, compute_dtype):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x):
        return nn.functional.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)
