"""The CUDA AdamW kernels (native/cuda/optim8.cu) against the CPU kernel, element for element, and the
optimizers on CUDA: AdamW8bit equal to itself on CPU, PagedAdamW8bit's managed state. Non-NaN values are
compared bit for bit; NaN must be NaN in the same places (payloads are the hardware's). Skipped without a
GPU or without the built extension (scripts/gpu_check.sh runs them)."""
import pytest
import torch

from converter.errors import OptimizerError
from converter.kernels import optim_cpu
from converter.optim import AdamW8bit, PagedAdamW8bit, maps
from converter.optim import reference as ref
from cuda_required import require_cuda_extension

pytestmark = pytest.mark.cuda
require_cuda_extension()

from converter.kernels import optim_cuda  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
M_MAP, V_MAP = maps.signed_map(), maps.unsigned_map()
DEV = torch.device("cuda", torch.cuda.current_device())


def _bits(t):
    t = t.detach().cpu().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _difference(label, got, want):
    """None when equal (bits, or NaN against NaN), else where they first differ."""
    got, want = got.detach().cpu().reshape(-1), want.detach().cpu().reshape(-1)
    differ = _bits(got) != _bits(want)
    if got.is_floating_point():
        differ &= ~(torch.isnan(got.float()) & torch.isnan(want.float()))
    idx = differ.nonzero().flatten()
    if idx.numel() == 0:
        return None
    i = int(idx[0])
    return f"{label}: {idx.numel()} differ, first at {i}: cuda {got[i].item()} vs cpu {want[i].item()}"


def _assert_same(label, got, want):
    names = ("param", "m codes", "m absmax", "v codes", "v absmax")
    problems = [_difference(f"{label} {name}", g, w) for name, g, w in zip(names, got, want)]
    problems = [p for p in problems if p]
    assert not problems, "; ".join(problems)


def _scalars(step, weight_decay=0.01, maximize=False):
    return ref.AdamWScalars.for_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, step=step,
                                     maximize=maximize)


def _grad(n, dtype, blocksize, gen, step):
    """Gaussian with outliers, an all-zero block, and on step 2 a block holding a NaN."""
    g = torch.randn(n, generator=gen) * 1e-3
    g[torch.rand(n, generator=gen) < 0.01] *= 50
    nb = -(-n // blocksize)
    if nb >= 3:
        b = int(torch.randint(0, nb - 1, (1,), generator=gen))
        g[b * blocksize:(b + 1) * blocksize] = 0
        if step == 2:
            g[((b + 1) % (nb - 1)) * blocksize + 1] = float("nan")
    return g.to(dtype)


def _state(n, blocksize, gen):
    mc, ma = ref.quantize(torch.randn(n, generator=gen) * 1e-3, M_MAP, blocksize)
    vc, va = ref.quantize(torch.rand(n, generator=gen) * 1e-6, V_MAP, blocksize)
    return [mc, ma, vc, va]


SIZES = [1, 4095, 4096, 4097, 256 * 37 + 13, 100_003]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("blocksize", [16, 200, 256, 4096])
def test_8bit_step_same_bytes_as_cpu(n, blocksize, gen):
    """Three steps (weight decay on and off, maximize on the last) with every param/grad dtype pair: the
    parameter, codes and absmax equal the CPU kernel's after each step."""
    for param_dtype in DTYPES:
        for grad_dtype in DTYPES:
            p_cpu = torch.randn(n, generator=gen).to(param_dtype)
            st_cpu = _state(n, blocksize, gen)
            p_gpu, st_gpu = p_cpu.to(DEV), [t.to(DEV) for t in st_cpu]
            maps_gpu = optim_cuda.device_maps(M_MAP, V_MAP, DEV)
            for step in (1, 2, 3):
                s = _scalars(step, weight_decay=0.1 * (step % 2), maximize=step == 3)
                g = _grad(n, grad_dtype, blocksize, gen, step)
                optim_cpu.adamw8bit_step(p_cpu, g, st_cpu[0], st_cpu[1], M_MAP, st_cpu[2], st_cpu[3], V_MAP, s,
                                         blocksize=blocksize)
                optim_cuda.adamw8bit_step(p_gpu, g.to(DEV), st_gpu[0], st_gpu[1], maps_gpu[0], st_gpu[2], st_gpu[3],
                                          maps_gpu[1], s, blocksize=blocksize)
                _assert_same(f"{param_dtype}/{grad_dtype} step {step}", (p_gpu, *st_gpu), (p_cpu, *st_cpu))


def test_8bit_step_large_and_misaligned(gen):
    """A few hundred thousand elements on the vector path, and the same through misaligned views (the
    thread-block path): identical to the CPU kernel."""
    for n, offset in ((300_001, 0), (262_144, 0), (100_000, 1)):
        p_cpu = torch.randn(n, generator=gen)
        st_cpu = _state(n, 256, gen)
        p_gpu = torch.empty(n + offset, device=DEV)[offset:].copy_(p_cpu.to(DEV))
        st_gpu = [torch.empty(t.numel() + offset, dtype=t.dtype, device=DEV)[offset:].copy_(t.to(DEV)) for t in st_cpu]
        maps_gpu = optim_cuda.device_maps(M_MAP, V_MAP, DEV)
        for step in (1, 2):
            g = _grad(n, torch.bfloat16, 256, gen, step)
            s = _scalars(step)
            optim_cpu.adamw8bit_step(p_cpu, g, st_cpu[0], st_cpu[1], M_MAP, st_cpu[2], st_cpu[3], V_MAP, s)
            optim_cuda.adamw8bit_step(p_gpu, g.to(DEV), st_gpu[0], st_gpu[1], maps_gpu[0], st_gpu[2], st_gpu[3],
                                      maps_gpu[1], s)
            _assert_same(f"n={n} offset={offset} step {step}", (p_gpu, *st_gpu), (p_cpu, *st_cpu))


def test_8bit_step_zero_gradient(gen):
    """Zero gradients on a zero state: the parameter only decays and the codes match (all-zero blocks)."""
    n = 4097
    p_cpu, g = torch.randn(n, generator=gen), torch.zeros(n)
    st_cpu = [torch.full((n,), 127, dtype=torch.uint8), torch.zeros(17), torch.zeros(n, dtype=torch.uint8), torch.zeros(17)]
    p_gpu, st_gpu = p_cpu.to(DEV), [t.to(DEV) for t in st_cpu]
    maps_gpu = optim_cuda.device_maps(M_MAP, V_MAP, DEV)
    s = _scalars(1, weight_decay=0.1)
    optim_cpu.adamw8bit_step(p_cpu, g, st_cpu[0], st_cpu[1], M_MAP, st_cpu[2], st_cpu[3], V_MAP, s)
    optim_cuda.adamw8bit_step(p_gpu, g.to(DEV), st_gpu[0], st_gpu[1], maps_gpu[0], st_gpu[2], st_gpu[3], maps_gpu[1], s)
    _assert_same("zero grad", (p_gpu, *st_gpu), (p_cpu, *st_cpu))


@pytest.mark.parametrize("n", [1, 4097, 100_003])
def test_32bit_step_same_bytes_as_cpu(n, gen):
    """The float32-state step equals the CPU kernel for every dtype pair over three steps."""
    for param_dtype in DTYPES:
        for grad_dtype in DTYPES:
            p_cpu = torch.randn(n, generator=gen).to(param_dtype)
            m_cpu, v_cpu = torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-6
            p_gpu, m_gpu, v_gpu = p_cpu.to(DEV), m_cpu.to(DEV), v_cpu.to(DEV)
            for step in (1, 2, 3):
                s = _scalars(step, weight_decay=0.1 * (step % 2), maximize=step == 3)
                g = _grad(n, grad_dtype, 256, gen, step)
                optim_cpu.adamw32_step(p_cpu, g, m_cpu, v_cpu, s)
                optim_cuda.adamw32_step(p_gpu, g.to(DEV), m_gpu, v_gpu, s)
                problems = [_difference(f"{param_dtype}/{grad_dtype} step {step} {k}", a, b)
                            for k, a, b in (("param", p_gpu, p_cpu), ("m", m_gpu, m_cpu), ("v", v_gpu, v_cpu))]
                assert not any(problems), problems


def test_cuda_kernels_refuse_bad_arguments(gen):
    """State on another device, wrong sizes, a bad blocksize and a non-increasing map are clear errors."""
    n = 600
    p, g = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    mc, ma, vc, va = [t.to(DEV) for t in _state(n, 256, gen)]
    mm, vm = optim_cuda.device_maps(M_MAP, V_MAP, DEV)
    s = _scalars(1)
    with pytest.raises(OptimizerError, match="first-moment absmax"):
        optim_cuda.adamw8bit_step(p, g, mc, ma[:-1], mm, vc, va, vm, s)
    with pytest.raises(OptimizerError, match="parameter's device"):
        optim_cuda.adamw8bit_step(p, g, mc.cpu(), ma, mm, vc, va, vm, s)
    with pytest.raises(OptimizerError, match="CUDA kernel needs CUDA tensors"):
        optim_cuda.adamw8bit_step(p.cpu(), g, mc, ma, mm, vc, va, vm, s)
    with pytest.raises(OptimizerError, match="blocksize"):
        optim_cuda.adamw8bit_step(p, g, mc, ma, mm, vc, va, vm, s, blocksize=8192)
    with pytest.raises(OptimizerError, match="second moment"):
        optim_cuda.adamw32_step(p, g, torch.zeros(n, device=DEV), torch.zeros(n - 1, device=DEV), s)


def _params(gen, device, dtype=torch.float32):
    big = torch.nn.Parameter((torch.randn(100, 131, generator=gen) * 0.1).to(device=device, dtype=dtype))
    small = torch.nn.Parameter(torch.randn(300, generator=gen).to(device=device, dtype=dtype))
    return [big, small]


def _run(opt_class, params, grads, steps):
    opt = opt_class(params, weight_decay=0.05)
    for i in range(steps):
        for p, g in zip(params, grads[i]):
            p.grad = g.to(device=p.device, dtype=p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw8bit_on_cuda_equals_cpu(dtype, gen):
    """AdamW8bit on CUDA parameters ends with the same parameters and state as on CPU parameters."""
    cpu_params = _params(gen, "cpu", dtype)
    gpu_params = [torch.nn.Parameter(p.detach().to(DEV)) for p in cpu_params]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in cpu_params] for _ in range(5)]
    opt_cpu, opt_gpu = _run(AdamW8bit, cpu_params, grads, 5), _run(AdamW8bit, gpu_params, grads, 5)
    for pc, pg in zip(cpu_params, gpu_params):
        assert _difference("param", pg, pc) is None
        for key, value in opt_cpu.state[pc].items():
            assert opt_gpu.state[pg][key].device == (value.device if key == "step" else pg.device)
            assert _difference(key, opt_gpu.state[pg][key], value) is None


@pytest.mark.parametrize("opt_class", [AdamW8bit, PagedAdamW8bit])
def test_state_dict_round_trip_on_cuda(opt_class, gen, tmp_path):
    """Saving after 3 steps and loading into a fresh optimizer continues exactly as the original."""
    params = _params(gen, DEV)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(6)]
    opt = _run(opt_class, params, grads, 3)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = opt_class(clones, weight_decay=0.05)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt"))
    if opt_class is PagedAdamW8bit:
        assert all(optim_cuda.is_managed(v) for s in resumed.state.values() for k, v in s.items() if k != "step")
    for i in range(3, 6):
        for group_params, o in ((params, opt), (clones, resumed)):
            for p, g in zip(group_params, grads[i]):
                p.grad = g.to(DEV)
            o.step()
    for a, b in zip(params, clones):
        assert _difference("param", b, a) is None


def test_paged_state_is_managed_and_equals_adamw8bit(gen):
    """PagedAdamW8bit keeps every state tensor in managed memory and gives AdamW8bit's exact results."""
    params = _params(gen, DEV, torch.bfloat16)
    paged_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(4)]
    plain, paged = _run(AdamW8bit, params, grads, 4), _run(PagedAdamW8bit, paged_params, grads, 4)
    for p, q in zip(params, paged_params):
        assert _difference("param", q, p) is None
        for key, value in paged.state[q].items():
            if key == "step":
                continue
            assert optim_cuda.is_managed(value), key
            assert not optim_cuda.is_managed(plain.state[p][key]), key
            assert _difference(key, value, plain.state[p][key]) is None


def test_paged_state_shares_one_allocation_per_parameter(gen, tmp_path):
    """A parameter's paged state is one managed allocation (one prefetch per step): its tensors lie inside
    it, 16-byte aligned and disjoint; after a state_dict round trip (one allocation per tensor) the steps
    still equal AdamW8bit's."""
    params = _params(gen, DEV, torch.float32)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in params] for _ in range(4)]
    paged = _run(PagedAdamW8bit, params, grads[:2], 2)
    for p in params:
        tensors = [v for k, v in paged.state[p].items() if k != "step"]
        arena = paged._arenas[p]
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
        assert spans[0][0] == arena.data_ptr() and spans[-1][1] <= arena.data_ptr() + arena.numel()
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and all(lo % 16 == 0 for lo, _ in spans)
    path = tmp_path / "paged.pt"
    torch.save(paged.state_dict(), path)
    plain = _run(AdamW8bit, plain_params, grads[:2], 2)
    resumed = PagedAdamW8bit(params)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for step_grads in grads[2:]:
        for p, q, g in zip(params, plain_params, step_grads):
            p.grad, q.grad = g.to(DEV, p.dtype), g.to(DEV, q.dtype)
        resumed.step()
        plain.step()
    for p, q in zip(params, plain_params):
        assert _difference("param", p, q) is None


def test_moved_parameter_is_a_clear_error(gen):
    """State made on one device and a parameter moved elsewhere afterwards: an error, not a bad launch."""
    p = torch.nn.Parameter(torch.randn(8192, generator=gen).to(DEV))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    p.data = p.data.cpu()
    p.grad = torch.randn_like(p)
    with pytest.raises(OptimizerError):
        opt.step()


def test_managed_memory_helpers():
    """managed_empty gives a writable CUDA tensor in managed memory; prefetch to host and back keeps it."""
    t = optim_cuda.managed_empty(1000, torch.float32, DEV)
    assert t.device == DEV and t.dtype == torch.float32 and t.shape == (1000,)
    assert optim_cuda.is_managed(t) and optim_cuda.is_managed(t[10:])
    t.copy_(torch.arange(1000.0, device=DEV))
    optim_cuda.prefetch(t, "cpu")
    optim_cuda.prefetch(t)
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), torch.arange(1000.0))
    view = t[5:]
    del t  # the view keeps the managed memory alive
    assert float(view[0]) == 5.0
    assert not optim_cuda.is_managed(torch.zeros(4, device=DEV))


def test_paged_refuses_cpu_parameters():
    """PagedAdamW8bit on CPU parameters (also in an added group) is a clear error naming AdamW8bit."""
    with pytest.raises(OptimizerError, match="AdamW8bit"):
        PagedAdamW8bit([torch.nn.Parameter(torch.randn(10))])
    opt = PagedAdamW8bit([torch.nn.Parameter(torch.randn(10, device=DEV))])
    with pytest.raises(OptimizerError, match="CUDA device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(10))]})


def test_mixed_devices_in_one_group(gen):
    """A group mixing CPU and CUDA parameters steps each on its own device, each equal to the CPU result."""
    cpu_params = _params(gen, "cpu")
    mixed = [torch.nn.Parameter(cpu_params[0].detach().to(DEV)), torch.nn.Parameter(cpu_params[1].detach().clone())]
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in cpu_params] for _ in range(3)]
    _run(AdamW8bit, cpu_params, grads, 3)
    opt = _run(AdamW8bit, mixed, grads, 3)
    assert opt.state[mixed[0]]["state1"].device == DEV and opt.state[mixed[1]]["exp_avg"].device.type == "cpu"
    for a, b in zip(cpu_params, mixed):
        assert _difference("param", b, a) is None


def _layouts(device, gen):
    """Parameters in every layout a step meets: many small ones (more than one multi-tensor launch
    holds), 8-bit ones in fp32 and bf16, one not 16-byte aligned (stepped alone), one non-contiguous
    (stepped in a copy), split over two groups with different learning rates."""
    base = torch.randn(8193, generator=gen)
    unaligned = torch.nn.Parameter(base.to(device)[1:])
    assert unaligned.data_ptr() % 16 != 0
    transposed = torch.nn.Parameter(torch.randn(64, 128, generator=gen).to(device).t())
    assert not transposed.is_contiguous()
    small = [torch.nn.Parameter(torch.randn(int(n), generator=gen).to(device))
             for n in torch.randint(1, 700, (600,), generator=gen)]
    big = [torch.nn.Parameter(torch.randn(5000, generator=gen).to(device)),
           torch.nn.Parameter(torch.randn(70, 257, generator=gen).to(device=device, dtype=torch.bfloat16))]
    return [{"params": small + big[:1], "lr": 1e-3}, {"params": [unaligned, transposed, big[1]], "lr": 3e-3}]


@pytest.mark.parametrize("launch_elements", [None, 1000])
def test_many_parameters_stepped_together_equal_cpu(launch_elements, monkeypatch):
    """AdamW8bit steps a device's parameters in multi-tensor launches (one per kind of state and dtype
    pair, at most QCKPT_CUDA_ADAM_MULTI_MAX parameters each; with a small launch threshold, many launches
    during the step) and the rest one by one: over three steps the parameters and every state tensor
    equal the CPU optimizer's, bit for bit."""
    if launch_elements is not None:
        import converter.optim.adamw as adamw_module

        monkeypatch.setattr(adamw_module, "_LAUNCH_ELEMENTS", launch_elements)
    cpu_groups = _layouts("cpu", torch.Generator().manual_seed(5))
    gpu_groups = _layouts(DEV, torch.Generator().manual_seed(5))
    cpu_opt, gpu_opt = AdamW8bit(cpu_groups, weight_decay=0.01), AdamW8bit(gpu_groups, weight_decay=0.01)
    gen = torch.Generator().manual_seed(6)
    cpu_params = [p for g in cpu_groups for p in g["params"]]
    gpu_params = [p for g in gpu_groups for p in g["params"]]
    for _ in range(3):
        for p, q in zip(cpu_params, gpu_params):
            g = torch.randn(p.shape, generator=gen) * 1e-2
            p.grad, q.grad = g.to(p.dtype), g.to(device=DEV, dtype=q.dtype)
        cpu_opt.step()
        gpu_opt.step()
    for i, (p, q) in enumerate(zip(cpu_params, gpu_params)):
        assert _difference(f"param {i}", q, p) is None
        for key, value in cpu_opt.state[p].items():
            assert _difference(f"param {i} {key}", gpu_opt.state[q][key], value) is None


def test_multi_launch_refuses_bad_tables(gen):
    """The C side checks the host copy of a multi-tensor table: wrong work-unit offsets, misalignment,
    counts outside [1, QCKPT_CUDA_ADAM_MULTI_MAX]."""
    from converter.kernels import cuda as kcuda

    ffi, lib = kcuda.load()
    p = torch.randn(1024, device=DEV)
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    table = ffi.new("qckpt_cuda_adam_tensor[]", 2)
    for i in range(2):
        table[i].param, table[i].grad, table[i].n = kcuda._ptr(p), kcuda._ptr(g), 1024
        table[i].m32, table[i].v32 = kcuda._ptr(m, "float *"), kcuda._ptr(v, "float *")
        table[i].hp.beta1 = 0.9
    table[1].first = 3  # should be 4
    stream = kcuda._stream(p.device)
    assert lib.qckpt_cuda_adamw32_multi(table, table, 2, 0, 0, stream) != 0
    assert "first work unit" in ffi.string(lib.qckpt_cuda_last_error()).decode()
    assert lib.qckpt_cuda_adamw32_multi(table, table, 0, 0, 0, stream) != 0
    table[1].first = 4
    table[0].m_codes = table[0].v_codes = ffi.cast("uint8_t *", kcuda._ptr(p, "uint8_t *"))
    table[0].m_absmax = table[0].v_absmax = kcuda._ptr(m, "float *")
    table[0].param = ffi.cast("void *", p.data_ptr() + 4)
    maps = torch.linspace(-1, 1, 256, device=DEV)
    assert lib.qckpt_cuda_adamw8bit_multi(table, table, 1, 0, 0, kcuda._ptr(maps, "float *"),
                                          kcuda._ptr(maps, "float *"), stream) != 0
    assert "aligned" in ffi.string(lib.qckpt_cuda_last_error()).decode()


def test_error_mid_step_still_steps_the_collected_parameters(gen):
    """CUDA parameters are collected for a multi-tensor launch after their step is counted; an error in a
    later group (here amsgrad switched on after construction) still launches the collected ones, so a
    caller that catches it keeps state consistent with a plain step of those parameters."""
    good = torch.nn.Parameter(torch.randn(6000, generator=gen).to(DEV))
    twin = torch.nn.Parameter(good.detach().clone())
    other = torch.nn.Parameter(torch.randn(300, generator=gen).to(DEV))
    grad = torch.randn(6000, generator=gen).to(DEV)
    good.grad, twin.grad, other.grad = grad.clone(), grad.clone(), torch.randn(300, device=DEV)
    opt, ref_opt = AdamW8bit([{"params": [good]}, {"params": [other]}]), AdamW8bit([twin])
    opt.param_groups[1]["amsgrad"] = True
    with pytest.raises(OptimizerError, match="amsgrad"):
        opt.step()
    ref_opt.step()
    assert int(opt.state[good]["step"]) == 1 and len(opt.state[other]) == 0
    assert _difference("param", good, twin) is None
