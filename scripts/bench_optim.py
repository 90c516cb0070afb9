#!/usr/bin/env python
"""Benchmark: AdamW8bit (converter.optim) vs torch.optim.AdamW (foreach, fused) vs bitsandbytes AdamW8bit.

Step time and optimizer-state memory over a synthetic parameter set (default 100M parameters: 24 matrices
4096x1024 plus 48 vectors of 1024, fp32, random gradients), all measured in this run on this machine.
Goal (issue 6): no slower than torch AdamW per step, with <= 1/3.5 of its state memory.

    python scripts/bench_optim.py                    # 100M parameters, 3 timed steps each
    python scripts/bench_optim.py --millions 25      # a smaller set
    python scripts/bench_optim.py --curve            # also the 200-step stories260K loss curves
    python scripts/bench_optim.py --device cuda --out build/bench   # the GPU table (CUDA events), also
                                                     # written to build/bench/bench_optim_cuda.md

On CUDA the table adds PagedAdamW8bit (ours and bitsandbytes') and a floor per optimizer: the bytes one
step must move (parameter read + write, gradient read, state read + write) over the device-to-device
copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from converter.optim import AdamW8bit, state_nbytes  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")


def make_params(millions: float, gen: torch.Generator):
    rows = max(1, round(millions * 1e6 / (24 * 1024) / 1.0))  # 24 matrices (rows x 1024) ~= millions * 1e6
    params = [torch.nn.Parameter(torch.randn(rows, 1024, generator=gen) * 0.02) for _ in range(24)]
    params += [torch.nn.Parameter(torch.ones(1024)) for _ in range(48)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def candidates(threads=None):
    out = [
        ("qckpt AdamW8bit", lambda ps: AdamW8bit(ps, threads=threads)),
        ("torch AdamW default", lambda ps: torch.optim.AdamW(ps)),  # on CPU: the per-tensor for-loop
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ]
    try:
        import bitsandbytes as bnb

        out.append((f"bitsandbytes {bnb.__version__} AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps)))
    except Exception as exc:  # noqa: BLE001 - the oracle is optional here
        print(f"(bitsandbytes not usable: {exc})")
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_steps(args):
    gen = torch.Generator().manual_seed(0)
    params = make_params(args.millions, gen)
    n = sum(p.numel() for p in params)
    from converter.kernels import cpu

    print(f"# optimizer step on {n / 1e6:.1f}M fp32 parameters ({len(params)} tensors), threads: torch "
          f"{torch.get_num_threads()}, qckpt {args.threads or 'all cores'}; native ISA {cpu.best_isa()}; "
          f"{_cpu_name()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, make in candidates(args.threads):
        try:
            opt = make(params)
            opt.step()  # creates the state; not timed
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
            rows.append((name, statistics.median(times), state_nbytes(opt)))
        except Exception as exc:  # noqa: BLE001 - report and go on to the next candidate
            rows.append((name, float("nan"), 0))
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
        del opt
        gc.collect()
    base_t = next(t for name, t, _ in rows if name == "torch AdamW default")
    base_b = next(b for name, _, b in rows if name == "torch AdamW default")
    print(f"| optimizer | step ms (median of {args.steps}) | vs torch default | state MiB | bytes/param | state vs torch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t, b in rows:
        print(f"| {name} | {t * 1e3:.0f} | {t / base_t:.2f}x | {b / 2**20:.1f} | {b / n:.3f} | 1/{base_b / max(b, 1):.2f} |")


# ----- CUDA (--device cuda) -----

def cuda_candidates():
    from converter.optim import PagedAdamW8bit

    out = [
        ("qckpt AdamW8bit", lambda ps: AdamW8bit(ps)),
        ("qckpt PagedAdamW8bit", lambda ps: PagedAdamW8bit(ps)),
        ("torch AdamW default", lambda ps: torch.optim.AdamW(ps)),  # on CUDA: foreach
        ("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
    ]
    try:
        import bitsandbytes as bnb

        out.append((f"bitsandbytes {bnb.__version__} AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps)))
        out.append((f"bitsandbytes {bnb.__version__} PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps)))
    except Exception as exc:  # noqa: BLE001 - the oracle is optional here
        print(f"(bitsandbytes not usable: {exc})")
    return out


def copy_bandwidth(device, nbytes=1 << 30, repeats=10) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), median of `repeats`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def bench_steps_cuda(args):
    device = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(p.detach().to(device)) for p in make_params(args.millions, gen)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    n = sum(p.numel() for p in params)
    io_bytes = sum(3 * p.numel() * p.element_size() for p in params)  # param read + write, gradient read
    bandwidth = copy_bandwidth(device)
    title = (f"# optimizer step on {n / 1e6:.1f}M fp32 parameters ({len(params)} tensors), "
             f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; device copy bandwidth "
             f"{bandwidth / 1e9:.0f} GB/s")
    print(title)
    rows = []
    for name, make in cuda_candidates():
        opt = None
        try:
            opt = make(params)
            opt.step()  # creates the state; not timed
            torch.cuda.synchronize(device)
            times = []
            for _ in range(args.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                opt.step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            state = state_nbytes(opt)
            rows.append((name, statistics.median(times), state, (io_bytes + 2 * state) / bandwidth))
        except Exception as exc:  # noqa: BLE001 - report and go on to the next candidate
            rows.append((name, float("nan"), 0, float("nan")))
            print(f"{name}: failed: {type(exc).__name__}: {exc}")
        del opt
        gc.collect()
        torch.cuda.empty_cache()
    base_t = next(t for name, t, _, _ in rows if name == "torch AdamW default")
    base_b = next(b for name, _, b, _ in rows if name == "torch AdamW default")
    lines = [title, "",
             f"| optimizer | step ms (median of {args.steps}) | floor ms | vs floor | vs torch default | state MiB "
             "| bytes/param | state vs torch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t, b, floor in rows:
        lines.append(f"| {name} | {t * 1e3:.2f} | {floor * 1e3:.2f} | {t / floor:.2f}x | {t / base_t:.2f}x | "
                     f"{b / 2**20:.1f} | {b / n:.3f} | 1/{base_b / max(b, 1):.2f} |")
    lines.append("")
    lines.append("floor: (parameter read + write + gradient read + state read + write) / device copy bandwidth")
    print("\n".join(lines[2:]))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_optim_cuda.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)
    print(f"written {path}")


def loss_curves(steps=200, seq=32, bs=8):
    """The 200-step run of issue 6: stories260K architecture from scratch, default lr 1e-3."""
    import transformers

    torch.set_num_threads(1)  # a tiny model: one thread is faster than two contended ones
    path = os.path.join(DATA, "stories260K")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with open(os.path.join(DATA, "tinystories_val.txt"), encoding="utf-8") as f:
        ids = tok(f.read()[:100000], return_tensors="pt").input_ids[0]
    config = transformers.AutoConfig.from_pretrained(path)
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, bs), generator=torch.Generator().manual_seed(0))
    curves = {}
    for name, make in candidates():
        if "fused" in name or "foreach" in name:
            continue  # same arithmetic as foreach up to rounding
        torch.manual_seed(1)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.train()
        opt = make(model.parameters())
        losses = []
        for row in starts:
            batch = torch.stack([ids[i:i + seq] for i in row])
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = torch.tensor(losses).unfold(0, 20, 20).mean(1)
    base = curves["torch AdamW default"]
    print(f"\n# loss, mean of each 20 steps: stories260K config from scratch, {steps} steps, seq {seq}, batch {bs}, lr 1e-3")
    print("| steps | " + " | ".join(curves) + " |")
    print("|---|" + "---:|" * len(curves))
    for i in range(len(base)):
        print(f"| {20 * i}-{20 * i + 19} | " + " | ".join(f"{c[i]:.4f}" for c in curves.values()) + " |")
    for name, c in curves.items():
        print(f"max relative difference to torch AdamW, {name}: {((c - base).abs() / base).max():.4f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--millions", type=float, default=100.0, help="parameter count in millions (default 100)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer (default 3)")
    parser.add_argument("--curve", action="store_true", help="also run the 200-step loss curves")
    parser.add_argument("--no-steps", action="store_true", help="skip the step-time table")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default): the table above; cuda: the GPU table with CUDA-event timings")
    parser.add_argument("--out", default=os.path.join("build", "bench"),
                        help="folder for the CUDA table's markdown file (default build/bench)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every optimizer (torch.set_num_threads and AdamW8bit threads=)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device")
        if not args.no_steps:
            bench_steps_cuda(args)
    elif not args.no_steps:
        bench_steps(args)
    if args.curve:
        loss_curves()


if __name__ == "__main__":
    main()
