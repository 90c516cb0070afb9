#!/usr/bin/env python
"""Perplexity of a causal LM, full precision and quantized through the qckpt runtime, in one table.

    python scripts/eval_ppl.py ../shared/data/stories260K ../shared/data/tinystories_val.txt

MODEL is a full-precision checkpoint folder; each quantized row converts it into a temporary folder
(`converter.convert`, or a plain per-linear quantization when the pipeline is not installed) and loads
it with `converter.load_quantized`. The last row is bitsandbytes' fake-quant reference (its
quantize_4bit/dequantize_4bit applied to every linear weight), when bitsandbytes is installed.
Text: stories separated by blank lines, each BOS + tokens, concatenated, cut into 512-token windows;
perplexity = exp(total NLL / predicted tokens). fp32 stories260K on tinystories_val.txt gives 5.354.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import converter  # noqa: E402

# (label, quant, double_quant); compute in float32 so rows differ only by the weight format.
QUANT_ROWS = [("NF4", "nf4", False), ("NF4+DQ", "nf4", True), ("FP4", "fp4", False), ("INT8", "int8", False)]


def token_windows(tokenizer, text: str, window: int = 512, bos: int | None = None, max_stories: int | None = None):
    """Stories (blank-line separated) -> BOS + tokens each, concatenated, cut into `window`-token pieces."""
    bos = tokenizer.bos_token_id if bos is None else bos
    stories = [s.strip() for s in text.split("\n\n") if s.strip()]
    if max_stories:
        stories = stories[:max_stories]
    ids = []
    for story in stories:
        ids.append(bos)
        ids.extend(tokenizer.encode(story, add_special_tokens=False))
    return [torch.tensor(ids[i:i + window]) for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]


@torch.no_grad()
def perplexity(model, windows) -> float:
    nll, count = 0.0, 0
    for w in windows:
        ids = w.unsqueeze(0)
        loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def quantize_folder(source: str, output: str, quant: str, double_quant: bool) -> str:
    """A quantized copy of `source` (compute dtype float32): the converter pipeline when present."""
    try:
        from converter.pipeline import convert
    except ImportError:
        convert = None
    if convert is not None:
        convert(source, output, quant=quant, double_quant=double_quant, compute_dtype="float32", progress=False)
        return output
    return _quantize_folder_fallback(source, output, quant, double_quant)


def _quantize_folder_fallback(source, output, quant, double_quant):
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    from converter.bnb import quantization_config

    os.makedirs(output, exist_ok=True)
    tensors = {}
    with safe_open(os.path.join(source, "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(".weight") and t.dim() == 2 and "embed" not in key and "lm_head" not in key:
                tensors.update(converter.quantize(t, quant, 64, double_quant).state_dict(key[: -len("weight")]))
            else:
                tensors[key] = t
    save_file(tensors, os.path.join(output, "model.safetensors"))
    cfg = json.load(open(os.path.join(source, "config.json")))
    cfg["quantization_config"] = quantization_config(quant, double_quant, "float32")
    json.dump(cfg, open(os.path.join(output, "config.json"), "w"))
    for name in os.listdir(source):
        if name.startswith("tokenizer") or name == "generation_config.json":
            shutil.copy(os.path.join(source, name), output)
    return output


def bnb_fake_quant(model, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False):
    """`model` with every linear weight (lm_head excepted) replaced by bnb dequantize(quantize(W)), or None."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
                w = module.weight.data
                packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=blocksize,
                                                   compress_statistics=double_quant, quant_type=quant_type)
                module.weight.data = bnbf.dequantize_4bit(packed, state).reshape(w.shape).to(w.dtype)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("text")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-stories", type=int, default=None, help="evaluate on the first N stories only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    with open(args.text, encoding="utf-8") as f:
        windows = token_windows(tokenizer, f.read(), args.window, max_stories=args.max_stories)
    n_tokens = sum(len(w) - 1 for w in windows)
    print(f"{args.model} on {args.text}: {len(windows)} windows of <= {args.window}, {n_tokens} predicted tokens")
    rows = []

    def measure(label, build):
        t0 = time.perf_counter()
        model = build()
        if model is None:
            rows.append((label, None, 0.0))
            return
        ppl = perplexity(model, windows)
        rows.append((label, ppl, time.perf_counter() - t0))
        print(f"  {label:<22} {ppl:.4f}", flush=True)

    def fp32():
        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    measure("fp32", fp32)
    with tempfile.TemporaryDirectory() as tmp:
        for label, quant, dq in QUANT_ROWS:
            folder = os.path.join(tmp, label.replace("+", "_"))
            measure(f"{label} (qckpt runtime)", lambda: converter.load_quantized(
                quantize_folder(args.model, folder, quant, dq)))
    measure("NF4 (bnb fake-quant)", lambda: bnb_fake_quant(fp32(), "nf4", 64, False))

    base = rows[0][1]
    print()
    print("| model | perplexity | vs fp32 | time (s) |")
    print("| --- | --- | --- | --- |")
    for label, ppl, seconds in rows:
        if ppl is None:
            print(f"| {label} | (bitsandbytes not installed) | | |")
        else:
            print(f"| {label} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
