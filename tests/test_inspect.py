"""`inspect`: describes qckpt's and transformers' bitsandbytes checkpoints from headers and small files, the
same locally and on the (loopback) Hub, where the server log shows only ranged header reads of the shards."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from checkpoint_factory import HIDDEN, INTER, LAYERS, build_converted, folder_bytes, source_tensors
from converter.cli import main
from converter.inspection import Inspection, inspect
from converter.verify import verify
from fakehub import fake_hub, no_network  # noqa: F401 - fixtures
from fakehub.server import _BUILTIN

REPO = "org/inspect-me"
VOCAB = 1500  # big enough that each shard outgrows the 100 kB first header read


@pytest.fixture
def tensors(gen):
    return source_tensors(gen, vocab=VOCAB)


@pytest.fixture
def folder(tmp_path, tensors):
    return build_converted(tmp_path / "out", tensors)


@pytest.fixture(scope="module")
def transformers_bnb(tmp_path_factory):
    """A tiny Llama quantized on load by transformers + bitsandbytes (CPU) and saved: not made by qckpt."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("bnb")
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=100, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    expected_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "src")
    quantized = AutoModelForCausalLM.from_pretrained(
        root / "src", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True))
    quantized.save_pretrained(root / "bnb")  # before any forward pass (FORMAT.md 7)
    return os.fspath(root / "bnb"), expected_params


def _range_logger(hub):
    """Record (path, Range header, bytes served) of every GET on resolve, then serve it as usual."""
    seen = []
    pattern = next(regex for method, regex, name in _BUILTIN if name == "resolve")

    def handler(req, match):
        repo = hub.repos[match["repo"]]
        size = len(hub.snapshot(repo, match["rev"])[1].get(match["path"], b""))
        rng = req.headers.get("Range")
        served = size
        if rng:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            served = min(int(end) if end else size - 1, size - 1) - int(start) + 1
        seen.append((match["path"], rng, served, size))
        req.resolve(match, head=False)

    hub.add_route("GET", pattern.pattern, handler)
    return seen


def test_local_description(folder):
    """Architecture, settings, modules, exact parameter count, size vs fp16, provenance and errors."""
    insp = inspect(folder)
    assert insp.architecture["architectures"] == ["LlamaForCausalLM"]
    assert insp.quantization["bnb_4bit_quant_type"] == "nf4" and insp.quant_types == ("nf4",)
    assert insp.blocksizes == (64,)
    assert len(insp.quantized_modules) == 7 * LAYERS
    assert "model.layers.1.mlp.down_proj" in insp.quantized_modules
    assert set(insp.unquantized_tensors) >= {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"}
    linear = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)
    others = 2 * VOCAB * HIDDEN + HIDDEN + 2 * LAYERS * HIDDEN
    assert insp.params == linear + others and insp.params_exact
    shard_bytes = sum(os.path.getsize(os.path.join(folder, s)) for s in insp.shards)
    assert insp.file_bytes == shard_bytes and insp.tensor_bytes < shard_bytes
    assert insp.fp16_bytes == 2 * insp.params and insp.bits_per_param < 16
    groups = {g.name: g for g in insp.groups}
    down = groups["model.layers.*.mlp.down_proj"]
    assert (down.scheme, down.count, down.params) == ("nf4", LAYERS, LAYERS * HIDDEN * INTER)
    assert 4 < down.bits_per_param < 7
    assert insp.provenance["source"] == "test/source-model" and insp.provenance["tool_version"] == "test"
    assert 0 < insp.errors["rel_error_mean"] <= insp.errors["rel_error_max"] < 0.2
    assert [layer["layer"] for layer in insp.layers] == list(range(LAYERS))
    assert Inspection.from_dict(json.loads(json.dumps(insp.to_dict()))) == insp


def test_hub_repo_reads_only_headers(fake_hub, folder):
    """Inspecting a Hub repo gives the local answer while every shard GET is a ranged read of fewer
    bytes than the shard: no shard is downloaded."""
    commit = fake_hub.add_repo(REPO, folder_bytes(folder))
    seen = _range_logger(fake_hub)
    remote = inspect(REPO)
    local = inspect(folder).to_dict()
    expected = dict(local, location=REPO, kind="hub", commit=commit)
    assert remote.to_dict() == expected
    shard_gets = [s for s in seen if s[0].endswith(".safetensors")]
    assert {s[0] for s in shard_gets} == set(remote.shards)
    for path, rng, served, size in shard_gets:
        assert rng is not None and served < size, (path, rng, served, size)
    assert not [m for m, p in fake_hub.log if m == "GET" and p.endswith(".safetensors")
                and not any(p.endswith(s[0]) for s in shard_gets)]


def test_transformers_checkpoint_local_and_hub(fake_hub, transformers_bnb):
    """A checkpoint saved by transformers + bitsandbytes is described correctly (derived counts exact
    for even shapes) and the same way from the Hub; verify finds nothing wrong with it."""
    folder, expected_params = transformers_bnb
    insp = inspect(folder)
    assert insp.quant_types == ("nf4",) and insp.blocksizes == (64,)
    assert len(insp.quantized_modules) == 14 and insp.params == expected_params
    assert insp.provenance == {} and insp.errors is None
    fake_hub.add_repo(REPO, folder_bytes(folder))
    remote = inspect(REPO)
    assert remote.params == expected_params and not remote.params_exact  # derived from packed sizes
    assert remote.blocksizes == (64,) and remote.quantized_modules == insp.quantized_modules
    assert verify(folder).ok, [str(f) for f in verify(folder).findings]


def test_cli_text_and_json(folder):
    """The text form names the settings, size and error lines; --json round-trips the same numbers."""
    runner = CliRunner()
    text = runner.invoke(main, ["inspect", folder])
    assert text.exit_code == 0, text.output
    assert "bitsandbytes 4-bit nf4, double quant, blocksize 64" in text.output
    assert "bits/param" in text.output and "source test/source-model" in text.output
    as_json = runner.invoke(main, ["inspect", folder, "--json"])
    data = json.loads(as_json.stdout)
    insp = inspect(folder)
    assert data["params"] == insp.params and data["bits_per_param"] == insp.bits_per_param


def test_cli_missing_repo(fake_hub):
    """A repo id the Hub does not know is one `error:` line naming it, exit 1."""
    result = CliRunner().invoke(main, ["inspect", "org/no-such-repo"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: org/no-such-repo: repository not found")


def test_plot_writes_png(folder, tmp_path):
    """--plot writes a PNG of per-layer error and size."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "layers.png"
    result = CliRunner().invoke(main, ["inspect", folder, "--plot", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.png")]


def test_plot_without_matplotlib_is_a_clear_error(folder, tmp_path, monkeypatch):
    """Without matplotlib, --plot fails with one line saying how to install it."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    result = CliRunner().invoke(main, ["inspect", folder, "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.output.strip() == "error: --plot needs matplotlib: pip install 'qckpt[plot]'"
