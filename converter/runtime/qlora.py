"""prepare_for_qlora(): make a loaded quantized model ready for LoRA adapters (what peft's
`prepare_model_for_kbit_training` does for bitsandbytes models, for our Linear4bit/Linear8bit).

After it, `peft.get_peft_model(model, LoraConfig(target_modules=[...]))` wraps our layers (they are
nn.Linear subclasses, so peft's default dispatcher makes them `lora.Linear`), and only adapters train.
"""
from __future__ import annotations

import torch
from torch import nn

from .modules import Linear4bit, Linear8bit

_HALF = (torch.float16, torch.bfloat16)


def prepare_for_qlora(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze every base parameter, keep the non-quantized half-precision parameters (norms, embeddings,
    lm_head) in float32 for stable training, make the embedding output require grad (so gradients reach
    the adapters through checkpointed blocks whose inputs are otherwise all frozen), and turn on
    gradient checkpointing (non-reentrant). Quantized weights are buffers and never change. Returns
    `model` (modified in place)."""
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        quantized = isinstance(module, (Linear4bit, Linear8bit))
        for name, param in list(module._parameters.items()):
            # A quantized layer's bias stays in its compute dtype (it is added inside the matmul).
            if param is None or quantized or param.dtype not in _HALF:
                continue
            module._parameters[name] = nn.Parameter(param.data.to(torch.float32), requires_grad=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the cast above made new Parameters: re-share lm_head with the embedding
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    return model
