"""`verify --source`: re-quantize every quantized tensor from the source with the recorded settings and prove
the stored bytes identical (qckpt's determinism invariant), or name the first tensor that differs and by how much.

Split from verify.py because it is the only part that reads the source checkpoint.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from safetensors import safe_open

from .errors import QckptError


def _settings(report, qt) -> dict:
    """The recorded settings: the report's when present, else what the stored quant state says."""
    recorded = report.get("settings") if isinstance(report, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    quant = recorded.get("quant", recorded.get("quant_type"))
    return {
        "quant_type": quant if quant in ("nf4", "fp4", "int8") else qt.quant_type.value,
        "blocksize": recorded.get("blocksize") if isinstance(recorded.get("blocksize"), int) else (qt.blocksize or 64),
        "double_quant": (recorded["double_quant"] if isinstance(recorded.get("double_quant"), bool)
                         else qt.double_quant),
    }


def _byte_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(bytes that differ, first differing byte) of two tensors of equal byte size."""
    xa = a.contiguous().reshape(-1).view(torch.uint8)
    xb = b.contiguous().reshape(-1).view(torch.uint8)
    diff = (xa != xb).nonzero()
    return int(diff.numel()), int(diff[0]) if diff.numel() else -1


def reproduce(opened, modules: dict, qconfig: dict, report, source, findings, *, revision=None, token=None,
              threads=None) -> dict:
    """Compare stored tensors with a fresh quantization of `source`; append findings; return a summary.

    The source is read through `sources.open_source`, shard by shard (a Hub source downloads one shard at a
    time), so this needs no more disk or memory than a conversion does."""
    from .sources import open_source
    from .verify import module_tensor_names

    names = list(opened.names())
    quantized = {f"{prefix}weight": prefix for prefix in modules}
    members_of = {p: module_tensor_names(p, qt.quant_type.value, names) for p, qt in modules.items()}
    claimed = {n for members in members_of.values() for n in members}
    passthrough = set(names) - claimed
    wanted = set(quantized) | passthrough
    differing = {}  # tensor name -> message
    seen = set()
    worst = (0.0, None)
    import tempfile

    work = tempfile.TemporaryDirectory(prefix="qckpt-verify-")  # a Hub source downloads shards here
    try:
        src = open_source(source, revision=revision, token=token, work_dir=work.name)
    except BaseException:
        work.cleanup()
        raise
    try:
        shards = list(src.shards)
        for shard in shards:
            present = {t.name for t in src.header(shard).tensors} & (wanted - seen)
            if not present:
                continue
            for _, path in src.iter_shards([shard]):
                with safe_open(path, framework="pt", device="cpu") as handle:
                    for name in sorted(present):
                        seen.add(name)
                        original = handle.get_tensor(name)
                        if name in quantized:
                            prefix = quantized[name]
                            problem, rel = _check_quantized(opened, prefix, members_of[prefix], modules[prefix],
                                                            original, report, threads)
                            if rel is not None and rel >= worst[0]:
                                worst = (rel, name)
                        else:
                            problem = _compare_passthrough(opened, original, name)
                        if problem:
                            differing[name] = problem
    finally:
        src.close()
        work.cleanup()
    for name in sorted(wanted - seen):
        differing[name] = "missing from the source"
    ordered = sorted(differing.items())
    if ordered:
        first, message = ordered[0]
        more = f" ({len(ordered) - 1} more tensors differ)" if len(ordered) > 1 else ""
        findings.add(first, f"not reproducible from {os.fspath(source)}: {message}{more}")
    return {
        "source": os.fspath(source), "tensors_compared": len(seen), "identical": len(seen) - len(
            [n for n in differing if n in seen]),
        "differing": [{"tensor": n, "message": m} for n, m in ordered],
        "max_relative_error": worst[0], "worst_tensor": worst[1],
    }


def _check_quantized(opened, prefix, members, qt, original, report, threads):
    """(problem or None, relative error of the stored weight vs the source)."""
    from . import quantize

    name = f"{prefix}weight"
    s = _settings(report, qt)
    try:
        fresh = quantize(original, s["quant_type"], blocksize=s["blocksize"], double_quant=s["double_quant"],
                         threads=threads, name=name)
    except QckptError as exc:
        return f"cannot be re-quantized: {exc}", None
    if fresh.quant_type.is_4bit:
        fresh = dataclasses.replace(fresh, storage_dtype=qt.storage_dtype)
    problem = _compare_module(opened, prefix, members, fresh.state_dict(prefix), qt, fresh)
    restored = qt.dequantize(torch.float32)
    ref = original.float()
    denom = float(ref.norm())
    rel = float((restored - ref).norm()) / denom if denom else float((restored - ref).abs().max())
    return problem, rel


def _compare_module(opened, prefix: str, members: list, expected: dict, qt, fresh) -> str | None:
    missing = sorted(set(expected) - set(members))
    extra = sorted(set(members) - set(expected))
    if missing or extra:
        return f"stored keys differ from a fresh quantization (missing {missing}, unexpected {extra})"
    for key in sorted(expected, key=lambda k: (k != f"{prefix}weight", k)):
        stored = opened.get(key)
        want = expected[key]
        if stored.dtype != want.dtype or tuple(stored.shape) != tuple(want.shape):
            return (f"{key} is {stored.dtype} {list(stored.shape)}, a fresh quantization gives "
                    f"{want.dtype} {list(want.shape)}")
        count, first = _byte_diff(stored, want)
        if count:
            total = stored.numel() * stored.element_size()
            delta = float((qt.dequantize(torch.float32) - fresh.dequantize(torch.float32)).abs().max())
            return (f"{key}: {count} of {total} bytes differ (first at byte {first}); "
                    f"dequantized weights differ by up to {delta:.6g}")
    return None


def _compare_passthrough(opened, original, name: str) -> str | None:
    stored = opened.get(name)
    if tuple(stored.shape) != tuple(original.shape):
        return f"shape {list(stored.shape)}, the source has {list(original.shape)}"
    if stored.dtype != original.dtype:
        original = original.to(stored.dtype)
    count, first = _byte_diff(stored, original)
    if count:
        total = stored.numel() * stored.element_size()
        delta = float((stored.float() - original.float()).abs().max()) if stored.is_floating_point() else float("nan")
        return f"{count} of {total} bytes differ from the source (first at byte {first}; max abs diff {delta:.6g})"
    return None
