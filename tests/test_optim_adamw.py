"""converter.optim.AdamW8bit / PagedAdamW8bit as torch optimizers: steps equal the reference, state size,
state_dict round trip, edge cases, and training behaviour against torch.optim.AdamW."""
import io

import pytest
import torch

from converter.errors import OptimizerError
from converter.optim import AdamW8bit, PagedAdamW8bit, maps, state_nbytes
from converter.optim import reference as ref

from shared_data import DATA


def _params(gen, dtype=torch.float32):
    """An 8-bit-sized matrix (awkward size), a 32-bit-sized vector, and one that never gets a gradient."""
    big = torch.nn.Parameter(torch.randn(97, 131, generator=gen).to(dtype))
    small = torch.nn.Parameter(torch.randn(300, generator=gen).to(dtype))
    unused = torch.nn.Parameter(torch.randn(5000, generator=gen).to(dtype))
    return big, small, unused


def _expected_step(p, g, st, s):
    """Reference step for one parameter with a reference state dict {'m'.., 'step'}; returns the new param."""
    if "mc" in st:
        new, st["mc"], st["ma"], st["vc"], st["va"] = ref.adamw8bit_step(
            p, g, st["mc"], st["ma"], st["vc"], st["va"], maps.signed_map(), maps.unsigned_map(), s)
    else:
        new, st["m"], st["v"] = ref.adamw32_step(p, g, st["m"], st["v"], s)
    return new


def _fresh_ref_state(n):
    if n >= 4096:
        nb = -(-n // 256)
        return {"mc": torch.full((n,), 127, dtype=torch.uint8), "ma": torch.zeros(nb),
                "vc": torch.zeros(n, dtype=torch.uint8), "va": torch.zeros(nb)}
    return {"m": torch.zeros(n), "v": torch.zeros(n)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_steps_match_reference_with_groups(dtype, gen):
    """4 steps on two param groups (different lr, weight decay 0 and > 0), one zero gradient, one parameter
    without a gradient: every parameter equals the reference exactly; the unused one is untouched."""
    big, small, unused = _params(gen, dtype)
    groups = [{"params": [big, unused], "lr": 3e-3, "weight_decay": 0.0},
              {"params": [small], "lr": 1e-2, "weight_decay": 0.1}]
    opt = AdamW8bit(groups, betas=(0.85, 0.99))
    expected = {id(p): p.detach().clone() for p in (big, small, unused)}
    ref_states = {id(p): _fresh_ref_state(p.numel()) for p in (big, small)}
    for step in range(1, 5):
        for p in (big, small):
            p.grad = torch.zeros_like(p) if step == 2 else (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
        opt.step()
        for p, lr, wd in ((big, 3e-3, 0.0), (small, 1e-2, 0.1)):
            s = ref.AdamWScalars.for_step(lr=lr, beta1=0.85, beta2=0.99, eps=1e-8, weight_decay=wd, step=step)
            expected[id(p)] = _expected_step(expected[id(p)], p.grad, ref_states[id(p)], s)
            assert torch.equal(p.detach(), expected[id(p)]), f"step {step}, shape {tuple(p.shape)}"
    assert torch.equal(unused.detach(), expected[id(unused)])
    assert unused not in opt.state
    assert "state1" in opt.state[big] and "exp_avg" in opt.state[small]
    assert opt.state[big]["step"].item() == 4


def test_non_contiguous_parameter_is_updated(gen):
    """A parameter that is a transposed view is stepped correctly (through a contiguous copy)."""
    base = torch.randn(64, 100, generator=gen)
    p = torch.nn.Parameter(base.t())  # shares base's storage: keep the original values apart
    original = base.t().contiguous()
    assert not p.is_contiguous()
    g = torch.randn(100, 64, generator=gen) * 1e-2
    p.grad = g
    AdamW8bit([p]).step()
    s = ref.AdamWScalars.for_step(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=1)
    expected = _expected_step(original, g.contiguous(), _fresh_ref_state(6400), s)
    assert torch.equal(p.detach(), expected)


def test_state_bytes_per_parameter(gen):
    """Measured state of a 1M-parameter set is <= 2.1 bytes per parameter (AdamW: 8)."""
    params = [torch.nn.Parameter(torch.randn(1000, 1000, generator=gen)), torch.nn.Parameter(torch.randn(1000))]
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    n = sum(p.numel() for p in params)
    ours = state_nbytes(_stepped(AdamW8bit, params, gen)) / n
    theirs = state_nbytes(_stepped(torch.optim.AdamW, torch_params, gen)) / n
    print(f"optimizer state bytes per parameter: AdamW8bit {ours:.4f}, torch AdamW {theirs:.4f}")
    assert ours <= 2.1
    assert theirs >= 8.0


def _stepped(cls, params, gen):
    opt = cls(params)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_identically(dtype, gen):
    """Save after 3 steps (torch.save, loaded with weights_only=True), load into a new optimizer on a copy
    of the parameters: 3 more steps give bit-identical parameters; state dtypes survive bf16 parameters."""
    big, small, _ = _params(gen, dtype)
    opt = AdamW8bit([big, small], lr=1e-2)
    grads = [[(torch.randn(p.shape, generator=gen) * 1e-2).to(dtype) for p in (big, small)] for _ in range(6)]

    def run(o, ps, gs):
        for step_grads in gs:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            o.step()

    run(opt, [big, small], grads[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in (big, small)]
    resumed = AdamW8bit(copies, lr=5.0)  # the saved param_groups (lr=1e-2) must win
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.state[copies[0]]["absmax1"].dtype == torch.float32
    assert resumed.state[copies[1]]["exp_avg"].dtype == torch.float32
    run(opt, [big, small], grads[3:])
    run(resumed, copies, grads[3:])
    for p, q in zip((big, small), copies):
        assert torch.equal(p.detach(), q.detach())


def test_resume_from_torch_adamw_state(gen):
    """A torch.optim.AdamW state dict loads into AdamW8bit: its moments continue as float32 state and the
    next step equals the reference step from those moments."""
    p = torch.nn.Parameter(torch.randn(70, 90, generator=gen))
    torch_opt = torch.optim.AdamW([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        torch_opt.step()
    saved = torch_opt.state_dict()
    m, v = saved["state"][0]["exp_avg"].clone(), saved["state"][0]["exp_avg_sq"].clone()
    before = p.detach().clone()
    opt = AdamW8bit([p])
    opt.load_state_dict(saved)
    p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    opt.step()
    s = ref.AdamWScalars.for_step(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=3)
    expected, _, _ = ref.adamw32_step(before, p.grad, m.reshape(-1), v.reshape(-1), s)
    assert torch.equal(p.detach(), expected)
    assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_load_state_dict_rejects_mismatched_state(gen):
    """A state saved for other parameter shapes is refused with an error naming the entry."""
    big, small, _ = _params(gen)
    opt = _stepped(AdamW8bit, [big, small], gen)
    other = [torch.nn.Parameter(torch.randn(100, 131)), torch.nn.Parameter(torch.randn(300))]
    with pytest.raises(OptimizerError, match="state1"):
        AdamW8bit(other).load_state_dict(opt.state_dict())


def test_settings_errors():
    """amsgrad, bad hyper-parameters, sparse gradients and PagedAdamW8bit on CPU are clear errors."""
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(OptimizerError, match="amsgrad"):
        AdamW8bit([p], amsgrad=True)
    with pytest.raises(OptimizerError, match="beta"):
        AdamW8bit([p], betas=(1.0, 0.999))
    with pytest.raises(OptimizerError, match="learning rate"):
        AdamW8bit([p], lr=-1.0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(OptimizerError, match="sparse"):
        AdamW8bit(emb.parameters()).step()
    with pytest.raises(OptimizerError, match="AdamW8bit"):
        PagedAdamW8bit([p])


def test_empty_parameter_is_skipped():
    """A zero-element parameter with a gradient is left alone, as torch.optim.AdamW leaves it."""
    empty = torch.nn.Parameter(torch.zeros(0, 8))
    empty.grad = torch.zeros(0, 8)
    AdamW8bit([empty]).step()
    assert empty.shape == (0, 8)


def test_defaults_match_torch_adamw():
    """Same hyper-parameter defaults as torch.optim.AdamW."""
    p = torch.nn.Parameter(torch.randn(3))
    ours, theirs = AdamW8bit([p]).defaults, torch.optim.AdamW([p]).defaults
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize"):
        assert ours[key] == theirs[key], key


def _stories_setup(steps, seq, bs):
    transformers = pytest.importorskip("transformers")
    path = f"{DATA}/stories260K"
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with open(f"{DATA}/tinystories_val.txt", encoding="utf-8") as f:
        text = f.read()[:60000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    starts = torch.randint(0, ids.numel() - seq - 1, (steps, bs), generator=torch.Generator().manual_seed(0))
    batches = [torch.stack([ids[i:i + seq] for i in row]) for row in starts]
    return transformers, transformers.AutoConfig.from_pretrained(path), batches


def _train(transformers, config, batches, make_opt):
    torch.manual_seed(1)  # the same random initialization for every optimizer
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    opt = make_opt(model.parameters())
    losses = []
    for batch in batches:
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_loss_curve_tracks_torch_adamw():
    """Training the stories260K architecture from scratch for 80 steps (default lr 1e-3, seq 32, batch 6),
    the mean loss of every 20-step window stays within 2% of torch.optim.AdamW's, and loss falls."""
    transformers, config, batches = _stories_setup(80, 32, 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: OpenMP spinning on a busy machine costs more than it gives
    try:
        theirs = _train(transformers, config, batches, lambda ps: torch.optim.AdamW(ps))
        ours = _train(transformers, config, batches, lambda ps: AdamW8bit(ps))
    finally:
        torch.set_num_threads(threads)
    a, b = theirs.unfold(0, 20, 20).mean(1), ours.unfold(0, 20, 20).mean(1)
    rel = ((a - b).abs() / a).max().item()
    print(f"20-step mean losses torch {a.tolist()} ours {b.tolist()} max rel diff {rel:.4f}")
    assert rel < 0.02
    assert b[-1] < b[0] - 0.5


def test_lora_adapters_use_32bit_state_and_learn():
    """With peft LoRA adapters on stories260K (fp32 r=8 adapters, < 4096 elements each), AdamW8bit keeps
    32-bit state for them, leaves the frozen base alone, and lowers the loss."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(f"{DATA}/stories260K")
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = AdamW8bit(trainable, lr=1e-2)
    batch = torch.randint(3, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all("exp_avg" in opt.state[p] for p in trainable if p.grad is not None)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_works_with_transformers_trainer(tmp_path):
    """transformers.Trainer(optimizers=(AdamW8bit, scheduler)) runs 3 steps and moves the weights."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(f"{DATA}/stories260K")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = [{"input_ids": row, "labels": row}
            for row in torch.randint(3, 512, (12, 16), generator=torch.Generator().manual_seed(0))]
    opt = AdamW8bit(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    assert opt.state[model.model.layers[0].mlp.up_proj.weight]["step"].item() == 3
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight.detach(), before)


def test_failed_state_allocation_leaves_no_half_state():
    """An allocation that fails (e.g. out of memory) while a parameter's state is first made leaves that
    state empty, so the next step makes it again instead of tripping over a half-built state."""
    class FailsOnce(AdamW8bit):
        failed = False

        def _allocate_state(self, param, specs):
            if not FailsOnce.failed:
                FailsOnce.failed = True
                raise RuntimeError("simulated out of memory")
            return super()._allocate_state(param, specs)

    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = FailsOnce([p])
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert len(opt.state[p]) == 0
    before = p.detach().clone()
    opt.step()
    assert int(opt.state[p]["step"]) == 1 and not torch.equal(p.detach(), before)
    assert set(opt.state[p]) == {"step", "state1", "absmax1", "state2", "absmax2"}
