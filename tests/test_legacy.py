"""Legacy (Ray Tune layout) zoos convert into vitzoo zoos; unsafe pickles are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from zoo_factory import TOKEN

import vitzoo
from vitzoo.models.cnn import build_cnn
from vitzoo.zoo.legacy import LegacyZooError, convert, load_checkpoint

pytest_plugins = ["conftest_hub"]


class Evil:  # a pickled object weights_only must refuse
    def __reduce__(self):
        return (print, ("this must never run",))


def _trial(root: Path, i: int, lr: float, seed: int, epochs: int = 2, diverge: bool = False,
           evil: bool = False, short_names: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    folder = root / f"NN_tune_trainable_ab12{i}_{i}_lr={lr},seed={seed}_2022-01-01_00-00-0{i}"
    folder.mkdir(parents=True)
    params = {"model::type": "CNN", "model::nlin": "tanh", "model::dropout": 0.0, "model::init_type": "uniform",
              "model::channels_in": 1, "optim::optimizer": "adam", "optim::lr": lr, "optim::wd": 0.0,
              "seed": seed, "training::batchsize": 10}
    (folder / "params.json").write_text(json.dumps(params))
    lines, states = [], {}
    for e in range(epochs + 1):
        model = build_cnn("cnn-s", 1, 10, "tanh", 0.0, init="U", seed=seed * 100 + e)
        states[e] = {k: v.clone() for k, v in model.state_dict().items()}
        ck = root / folder.name / (f"checkpoint_{e}" if short_names else f"checkpoint_{e:06d}")
        ck.mkdir()
        payload: object = states[e]
        if evil and e == epochs:
            payload = {**states[e], "x": Evil()}
        torch.save(payload, ck / "checkpoints")
        torch.save({"state": {}, "param_groups": []}, ck / "optimizer")
        loss = float("nan") if diverge and e == epochs else 2.0 / (e + 1)
        lines.append({"train_loss": loss, "train_acc": 0.1 * e, "test_loss": loss, "test_acc": 0.1 * e + 0.05,
                      "training_iteration": e + 1})
    (folder / "result.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return states


@pytest.fixture
def legacy(tmp_path):
    root = tmp_path / "legacy_mnist_seed"
    states = {
        "a": _trial(root, 1, 1e-3, 1),
        "b": _trial(root, 2, 1e-4, 2, short_names=True),
        "div": _trial(root, 3, 1e-3, 3, diverge=True),
    }
    _trial(root, 4, 1e-4, 4, evil=True)
    return root, states


def test_convert_and_load(legacy, tmp_path):
    root, states = legacy
    result = convert(root, tmp_path / "zoo", name="mnist-seed")
    assert len(result.converted) == 3
    (refused,) = result.refused.values()
    assert "weights_only" in refused
    zoo = vitzoo.load(tmp_path / "zoo")
    assert len(zoo) == 3
    index = zoo.index
    assert {"optim.lr", "model.nlin", "seed"} <= set(index.columns)
    assert set(index["grid_factors"].iloc[0]) == {"optim.lr"}  # read_index gives lists, whatever the format
    by_seed = {int(r["seed"]): r["model_id"] for _, r in zoo.models.iterrows()}
    for e in (0, 1, 2):
        sd = zoo.state_dict(by_seed[1], epoch=e)
        assert all(torch.equal(sd[k], v) for k, v in states["a"][e].items())
    assert zoo.epochs(by_seed[2]) == [0, 1, 2]  # checkpoint_N spelling read too
    div = zoo.models.set_index("model_id").loc[by_seed[3]]
    assert div["status"] == "diverged" and div["epoch"] == 1
    row = index[(index["model_id"] == by_seed[1]) & (index["epoch"] == 2)].iloc[0]
    assert math.isclose(row["test_acc"], 0.25) and math.isclose(row["train_loss"], 2 / 3)
    info = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert info["name"] == "mnist-seed" and info["provenance"]["refused"] == 1
    from vitzoo.models import cnn

    if hasattr(cnn, "from_config"):  # the CNN builder reads config.json: the model loads as it was trained
        model = zoo.model(by_seed[1], epoch=2)
        assert not model.training


def test_convert_is_resumable(legacy, tmp_path):
    root, _ = legacy
    first = convert(root, tmp_path / "zoo")
    again = convert(root, tmp_path / "zoo")
    assert again.converted == [] and sorted(again.skipped) == sorted(first.converted)
    assert len(pd.read_parquet(tmp_path / "zoo" / "index.parquet")) == 3 * 3 - 1  # diverged keeps epochs 0-1


def test_unsafe_pickle_refused_without_running_it(tmp_path, capsys):
    path = tmp_path / "checkpoints"
    torch.save({"w": torch.zeros(2), "x": Evil()}, path)
    with pytest.raises(LegacyZooError, match="weights_only"):
        load_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(LegacyZooError, match="state_dict"):
        load_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_not_a_legacy_zoo(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LegacyZooError, match="not a legacy"):
        convert(tmp_path / "empty", tmp_path / "zoo")


def test_cli_convert_then_push_and_load(legacy, tmp_path, hub, hf_cache, monkeypatch, capsys):
    from vitzoo.cli import main

    root, states = legacy
    assert main(["convert", str(root), str(tmp_path / "zoo")]) == 0
    assert "converted 3 models" in capsys.readouterr().out
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(tmp_path / "zoo"), "vitzoo-test/legacy", "--endpoint", hub.endpoint]) == 0
    zoo = vitzoo.load("vitzoo-test/legacy", revision="v1", endpoint=hub.endpoint, cache_dir=hf_cache)
    local = vitzoo.load(tmp_path / "zoo")
    mid = local.model_ids()[0]
    assert all(torch.equal(zoo.state_dict(mid)[k], v) for k, v in local.state_dict(mid).items())
