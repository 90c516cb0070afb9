"""The CUDA extension without a GPU: the module imports and degrades on a CPU-only install, nvcc compiles
every native/cuda source (CI's build check), and the exact-mean rounding of double quantization (host
and device code alike) equals reference.exact_mean_f32. nvcc-dependent tests skip when it is absent."""
import importlib.util
import pathlib
import re
import struct
import subprocess

import pytest
import torch

from converter.formats import reference as ref

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _build_module():
    spec = importlib.util.spec_from_file_location("qckpt_build_cuda", ROOT / "native" / "ffi" / "build_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_module_imports_without_gpu_or_extension():
    """Importing the CUDA binding touches no GPU and no extension; available() only answers a question."""
    from converter.kernels import cuda

    assert isinstance(cuda.available(), bool)
    assert cuda.fused_supported(1, 14336, 4096, torch.bfloat16)
    assert cuda.fused_supported(16, 333, 4128, torch.float16)  # decode kernel: K % 32
    assert cuda.fused_supported(17, 333, 4096, torch.bfloat16) and cuda.fused_supported(128, 333, 64, torch.bfloat16)
    assert not cuda.fused_supported(17, 333, 4128, torch.bfloat16)  # prefill kernel: K % 64
    assert not cuda.fused_supported(129, 333, 4096, torch.bfloat16)
    assert not cuda.fused_supported(0, 333, 4096, torch.bfloat16)
    assert not cuda.fused_supported(1, 333, 4100, torch.bfloat16)
    assert not cuda.fused_supported(1, 333, 4096, torch.float32)
    assert not cuda.fused_supported(1, 2**16, 2**20, torch.bfloat16)  # decode positions need n_out * k < 2^36
    assert cuda.fused_supported(1, 2**16 - 1, 2**20, torch.bfloat16)
    assert not cuda.fused_supported(1, 1, 2**31, torch.bfloat16)  # and k < 2^31
    assert cuda.fused_supported(17, 2**20, 2**20, torch.bfloat16)


def test_cuda_cdef_parses_header():
    """The cffi declarations come from qckpt_cuda.h itself and declare every entry point Python calls."""
    cffi = pytest.importorskip("cffi")
    build = _build_module()
    cdef = build.cdef_from_header(build.HEADER.read_text())
    ffi = cffi.FFI()
    ffi.cdef(cdef)  # raises on anything cffi cannot parse
    for name in ("qckpt_cuda_quantize_4bit", "qckpt_cuda_gemm_4bit", "qckpt_cuda_gemm_4bit_workspace",
                 "qckpt_cuda_gemm_4bit_workspace_zeroed",
                 "qckpt_cuda_gemm_4bit_scales_bytes", "qckpt_cuda_gemm_4bit_expand_scales",
                 "qckpt_cuda_read_report", "qckpt_cuda_dequantize_4bit", "qckpt_cuda_quantize_int8_rowwise",
                 "qckpt_cuda_exact_mean", "qckpt_cuda_adamw8bit_step", "qckpt_cuda_adamw32_step",
                 "qckpt_cuda_managed_alloc", "qckpt_cuda_managed_free", "qckpt_cuda_prefetch"):
        assert name in cdef
    # Python's row limit of the fused kernels is the header's
    from converter.kernels import cuda

    limit = re.search(r"QCKPT_CUDA_GEMM_MAX_ROWS = (\d+)", build.HEADER.read_text())
    assert limit and int(limit.group(1)) == cuda.FUSED_MAX_ROWS


@pytest.mark.slow
def test_cuda_sources_compile_with_nvcc(tmp_path):
    """Every native/cuda/*.cu compiles with nvcc for sm_80 (the oldest target) and the objects link into
    one library (no symbol defined twice or missing): build errors fail CI, not the GPU host."""
    build = _build_module()
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    objs = build.compile_objects(nvcc, tmp_path, arches=("80",))
    assert len(objs) == len(build.cu_sources()) and all(pathlib.Path(o).stat().st_size > 0 for o in objs)
    build.link_check(nvcc, objs, tmp_path)
    assert (tmp_path / "link_check.so").stat().st_size > 0


_HARNESS = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "kernels/exact_mean.cuh"
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    std::vector<float> v;
    float x;
    while (fread(&x, 4, 1, f) == 1) v.push_back(x);
    unsigned long long bins[256] = {0};
    for (float y : v) {  /* the device kernel's binning, on the host */
        uint32_t b; memcpy(&b, &y, 4); b &= 0x7FFFFFFFu;
        uint32_t e = b >> 23, m = b & 0x7FFFFFu;
        if (e > 0) m |= 0x800000u; else e = 1;
        bins[e] += m;
    }
    float r = qk::mean_from_bins(bins, v.size());
    uint32_t rb; memcpy(&rb, &r, 4);
    printf("%08x\n", rb);
}
"""


@pytest.mark.slow
def test_exact_mean_rounding_matches_reference(tmp_path, gen):
    """mean_from_bins (the device's exact mean, compiled for the host) rounds like exact_mean_f32 on
    wide exponent spreads (the big-integer path), spans at the 128-bit path's limit, subnormals, equal
    values and ties."""
    build = _build_module()
    nvcc = build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed")
    exe = tmp_path / "mean"
    (tmp_path / "mean.cu").write_text(_HARNESS)
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", f"-I{build.NATIVE / 'include'}", f"-I{build.CUDA_SRC}",
                    "-o", str(exe), str(tmp_path / "mean.cu")], check=True, capture_output=True)
    cases = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0**-24]), torch.tensor([1.0, 2.0**-23, 0.0]),
             torch.tensor([2.0**-149] * 3), torch.tensor([3.4e38] * 5)]
    for i in range(60):
        n = int(torch.randint(1, 3000, (1,), generator=gen))
        kind = i % 5
        if kind == 0:
            v = torch.rand(n, generator=gen)
        elif kind == 1:
            v = torch.rand(n, generator=gen) * torch.exp2(torch.randint(-140, 120, (n,), generator=gen).float())
        elif kind == 2:
            v = torch.randint(0, 2**24, (n,), generator=gen).float() * 2.0**-149
        elif kind == 3:
            v = torch.full((n,), float(torch.rand(1, generator=gen)))
        else:  # exponent spans around the 128-bit path's limit (56) and just past it
            span = 50 + i % 12
            v = (torch.rand(n, generator=gen) + 0.5) * torch.exp2(torch.randint(-20, -20 + span, (n,), generator=gen).float())
            v[0], v[-1] = 2.0**-20, 2.0 ** (-21 + span)
        cases.append(v.float())
    for v in cases:
        path = tmp_path / "in.bin"
        path.write_bytes(v.numpy().tobytes())
        out = subprocess.run([str(exe), str(path)], check=True, capture_output=True, text=True).stdout.strip()
        got = struct.unpack(">f", bytes.fromhex(out))[0]
        want = ref.exact_mean_f32(v)
        assert struct.pack("<f", got) == struct.pack("<f", want), (v[:4], got, want)
