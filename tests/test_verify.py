"""`verify`: a clean converted folder passes; each kind of damage is named in one finding line; --source proves
byte-identical reproduction or names the first tensor that differs."""
import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint_factory import build_converted, source_tensors, write_source
from converter.cli import main
from converter.shards.reader import read_header
from converter.verify import verify

MODULE = "model.layers.1.self_attn.q_proj."


@pytest.fixture
def tensors(gen):
    return source_tensors(gen)


@pytest.fixture
def folder(tmp_path, tensors):
    return build_converted(tmp_path / "out", tensors)


def _shard_of(folder, name):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


def _rewrite(folder, shard, edit, fix_index=False):
    """Load a shard, let `edit(dict)` change it, save it back (optionally keeping the index consistent)."""
    path = os.path.join(folder, shard)
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})
    if fix_index:
        index_path = os.path.join(folder, "model.safetensors.index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in sd}
        index["weight_map"].update({k: shard for k in sd})
        index["metadata"].pop("total_size", None)
        with open(index_path, "w") as f:
            json.dump(index, f)


def _messages(result):
    return [str(f) for f in result.findings]


def test_clean_folder_passes(folder):
    """A freshly written folder has no findings; every shard, module and listed file is checked."""
    result = verify(folder)
    assert result.ok, _messages(result)
    assert result.quantized_modules == 14 and result.files_checked == 2
    assert result.files_hashed == 5  # 2 shards, index, config, README


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("fp4", False, 128), ("int8", False, 64),
                                                             ("nf4", True, 32)])
def test_other_schemes_pass_and_reproduce(tmp_path, tensors, quant_type, double_quant, blocksize):
    """FP4 without double quant, INT8 and NF4 at blocksize 32 verify clean and reproduce from the source."""
    folder = build_converted(tmp_path / "out", tensors, quant_type=quant_type, double_quant=double_quant,
                             blocksize=blocksize, shards=1)
    src = write_source(tmp_path / "src", tensors)
    result = verify(folder, source=src)
    assert result.ok, _messages(result)
    assert result.quantized_modules == 14 and result.reproduction["identical"] == len(tensors)


def test_flipped_byte_is_a_sha256_mismatch(folder):
    """One flipped bit in a shard's data section is caught by the sha256 recorded in the report."""
    shard = _shard_of(folder, MODULE + "weight")
    path = os.path.join(folder, shard)
    header = read_header(path)
    info = header.by_name()[MODULE + "weight"]  # packed codes: any byte value is a valid code pair
    with open(path, "r+b") as f:
        f.seek(header.data_start + (info.start + info.end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    result = verify(folder)
    assert [str(f) for f in result.findings if "sha256" in f.message] and len(result.findings) == 1
    assert result.findings[0].where == shard


def test_missing_tensor_is_named(folder):
    """A quantized module that lost its absmax tensor is reported under that module, and the index
    mismatch is named too."""
    name = MODULE + "weight.absmax"
    _rewrite(folder, _shard_of(folder, name), lambda sd: sd.pop(name))
    messages = _messages(verify(folder))
    assert any(m.startswith(name + ": missing tensor") for m in messages), messages
    assert any(m.startswith(MODULE + "weight:") and "missing tensor" in m and "absmax" in m for m in messages)


def test_missing_module_listed_in_report(folder):
    """A whole quantized module dropped consistently from shard and index is still caught via the report."""
    def drop(sd):
        for key in [k for k in sd if k.startswith(MODULE)]:
            sd.pop(key)

    for shard in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        _rewrite(folder, shard, drop, fix_index=True)
    messages = _messages(verify(folder))
    assert f"{MODULE}weight: missing tensor (listed in qckpt_report.json)" in messages


def test_wrong_shape_is_named(folder):
    """An absmax tensor with one block too many fails the shape check with both shapes in the message."""
    name = MODULE + "weight.absmax"

    def grow(sd):
        sd[name] = torch.cat([sd[name], sd[name][:1]])

    _rewrite(folder, _shard_of(folder, name), grow)
    messages = _messages(verify(folder))
    assert any(m.startswith(f"{MODULE}weight:") and "shape" in m and name in m for m in messages), messages


def _set_quant_state(folder, mutate, key_type=None):
    old_key = MODULE + "weight.quant_state.bitsandbytes__nf4"
    shard = _shard_of(folder, old_key)

    def edit(sd):
        state = json.loads(bytes(sd.pop(old_key).tolist()))
        mutate(state)
        blob = json.dumps(state).encode()
        new_key = old_key if key_type is None else MODULE + f"weight.quant_state.bitsandbytes__{key_type}"
        sd[new_key] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    _rewrite(folder, shard, edit, fix_index=True)


def test_quant_state_blocksize_mismatch(folder):
    """A quant-state JSON claiming blocksize 128 no longer matches the stored absmax count."""
    _set_quant_state(folder, lambda s: s.update(blocksize=128))
    messages = _messages(verify(folder))
    assert any(m.startswith(MODULE + "weight:") and "absmax" in m and "shape" in m for m in messages), messages


def test_quant_state_type_disagrees_with_config(folder):
    """A module stored as fp4 in an nf4 checkpoint is named, with both types."""
    _set_quant_state(folder, lambda s: s.update(quant_type="fp4"), key_type="fp4")
    messages = _messages(verify(folder))
    assert any("quant state says fp4 but config.json says nf4" in m for m in messages), messages
    assert any("quant_map: is not the fp4 code table" in m for m in messages), messages


def test_quant_state_shape_mismatch(folder):
    """A quant-state shape that the packed bytes cannot hold is reported."""
    _set_quant_state(folder, lambda s: s.update(shape=[s["shape"][0] * 2, s["shape"][1]]))
    messages = _messages(verify(folder))
    assert any(m.startswith(MODULE + "weight:") and "packed bytes do not fit" in m for m in messages), messages


def test_report_disagrees_with_files(folder):
    """A report whose recorded shape or scheme differs from the stored tensor is named."""
    path = os.path.join(folder, "qckpt_report.json")
    with open(path) as f:
        report = json.load(f)
    records = {r["name"]: r for r in report["tensors"]}
    records[MODULE + "weight"]["shape"] = [1, 2]
    records["model.norm.weight"]["scheme"] = "nf4"
    with open(path, "w") as f:
        json.dump(report, f)
    messages = _messages(verify(folder))
    assert f"{MODULE}weight: quant state shape [48, 48] but qckpt_report.json records [1, 2]" in messages
    assert "model.norm.weight: qckpt_report.json says nf4 but it is stored unquantized" in messages


def test_config_and_index_problems(folder):
    """A config without quantization_config and an index naming a shard outside the folder are findings."""
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("quantization_config")
    with open(config_path, "w") as f:
        json.dump(config, f)
    messages = _messages(verify(folder, check_hashes=False))
    assert "config.json: has no quantization_config" in messages
    index_path = os.path.join(folder, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    with open(index_path, "w") as f:
        json.dump(index, f)
    messages = _messages(verify(folder, check_hashes=False))
    assert any(m.startswith("model.safetensors.index.json:") and "outside" in m for m in messages), messages


def test_source_reproduces_bytes(tmp_path, tensors, folder):
    """Re-quantizing from the source with the recorded settings gives identical bytes for every tensor."""
    src = write_source(tmp_path / "src", tensors)
    result = verify(folder, source=src)
    assert result.ok, _messages(result)
    r = result.reproduction
    assert r["tensors_compared"] == r["identical"] == len(tensors)
    assert 0.0 < r["max_relative_error"] < 0.2


def test_source_names_first_differing_tensor(tmp_path, tensors, folder):
    """A changed source weight is named as the first differing tensor, with bytes and value difference."""
    changed = dict(tensors)
    changed["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].clone()
    changed["model.layers.0.mlp.up_proj.weight"][5, 7] += 1.0
    changed["model.norm.weight"] = tensors["model.norm.weight"] + 1
    src = write_source(tmp_path / "src", changed)
    result = verify(folder, source=src)
    assert len(result.findings) == 1
    finding = result.findings[0]
    assert finding.where == "model.layers.0.mlp.up_proj.weight"
    assert "bytes differ" in finding.message and "(1 more tensors differ)" in finding.message
    assert "dequantized weights differ by up to" in finding.message


def test_cli_exit_status_and_lines(folder):
    """The CLI exits 0 on a clean folder and 1 with one `error:` line per finding, and --json parses."""
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", folder])
    assert ok.exit_code == 0 and ok.output.startswith("ok: ")
    config_path = os.path.join(folder, "config.json")
    with open(config_path) as f:
        text = f.read()
    with open(config_path, "w") as f:  # same size, other content: only the sha256 can tell
        f.write(text.replace('"max_position_embeddings": 128', '"max_position_embeddings": 256'))
    bad = runner.invoke(main, ["verify", folder])
    assert bad.exit_code == 1
    lines = [line for line in bad.output.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: config.json: sha256 ")
    as_json = runner.invoke(main, ["verify", folder, "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["ok"] is False
