#!/usr/bin/env python
"""QLoRA fine-tuning of a small model through the qckpt runtime: convert to NF4, load, add LoRA, train.

    python scripts/qlora_finetune.py [--source ../shared/data/stories260K]
        [--text ../shared/data/tinystories_val.txt] [--steps 100] [--optim adamw|adamw8bit|paged_adamw8bit]

The source is converted to NF4 + double quant in a temporary folder (converter.convert; a plain
per-linear quantization when the pipeline is not installed), loaded with converter.load_quantized,
prepared with converter.prepare_for_qlora (frozen base, fp32 norms, gradient checkpointing) and
wrapped by peft LoRA on every projection. Prints the loss curve, held-out loss before/after, the
quantized bytes' integrity and peak memory (process RSS; CUDA allocator peak when on a GPU).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import converter  # noqa: E402
from eval_ppl import quantize_folder, token_windows  # noqa: E402

DATA = os.path.join(HERE, "..", "..", "shared", "data")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name in ("adamw8bit", "paged_adamw8bit"):
        from converter.errors import OptimizerError
        from converter.optim import AdamW8bit, PagedAdamW8bit

        try:  # the paged variant needs CUDA parameters: its error says so in one line
            return (AdamW8bit if name == "adamw8bit" else PagedAdamW8bit)(params, lr=lr)
        except OptimizerError as exc:
            raise SystemExit(f"error: --optim {name}: {exc}") from None
    raise SystemExit(f"error: unknown optimizer {name!r} (expected adamw, adamw8bit or paged_adamw8bit)")


def quantized_digest(model) -> str:
    h = hashlib.sha256()
    for name, buf in sorted(model.named_buffers()):
        if "proj" in name:
            h.update(buf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def mean_loss(model, batches) -> float:
    losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    return sum(losses) / len(losses)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=os.path.join(DATA, "stories260K"))
    parser.add_argument("--text", default=os.path.join(DATA, "tinystories_val.txt"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--optim", default="adamw", choices=["adamw", "adamw8bit", "paged_adamw8bit"])
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    torch.manual_seed(args.seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.source)
    with open(args.text, encoding="utf-8") as f:
        windows = token_windows(tokenizer, f.read(), args.seq + 1)
    windows = [w[: args.seq] for w in windows if len(w) >= args.seq]
    held_out = torch.stack(windows[: args.batch * 2]).to(args.device).split(args.batch)
    train = torch.stack(windows[args.batch * 2:])
    print(f"{len(train)} training windows of {args.seq} tokens, {len(held_out)} held-out batches")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = quantize_folder(args.source, os.path.join(tmp, "nf4"), "nf4", True)
        model = converter.load_quantized(folder, device=args.device, dtype=getattr(torch, args.compute_dtype))
        print(f"converted + loaded NF4 in {time.perf_counter() - t0:.1f} s")
    model = converter.prepare_for_qlora(model, gradient_checkpointing=not args.no_gradient_checkpointing)
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                       target_modules=TARGETS))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    print(f"trainable parameters: {trainable} of {total} stored elements")
    digest = quantized_digest(model)
    before = mean_loss(model.eval(), held_out)
    optimizer = make_optimizer(args.optim, [p for p in model.parameters() if p.requires_grad], args.lr)

    model.train()
    print("\nstep  loss")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(train), (args.batch,), generator=gen)
        batch = train[idx].to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"{step:4d}  {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    after = mean_loss(model.eval(), held_out)

    print(f"\nheld-out loss: {before:.4f} -> {after:.4f}")
    print(f"training: {args.steps} steps in {seconds:.1f} s ({seconds / args.steps * 1e3:.0f} ms/step), "
          f"optimizer {args.optim}")
    print(f"quantized weights unchanged: {quantized_digest(model) == digest}")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")
    if args.device.startswith("cuda"):
        print(f"peak CUDA allocated: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
