"""The engine against code it shares nothing with, and against its vectorised siblings.

- A plain textbook loop (an ``nn.Module``, ``torch.optim.Adam``, an explicit permutation written here from
  the spec of :func:`vitzoo.train.seeds.epoch_order`, the last partial batch kept) trains one classic CNN;
  the engine's run of the same spec must save the same weights (float tolerance) and report the same
  metrics. This keeps the engine compared with something that is not the engine.
- A CNN run that falls back to the per-run engine (here: forced) gets the data order, last batch and
  history schema of its vectorised siblings: the same model trained both ways agrees to float tolerance,
  for Adam, AdamW and Nesterov SGD.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import vitzoo
from vitzoo.data.pipeline import DataCache, preprocessing_for
from vitzoo.models.cnn import build_cnn
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe
from vitzoo.train.context import RunContext
from vitzoo.train.engine import train_run
from vitzoo.train.generate import generate
from vitzoo.train.population_adapter import unsupported
from vitzoo.zoo.index import write_index

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "name": "engine-micro",
    "stages": {"train": {
        "data": {"source": "builtin:digits", "channels": 1, "max_train_samples": 95, "max_eval_samples": 40},
        "model": {"variant": "cnn-s", "activation": "tanh", "init": "U"},
        "optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": None},
        "schedule": "constant", "epochs": 2, "batch_size": 10, "checkpoint_every": 1,
        "seeds": {"init": [3]},
    }},
}


def _spec(tmp_path: Path, optimizer: str = "adam"):
    recipe = copy.deepcopy(RECIPE)
    recipe["stages"]["train"]["optimizer"]["name"] = optimizer
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    recipe = load_recipe(tmp_path / "r.yaml")
    return tmp_path / "r.yaml", expand(recipe).runs[0]


def _textbook(spec, x, y, evals):
    """One model, torch.optim, an explicit permutation per epoch: nothing from vitzoo.train."""
    cfg = spec.config
    torch.manual_seed(0)
    model = build_cnn("cnn-s", 1, 10, "tanh", 0.0, "U", seed=spec.init_seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4, foreach=False)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        seed = int.from_bytes(hashlib.sha256(f"{spec.data_seed},{epoch}".encode()).digest()[:8], "little")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed & (2**63 - 1)))
        model.train()
        for s in range(0, len(y), cfg.batch_size):  # 95 samples: nine batches of 10 and one of 5
            idx = perm[s:s + cfg.batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            row = {}
            for split, (ex, ey) in evals.items():
                logits = model(ex)
                row[f"{split}_loss"] = F.cross_entropy(logits, ey).item()
                row[f"{split}_acc"] = (logits.argmax(1) == ey).float().mean().item()
        history.append(row)
    return model.state_dict(), history


def test_engine_equals_a_textbook_loop(tmp_path: Path) -> None:
    path, spec = _spec(tmp_path)
    cache = DataCache()
    pp = preprocessing_for(spec.config.data, 28)
    x, y = cache.eval_tensors(spec.config.data, "train", pp)
    splits = cache.splits(spec.config.data)
    evals = {s: cache.eval_tensors(spec.config.data, s, pp) for s in ("train", "val", "test")
             if getattr(splits, s) is not None}
    ref_state, ref_hist = _textbook(spec, x, y, evals)
    ctx = RunContext(zoo_root=tmp_path / "zoo", device=torch.device("cpu"), cache=cache, progress=False,
                     log=lambda m: None)
    info = train_run(spec, ctx)
    write_index(tmp_path / "zoo")
    state = vitzoo.load(tmp_path / "zoo").state_dict(spec.run_id)
    for k, v in ref_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    for got, ref in zip(info["history"][1:], ref_hist, strict=True):
        for k, v in ref.items():
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert got["lr"] == pytest.approx(3e-3)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "nesterov"])
def test_a_fallback_run_trains_like_its_vectorised_siblings(tmp_path: Path, monkeypatch, optimizer: str) -> None:
    """A run alone (timm's optimizer) and the same run in a vmap stack (the functional update): AdamW and
    Nesterov vectorise for CNNs too."""
    path, spec = _spec(tmp_path, optimizer)
    assert not unsupported(spec), "population-trained"
    monkeypatch.setenv("VITZOO_POPULATION", "on")  # the stacked (vmap) engine, even for one model
    generate(path, tmp_path / "stacked", progress=False, log=lambda m: None)
    ctx = RunContext(zoo_root=tmp_path / "alone", device=torch.device("cpu"), progress=False, log=lambda m: None)
    alone = train_run(spec, ctx)  # what a fallback run of the same zoo goes through
    write_index(tmp_path / "alone")
    stacked = json.loads((tmp_path / "stacked" / "models" / spec.run_id / "run.json").read_text())
    assert [sorted(h) for h in alone["history"]] == [sorted(h) for h in stacked["history"]], "one schema"
    for a, b in zip(alone["history"], stacked["history"], strict=True):
        for k, v in b.items():
            if isinstance(v, float):
                assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["epoch"], k)
    za, zb = vitzoo.load(tmp_path / "alone"), vitzoo.load(tmp_path / "stacked")
    for epoch in (0, 1, 2):
        sa, sb = za.state_dict(spec.run_id, epoch), zb.state_dict(spec.run_id, epoch)
        for k in sb:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k, e=epoch: f"{e} {k}: {m}")
