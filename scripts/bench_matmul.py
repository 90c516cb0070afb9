#!/usr/bin/env python
"""CPU latency of the runtime's 4-bit linear layer against dense torch and bitsandbytes, in one run.

    python scripts/bench_matmul.py [--repeat 20] [--threads N] [--skip-load]

Table 1: batch 1/16/128 at 4096x4096 and 14336x4096 (NF4 + double quant, bf16 activations):
  ours = converter.runtime.Linear4bit forward (compute bf16), torch = F.linear on the dense bf16 weight,
  bnb = bitsandbytes.matmul_4bit (when installed). Median of --repeat runs after a warm-up.
Table 2: fused kernel vs dequantize + torch matmul by number of rows (picks FUSED_MAX_ROWS).
Table 3: batch-1 breakdown: fused kernel, nested-absmax decode (AVX-512 vs the scalar loop), the rest.
Table 4: load time, converter.load_quantized vs transformers + bitsandbytes from_pretrained, same folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import converter  # noqa: E402
from converter.runtime import Linear4bit  # noqa: E402
from converter.runtime import functional as rf  # noqa: E402


class Timing:
    """Median and best of `repeat` calls after two warm-ups. On a shared 2-core box the median moves
    with other load; the best is the least disturbed run. Printed as `median (best)` in ms."""

    def __init__(self, fn, repeat: int):
        fn()
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        self.median, self.best = statistics.median(times), min(times)

    def __str__(self):
        return f"{self.median * 1e3:.2f} ({self.best * 1e3:.2f})"


def _bnb_matmul(weight):
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    return lambda x: bnb.matmul_4bit(x, packed.t(), quant_state=state)


def table_latency(repeat: int) -> None:
    print("## Linear4bit forward latency (NF4 + double quant, bf16 activations), ms: median (best)\n")
    print("| shape (out x in) | batch | ours | torch bf16 F.linear | bitsandbytes matmul_4bit "
          "| torch / ours (median) |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(0)
    for n_out, k in [(4096, 4096), (14336, 4096)]:
        weight = (torch.randn(n_out, k, generator=gen) * 0.02).to(torch.bfloat16)
        layer = Linear4bit.from_quantized(converter.quantize(weight, "nf4", 64, True), compute_dtype=torch.bfloat16)
        bnb_fn = _bnb_matmul(weight)
        for batch in (1, 16, 128):
            x = torch.randn(batch, k, generator=gen).to(torch.bfloat16)
            with torch.no_grad():
                ours = Timing(lambda: layer(x), repeat)
                dense = Timing(lambda: F.linear(x, weight), repeat)
                theirs = Timing(lambda: bnb_fn(x), max(3, repeat // 4)) if bnb_fn else "n/a"
            print(f"| {n_out}x{k} | {batch} | {ours} | {dense} | {theirs} | {dense.median / ours.median:.2f}x |",
                  flush=True)
    print()


def table_threshold(repeat: int) -> None:
    print(f"## Fused kernel vs dequantize + matmul by rows (4096x4096, bf16), ms: median (best); "
          f"current FUSED_MAX_ROWS = {rf.FUSED_MAX_ROWS}\n")
    print("| rows | fused | dequantize + torch matmul | faster |")
    print("| --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(1)
    weight = (torch.randn(4096, 4096, generator=gen) * 0.02).to(torch.bfloat16)
    qt = converter.quantize(weight, "nf4", 64, True)
    fused = Linear4bit.from_quantized(qt, compute_dtype=torch.bfloat16, fused_max_rows=1 << 30)
    dense = Linear4bit.from_quantized(qt, compute_dtype=torch.bfloat16, fused_max_rows=0)
    for rows in (1, 2, 4, 8, 12, 16, 24, 32):
        x = torch.randn(rows, 4096, generator=gen).to(torch.bfloat16)
        with torch.no_grad():
            a = Timing(lambda: fused(x), repeat)
            b = Timing(lambda: dense(x), repeat)
        print(f"| {rows} | {a} | {b} | {'fused' if a.best < b.best else 'dequantize'} |", flush=True)
    print()


def table_batch1_breakdown(repeat: int) -> None:
    """Where a batch-1 forward goes: the fused kernel, the nested-absmax decode (scalar loop = the code
    before its AVX-512 variant, forced with isa=; auto = what the module runs) and the Python around them."""
    from converter.kernels import cpu

    print("## Batch-1 breakdown (NF4 + double quant, bf16), ms: median (best)\n")
    print("| shape (out x in) | module forward | fused kernel alone | nested decode, auto ISA "
          "| nested decode, scalar (baseline) | Python + wrappers |")
    print("| --- | --- | --- | --- | --- | --- |")
    gen = torch.Generator().manual_seed(2)
    for n_out, k in [(4096, 4096), (14336, 4096)]:
        weight = (torch.randn(n_out, k, generator=gen) * 0.02).to(torch.bfloat16)
        qt = converter.quantize(weight, "nf4", 64, True)
        layer = Linear4bit.from_quantized(qt, compute_dtype=torch.bfloat16)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        nested, absmax = qt.nested, qt.block_absmax()

        def decode(isa=None):
            return cpu.dequantize_blockwise8(nested.codes, nested.absmax, nested.code, nested.blocksize,
                                             offset=nested.offset, isa=isa)

        with torch.no_grad():
            fwd = Timing(lambda: layer(x), repeat * 5)
            kern = Timing(lambda: cpu.gemm_4bit(x, qt.data, absmax, n_out, k, 64, qt.quant_type), repeat * 5)
            auto = Timing(decode, repeat * 5)
            scalar = Timing(lambda: decode("scalar"), repeat * 5)
        rest = fwd.median - kern.median - auto.median
        print(f"| {n_out}x{k} | {fwd} | {kern} | {auto} | {scalar} | {rest * 1e3:.2f} |", flush=True)
    print()


def table_load() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("## Load time: bitsandbytes not installed, skipped\n")
        return
    import transformers

    print("## Load time of one NF4+DQ checkpoint (Llama, hidden 1024, 8 layers, ~85M params), median of 3 s\n")
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                      num_attention_heads=16, num_key_value_heads=8, vocab_size=8192)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(os.path.join(tmp, "src"))
        bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "src"), quantization_config=bnb_cfg,
                                                                  device_map="cpu")
        folder = os.path.join(tmp, "nf4")
        model.save_pretrained(folder)
        del model
        ours = statistics.median(_seconds(lambda: converter.load_quantized(folder)) for _ in range(3))
        theirs = statistics.median(_seconds(lambda: transformers.AutoModelForCausalLM.from_pretrained(
            folder, device_map="cpu")) for _ in range(3))
    print("| loader | seconds |")
    print("| --- | --- |")
    print(f"| converter.load_quantized | {ours:.2f} |")
    print(f"| transformers + bitsandbytes from_pretrained | {theirs:.2f} |")
    print()


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--skip-load", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["QCKPT_THREADS"] = str(args.threads)
    from converter.kernels import cpu

    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, native ISA {cpu.best_isa()}, "
          f"{os.cpu_count()} CPUs\n")
    table_latency(args.repeat)
    table_threshold(args.repeat)
    table_batch1_breakdown(args.repeat)
    if not args.skip_load:
        table_load()
    return 0


if __name__ == "__main__":
    sys.exit(main())
