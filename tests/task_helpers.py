"""What the task tests (language model, PINN) share: a micro recipe with overrides, and the kill-and-resume
check (a zoo generated in one go and one killed after epoch 1, then resumed, save the same states bit for bit
and index the same ``metric``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml

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


def write_recipe(base: dict[str, Any], tmp_path: Path, name: str = "micro.yaml", **train: Any) -> Path:
    """``base`` (a one-stage ``train`` recipe) with ``train`` overrides (a section's keys merged), as a file."""
    data = json.loads(json.dumps(base))
    for k, v in train.items():
        if isinstance(v, dict) and isinstance(data["stages"]["train"].get(k), dict):
            data["stages"]["train"][k].update(v)
        else:
            data["stages"]["train"][k] = v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p
