#!/usr/bin/env python
"""Write a synthetic Llama-shaped bf16 checkpoint of about SIZE_GB (random weights, real config.json,
sharded with an index) for benchmarks, streaming one tensor at a time.

    python scripts/make_synthetic_checkpoint.py OUT [--size-gb 1.5] [--shards 3] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def llama_shape(size_gb: float) -> dict:
    """Hidden 2048 / intermediate 5632 / vocab 32000; the layer count sets the size (bf16)."""
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "vocab_size": vocab, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 16}


def tensor_specs(shape: dict) -> list:
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        specs += [(p + f"self_attn.{k}_proj.weight", (h, h)) for k in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i))]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from transformers import LlamaConfig

    from converter.shards import ShardWriter
    from converter.shards.index import INDEX_NAME, index_json, shard_name

    shape = llama_shape(args.size_gb)
    specs = tensor_specs(shape)
    total = sum(2 * torch.Size(s).numel() for _, s in specs)
    per_shard = total / args.shards
    os.makedirs(args.out, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, shard, used, writer = {}, 0, 0, None
    for name, s in specs:
        nbytes = 2 * torch.Size(s).numel()
        if writer is None or (used + nbytes > per_shard * 1.02 and shard < args.shards - 1):
            if writer is not None:
                writer.commit()
                shard += 1
            writer, used = ShardWriter(os.path.join(args.out, shard_name(shard, args.shards))), 0
        if len(s) == 1:
            t = torch.ones(s, dtype=torch.bfloat16)
        else:
            t = (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, t)
        weight_map[name] = shard_name(shard, args.shards)
        used += nbytes
    writer.commit()
    n_files = shard + 1
    if n_files != args.shards:  # rename to the real count
        for i in range(n_files):
            os.replace(os.path.join(args.out, shard_name(i, args.shards)), os.path.join(args.out, shard_name(i, n_files)))
        weight_map = {k: shard_name(int(v.split("-")[1]) - 1, n_files) for k, v in weight_map.items()}
    if n_files > 1:
        with open(os.path.join(args.out, INDEX_NAME), "w") as f:
            f.write(index_json(weight_map, total))
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, max_position_embeddings=2048)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(args.out)
    print(json.dumps({"out": args.out, "bytes": total, "layers": shape["num_hidden_layers"], "shards": n_files}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
