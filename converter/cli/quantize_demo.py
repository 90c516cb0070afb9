"""`qckpt quantize-demo`: quantize one random weight and print its error, a smoke test of the install."""
from __future__ import annotations

import json

import click


@click.command("quantize-demo")
@click.option("--shape", default="4096x4096", show_default=True, help="Weight shape as NxK.")
@click.option("--quant", "quant_type", type=click.Choice(["nf4", "fp4", "int8"]), default="nf4", show_default=True)
@click.option("--blocksize", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def command(shape, quant_type, blocksize, seed):
    """Quantize a random bf16 weight and report the round-trip error."""
    import torch

    from .. import quantize
    from ..errors import QuantizationInputError

    try:
        dims = tuple(int(d) for d in shape.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected NxK, got {shape!r}", param_hint="--shape") from None
    if any(d <= 0 for d in dims):
        raise QuantizationInputError(f"shape {shape!r} has a non-positive dimension")
    weight = torch.randn(dims, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    qt = quantize(weight, quant_type, blocksize=blocksize)
    restored = qt.dequantize(torch.float32)
    ref = weight.float()
    rel = float((restored - ref).norm() / ref.norm())
    click.echo(json.dumps({
        "shape": list(dims), "quant_type": quant_type, "blocksize": blocksize,
        "bytes_in": weight.numel() * 2, "bytes_out": qt.nbytes(), "relative_error": round(rel, 6),
    }))
