"""`convert --push-to` against the loopback Hub (LFS path, Xet disabled): shards are uploaded one by one as
they are written and arrive byte-identical to a local conversion, the local folder never holds two
finished shards, a failure mid-way commits nothing, and a --resume re-run sends only what is missing."""
import hashlib
import json
import os

import pytest
from click.testing import CliRunner

import converter
from converter import pipeline
from converter.cli import main
from converter.errors import HubError
from converter.publish import HubShardStream
from fakehub import fake_hub, fake_hub_uploads, no_network  # noqa: F401 - fixtures
from checkpoint_factory import folder_bytes, tiny_llama

TOKEN = "hf_good"
REPO = "org/tiny-nf4"
SHARD = "60KB"  # a tiny Llama's ~190 KB of output in 4 shards


@pytest.fixture
def hub(fake_hub_uploads):
    return fake_hub_uploads


@pytest.fixture
def src(tmp_path, seed):
    return tiny_llama(tmp_path / "src", seed=seed, max_shard_size="200KB")


@pytest.fixture
def local(src, tmp_path):
    """{name: bytes} of the same conversion written locally: what the pushed repo must hold."""
    out = tmp_path / "local"
    converter.convert(src, out, max_shard_size=SHARD, progress=False)
    return {f: (out / f).read_bytes() for f in os.listdir(out)}


def _shards(names):
    return sorted(n for n in names if n.endswith(".safetensors"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_push_to_streams_shards_byte_identical(hub, src, local, tmp_path, monkeypatch):
    """Each shard is pre-uploaded right after it is written and then deleted, so staging never holds two
    finished shards; one commit at the end; the repo equals the local conversion byte for byte."""
    seen = []  # (shard being added, finished shards on disk then, still there afterwards)
    original = HubShardStream.add_file

    def spy(self, local_path, path_in_repo=None):
        folder = os.path.dirname(local_path)
        on_disk = _shards(f for f in os.listdir(folder) if not f.startswith("."))
        assert hub.uploads.commits == []
        original(self, local_path, path_in_repo)
        seen.append((path_in_repo, on_disk, os.path.exists(local_path)))

    monkeypatch.setattr(HubShardStream, "add_file", spy)
    monkeypatch.setattr(HubShardStream, "add_shard", spy)
    out = tmp_path / "pushed"
    report = converter.convert(src, out, max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN)

    shards = _shards(local)
    assert len(shards) > 2
    assert [s for s, _, _ in seen] == shards  # in order, as written
    assert all(on_disk == [s] and not left for s, on_disk, left in seen)
    assert hub.uploads.put_oids(REPO) == [_sha(local[s]) for s in shards]
    (commit,) = hub.uploads.commits
    repo = hub.repos[REPO]
    assert report.push["commit"] == repo.branches["main"] == commit[2]
    assert {p for p, kind in commit[3].items() if kind == "lfs"} == set(shards)
    for name in shards + ["config.json", "model.safetensors.index.json", "generation_config.json", "README.md"]:
        assert repo.files[name] == local[name], name
    # OUTPUT keeps the small files only; the report there is the one in the repo and names every shard
    assert sorted(os.listdir(out)) == sorted(set(local) - set(shards))
    assert repo.files["qckpt_report.json"] == (out / "qckpt_report.json").read_bytes()
    saved = json.loads((out / "qckpt_report.json").read_text())
    assert all(saved["files"][s] == _sha(local[s]) for s in shards)


def test_push_failure_commits_nothing_and_resume_sends_only_missing(hub, src, local, tmp_path):
    """An upload refused at the second shard stops the run with nothing committed and nothing
    finished-looking in OUTPUT; --resume then completes it, and the Hub is not sent the first shard again."""
    shards = _shards(local)
    oids = [_sha(local[s]) for s in shards]
    out = tmp_path / "pushed"
    hub.fail(rf"/__lfs/{REPO}/{oids[1]}", status=403)
    with pytest.raises(HubError, match=rf"{REPO}: uploading {shards[1]} failed"):
        converter.convert(src, out, max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN)
    assert hub.uploads.commits == [] and hub.repos[REPO].files == {}
    assert hub.uploads.put_oids(REPO) == [oids[0]]
    assert not (out / "config.json").exists() and not _shards(os.listdir(out))

    converter.convert(src, out, max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN, resume=True)
    # shard 2 (finished locally, upload refused) is sent from disk first; shard 1 is quantized again and
    # answered "already stored"; the rest follow
    assert hub.uploads.put_oids(REPO) == [oids[0], oids[1]] + oids[2:]
    assert (REPO, oids[0], "stored") in hub.uploads.batches
    assert len(hub.uploads.commits) == 1
    assert {s: hub.repos[REPO].files[s] for s in shards} == {s: local[s] for s in shards}


def test_conversion_error_after_uploads_commits_nothing(hub, src, tmp_path, monkeypatch):
    """A conversion that fails after some shards were uploaded makes no commit: the repo stays empty."""
    original = pipeline._Run.process_tensor
    calls = []

    def failing(self, reader, tp, writer, **io):
        calls.append(tp.name)
        if len(calls) == 12:  # past the first shard
            raise OSError("simulated crash")
        return original(self, reader, tp, writer, **io)

    monkeypatch.setattr(pipeline._Run, "process_tensor", failing)
    with pytest.raises(OSError, match="simulated crash"):
        converter.convert(src, tmp_path / "out", max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN)
    assert hub.uploads.put_oids(REPO) and hub.uploads.commits == [] and hub.repos[REPO].files == {}


def test_cli_push_to_json_and_usage(hub, src, tmp_path):
    """`qckpt convert --push-to` prints the commit in --json; --private without --push-to is a usage error;
    a rejected token is one error line before any quantizing."""
    runner = CliRunner()
    result = runner.invoke(main, ["convert", src, str(tmp_path / "a"), "--push-to", REPO, "--private",
                                  "--token", TOKEN, "--json", "--max-shard-size", SHARD])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["pushed_to"] == REPO and summary["push_commit"] == hub.repos[REPO].branches["main"]
    assert hub.repos[REPO].private

    result = runner.invoke(main, ["convert", src, str(tmp_path / "b"), "--private"])
    assert result.exit_code == 2 and "--private only applies with --push-to" in result.output

    result = runner.invoke(main, ["convert", src, str(tmp_path / "c"), "--push-to", "org/other", "--token", "hf_bad"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("error: org/other: creating the repo failed (HTTP 401)")
    assert not (tmp_path / "c" / "config.json").exists()


def test_refused_commit_leaves_output_unfinished(hub, src, local, tmp_path):
    """If the final commit is refused, every shard was uploaded but the repo has no commit, and OUTPUT holds
    nothing finished-looking (the small files stay in staging)."""
    hub.fail(rf"/api/models/{REPO}/commit/", status=403)
    out = tmp_path / "pushed"
    with pytest.raises(HubError, match=rf"{REPO}: committing failed \(HTTP 403\)"):
        converter.convert(src, out, max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN)
    assert len(hub.uploads.put_oids(REPO)) == len(_shards(local))
    assert hub.uploads.commits == [] and hub.repos[REPO].files == {}
    assert os.listdir(out) == [pipeline.STAGING]


def test_hub_to_hub_keeps_no_shard_locally(hub, src, local, tmp_path):
    """A Hub source converted with --push-to: the repo gets the same shards as a local conversion, and
    OUTPUT ends with neither downloaded source shards nor output shards."""
    sha = hub.add_repo("org/source", folder_bytes(src))
    out = tmp_path / "pushed"
    report = converter.convert("org/source", out, max_shard_size=SHARD, progress=False, push_to=REPO, token=TOKEN)
    assert report.commit == sha
    shards = _shards(local)
    assert {s: hub.repos[REPO].files[s] for s in shards} == {s: local[s] for s in shards}
    leftover = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.endswith(".safetensors")]
    assert leftover == []
