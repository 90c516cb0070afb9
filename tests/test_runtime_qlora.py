"""QLoRA on stories260K loaded as NF4 through our runtime: peft adapters train, the base stays frozen."""
import hashlib
import os

import pytest
import torch

import converter

from runtime_checkpoints import STORIES, TINYSTORIES, stories260k, write_quantized
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: run this module on one torch thread (see conftest.one_torch_thread)."""


def _digest(model):
    """sha256 of every quantized buffer (packed codes, absmax, nested state)."""
    return {name: hashlib.sha256(buf.cpu().numpy().tobytes()).hexdigest() for name, buf in model.named_buffers()
            if "proj" in name}


def _batch(seq=48, rows=2):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    with open(TINYSTORIES, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(20_000), add_special_tokens=False)
    return torch.tensor(ids[: seq * rows]).reshape(rows, seq)


def _peft_model(folder, seed):
    torch.manual_seed(seed)
    model = converter.prepare_for_qlora(converter.load_quantized(folder), gradient_checkpointing=True)
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return peft.get_peft_model(model, config)


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="needs ../shared/data/stories260K")
def test_qlora_trains_adapters_only(tmp_path, seed):
    """30 AdamW steps lower the loss; only adapters get gradients; the NF4 bytes are unchanged; gradient
    checkpointing gives the same gradients as a plain backward; adapters save and reload with peft."""
    folder = write_quantized(stories260k(), tmp_path / "nf4", "nf4", compute_dtype="float32")
    model = _peft_model(folder, seed)
    assert model.base_model.model.is_gradient_checkpointing
    from converter.runtime import Linear4bit

    wrapped = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(wrapped, peft.tuners.lora.Linear) and isinstance(wrapped.base_layer, Linear4bit)
    before = _digest(model)
    assert before
    batch = _batch()
    model.train()

    # One backward with checkpointing, one without: identical adapter gradients.
    model(input_ids=batch, labels=batch).loss.backward()
    with_gc = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert with_gc and all("lora_" in n for n in with_gc)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(with_gc)
    model.zero_grad(set_to_none=True)
    model.base_model.model.gradient_checkpointing_disable()
    model(input_ids=batch, labels=batch).loss.backward()
    for name, grad in with_gc.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    assert _digest(model) == before

    model.eval()
    with torch.no_grad():
        trained_logits = model(input_ids=batch[:1, :16]).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = converter.load_quantized(folder)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch[:1, :16]).logits, trained_logits, rtol=1e-5, atol=1e-5)


def test_prepare_for_qlora_bf16_model(tmp_path, seed):
    """On a bf16 checkpoint: every base parameter frozen, half-precision norms/embeddings made float32,
    tied lm_head still shared, quantized layers keep their bf16 compute dtype, input grads enabled."""
    from runtime_checkpoints import tiny_llama

    folder = write_quantized(tiny_llama(seed, dtype=torch.bfloat16, tied=True), tmp_path / "q", "nf4",
                             compute_dtype="bfloat16")
    model = converter.prepare_for_qlora(converter.load_quantized(folder), gradient_checkpointing=False)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    hidden = model.model.embed_tokens(ids)
    assert hidden.requires_grad  # enable_input_require_grads: checkpointed blocks see a grad-requiring input
