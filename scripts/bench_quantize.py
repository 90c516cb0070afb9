#!/usr/bin/env python
"""Throughput of qckpt's native CPU quantize/dequantize against bitsandbytes' CPU path and the pure-torch
reference, on bf16 Linear weights, measured in one run on one machine (issue 2, "Speed").

    python scripts/bench_quantize.py                      # 4096x4096 and 14336x4096, markdown table
    python scripts/bench_quantize.py --shapes 1024x1024 --repeat 3 --no-reference

GB/s is of the bf16 input for quantize and of the output for dequantize (10^9 bytes). Each figure is the
best of --repeat runs after one warm-up (the machine is shared; the best run is the least disturbed).
"Ceiling" is what memory traffic alone allows: bytes that must move / measured bandwidth (see
scripts/BENCHMARKS.md for how it is derived).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import sys
import threading
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from converter import quantize  # noqa: E402
from converter.formats import reference as ref  # noqa: E402
from converter.kernels import cpu  # noqa: E402


def best_time(fn, repeat: int) -> float:
    fn()  # warm-up: lazy loads, allocator
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _split_calls(fn, base_a, base_b, nbytes: int, workers: int) -> None:
    """Run fn(a + off, b + off, len) over `workers` Python threads; ctypes drops the GIL during the call."""
    per = nbytes // workers
    threads = [threading.Thread(target=fn, args=(base_a + i * per, base_b + i * per if base_b is not None else 0,
                                                 per if i < workers - 1 else nbytes - i * per))
               for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bandwidths(nbytes: int, repeat: int, workers: int) -> dict:
    """Copy bandwidth (memmove, read + write bytes, buffers already faulted in) and first-touch write
    bandwidth (memset into a fresh allocation, i.e. writing a new output including its page faults), both
    over `workers` threads like the kernels."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    copy = best_time(lambda: _split_calls(ctypes.memmove, dst.data_ptr(), src.data_ptr(), nbytes, workers), repeat)

    libc = ctypes.CDLL(None, use_errno=True)

    def fresh_fill(huge: bool):
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if huge:  # what the native kernels do for large outputs (native/src/parallel.c)
            page = 1 << 21
            begin = (buf.data_ptr() + page - 1) & ~(page - 1)
            end = (buf.data_ptr() + nbytes) & ~(page - 1)
            if end > begin:
                libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 14)  # MADV_HUGEPAGE
        _split_calls(lambda a, _b, n: ctypes.memset(a, 1, n), buf.data_ptr(), None, nbytes, workers)

    fresh = best_time(lambda: fresh_fill(False), repeat)
    fresh_huge = best_time(lambda: fresh_fill(True), repeat)
    return {"copy": 2 * nbytes / copy / 1e9, "fresh_write": nbytes / fresh / 1e9,
            "fresh_huge": nbytes / fresh_huge / 1e9}


def bench_shape(shape, repeat: int, with_bnb: bool, with_reference: bool, workers: int) -> list:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    n = w.numel()
    in_bytes = 2 * n
    bw = bandwidths(in_bytes, repeat, workers)
    rows = []

    def row(op, bytes_, ours, bnb=None, reference=None, ceiling=None):
        rows.append({"op": op, "ours": bytes_ / ours / 1e9,
                     "bnb": None if bnb is None else bytes_ / bnb / 1e9,
                     "ref": None if reference is None else bytes_ / reference / 1e9,
                     "ceiling": ceiling, "ms": ours * 1e3})

    # Bytes that must move, per element: quantize reads 2 (bf16) and writes 0.5 (+ scales, ~1/64 x 4);
    # dequantize reads 0.5 and writes 2. Ceiling in GB/s of the bf16 side: 2 / 2.5 of the copy bandwidth
    # (copy bandwidth counts read + write bytes).
    ceil_q = bw["copy"] * 2 / 2.5
    ceil_dq_fresh = min(ceil_q, bw["fresh_huge"])

    qt_nf4 = quantize(w, "nf4", 64, True)
    qt_fp4 = quantize(w, "fp4", 64, False)
    qt_i8 = quantize(w, "int8")
    t_q_nf4dq = best_time(lambda: quantize(w, "nf4", 64, True), repeat)
    t_q_nf4 = best_time(lambda: quantize(w, "nf4", 64, False), repeat)
    t_q_fp4 = best_time(lambda: quantize(w, "fp4", 64, False), repeat)
    t_q_i8 = best_time(lambda: quantize(w, "int8"), repeat)
    t_dq_only = best_time(lambda: qt_nf4.block_absmax(), repeat)
    t_d_nf4dq = best_time(lambda: qt_nf4.dequantize(), repeat)
    out = torch.empty(shape, dtype=torch.bfloat16).fill_(0)
    absmax = qt_nf4.block_absmax()
    t_d_nf4_out = best_time(lambda: cpu.dequantize_4bit(qt_nf4.data, qt_nf4.block_absmax(), qt_nf4.quant_type, 64,
                                                        shape, torch.bfloat16, out=out), repeat)
    t_d_fp4 = best_time(lambda: qt_fp4.dequantize(), repeat)
    t_d_i8 = best_time(lambda: qt_i8.dequantize(), repeat)
    del absmax

    bnb = {}
    if with_bnb:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as F
        reps = max(1, min(repeat, 3))  # bnb's CPU quantize is slow; 3 runs are plenty
        bnb["q_nf4dq"] = best_time(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), reps)
        bnb["q_nf4"] = best_time(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"), reps)
        bnb["q_fp4"] = best_time(lambda: F.quantize_4bit(w, blocksize=64, quant_type="fp4"), reps)
        bnb["q_i8"] = best_time(lambda: F.int8_vectorwise_quant(w.to(torch.float16)), reps)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        bnb["d_nf4dq"] = best_time(lambda: F.dequantize_4bit(packed, state), repeat)
        packed4, state4 = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
        bnb["d_fp4"] = best_time(lambda: F.dequantize_4bit(packed4, state4), repeat)

    refs = {}
    if with_reference:
        def ref_q():
            packed, absmax = ref.quantize_4bit(w, "nf4", 64)
            return packed, ref.double_quantize(absmax)

        refs["q_nf4dq"] = best_time(ref_q, 1)
        refs["q_i8"] = best_time(lambda: ref.quantize_int8_rowwise(w), 1)
        codes, nested_absmax, offset = qt_nf4.nested.codes, qt_nf4.nested.absmax, qt_nf4.nested.offset
        refs["d_nf4dq"] = best_time(lambda: ref.dequantize_4bit(
            qt_nf4.data, ref.dequantize_absmax(codes, nested_absmax, offset), "nf4", 64, shape, torch.bfloat16), 1)

    row("quantize NF4 + double quant", in_bytes, t_q_nf4dq, bnb.get("q_nf4dq"), refs.get("q_nf4dq"), ceil_q)
    row("quantize NF4", in_bytes, t_q_nf4, bnb.get("q_nf4"), None, ceil_q)
    row("quantize FP4", in_bytes, t_q_fp4, bnb.get("q_fp4"), None, ceil_q)
    row("quantize INT8 (bnb: incl. fp16 cast)", in_bytes, t_q_i8, bnb.get("q_i8"), refs.get("q_i8"), bw["copy"] * 2 / 3)
    row("dequantize NF4+DQ -> bf16 (new output)", in_bytes, t_d_nf4dq, bnb.get("d_nf4dq"), refs.get("d_nf4dq"),
        ceil_dq_fresh)
    row("dequantize NF4+DQ -> bf16 (out= buffer)", in_bytes, t_d_nf4_out, None, None, ceil_q)
    row("dequantize FP4 -> bf16 (new output)", in_bytes, t_d_fp4, bnb.get("d_fp4"), None, ceil_dq_fresh)
    row("dequantize INT8 -> bf16 (new output)", in_bytes, t_d_i8, None, None, min(bw["copy"] * 2 / 3, bw["fresh_huge"]))
    return rows, bw, t_dq_only


def fmt(x, digits=2, suffix=""):
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--shapes", default="4096x4096,14336x4096")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) pure-torch reference")
    args = parser.parse_args(argv)
    with_bnb = not args.no_bnb
    if with_bnb:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import bitsandbytes  # noqa: F401
        except ImportError:
            print("bitsandbytes not installed: skipping its columns", file=sys.stderr)
            with_bnb = False

    threads = os.environ.get("QCKPT_THREADS") or str(len(os.sched_getaffinity(0)))
    print(f"# qckpt bench_quantize  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, qckpt threads {threads}, "
          f"native ISA {cpu.best_isa()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for spec in args.shapes.split(","):
        shape = tuple(int(d) for d in spec.lower().split("x"))
        rows, bw, t_dq_only = bench_shape(shape, args.repeat, with_bnb, not args.no_reference, int(threads))
        print(f"\n## {spec} bf16 ({2 * shape[0] * shape[1] / 1e6:.1f} MB); memory: copy {bw['copy']:.1f} GB/s "
              f"(read+write), first-touch write {bw['fresh_write']:.1f} GB/s (4 KiB pages) / "
              f"{bw['fresh_huge']:.1f} GB/s (huge pages); nested-absmax decode "
              f"{t_dq_only * 1e3:.2f} ms\n")
        print("| operation | ours GB/s | ours ms | bnb CPU GB/s | reference GB/s | ours / bnb | ours / ref | ceiling GB/s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            ratio_bnb = None if r["bnb"] is None else r["ours"] / r["bnb"]
            ratio_ref = None if r["ref"] is None else r["ours"] / r["ref"]
            print(f"| {r['op']} | {fmt(r['ours'])} | {fmt(r['ms'], 1)} | {fmt(r['bnb'], 3)} | {fmt(r['ref'], 3)} | "
                  f"{fmt(ratio_bnb, 1, 'x')} | {fmt(ratio_ref, 0, 'x')} | {fmt(r['ceiling'], 1)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
