"""The installed command line: `qckpt --version`, `python -m converter`, the quantize-demo smoke test and
the one-line error contract (exit 1, a single `error:` line on stderr)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from converter import __version__
from converter.cli import main


def run(args, env_extra=None):
    env = {**os.environ, "QCKPT_THREADS": "1", **(env_extra or {})}
    env.pop("QCKPT_DEBUG", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)


def test_console_script_version():
    """The `qckpt` console script is installed and prints the package version."""
    exe = shutil.which("qckpt") or os.path.join(os.path.dirname(sys.executable), "qckpt")
    if not os.path.exists(exe):
        pytest.fail("the qckpt console script is not installed (pip install -e .)")
    result = run([exe, "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qckpt, version {__version__}"


def test_python_m_converter_version():
    """`python -m converter --version` is the same program under the name qckpt."""
    result = run([sys.executable, "-m", "converter", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"qckpt, version {__version__}"


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_quantize_demo_smoke(quant):
    """quantize-demo quantizes a random bf16 weight and prints one JSON line with a plausible error."""
    result = CliRunner().invoke(main, ["quantize-demo", "--shape", "96x160", "--quant", quant, "--blocksize", "32"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["shape"] == [96, 160] and report["quant_type"] == quant
    assert report["bytes_in"] == 96 * 160 * 2
    assert report["bytes_out"] < report["bytes_in"]
    assert 0 < report["relative_error"] < {"nf4": 0.12, "fp4": 0.15, "int8": 0.02}[quant]


@pytest.mark.parametrize(
    "args,message",
    [
        (["quantize-demo", "--shape", "4x4", "--blocksize", "48"], "error: unsupported blocksize 48 "),
        (["quantize-demo", "--shape", "0x4"], "error: shape '0x4' has a non-positive dimension"),
    ],
)
def test_input_error_exits_1_with_one_error_line(args, message):
    """A bad input exits with status 1 and exactly one stderr line starting `error:`, no traceback."""
    result = run([sys.executable, "-m", "converter", *args])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_flag_shows_traceback():
    """--debug turns the one-line error into the full traceback (still a failing exit)."""
    result = run([sys.executable, "-m", "converter", "--debug", "quantize-demo", "--shape", "0x4"])
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "QuantizationInputError" in result.stderr


def test_usage_error_exits_2():
    """Command-line usage errors (unknown option) are Click's: exit status 2."""
    result = CliRunner().invoke(main, ["quantize-demo", "--no-such-option"])
    assert result.exit_code == 2
