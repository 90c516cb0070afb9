"""stories260K (a real trained Llama) quantized to NF4: perplexity through our runtime vs bitsandbytes."""
import importlib.util
import os

import pytest
import torch

import converter

from runtime_checkpoints import STORIES, TINYSTORIES, write_quantized

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="needs ../shared/data/stories260K")

_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "eval_ppl.py")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: run this module on one torch thread (see conftest.one_torch_thread)."""


def _eval_script():
    spec = importlib.util.spec_from_file_location("eval_ppl", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.bnb
def test_stories260k_nf4_perplexity_matches_bnb_fake_quant(tmp_path):
    """NF4 perplexity through load_quantized is within 0.1% of bitsandbytes' fake-quant reference
    (NF4 + double quant, first 40 stories of tinystories_val.txt, 512-token windows, float32 compute)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    ev = _eval_script()
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    with open(TINYSTORIES, encoding="utf-8") as f:
        windows = ev.token_windows(tokenizer, f.read(100_000), 512, max_stories=40)
    source = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    folder = write_quantized(source, tmp_path / "nf4", "nf4", double_quant=True)
    ours = ev.perplexity(converter.load_quantized(folder), windows)
    fp32 = ev.perplexity(source, windows)
    reference = ev.perplexity(ev.bnb_fake_quant(source, "nf4", 64, True), windows)
    assert abs(ours / reference - 1) < 1e-3, (ours, reference)
    assert ours > fp32  # quantization costs something: the comparison is not vacuous
