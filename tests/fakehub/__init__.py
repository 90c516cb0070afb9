"""Loopback Hub for tests: `fake_hub` fixture (server + HF env pointed at it + a temp HF_HOME) and the
network guard. Import the fixtures into a test module: `from fakehub import fake_hub, no_network`."""
from __future__ import annotations

import pytest

from . import guard
from .server import FakeHub, git_sha1

__all__ = ["FakeHub", "fake_hub", "fake_hub_uploads", "git_sha1", "no_network"]


@pytest.fixture
def no_network():
    """Fail the test if anything tried to reach a non-loopback address."""
    guard.arm()
    yield
    violations = guard.disarm()
    assert not violations, f"non-loopback connections attempted: {violations}"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, no_network):
    """A running FakeHub; HF_ENDPOINT, HF_HOME (temp), HF_HUB_DISABLE_XET=1 set in env and constants."""
    import huggingface_hub.constants as c

    hub = FakeHub().start()
    home = tmp_path / "hf_home"
    home.mkdir()
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost",
           "HF_TOKEN_PATH": str(home / "token"), "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    for name, value in (("ENDPOINT", hub.url), ("HF_HOME", str(home)), ("HF_HUB_CACHE", str(home / "hub")),
                        ("HUGGINGFACE_HUB_CACHE", str(home / "hub")), ("HF_HUB_DISABLE_XET", True),
                        ("HF_HUB_OFFLINE", False), ("HF_TOKEN_PATH", str(home / "token")),
                        ("HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")):
        if hasattr(c, name):
            monkeypatch.setattr(c, name, value)
    yield hub
    hub.stop()


@pytest.fixture
def fake_hub_uploads(fake_hub):
    """fake_hub with the upload endpoints attached; their state and log are `hub.uploads`."""
    from .upload import attach_uploads

    fake_hub.uploads = attach_uploads(fake_hub)
    return fake_hub
