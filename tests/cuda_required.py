"""The module-level guard of the GPU test files: skip the whole module without a CUDA device or without
the built CUDA extension (scripts/gpu_check.sh runs them on a GPU host)."""
import pytest
import torch


def require_cuda_extension() -> None:
    from converter.kernels import cuda as kcuda

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device", allow_module_level=True)
    if not kcuda.available():
        pytest.skip("CUDA extension not built (python native/ffi/build_cuda.py)", allow_module_level=True)
