"""Benchmark the CUDA kernels against bitsandbytes and torch bf16 on the same GPU, in one run.

    python scripts/bench_cuda.py [--out DIR] [--quick]

Times are medians of CUDA-graph replays (GPU time, no Python launch overhead) with inputs rotated
across >= 8 copies so the 50 MB L2 cannot serve them; "API" columns time the public Python call with
events as a user would call it (including its synchronization, where it has one). Each row prints
GB/s next to the floor: the fewest bytes the op must move over the device-to-device copy bandwidth
measured in this run. Writes bench_cuda.md and bench_cuda.json under --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics

import torch
import torch.nn.functional as F

import converter
from converter.formats.codebooks import QuantType
from converter.kernels import cuda as kcuda

ROTATE = 8
SHAPES = [(14336, 4096), (4096, 14336)]  # (N out, K in): Llama-3-8B MLP up/down


def graph_time(fns, iters: int = 24, reps: int = 7) -> float:
    """Median ms per call of fns[i % len(fns)]() captured `iters` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # warm-up outside capture (allocator, lazy init, cuBLAS handles)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    return statistics.median(times)


def eager_time(fns, iters: int = 24, reps: int = 5) -> float:
    """Median ms per call, events around `iters` eager calls (includes launch and sync overhead)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(iters):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def timed(fns, mode="graph"):
    try:
        return graph_time(fns) if mode == "graph" else eager_time(fns)
    except Exception as exc:  # a baseline that cannot be captured is timed eagerly and says so
        print(f"  (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
        torch.cuda.synchronize()
        return eager_time(fns)


def copy_bandwidth() -> float:
    """Device-to-device copy GB/s, counting bytes read plus written (the memory ceiling)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = min(timed([lambda: b.copy_(a)]), eager_time([lambda: b.copy_(a)], iters=8))
    return 2 * a.numel() / ms / 1e6


def kernel_profile(fn, path):
    """Per-kernel device time of fn() (torch.profiler), printed and saved: where a pipeline spends it."""
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
    except Exception as exc:  # noqa: BLE001 - profiling is informative only
        table = f"profiler failed: {exc}"
    print(table)
    path.write_text(table)


def host_profile(fn, path, calls: int = 300):
    """Where the Python call's host time goes (cProfile over eager calls), printed and saved."""
    import cProfile
    import io
    import pstats
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / calls * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    text = f"eager wall per call: {per_call:.1f} us\n" + buf.getvalue()
    print(text[:2500])
    path.write_text(text)


def exact_mean_sweep(nb: int, gen) -> list:
    """The exact-mean kernel alone (graph time), at the size of one weight's absmax and at one block's
    worth (its fixed cost: launch, the last block's big-integer finish), for several grid sizes
    (QCKPT_CUDA_MEAN_BLOCKS_PER_SM); each result is checked against reference.exact_mean_f32."""
    import os

    from converter.formats.reference import exact_mean_f32

    ffi, lib = kcuda.load()
    ws = kcuda.new_workspace("cuda")
    rows = []
    for n in (1024, nb):
        vals = [torch.randn(n, device="cuda", generator=gen).abs_().mul_(0.05) for _ in range(ROTATE)]
        want = exact_mean_f32(vals[0].cpu())
        for per_sm in (1, 2, 4, 8, 16):
            os.environ["QCKPT_CUDA_MEAN_BLOCKS_PER_SM"] = str(per_sm)
            stream = kcuda._stream(torch.device("cuda", torch.cuda.current_device()))
            kcuda._check(lib.qckpt_cuda_workspace_reset(kcuda._ptr(ws, "int64_t *"), stream))
            kcuda._check(lib.qckpt_cuda_exact_mean(kcuda._ptr(vals[0], "float *"), n, kcuda._ptr(ws, "int64_t *"), stream))
            got = kcuda.finish(ws)
            ms = timed([lambda v=v: lib.qckpt_cuda_exact_mean(
                kcuda._ptr(v, "float *"), n, kcuda._ptr(ws, "int64_t *"),
                kcuda._stream(torch.device("cuda", torch.cuda.current_device()))) for v in vals])
            ok = got == want
            rows.append(dict(n=n, per_sm=per_sm, ms=ms, ok=ok))
            print(f"  exact mean n={n} blocks/SM={per_sm}: {1000 * ms:.1f} us, matches reference: {ok}")
    os.environ.pop("QCKPT_CUDA_MEAN_BLOCKS_PER_SM", None)
    return rows


def fmt(ms):
    return "—" if ms is None else f"{ms:.4f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (smoke run)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - any import failure means no baseline
        print(f"bitsandbytes unavailable ({exc}); its columns stay empty")
        bnb = bnbf = None

    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    bw = copy_bandwidth()
    print(f"{card}, {date}, torch {torch.__version__}, bitsandbytes {getattr(bnb, '__version__', '—')}")
    print(f"device-to-device copy: {bw:.0f} GB/s (the floor's bandwidth)")
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)

    # ---- quantize NF4 + double quant ----
    n_out, k = SHAPES[0]
    xs = [torch.randn(n_out, k, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(ROTATE)]
    n = n_out * k
    floor_bytes = 2 * n + n // 2 + n // 64 + 4 * (n // 64 // 256)
    ws = kcuda.new_workspace("cuda")
    code = kcuda.nested_code("cuda")
    ours = timed([lambda x=x: kcuda.quantize_4bit(x, QuantType.NF4, 64, double_quant=True, workspace=ws, code=code)
                  for x in xs])
    api = timed([lambda x=x: converter.quantize(x, "nf4", 64, True) for x in xs], mode="eager")
    plain = timed([lambda x=x: kcuda.quantize_4bit(x, QuantType.NF4, 64, double_quant=False, workspace=ws)
                   for x in xs])
    rows.append(dict(op=f"quantize NF4 (no DQ) {n_out}x{k} bf16", ours=plain, ours_api=None, bnb=None, torch=None,
                     bytes=2 * n + n // 2 + 4 * (n // 64)))
    base = None
    if bnbf is not None:
        base = timed([lambda x=x: bnbf.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
                      for x in xs])
    rows.append(dict(op=f"quantize NF4+DQ {n_out}x{k} bf16", ours=ours, ours_api=api, bnb=base, torch=None,
                     bytes=floor_bytes))
    print(f"  quantize NF4: no DQ {fmt(plain)} ms, DQ {fmt(ours)} ms, API {fmt(api)} ms, bitsandbytes {fmt(base)} ms")
    kernel_profile(lambda: kcuda.quantize_4bit(xs[0], QuantType.NF4, 64, double_quant=True, workspace=ws, code=code),
                   out / "profile_quantize.txt")
    # bytes check against bitsandbytes' own CUDA quantizer, for information
    if bnbf is not None:
        packed_b, _ = bnbf.quantize_4bit(xs[0], blocksize=64, compress_statistics=True, quant_type="nf4")
        ours_qt = converter.quantize(xs[0], "nf4", 64, True)
        same = (packed_b.reshape(-1) == ours_qt.data.reshape(-1)).float().mean().item()
        print(f"  packed bytes equal to bitsandbytes' CUDA quantizer: {100 * same:.4f}%")
    del xs
    try:  # a diagnosis, not a goal row: a failure here must not cost the matmul rows
        mean_rows = exact_mean_sweep(n // 64, gen)
    except Exception as exc:  # noqa: BLE001
        print(f"  exact-mean sweep failed: {type(exc).__name__}: {exc}")
        mean_rows = []

    # ---- 4-bit matmul ----
    batches = [1, 16] if args.quick else [1, 16, 128]
    for n_out, k in SHAPES:
        ws_t = [torch.randn(n_out, k, device="cuda", generator=gen).mul_(0.02).to(torch.bfloat16) for _ in range(ROTATE)]
        qts = [converter.quantize(w, "nf4", 64, True) for w in ws_t]
        bnb_w = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in ws_t] \
            if bnbf is not None else None
        scratch = torch.empty(n_out * k, dtype=torch.bfloat16, device="cuda")
        for batch in batches:
            x = torch.randn(batch, k, device="cuda", generator=gen).to(torch.bfloat16)
            # correctness on the benchmark data itself, so a fast wrong kernel cannot pass unnoticed
            ref = (x.double() @ converter.dequantize(qts[0], torch.bfloat16).double().t())
            got = kcuda.gemm_4bit(x, qts[0], workspace=scratch).double()
            err = float((got - ref).norm() / ref.norm())
            ours = timed([lambda q=q: kcuda.gemm_4bit(x, q, workspace=scratch) for q in qts])
            api = timed([lambda q=q: kcuda.gemm_4bit(x, q, workspace=scratch) for q in qts], mode="eager")
            tb = timed([lambda w=w: F.linear(x, w) for w in ws_t])
            base = None
            if bnb_w is not None:
                base = timed([lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s) for p, s in bnb_w])
            nbytes = n_out * k // 2 + n_out * k // 64 + batch * (k + n_out) * 2
            rows.append(dict(op=f"matmul batch {batch} {n_out}x{k}", ours=ours, ours_api=api, bnb=base, torch=tb,
                             bytes=nbytes, rel_err=err))
            print(f"  matmul batch {batch} {n_out}x{k}: ours {fmt(ours)} API {fmt(api)} bnb {fmt(base)} "
                  f"torch {fmt(tb)} ms, rel err {err:.1e}")
            if batch == 1 and n_out == SHAPES[0][0]:
                host_profile(lambda: kcuda.gemm_4bit(x, qts[0], workspace=scratch), out / "profile_host_gemv.txt")
            if batch == 128 and n_out == SHAPES[0][0]:
                kernel_profile(lambda: kcuda.gemm_4bit(x, qts[0], workspace=scratch), out / "profile_gemm128.txt")
        del ws_t, qts, bnb_w, scratch

    lines = [f"Card: {card}; date {date}; torch {torch.__version__}; bitsandbytes {getattr(bnb, '__version__', '—')}; "
             f"copy ceiling {bw:.0f} GB/s. Times in ms (CUDA-graph median, {ROTATE} rotated inputs; API = eager Python call).",
             "",
             "| op (bf16) | ours | ours API | bitsandbytes | torch bf16 | ours GB/s | floor ms | vs bnb |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        floor_ms = r["bytes"] / bw / 1e6
        gbs = r["bytes"] / r["ours"] / 1e6
        speedup = f"{r['bnb'] / r['ours']:.1f}x" if r["bnb"] else "—"
        note = f" (rel err {r['rel_err']:.1e})" if "rel_err" in r else ""
        lines.append(f"| {r['op']}{note} | {fmt(r['ours'])} | {fmt(r['ours_api'])} | {fmt(r['bnb'])} | "
                     f"{fmt(r['torch'])} | {gbs:.0f} | {floor_ms:.4f} | {speedup} |")
    lines += ["", "Exact-mean kernel alone (us, CUDA-graph median; grid = min(ceil(n/1024), SMs x blocks/SM)):", "",
              "| n | " + " | ".join(f"{r['per_sm']}/SM" for r in mean_rows if r["n"] == 1024) + " |",
              "|---|" + "---|" * sum(r["n"] == 1024 for r in mean_rows)]
    for size in sorted({r["n"] for r in mean_rows}):
        cells = [f"{1000 * r['ms']:.1f}{'' if r['ok'] else ' WRONG'}" for r in mean_rows if r["n"] == size]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "bench_cuda.md").write_text(table + "\n")
    (out / "bench_cuda.json").write_text(json.dumps(dict(card=card, date=date, copy_gbs=bw, rows=rows, exact_mean=mean_rows), indent=1))


if __name__ == "__main__":
    main()
