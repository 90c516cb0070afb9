"""`qckpt verify PATH [--source SOURCE]`: structural integrity, recorded hashes, and optional reproducibility."""
from __future__ import annotations

import json
import sys

import click


@click.command("verify")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--source", default=None, help="Re-quantize from this source (local path or Hub repo id) and "
                                             "check the bytes are identical.")
@click.option("--revision", default=None, help="Revision of a Hub --source.")
@click.option("--token", default=None, help="Hub token for a Hub --source.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for re-quantizing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def command(path, source, revision, token, threads, as_json):
    """Check a converted folder; exit 1 with one line per finding."""
    from ..verify import verify

    result = verify(path, source=source, revision=revision, token=token, threads=threads)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for finding in result.findings:
            click.echo(f"error: {finding}", err=True)
        if result.ok:
            extra = ""
            if result.reproduction is not None:
                r = result.reproduction
                extra = (f"; {r['identical']} of {r['tensors_compared']} tensors reproduced byte for byte from "
                         f"{r['source']} (max relative error {r['max_relative_error']:.4g})")
            click.echo(f"ok: {result.path}: {result.quantized_modules} quantized modules, {result.tensors_checked} "
                       f"tensors in {result.files_checked} shard(s), {result.files_hashed} sha256 checked{extra}")
    if not result.ok:
        sys.exit(1)
