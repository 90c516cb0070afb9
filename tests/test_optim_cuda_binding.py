"""converter.kernels.optim_cuda without a GPU: the checks that run before any CUDA call give clear errors,
and the optimizers refuse what they cannot run (the GPU behaviour is in tests/test_cuda_optim.py)."""
import pytest
import torch

from converter.errors import OptimizerError
from converter.kernels import optim_cuda
from converter.optim import AdamW8bit, PagedAdamW8bit, maps
from converter.optim import reference as ref

S = ref.AdamWScalars.for_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def test_steps_refuse_cpu_parameters():
    """The CUDA steps name the parameter and say they need CUDA tensors, before loading the extension."""
    p, g = torch.zeros(300), torch.zeros(300)
    state = [torch.zeros(300, dtype=torch.uint8), torch.zeros(2), torch.zeros(300, dtype=torch.uint8), torch.zeros(2)]
    with pytest.raises(OptimizerError, match="w: parameter is on cpu, the CUDA kernel needs CUDA tensors"):
        optim_cuda.adamw8bit_step(p, g, state[0], state[1], maps.signed_map(), state[2], state[3],
                                  maps.unsigned_map(), S, name="w")
    with pytest.raises(OptimizerError, match="CUDA kernel needs CUDA tensors"):
        optim_cuda.adamw32_step(p, g, torch.zeros(300), torch.zeros(300), S)


def test_check_map_rejects_bad_maps():
    """A map of the wrong size or not strictly increasing is refused, naming the index; good maps pass."""
    good = maps.unsigned_map()
    assert torch.equal(optim_cuda.check_map(good, "second-moment"), good)
    with pytest.raises(OptimizerError, match="255 entries"):
        optim_cuda.check_map(good[:-1], "second-moment")
    bad = good.clone()
    bad[10] = bad[9]
    with pytest.raises(OptimizerError, match="second-moment map is not strictly increasing at index 9"):
        optim_cuda.check_map(bad, "second-moment")


def test_managed_memory_argument_checks():
    """managed_empty and prefetch refuse non-CUDA devices and empty sizes; a CPU tensor is not managed."""
    with pytest.raises(OptimizerError, match="CUDA devices"):
        optim_cuda.managed_empty(10, torch.float32, "cpu")
    with pytest.raises(OptimizerError, match="positive element count"):
        optim_cuda.managed_empty(0, torch.float32, "cuda:0")
    with pytest.raises(OptimizerError, match="prefetch target"):
        optim_cuda.prefetch(torch.zeros(4), "meta")
    with pytest.raises(OptimizerError, match="CUDA kernel needs CUDA tensors"):
        optim_cuda.prefetch(torch.zeros(4))
    assert not optim_cuda.is_managed(torch.zeros(4))


def test_optimizers_refuse_unsupported_devices():
    """AdamW8bit names a parameter on a device other than CPU/CUDA; PagedAdamW8bit refuses CPU parameters
    (pointing to AdamW8bit), also when they arrive in an added group."""
    p = torch.nn.Parameter(torch.zeros(10, device="meta"))
    p.grad = torch.zeros(10, device="meta")
    with pytest.raises(OptimizerError, match="runs on CPU and CUDA devices"):
        AdamW8bit([p]).step()
    with pytest.raises(OptimizerError, match="converter.optim.AdamW8bit"):
        PagedAdamW8bit([torch.nn.Parameter(torch.zeros(10))])
    with pytest.raises(OptimizerError, match="param group 1 parameter 0"):
        PagedAdamW8bit([{"params": []}, {"params": [torch.nn.Parameter(torch.zeros(3))]}])
