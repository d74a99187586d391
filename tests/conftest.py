"""Shared fixtures: the tiny recipe and a tiny zoo generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["conftest_hub"]

# Deterministic, quiet CPU runs: one thread per process avoids oversubscription on 2-core CI machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")

TESTS = Path(__file__).parent
REPO = TESTS.parent
TINY = TESTS / "tiny.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the same reduction order on any machine (exact comparisons),
    and tiny models run faster on one thread than on two busy ones."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_recipe() -> Path:
    return TINY


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> Path:
    """The tiny recipe generated once (2 pre-trained + 4 fine-tuned micro ViTs, ~10 s)."""
    from vitzoo.train.generate import generate

    out = tmp_path_factory.mktemp("zoos") / "tiny"
    generate(TINY, out, progress=False, log=lambda m: None)
    return out
