#!/usr/bin/env python
"""Benchmark `qckpt convert` against transformers + bitsandbytes (quantize-on-load on CPU, then
save_pretrained) on a synthetic Llama-shaped bf16 checkpoint, both measured in this run, each in its own
subprocess (wall time, input GB/s, peak RSS from wait4).

    python scripts/bench_convert.py [--size-gb 1.5] [--threads N] [--skip-baseline] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BASELINE = r"""
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=cfg, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[2])
"""


def measure(argv: list, env=None) -> dict:
    """Run argv; wall seconds and the child's own peak RSS (ru_maxrss of wait4, in KiB on Linux)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out_r, err_r = proc.stdout, proc.stderr
    # wait4 gives this child's rusage; read pipes after (the outputs are small)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = out_r.read().decode(), err_r.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": out}


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where the synthetic checkpoint is kept (reused if present)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = ap.parse_args(argv)
    work = args.workdir or os.path.join(tempfile.gettempdir(), f"qckpt-bench-{args.size_gb:g}gb")
    src = os.path.join(work, "src")
    if not os.path.isfile(os.path.join(src, "config.json")):
        subprocess.run([sys.executable, os.path.join(HERE, "make_synthetic_checkpoint.py"), src,
                        "--size-gb", str(args.size_gb), "--shards", "3"], check=True)
    size = dir_bytes(src)
    # Warm the page cache for both runs alike: the benchmark measures conversion, not the disk.
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as fh:
            while fh.read(64 << 20):
                pass
    rows = []
    out = os.path.join(work, "qckpt-out")
    cmd = [sys.executable, "-m", "converter", "convert", src, out, "--overwrite", "--json", "--quiet", "--device", "cpu"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = measure(cmd, env)
    report = json.load(open(os.path.join(out, "qckpt_report.json")))
    rows.append(("qckpt convert (nf4, dq)", r["wall_s"], r["peak_rss_mb"], dir_bytes(out)))
    if not args.skip_baseline:
        base_out = os.path.join(work, "transformers-out")
        shutil.rmtree(base_out, ignore_errors=True)
        b = measure([sys.executable, "-c", BASELINE, src, base_out], env)
        rows.append(("transformers+bnb load_in_4bit + save_pretrained", b["wall_s"], b["peak_rss_mb"], dir_bytes(base_out)))
        if not args.keep:
            shutil.rmtree(base_out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
    print(f"input: {size / 1e9:.2f} GB bf16 Llama-shaped ({src}); cores: {len(os.sched_getaffinity(0))}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"qckpt stage timings (s): {json.dumps(report['timings'])}")
    print()
    print("| path | wall s | input GB/s | peak RSS MB | output GB | speed-up | RSS ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows[-1] if len(rows) > 1 else None
    for name, wall, rss, nbytes in rows:
        speed = f"{base[1] / wall:.1f}x" if base else "-"
        ratio = f"{rss / base[2]:.2f}" if base else "-"
        print(f"| {name} | {wall:.2f} | {size / 1e9 / wall:.3f} | {rss:.0f} | {nbytes / 1e9:.3f} | {speed} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
