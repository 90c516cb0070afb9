"""`push` and the shard streamer against the loopback Hub (LFS path, Xet disabled): files arrive
byte-identical, an interrupted push re-sends only what is missing, and a folder verify rejects is refused."""
import hashlib
import os
import shutil

import pytest
from click.testing import CliRunner

from checkpoint_factory import build_converted, folder_bytes, source_tensors
from converter.cli import main
from converter.errors import HubError, VerificationError
from converter.publish import push, stream_shards_to_hub
from fakehub import fake_hub, fake_hub_uploads, no_network  # noqa: F401 - fixtures

TOKEN = "hf_good"
REPO = "org/tiny-nf4"


@pytest.fixture
def hub(fake_hub_uploads):
    return fake_hub_uploads


@pytest.fixture
def folder(tmp_path, gen):
    return build_converted(tmp_path / "out", source_tensors(gen), shards=3)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _shards(files):
    return sorted(n for n in files if n.endswith(".safetensors"))


def test_push_arrives_byte_identical(hub, folder):
    """Every file lands byte for byte in one commit; shards went through LFS, one pre-upload each."""
    local = folder_bytes(folder)
    result = push(folder, REPO, token=TOKEN)
    repo = hub.repos[REPO]
    assert repo.files == local
    assert result.commit == repo.branches["main"] and set(result.files) == set(local)
    assert list(result.preuploaded) == _shards(local)  # weights first, in order
    (commit,) = hub.uploads.commits
    kinds = commit[3]
    assert {p for p, k in kinds.items() if k == "lfs"} == set(_shards(local))
    assert {p for p, k in kinds.items() if k == "regular"} == set(local) - set(_shards(local))
    assert sorted(hub.uploads.put_oids(REPO)) == sorted(_sha(local[s]) for s in _shards(local))
    # the read side serves the pushed bytes too
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(REPO, _shards(local)[1], token=TOKEN)
    with open(path, "rb") as f:
        assert f.read() == local[_shards(local)[1]]


def test_interrupted_push_resends_only_missing(hub, folder):
    """A push cut off at the second shard leaves nothing committed; the re-run PUTs only the shards the
    Hub lacks (the first is answered 'already stored' by the LFS batch endpoint)."""
    local = folder_bytes(folder)
    shards = _shards(local)
    oids = [_sha(local[s]) for s in shards]
    hub.fail(rf"/__lfs/{REPO}/{oids[1]}", status=403)  # not retried by huggingface_hub: the run stops
    with pytest.raises(HubError, match=rf"{REPO}: uploading {shards[1]} failed"):
        push(folder, REPO, token=TOKEN)
    assert hub.uploads.put_oids(REPO) == [oids[0]]
    assert hub.uploads.commits == [] and hub.repos[REPO].files == {}

    result = push(folder, REPO, token=TOKEN)
    assert hub.uploads.put_oids(REPO) == [oids[0], oids[1], oids[2]]  # oids[0] was not sent again
    assert (REPO, oids[0], "stored") in hub.uploads.batches
    puts_logged = [p for m, p in hub.log if m == "PUT"]
    # shard 1, the refused shard 2; then on the re-run only shards 2 and 3
    assert puts_logged == [f"/__lfs/{REPO}/{o}" for o in (oids[0], oids[1], oids[1], oids[2])]
    assert hub.repos[REPO].files == local and result.commit is not None

    # a third run with nothing changed uploads nothing and makes no commit
    push(folder, REPO, token=TOKEN)
    assert len(hub.uploads.put_oids(REPO)) == 3 and len(hub.uploads.commits) == 1


def test_push_refuses_folder_verify_rejects(hub, folder):
    """A folder with a damaged shard is refused before any request reaches the Hub."""
    shard = _shards(os.listdir(folder))[0]
    path = os.path.join(folder, shard)
    with open(path, "r+b") as f:
        f.seek(-40, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(VerificationError, match="refusing to push"):
        push(folder, REPO, token=TOKEN)
    assert not [entry for entry in hub.log if entry[0] != "GET" or "agent-harnesses" not in entry[1]]


def test_cli_push_private_branch(hub, folder):
    """`qckpt push --private --revision dev` creates a private repo and commits to branch dev only."""
    result = CliRunner().invoke(main, ["push", folder, REPO, "--private", "--revision", "dev",
                                       "--message", "first upload", "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"pushed 7 files to {REPO}@dev commit "), result.stdout
    repo = hub.repos[REPO]
    assert repo.private
    assert hub.snapshot(repo, "main")[1] == {}
    assert hub.snapshot(repo, "dev")[1] == folder_bytes(folder)


def test_cli_push_bad_token(hub, folder):
    """A rejected token is one `error:` line naming the repo, exit 1."""
    result = CliRunner().invoke(main, ["push", folder, REPO, "--token", "hf_wrong"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {REPO}: creating the repo failed (HTTP 401)")


def test_stream_shards_deletes_local_copies(hub, folder, tmp_path):
    """The converter's streamer uploads each shard as it is added, deletes it locally, and commits the
    shards plus the remaining small files once at finish()."""
    original = folder_bytes(folder)
    work = tmp_path / "streamed"
    shutil.copytree(folder, work)
    stream = stream_shards_to_hub(REPO, token=TOKEN)
    for i, shard in enumerate(_shards(original)):
        stream.add_shard(work / shard, shard)
        assert not (work / shard).exists()
        assert len(hub.uploads.put_oids(REPO)) == i + 1
        assert hub.uploads.commits == []  # nothing visible before the end
    result = stream.finish(work, message="convert --push-to")
    assert hub.repos[REPO].files == original
    assert len(hub.uploads.commits) == 1 and set(result.files) == set(original)
    with pytest.raises(HubError, match="finish"):
        stream.finish(work)
