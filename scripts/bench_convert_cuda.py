#!/usr/bin/env python
"""`qckpt convert --device cuda` vs `--device cpu` on a Llama-7B-shaped synthetic bf16 checkpoint (a subset
of the layers), both in this run, next to the ceilings measured here: cold and warm disk read, pinned and
pageable host->device copy, device->host copy, disk write + fsync. Also checks that the two outputs are
byte-identical (every shard, the index and config.json).

    python scripts/bench_convert_cuda.py [--size-gb 6] [--work /tmp/qc7b] [--out DIR] [--runs 1]

The checkpoint is generated on the GPU (random normal * 0.02 -> bf16; hidden 4096, intermediate 11008,
vocab 32000, untied lm_head, ~2 GB shards). Each conversion is `python -m converter convert` in its own
subprocess (wall time includes interpreter start and imports), from the page cache (the source is read
once beforehand), NF4 + double quant, blocksize 64. Writes convert_bench.md and convert_bench.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HIDDEN, INTER, VOCAB = 4096, 11008, 32000


def make_checkpoint(path: str, size_gb: float, shard_gb: float = 2.0, tiny: bool = False) -> dict:
    """Llama-7B-shaped layers until ~size_gb of bf16, written as safetensors shards + index + config
    (tiny: hidden 512 / intermediate 1376 / vocab 1000, for a smoke run of this script without a GPU)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    global HIDDEN, INTER, VOCAB
    if tiny:
        HIDDEN, INTER, VOCAB = 512, 1376, 1000

    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    specs = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        specs += [(p + f"self_attn.{k}_proj.weight", (HIDDEN, HIDDEN)) for k in "qkvo"]
        specs += [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                  (p + "mlp.down_proj.weight", (HIDDEN, INTER))]
    specs += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    total = sum(2 * torch.Size(s).numel() for _, s in specs)
    n_shards = max(1, round(total / (shard_gb * 1e9)))
    per_shard = total / n_shards
    os.makedirs(path, exist_ok=True)
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=gen_device).manual_seed(0)
    groups, current, used = [], [], 0
    for name, s in specs:
        nbytes = 2 * torch.Size(s).numel()
        if current and used + nbytes > per_shard * 1.02 and len(groups) < n_shards - 1:
            groups.append(current)
            current, used = [], 0
        current.append((name, s))
        used += nbytes
    groups.append(current)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, s in group:
            if len(s) == 1:
                tensors[name] = torch.ones(s, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(s, device=gen_device, generator=gen) * 0.02).to(torch.bfloat16).cpu()
            weight_map[name] = fname
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, vocab_size=VOCAB, num_hidden_layers=layers,
                      num_attention_heads=HIDDEN // 128, num_key_value_heads=HIDDEN // 128, tie_word_embeddings=False,
                      max_position_embeddings=4096)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(path)
    return {"bytes": total, "layers": layers, "shards": len(groups)}


def shard_files(path: str) -> list:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def read_speed(files: list, chunk: int = 64 << 20) -> float:
    """GB/s of reading `files` whole with large preadinto calls (what the converter's reader does)."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if n <= 0:
                    break
                off += n
            total += off
        finally:
            os.close(fd)
    return total / (time.perf_counter() - start) / 1e9


def drop_caches() -> bool:
    """Empty the page cache (root only); False where the kernel refuses."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def copy_speeds(nbytes: int = 256 << 20, reps: int = 5) -> dict:
    """Host<->device GB/s, best of `reps`: the converter's staged copy (kernels.cuda.to_device of a pageable
    tensor: host memcpy into the pinned buffer + DMA), pinned H2D (non_blocking), pageable H2D, pinned D2H,
    and the host memcpy alone."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)
    pinned.fill_(1)

    def best(fn):
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return nbytes / min(times) / 1e9

    sys.path.insert(0, ROOT)
    from converter.kernels import cuda as kcuda

    weight = pageable.view(torch.bfloat16).view(-1, HIDDEN)  # what the converter stages per tensor
    return {"to_device_staged": best(lambda: kcuda.to_device(weight, "cuda")),
            "h2d_pinned": best(lambda: dev.copy_(pinned, non_blocking=True)),
            "h2d_pageable": best(lambda: dev.copy_(pageable)),
            "d2h_pinned": best(lambda: pinned.copy_(dev, non_blocking=True)),
            "host_memcpy": best(lambda: pinned.copy_(pageable))}


def write_speed(folder: str, nbytes: int = 1 << 30) -> float:
    """GB/s of writing nbytes and fsync (the converter fsyncs every shard)."""
    path = os.path.join(folder, "write_probe.bin")
    block = os.urandom(16 << 20)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    speed = nbytes / (time.perf_counter() - start) / 1e9
    os.unlink(path)
    return speed


def convert(src: str, out: str, device: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "converter", "convert", src, out, "--device", device, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"convert --device {device} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "qckpt_report.json")) as f:
        report = json.load(f)
    return {"device": device, "wall_s": wall, "timings": report.get("timings", {})}


_PLAN_ALONE = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from converter import pipeline
from converter.plan import plan_with_config
from converter.sources import open_source
t1 = time.perf_counter()
src = open_source(sys.argv[1])
plan_with_config(pipeline._collect_infos(src), src.config_dir)
print(json.dumps({"import_s": t1 - t0, "plan_s": time.perf_counter() - t1}))
"""


def plan_alone(src: str) -> dict:
    """transformers' plan built by itself in a fresh process (imports, then skeleton + plan): what the
    conversion's plan thread costs without a conversion running beside it."""
    proc = subprocess.run([sys.executable, "-c", _PLAN_ALONE, src], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"planning {src} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def digests(folder: str) -> dict:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".json")) and name != "qckpt_report.json":
            h = hashlib.sha256()
            with open(os.path.join(folder, name), "rb") as f:
                for chunk in iter(lambda: f.read(16 << 20), b""):
                    h.update(chunk)
            out[name] = h.hexdigest()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=6.0)
    ap.add_argument("--work", default="/tmp/qc7b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--runs", type=int, default=1, help="conversions per device (alternating)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--tiny", action="store_true", help="small shapes; without a GPU only the CPU converts (smoke run)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    src = os.path.join(args.work, "src")
    t = time.perf_counter()
    info = make_checkpoint(src, args.size_gb, args.shard_gb, args.tiny)
    info["gen_s"] = time.perf_counter() - t
    gb = info["bytes"] / 1e9
    gpu = torch.cuda.is_available()
    devices = ("cuda", "cpu") if gpu else ("cpu", "cpu")
    print(f"checkpoint: {gb:.2f} GB, {info['layers']} Llama-7B-shaped layers, {info['shards']} shards "
          f"(made in {info['gen_s']:.1f} s)", flush=True)
    files = shard_files(src)
    cold = read_speed(files) if drop_caches() else None
    warm = read_speed(files)
    copies = copy_speeds() if gpu else {}
    write = write_speed(args.work)
    ceil = {"disk_read_cold": cold, "page_cache_read": warm, **copies, "disk_write_fsync": write}
    print("ceilings GB/s:", json.dumps({k: None if v is None else round(v, 2) for k, v in ceil.items()}), flush=True)
    subprocess.run([sys.executable, "-c", "import converter.pipeline, transformers, torch"], cwd=ROOT, check=False)
    alone = plan_alone(src)
    print("plan alone s:", json.dumps({k: round(v, 2) for k, v in alone.items()}), flush=True)
    runs = []
    for _ in range(args.runs):
        for i, device in enumerate(devices):
            r = convert(src, os.path.join(args.work, f"out_{i}"), device)
            r["in_gbs"] = gb / r["wall_s"]
            runs.append(r)
            print(f"convert --device {device}: {r['wall_s']:.2f} s wall, {r['in_gbs']:.2f} GB/s; "
                  f"stages {json.dumps(r['timings'])}", flush=True)
    a, b = digests(os.path.join(args.work, "out_0")), digests(os.path.join(args.work, "out_1"))
    same = a == b and len(a) > 0
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    print(f"byte check {devices[0]} vs {devices[1]} on {len(a)} files: {'IDENTICAL' if same else 'DIFFERENT: ' + ', '.join(differ)}")
    out_gb = sum(os.path.getsize(f) for f in shard_files(os.path.join(args.work, "out_0"))) / 1e9

    def f2(v):
        return "—" if v is None else f"{v:.2f}"

    card = torch.cuda.get_device_name() if gpu else "no GPU"
    lines = [f"Card: {card}; {os.cpu_count()} CPU cores; torch {torch.__version__}; "
             f"input {gb:.2f} GB bf16 ({info['layers']} Llama-7B-shaped layers + embed + lm_head, {info['shards']} "
             f"shards), output {out_gb:.2f} GB NF4+DQ; converted from the page cache.", "",
             "Ceilings (GB/s): " + ", ".join(f"{k} {f2(v)}" for k, v in ceil.items()), "",
             f"Plan alone in a fresh process: imports {alone['import_s']:.2f} s, skeleton + plan "
             f"{alone['plan_s']:.2f} s (the conversion's plan_thread_s builds the same beside the loop).", "",
             "| device | wall s | input GB/s | read_s | quantize_s | error_s | write_s | plan_s | plan_thread_s | total_s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        tm = r["timings"]
        cells = [f"{tm[k]:.2f}" if isinstance(tm.get(k), (int, float)) else "—"
                 for k in ("read_s", "quantize_s", "error_s", "write_s", "plan_s", "plan_thread_s", "total_s")]
        lines.append(f"| {r['device']} | {r['wall_s']:.2f} | {r['in_gbs']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", f"Byte check (every shard, index, config.json): {'identical' if same else 'DIFFERENT: ' + ', '.join(differ)}"]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "convert_bench.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "convert_bench.json"), "w") as f:
        json.dump({"checkpoint": info, "ceilings_gbs": ceil, "plan_alone_s": alone, "runs": runs, "identical": same,
                   "differ": differ}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
