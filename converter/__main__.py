"""`python -m converter` runs the `qckpt` command line."""
from .cli import main

main(prog_name="qckpt")
