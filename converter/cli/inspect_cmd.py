"""`qckpt inspect PATH_OR_REPO`: what a checkpoint holds, from headers and small files only."""
from __future__ import annotations

import json

import click


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _versus(insp) -> str:
    if not insp.tensor_bytes or not insp.fp16_bytes:
        return "n/a"
    ratio = insp.fp16_bytes / insp.tensor_bytes
    return f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"


def _settings_line(insp) -> str:
    q = insp.quantization
    if not q:
        return "not quantized (no quantization_config)"
    if q.get("load_in_8bit") and not q.get("load_in_4bit"):
        return f"bitsandbytes int8 (LLM.int8 row-wise), threshold {q.get('llm_int8_threshold')}"
    parts = [f"bitsandbytes 4-bit {q.get('bnb_4bit_quant_type', '?')}",
             "double quant" if q.get("bnb_4bit_use_double_quant") else "no double quant"]
    if insp.blocksizes:
        parts.append("blocksize " + "/".join(str(b) for b in insp.blocksizes))
    parts.append(f"compute dtype {q.get('bnb_4bit_compute_dtype', '?')}")
    parts.append(f"storage {q.get('bnb_4bit_quant_storage', 'uint8')}")
    if q.get("llm_int8_skip_modules"):
        parts.append("skip " + ",".join(q["llm_int8_skip_modules"]))
    return ", ".join(parts)


def render(insp) -> str:
    arch = insp.architecture
    name = ",".join(arch.get("architectures") or []) or "?"
    details = [f"{arch[k]} {label}" for k, label in (("num_hidden_layers", "layers"), ("hidden_size", "hidden"),
                                                      ("vocab_size", "vocab")) if k in arch]
    where = insp.location + (f" @ {insp.commit}" if insp.commit else "")
    kept = sorted({g.name for g in insp.groups if g.scheme not in ("nf4", "fp4", "int8")})
    lines = [
        f"checkpoint   {where} ({insp.kind})",
        f"architecture {name} ({arch.get('model_type', '?')}){', ' + ', '.join(details) if details else ''}",
        f"format       {_settings_line(insp)}",
        f"quantized    {len(insp.quantized_modules)} modules ({', '.join(insp.quant_types) or 'none'}); "
        f"{len(insp.unquantized_tensors)} tensors kept unquantized ({', '.join(kept[:6])}"
        f"{', ...' if len(kept) > 6 else ''})",
        f"size         {_size(insp.tensor_bytes)} of tensors in {len(insp.shards)} shard(s) "
        f"({_size(insp.file_bytes)} on disk); fp16 would be {_size(insp.fp16_bytes)} ({_versus(insp)})",
        f"bits/param   {insp.bits_per_param:.3f} over {insp.params:,} parameters"
        + ("" if insp.params_exact else " (4-bit counts derived from packed sizes)"),
    ]
    prov = insp.provenance
    if prov:
        src = prov.get("source", "?")
        commit = prov.get("source_commit")
        tool = f", made by {prov.get('tool', 'qckpt')} {prov['tool_version']}" if prov.get("tool_version") else ""
        lines.append(f"provenance   source {src}{' @ ' + commit if commit else ''}{tool}")
    if insp.errors:
        e = insp.errors
        lines.append(f"error        relative error mean {e['rel_error_mean']:.4g}, max {e['rel_error_max']:.4g} "
                     f"({e['worst_tensor']}) over {e['quantized_tensors']} quantized tensors")
    lines.append("")
    width = max([len("tensor group")] + [len(g.name) for g in insp.groups])
    lines.append(f"  {'tensor group':<{width}} {'scheme':<6} {'count':>5} {'params':>14} {'bytes':>11} {'bits/param':>10}")
    for g in insp.groups:
        lines.append(f"  {g.name:<{width}} {g.scheme:<6} {g.count:>5} {g.params:>14,} {_size(g.bytes):>11} "
                     f"{g.bits_per_param:>10.3f}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("path_or_repo")
@click.option("--revision", default=None, help="Hub branch, tag or commit (Hub repos only).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Draw per-layer relative error and size to this PNG (needs qckpt[plot]).")
def command(path_or_repo, revision, token, as_json, plot_path):
    """Describe a quantized checkpoint (local folder or Hub repo) without downloading its weights."""
    from ..inspection import inspect

    insp = inspect(path_or_repo, revision=revision, token=token)
    if plot_path:
        from ..inspection import plot

        plot(insp, plot_path)
    if as_json:
        click.echo(json.dumps(insp.to_dict(), indent=2))
    else:
        click.echo(render(insp))
        if plot_path:
            click.echo(f"plot written to {plot_path}")
