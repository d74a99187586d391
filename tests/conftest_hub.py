"""Fixtures for Hub tests: a fresh loopback Hub server per test and small zoo folders.

Use from a test module (or tests/conftest.py) with ``pytest_plugins = ["conftest_hub"]``; the
plain helpers (``write_test_zoo``, ``tree_bytes``, ``TOKEN``) are in ``zoo_factory.py``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from hub_server import HubServer  # noqa: E402
from zoo_factory import TOKEN, write_test_zoo  # noqa: E402


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """Hub server, files "regular" (the client's default Xet pipeline runs, no Xet storage needed)."""
    with HubServer(tokens={TOKEN: "tester"}, require_auth=True, page_size=7) as server:
        yield server


@pytest.fixture
def lfs_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """Hub server answering "lfs" for weights/parquet; Xet disabled in the client (no CAS here)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with HubServer(lfs_mode=True, tokens={TOKEN: "tester"}, require_auth=True) as server:
        yield server


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache and no ambient token/endpoint from the machine."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return cache


@pytest.fixture
def make_zoo(tmp_path: Path):
    """``make_zoo(name="zoo", **kwargs)`` → a fresh zoo folder (see :func:`write_test_zoo`)."""

    def _make(name: str = "zoo", **kwargs: Any) -> Path:
        return write_test_zoo(tmp_path / name, **kwargs)

    return _make


#: Prepended to the scripts tests run in a subprocess (datasets reads HF_ENDPOINT at import): name
#: resolution is refused for anything but the loopback, and each refused host is recorded in ``blocked``.
LOOPBACK_ONLY = """\
import socket

_real, blocked = socket.getaddrinfo, []


def _loopback_only(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost"):
        blocked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, f"test: no network for {host}")
    return _real(host, *args, **kwargs)


socket.getaddrinfo = _loopback_only
"""
