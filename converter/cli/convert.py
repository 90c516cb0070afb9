"""`qckpt convert SOURCE OUTPUT`: a thin adapter over converter.convert()."""
from __future__ import annotations

import json
import sys

import click


def _max_shard_size(ctx, param, value):
    from ..pipeline import parse_size

    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--quant", type=click.Choice(["nf4", "fp4", "int8"]), default="nf4", show_default=True)
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]),
              default="64", show_default=True, help="4-bit block size.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the 4-bit block scales again (bitsandbytes compress_statistics).")
@click.option("--compute-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
              show_default=True, help="bnb_4bit_compute_dtype written to config.json.")
@click.option("--skip", "skip", multiple=True, metavar="GLOB", help="Leave matching modules unquantized (repeatable).")
@click.option("--revision", default=None, help="Hub branch, tag or commit (pinned to a commit sha).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Quantization threads (default: all cores).")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=_max_shard_size,
              help="Largest output shard, e.g. 5GB, 500MB.")
@click.option("--resume", is_flag=True, help="Continue an interrupted conversion into OUTPUT.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty OUTPUT.")
@click.option("--push-to", "push_to", default=None, metavar="REPO_ID",
              help="Upload each shard to this Hub repo as soon as it is written (then delete it locally) and "
                   "commit once at the end; OUTPUT keeps only config, index, card and report. With --resume, "
                   "shards already pushed are quantized again but not re-sent (the Hub has their bytes).")
@click.option("--private", is_flag=True, help="With --push-to: create the repo private.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or summary text.")
def command(source, output, quant, blocksize, double_quant, compute_dtype, skip, revision, token, device, threads,
            max_shard_size, resume, overwrite, push_to, private, as_json, quiet):
    """Quantize the checkpoint SOURCE (folder, .safetensors file or Hub repo id) into the folder OUTPUT."""
    from .. import convert

    if private and not push_to:
        raise click.UsageError("--private only applies with --push-to")
    report = convert(
        source, output, quant=quant, blocksize=int(blocksize), double_quant=double_quant,
        compute_dtype=compute_dtype, skip=skip, revision=revision, token=token, device=device, threads=threads,
        max_shard_size=max_shard_size, resume=resume, overwrite=overwrite,
        progress=False if quiet else sys.stderr.isatty(), push_to=push_to, private=private,
    )
    if as_json:
        click.echo(json.dumps(report.summary()))
    elif not quiet:
        click.echo(report.summary_text())
