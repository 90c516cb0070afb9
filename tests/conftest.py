"""Shared fixtures. Keep this small: fixtures used by several test files only (additive changes welcome)."""
import os

import pytest
import torch


@pytest.fixture
def seed(request) -> int:
    """A fresh random seed per test (inputs differ run to run); printed so a failure can be replayed
    with QCKPT_TEST_SEED=<seed>."""
    value = int(os.environ.get("QCKPT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.nodeid}: QCKPT_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch.Generator seeded with `seed`."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def cpu_isas() -> list:
    """Every native ISA variant this CPU can run, scalar first (the reference the others must equal)."""
    from converter.kernels import cpu

    best = cpu.best_isa()
    order = ["scalar", "neon"] if best == "neon" else ["scalar", "avx2", "avx512"]
    return order[: order.index(best) + 1]


def _awkward_weight(shape, dtype, blocksize, gen, zero_block=True):
    """Gaussian values with ~1% outliers (x50) and, when there are >= 2 blocks, one all-zero block
    somewhere in the middle; blocks straddle rows whenever the last dim is not a multiple of blocksize."""
    numel = 1
    for d in shape:
        numel *= d
    flat = torch.randn(numel, generator=gen, dtype=torch.float32)
    outliers = torch.rand(numel, generator=gen) < 0.01
    flat = torch.where(outliers, flat * 50, flat)
    nb = -(-numel // blocksize)
    if zero_block and nb >= 2:
        b = int(torch.randint(0, nb - 1, (1,), generator=gen))  # never the partial tail block
        flat[b * blocksize:(b + 1) * blocksize] = 0
    return flat.reshape(shape).to(dtype)


@pytest.fixture
def awkward():
    """Factory: awkward(shape, dtype, blocksize, gen, zero_block=True) -> tensor (see _awkward_weight)."""
    return _awkward_weight


@pytest.fixture
def one_torch_thread():
    """Run on one torch thread, restored after: for tiny models it is as fast, and it avoids spinning
    OpenMP workers on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
