"""verify / inspect / push on the real output of `converter.convert` (not the test factory): it verifies clean,
reproduces byte for byte from its source, and survives a push + download round trip through the loopback Hub."""
import os

import pytest
import torch
from click.testing import CliRunner

from checkpoint_factory import folder_bytes, source_tensors, write_source
from converter.cli import main
from converter.inspection import inspect
from converter.publish import push
from converter.verify import verify
from fakehub import fake_hub, fake_hub_uploads, no_network  # noqa: F401 - fixtures

REPO = "org/converted"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(source folder, converted folder): a tiny bf16 Llama converted to NF4 in three shards."""
    pytest.importorskip("converter.pipeline")
    from converter import convert

    root = tmp_path_factory.mktemp("convert")
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"converted fixture seed {seed}")
    src = write_source(root / "src", source_tensors(torch.Generator().manual_seed(seed)))
    convert(src, root / "out", max_shard_size="20KB", threads=1)
    return src, os.fspath(root / "out")


def test_convert_output_verifies_and_reproduces(converted):
    """convert's folder has no findings, hashes match its report, and re-quantizing the source gives the
    stored bytes for every tensor."""
    src, out = converted
    result = verify(out, source=src, threads=2)
    assert result.ok, [str(f) for f in result.findings]
    assert result.files_checked == 3 and result.files_hashed == 6
    assert result.reproduction["identical"] == result.reproduction["tensors_compared"] == 21
    cli = CliRunner().invoke(main, ["verify", out, "--source", src])
    assert cli.exit_code == 0 and "21 of 21 tensors reproduced byte for byte" in cli.stdout


def test_convert_output_inspects_with_report(converted):
    """inspect reads convert's report: provenance, tool version and the error summary."""
    src, out = converted
    insp = inspect(out)
    assert insp.provenance["source"] == src and insp.provenance["tool_version"]
    assert insp.errors["quantized_tensors"] == 14 and insp.params_exact
    assert len(insp.quantized_modules) == 14 and len(insp.shards) == 3


def test_source_from_the_hub(fake_hub, converted):
    """--source also takes a Hub repo id: the source shards are fetched through sources.hub and compared."""
    src, out = converted
    fake_hub.add_repo("org/source", folder_bytes(src))
    result = verify(out, source="org/source")
    assert result.ok, [str(f) for f in result.findings]
    assert result.reproduction["identical"] == result.reproduction["tensors_compared"] == 21


def test_push_download_verify_round_trip(fake_hub_uploads, converted, tmp_path):
    """Pushed, then downloaded with huggingface_hub, the folder still verifies (sha256s intact) and
    inspects the same from the Hub as from disk."""
    from huggingface_hub import snapshot_download

    _, out = converted
    push(out, REPO, token="hf_good")
    local = snapshot_download(REPO, local_dir=tmp_path / "dl", token="hf_good")
    assert verify(local).ok
    remote = inspect(REPO).to_dict()
    here = inspect(out).to_dict()
    for key in ("location", "kind", "commit"):
        remote.pop(key), here.pop(key)
    assert remote == here
