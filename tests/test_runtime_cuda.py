"""The runtime on a GPU: load_quantized(device='cuda') agrees with the CPU runtime; QLoRA steps run."""
import pytest
import torch

import converter

from runtime_checkpoints import reference_model, tiny_llama, write_quantized

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("quant_type,dtype", [("nf4", torch.bfloat16), ("fp4", torch.float32), ("int8", torch.float32)])
def test_cuda_logits_match_reference(tmp_path, seed, quant_type, dtype):
    """Logits on the GPU (decode and prefill sizes) match the dequantized reference within the CPU tolerance."""
    model = tiny_llama(seed, hidden=128, inter=256, dtype=dtype, bias=True)
    folder = write_quantized(model, tmp_path / "q", quant_type, compute_dtype=str(dtype)[6:], threshold=0.0)
    on_gpu = converter.load_quantized(folder, device="cuda")
    assert on_gpu.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    ref = reference_model(model, folder, dtype).cuda()
    gen = torch.Generator().manual_seed(seed)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for shape in [(1, 1), (2, 37)]:
        ids = torch.randint(0, model.config.vocab_size, shape, generator=gen).cuda()
        with torch.no_grad():
            a, b = on_gpu(ids).logits.float(), ref(ids).logits.float()
        assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_cuda_qlora_step(tmp_path, seed):
    """prepare_for_qlora + peft on the GPU: a few AdamW steps lower the loss, base bytes unchanged."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(seed, hidden=128, inter=256)
    folder = write_quantized(model, tmp_path / "q", "nf4", compute_dtype="bfloat16")
    loaded = converter.prepare_for_qlora(converter.load_quantized(folder, device="cuda"))
    pm = peft.get_peft_model(loaded, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    before = {n: b.clone() for n, b in pm.named_buffers() if "proj" in n}
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(seed)).cuda()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    losses = []
    for _ in range(10):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[n], b) for n, b in pm.named_buffers() if n in before)


def test_cuda_device_map_auto(tmp_path, seed):
    """device_map='auto' places the layers on the GPU through accelerate and gives the CPU model's tokens."""
    model = tiny_llama(seed)
    folder = write_quantized(model, tmp_path / "q", "nf4")
    auto = converter.load_quantized(folder, device_map="auto")
    assert {b.device.type for b in auto.buffers() if b is not None} == {"cuda"}
    cpu_model = converter.load_quantized(folder)
    prompt = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(seed))
    kwargs = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert auto.generate(prompt.cuda(), **kwargs).tolist() == cpu_model.generate(prompt, **kwargs).tolist()


@pytest.mark.parametrize("rows,k,n", [(1, 4100, 72), (3, 96, 40), (33, 4096, 264), (20, 72, 37)])
def test_cuda_llm_int8_matches_cpu(seed, rows, k, n):
    """LLM.int8 on the GPU (torch._int_mm where cuBLASLt takes the shape, else exact K-chunked float32)
    gives the CPU's integers: bit-identical without outliers; with outlier columns (added back by a
    float32 matmul in another order) within 1e-5 of max |y|."""
    from converter.runtime.functional import matmul_int8

    gen = torch.Generator().manual_seed(seed)
    qt = converter.quantize(torch.randn(n, k, generator=gen) * k ** -0.5, "int8")
    bias = torch.randn(n, generator=gen)
    x = torch.randn(rows, k, generator=gen).clamp(-5, 5)  # no |x| >= 6: no outliers
    cpu_y = matmul_int8(x, qt, bias)
    gpu_y = matmul_int8(x.cuda(), qt.to("cuda"), bias.cuda())
    assert torch.equal(gpu_y.cpu(), cpu_y)
    x[:, [0, k // 2]] = 9.0  # two outlier columns
    cpu_y = matmul_int8(x, qt, bias)
    gpu_y = matmul_int8(x.cuda(), qt.to("cuda"), bias.cuda()).cpu()
    assert (gpu_y - cpu_y).abs().max().item() <= 1e-5 * cpu_y.abs().max().item()
