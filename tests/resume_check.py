"""The one kill-and-resume check of the task tests: a zoo generated in one go and one killed after epoch 1
(``stop_after_epoch``) then resumed save the same states bit for bit and index the same ``metric``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import vitzoo
from vitzoo.train.generate import generate


def assert_kill_and_resume_is_exact(recipe: Path, tmp_path: Path, metric: str, epochs: list[int]) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    generate(recipe, whole, progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, cut, progress=False, log=lambda m: None, stop_after_epoch=1)
    logs: list[str] = []
    generate(recipe, cut, progress=False, log=logs.append)
    assert any("resuming after epoch 1" in m for m in logs)
    a, b = vitzoo.load(whole), vitzoo.load(cut)
    assert a.model_ids() == b.model_ids()
    for mid in a.model_ids():
        assert a.epochs(mid) == b.epochs(mid) == epochs
        for e in a.epochs(mid):
            sa, sb = a.state_dict(mid, e), b.state_dict(mid, e)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{mid} epoch {e} differs after resume"
    ia, ib = pd.read_parquet(whole / "index.parquet"), pd.read_parquet(cut / "index.parquet")
    assert ia[metric].tolist() == ib[metric].tolist()
