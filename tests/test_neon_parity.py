"""NEON 4-bit variant parity without ARM hardware: scripts/check_neon.sh cross-compiles the native
library for AArch64 and runs tests/native/neon_parity.c under qemu-aarch64 (skipped unless both tools
are installed: apt-get install gcc-aarch64-linux-gnu qemu-user)."""
import pathlib
import shutil
import subprocess

import pytest
import torch

from converter.formats.codebooks import QuantType
from converter.kernels import cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-gcc and qemu-aarch64")
def test_neon_4bit_equals_scalar_under_qemu(seed):
    """On AArch64 the NEON quantize/dequantize give the scalar variant's bytes for every dtype, blocksize
    and awkward size, reject NaN/inf with the same message, and AUTO resolves to NEON."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_neon.sh"), str(seed)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 mismatches" in proc.stdout and "NEON == scalar byte for byte" in proc.stdout


def test_foreign_isa_is_refused():
    """A variant of the other architecture (NEON on x86, AVX2 on ARM) fails cleanly instead of running."""
    foreign = "avx2" if cpu.best_isa() == "neon" else "neon"
    with pytest.raises(Exception, match="not supported by this CPU"):
        cpu.quantize_4bit(torch.ones(64), QuantType.NF4, 64, isa=foreign)
    with pytest.raises(Exception, match="not supported by this CPU"):
        cpu.dequantize_4bit(torch.zeros(32, dtype=torch.uint8), torch.ones(1), QuantType.NF4, 64, (64,),
                            torch.float32, isa=foreign)
