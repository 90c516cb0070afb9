"""Hub sources through the real huggingface_hub client against the loopback FakeHub: listing, pinned
download, prefetch and cleanup, sha256 check, 404/401/gated/500 and a connection dropped mid-file."""
import hashlib
import json
import os

import pytest

import converter
from click.testing import CliRunner
from converter.cli import main
from converter.errors import HubError, SourceNotFoundError
from fakehub import fake_hub, no_network  # noqa: F401 - fixtures
from checkpoint_factory import folder_bytes, tiny_llama


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{path: bytes} of a tiny multi-shard Llama with index, config, generation config and a tokenizer file."""
    folder = tiny_llama(tmp_path_factory.mktemp("hubsrc") / "m", seed=3, max_shard_size="200KB")
    out = folder_bytes(folder)
    out["tokenizer_config.json"] = b'{"model_max_length": 64}'
    out["pytorch_model.bin"] = b"never downloaded"
    return out


@pytest.fixture(scope="module")
def local_result(files, tmp_path_factory):
    """The same checkpoint converted from a local folder: the bytes a Hub conversion must equal."""
    folder = tmp_path_factory.mktemp("local") / "m"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path_factory.mktemp("localout") / "out"
    converter.convert(folder, out, progress=False)
    return out


def _shards(folder):
    return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")}


def test_listing_pinned_download_equals_local(fake_hub, files, local_result, tmp_path):
    """A repo id converts like the local folder: commit pinned and recorded, each shard fetched once,
    small files copied, the pickle never fetched, downloads deleted afterwards."""
    sha = fake_hub.add_repo("org/tiny", files)
    report = converter.convert("org/tiny", tmp_path / "out", progress=False, revision="main")
    assert report.commit == sha and report.source == "org/tiny"
    assert _shards(tmp_path / "out") == _shards(local_result)
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == files["tokenizer_config.json"]
    gets = [p for m, p in fake_hub.log if m == "GET" and "/resolve/" in p]
    assert all(f"/resolve/{sha}/" in p for p in gets)  # every file read at the pinned commit
    shard_gets = [p for p in gets if p.endswith(".safetensors")]
    n = sum(1 for f in files if f.endswith(".safetensors"))
    assert n > 2 and len(shard_gets) == 2 * n  # a header Range read + one download per shard
    assert not any("pytorch_model.bin" in p for p in gets)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(local_result))
    saved = json.loads((tmp_path / "out" / "qckpt_report.json").read_text())
    assert saved["commit"] == sha
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/tiny" in card and "base_model_relation: quantized" in card


def test_revision_commit_pins_old_snapshot(fake_hub, files, tmp_path):
    """--revision <sha> reads that commit even after main moved on."""
    old = fake_hub.add_repo("org/tiny", files)
    changed = dict(files, **{"generation_config.json": b'{"moved": true}'})
    fake_hub.add_repo("org/tiny", changed)
    report = converter.convert("org/tiny", tmp_path / "out", revision=old, progress=False)
    assert report.commit == old
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == files["generation_config.json"]


def test_sha256_mismatch_is_an_error(fake_hub, files, tmp_path):
    """A shard whose bytes do not match the listed sha256 stops the run; the bad download is removed."""
    fake_hub.add_repo("org/tiny", files)
    shard = sorted(f for f in files if f.endswith(".safetensors"))[1]
    fake_hub.repos["org/tiny"].fake_sha256[shard] = "0" * 64
    with pytest.raises(HubError, match="sha256 mismatch"):
        converter.convert("org/tiny", tmp_path / "out", progress=False)
    downloaded = [f for _, _, fs in os.walk(tmp_path / "out" / ".qckpt-partial" / "download") for f in fs]
    assert shard not in downloaded  # the bad download was deleted
    assert os.listdir(tmp_path / "out") == [".qckpt-partial"]  # nothing finished-looking


@pytest.mark.parametrize("repo, revision, kind, words", [
    ("org/missing", None, SourceNotFoundError, "repository not found"),
    ("org/tiny", "no-such-branch", SourceNotFoundError, "not found"),
])
def test_repo_and_revision_not_found(fake_hub, files, tmp_path, repo, revision, kind, words):
    """404 for an unknown repo or revision becomes a one-line SourceNotFoundError."""
    fake_hub.add_repo("org/tiny", files)
    with pytest.raises(kind, match=words):
        converter.convert(repo, tmp_path / "out", revision=revision, progress=False)


def test_file_not_found(fake_hub, files, tmp_path):
    """An index naming a shard missing from the repo is reported by name."""
    broken = {k: v for k, v in files.items() if not k.startswith("model-00002-")}
    fake_hub.add_repo("org/tiny", broken)
    with pytest.raises(SourceNotFoundError, match="model-00002"):
        converter.convert("org/tiny", tmp_path / "out", progress=False)


def test_private_and_gated_need_a_token(fake_hub, files, tmp_path):
    """401 on a private repo and a gated repo without a token are one-line errors that mention the token;
    with a good token the private repo converts."""
    fake_hub.add_repo("org/private", files, private=True)
    fake_hub.add_repo("org/gated", files, gated=True)
    r = CliRunner().invoke(main, ["convert", "org/private", str(tmp_path / "o1"), "--quiet"])
    assert r.exit_code == 1 and r.output.count("error:") == 1 and "--token" in r.output
    r = CliRunner().invoke(main, ["convert", "org/gated", str(tmp_path / "o2"), "--quiet"])
    assert r.exit_code == 1 and "gated" in r.output and "--token" in r.output
    report = converter.convert("org/private", tmp_path / "o3", token="hf_good", progress=False)
    assert report.commit


def test_server_errors_retried_then_reported(fake_hub, files, tmp_path):
    """Two 500s on a shard are retried through; a persistent 500 ends as HubError after the retries."""
    fake_hub.add_repo("org/tiny", files)
    fake_hub.fail(r"/resolve/.*/model-00001-of-.*\.safetensors", status=500, times=2)
    converter.convert("org/tiny", tmp_path / "ok", progress=False, retries=3)
    assert fake_hub._faults[0]["times"] == 0  # both injected 500s were served
    fake_hub.fail(r"/resolve/.*/model-00002-of-.*\.safetensors", status=500, times=1000)
    with pytest.raises(HubError, match="after 2 attempts"):
        converter.convert("org/tiny", tmp_path / "bad", progress=False, retries=2)


def test_dropped_connection_mid_file(fake_hub, files, local_result, tmp_path):
    """A download cut mid-file is resumed or retried and the result still equals the local conversion."""
    fake_hub.add_repo("org/tiny", files)
    fake_hub.drop(r"/resolve/.*/model-00003-of-.*\.safetensors", after=5000, times=2)
    converter.convert("org/tiny", tmp_path / "out", progress=False, retries=3)
    assert fake_hub._faults[0]["times"] == 0  # both drops happened
    assert _shards(tmp_path / "out") == _shards(local_result)


def test_cached_shards_are_used_in_place_and_kept(fake_hub, files, tmp_path):
    """Files already in the user's HF cache are read from there and not deleted afterwards."""
    from huggingface_hub import hf_hub_download

    sha = fake_hub.add_repo("org/tiny", files)
    shard = sorted(f for f in files if f.endswith(".safetensors"))[0]
    cached = hf_hub_download("org/tiny", shard, revision=sha)
    n_before = sum(1 for m, p in fake_hub.log if m == "GET" and p.endswith(shard))
    converter.convert("org/tiny", tmp_path / "out", progress=False)
    assert os.path.isfile(cached)
    downloads = [p for m, p in fake_hub.log if m == "GET" and p.endswith(shard)]
    assert len(downloads) - n_before == 1  # only the header range read
    assert hashlib.sha256(open(cached, "rb").read()).hexdigest() == hashlib.sha256(files[shard]).hexdigest()


def test_route_hook_and_network_guard(fake_hub):
    """Extra endpoints plug in with add_route; the guard refuses any non-loopback connection."""
    import socket

    import httpx2

    fake_hub.add_route("POST", r"/api/echo/(?P<word>\w+)", lambda req, m: req.send_json({"echo": m["word"],
                                                                                         "body": req.read_body().decode()}))
    r = httpx2.post(fake_hub.url + "/api/echo/hi", content=b"payload")
    assert r.json() == {"echo": "hi", "body": "payload"}
    with pytest.raises(ConnectionRefusedError, match="loopback only"):
        socket.create_connection(("10.255.255.1", 80), timeout=1)
    from fakehub import guard

    guard._state["violations"].clear()  # the refusal above was this test's own probe


def test_unreachable_hub_is_a_hub_error_not_file_not_found(fake_hub, files, tmp_path):
    """With the server gone, the run ends as a HubError after the retries (never as 'file not found')."""
    fake_hub.add_repo("org/tiny", files)
    fake_hub.stop()
    with pytest.raises(HubError, match="after 1 attempts"):
        converter.convert("org/tiny", tmp_path / "out", progress=False, retries=1)
