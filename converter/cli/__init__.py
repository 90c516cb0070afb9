"""The `qckpt` command line: a Click group of thin adapters over converter's Python API."""
from __future__ import annotations

import importlib

import click

from .._version import __version__
from .errors import run_guarded

# Each command lives in its own module exposing `command`; imported when the group is built.
_COMMAND_MODULES = ("quantize_demo", "convert", "inspect_cmd", "verify", "push")


class QckptGroup(click.Group):
    """Turns every known failure into one `error:` line and exit 1 (tracebacks with --debug)."""

    def invoke(self, ctx):
        return run_guarded(lambda: super(QckptGroup, self).invoke(ctx), debug=ctx.params.get("debug"))


@click.group(cls=QckptGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qckpt")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors (also QCKPT_DEBUG=1).")
@click.pass_context
def main(ctx, debug):
    """Convert Hugging Face checkpoints to bitsandbytes-compatible 4-bit/8-bit safetensors."""
    ctx.obj = {"debug": debug}


for _name in _COMMAND_MODULES:
    main.add_command(importlib.import_module(f".{_name}", __name__).command)
