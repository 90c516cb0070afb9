"""convert(): determinism across runs and thread counts, report contents, model card, --skip,
interrupted runs that leave nothing finished-looking, and --resume."""
import hashlib
import json
import os

import pytest
import torch

import converter
from converter import pipeline
from converter.errors import OutputExistsError
from checkpoint_factory import STORIES, tiny_llama


def _shard_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


def _report_without_timings(folder):
    report = json.loads(open(os.path.join(folder, "qckpt_report.json")).read())
    report.pop("timings")
    report.pop("output")
    report["settings"].pop("threads")
    return report


def _crash_at(monkeypatch, n: int, exc):
    """Make the n-th tensor of the next conversions raise `exc`; return the real process_tensor."""
    original = pipeline._Run.process_tensor
    calls = {"n": 0}

    def crashing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(self, *a, **k)

    monkeypatch.setattr(pipeline._Run, "process_tensor", crashing)
    return original


def test_deterministic_across_runs_and_threads(tmp_path, seed):
    """Two conversions (1 thread, 2 threads) give byte-identical shards, index, config and report (minus timings)."""
    src = tiny_llama(tmp_path / "src", seed=seed, max_shard_size="200KB")
    converter.convert(src, tmp_path / "a", threads=1, max_shard_size="100KB", progress=False)
    converter.convert(src, tmp_path / "b", threads=2, max_shard_size="100KB", progress=False)
    a, b = _shard_bytes(tmp_path / "a"), _shard_bytes(tmp_path / "b")
    assert len(a) > 1 and a == b
    for f in ("config.json", "model.safetensors.index.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert _report_without_timings(tmp_path / "a") == _report_without_timings(tmp_path / "b")


def test_report_and_model_card(tmp_path):
    """The report lists every tensor with sizes and errors, hashes of every output file, and settings;
    the card has the Hub front matter and loading instructions."""
    report = converter.convert(STORIES, tmp_path / "out", blocksize=128, progress=False)
    saved = json.loads((tmp_path / "out" / "qckpt_report.json").read_text())
    assert converter.Report.from_dict(saved).to_dict() == saved
    by_name = {t["name"]: t for t in saved["tensors"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q["scheme"] == "nf4" and q["source_dtype"] == "F32" and q["shape"] == [64, 64]
    assert q["bytes_before"] == 64 * 64 * 4 and 0 < q["relative_error"] < 0.2 and q["max_abs_error"] > 0
    assert by_name["model.embed_tokens.weight"]["scheme"] == "copy"  # tied to the output head
    assert saved["settings"]["blocksize"] == 128 and saved["tool_version"] == converter.__version__
    for name, sha in saved["files"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == sha, name
    assert saved["totals"]["bytes_after"] == report.bytes_after
    card = (tmp_path / "out" / "README.md").read_text()
    front = card.split("---")[1]
    for needle in ("library_name: transformers", "- bitsandbytes", "- 4-bit", "- qckpt"):
        assert needle in front, needle
    assert "base_model:" not in front  # a local folder with no known repo id: the Hub would reject a guess
    assert "from_pretrained" in card and "converter.load_quantized" in card and "| blocksize | 128 |" in card
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32" and config["quantization_config"]["llm_int8_skip_modules"] is None


def test_skip_globs_listed_so_transformers_agrees(tmp_path, seed):
    """--skip leaves modules unquantized and lists every unquantized linear (lm_head too) so transformers
    replaces exactly the quantized ones."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    src = tiny_llama(tmp_path / "src", seed=seed)
    converter.convert(src, tmp_path / "out", skip=["*.mlp.down_proj", "model.layers.1.self_attn.*"], progress=False)
    skip = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" in skip and "model.layers.0.mlp.down_proj" in skip and "model.layers.1.self_attn.q_proj" in skip
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if "Linear" in type(m).__name__}
    assert kinds["model.layers.0.mlp.down_proj"] == "Linear" and kinds["lm_head"] == "Linear"
    assert kinds["model.layers.1.self_attn.k_proj"] == "Linear" and kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"


def test_interrupted_run_leaves_nothing_finished_and_resume_completes(tmp_path, seed, monkeypatch):
    """A crash after the first output shards leaves no finished-looking files; --resume re-checks the finished
    shards, skips their tensors, and ends byte-identical to an uninterrupted conversion."""
    src = tiny_llama(tmp_path / "src", seed=seed)
    converter.convert(src, tmp_path / "fresh", max_shard_size="80KB", progress=False)
    original = _crash_at(monkeypatch, 15, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        converter.convert(src, tmp_path / "out", max_shard_size="80KB", progress=False)
    top = os.listdir(tmp_path / "out")
    assert top == [pipeline.STAGING]
    with pytest.raises(OutputExistsError):  # a half-done OUTPUT needs --resume (or --overwrite)
        converter.convert(src, tmp_path / "out", max_shard_size="80KB", progress=False)

    counted = {"n": 0}

    def counting(self, *a, **k):
        counted["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(pipeline._Run, "process_tensor", counting)
    report = converter.convert(src, tmp_path / "out", max_shard_size="80KB", resume=True, progress=False)
    assert 0 < counted["n"] < len(report.tensors)  # finished shards were not redone
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "fresh")
    assert _report_without_timings(tmp_path / "out") == _report_without_timings(tmp_path / "fresh")
    assert pipeline.STAGING not in os.listdir(tmp_path / "out")


def test_resume_redoes_a_corrupted_finished_shard(tmp_path, seed, monkeypatch):
    """A finished shard whose bytes changed after the crash is not trusted: --resume rewrites it."""
    src = tiny_llama(tmp_path / "src", seed=seed)
    converter.convert(src, tmp_path / "fresh", max_shard_size="80KB", progress=False)
    original = _crash_at(monkeypatch, 15, RuntimeError("simulated crash"))
    with pytest.raises(RuntimeError):
        converter.convert(src, tmp_path / "out", max_shard_size="80KB", progress=False)
    staging = tmp_path / "out" / pipeline.STAGING
    finished = sorted(f for f in os.listdir(staging) if f.endswith(".safetensors"))
    assert finished
    with open(staging / finished[0], "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x55")
    monkeypatch.setattr(pipeline._Run, "process_tensor", original)
    converter.convert(src, tmp_path / "out", max_shard_size="80KB", resume=True, progress=False)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "fresh")


def test_single_safetensors_file_without_config(tmp_path, gen):
    """A bare .safetensors file: 2-D float weights quantized by name (embeddings/norms/head kept), no config written."""
    from safetensors.torch import save_file

    tensors = {"embed_tokens.weight": torch.randn(50, 64, generator=gen), "blocks.0.proj.weight": torch.randn(96, 64, generator=gen),
               "blocks.0.proj.bias": torch.randn(96, generator=gen), "norm.weight": torch.ones(64)}
    save_file(tensors, tmp_path / "w.safetensors")
    report = converter.convert(tmp_path / "w.safetensors", tmp_path / "out", progress=False)
    assert [t.name for t in report.quantized] == ["blocks.0.proj.weight"]
    assert not (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_plan_matches_transformers_replacement_t5(tmp_path):
    """For T5 (`_keep_in_fp32_modules = ['wo']`, tied lm_head) the quantized set is exactly the set of
    modules transformers itself turns into Linear4bit when quantizing on load."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSeq2SeqLM, BitsAndBytesConfig, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    report = converter.convert(tmp_path / "t5", tmp_path / "out", double_quant=False, progress=False)
    ours = {t.name[: -len(".weight")] for t in report.quantized}
    ref = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "t5", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    theirs = {n for n, m in ref.named_modules() if type(m).__name__ == "Linear4bit"}
    assert ours == theirs and ours and not any(n.endswith(".wo") for n in ours)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out")
    assert {n for n, m in loaded.named_modules() if type(m).__name__ == "Linear4bit"} == theirs


def test_output_inside_source_folder_is_not_copied_into_itself(tmp_path, seed):
    """OUTPUT inside the source folder: a second --overwrite run does not copy the old output as extras."""
    src = tiny_llama(tmp_path / "src", seed=seed)
    converter.convert(src, tmp_path / "src" / "q", progress=False)
    converter.convert(src, tmp_path / "src" / "q", overwrite=True, progress=False)
    assert not (tmp_path / "src" / "q" / "q").exists()
    assert sorted(os.listdir(tmp_path / "src" / "q")) == ["README.md", "config.json", "generation_config.json",
                                                          "model.safetensors", "qckpt_report.json"]


def test_guessed_plan_work_is_kept_only_when_confirmed(tmp_path, seed, monkeypatch):
    """Shards started on the name-based guess while transformers builds the plan are kept only when the
    real plan is identical; when it is not, the run starts over with it and writes the same bytes."""
    src = tiny_llama(tmp_path / "src", seed=seed)
    original = pipeline._Run.process_tensor
    calls = {"n": 0}

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(pipeline._Run, "process_tensor", counting)
    report = converter.convert(src, tmp_path / "guessed", max_shard_size="80KB", progress=False)
    assert calls["n"] == len(report.tensors)  # a Llama's guess is right: nothing redone
    assert report.timings["plan_thread_s"] > 0

    calls["n"] = 0
    monkeypatch.setattr(pipeline.PendingPlan, "confirmed", lambda self: False)
    report = converter.convert(src, tmp_path / "redone", max_shard_size="80KB", progress=False)
    assert calls["n"] > len(report.tensors)  # the first shard's tensors were processed twice
    assert _shard_bytes(tmp_path / "redone") == _shard_bytes(tmp_path / "guessed")
    assert _report_without_timings(tmp_path / "redone") == _report_without_timings(tmp_path / "guessed")
    assert sorted(os.listdir(tmp_path / "redone")) == sorted(os.listdir(tmp_path / "guessed"))


def test_plan_thread_leaves_torch_default_dtype_alone(tmp_path, monkeypatch):
    """Building the skeleton (in a thread beside the conversion) never switches torch's process-wide
    default dtype, which would silently change tensors the main thread creates meanwhile."""
    from converter import plan

    src = tiny_llama(tmp_path / "src", dtype=torch.bfloat16)  # config.json says bfloat16
    calls = []
    real = torch.set_default_dtype
    monkeypatch.setattr(torch, "set_default_dtype", lambda d: (calls.append(d), real(d)))
    model, name = plan.build_skeleton(src)
    assert name == "LlamaForCausalLM" and calls == []
    assert next(model.parameters()).device.type == "meta"
