"""Clear errors from the reader on a local zoo: unknown ids and epochs, tampered files, bad arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vitzoo
from vitzoo.errors import ZooError


def test_unknown_model_epoch_and_column(tiny_zoo: Path) -> None:
    zoo = vitzoo.load(tiny_zoo)
    mid = zoo.model_ids()[0]
    with pytest.raises(ZooError, match="model 'nope' is not in this zoo"):
        zoo.state_dict("nope")
    with pytest.raises(ZooError, match=r"has no saved state at epoch 7; saved: \[0, 1, 2\]"):
        zoo.state_dict(mid, epoch=7)
    with pytest.raises(ZooError, match="filter: no column 'colour'"):
        zoo.filter(colour="red")
    with pytest.raises(ZooError, match="a revision applies to Hub repositories"):
        vitzoo.load(tiny_zoo, revision="v1")
    with pytest.raises(ZooError, match="not a zoo"):
        vitzoo.load(tiny_zoo / "models")


def test_tampered_file_is_never_used(tiny_zoo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "zoo"
    shutil.copytree(tiny_zoo, copy)
    zoo = vitzoo.load(copy)
    mid = zoo.model_ids()[0]
    f = copy / "models" / mid / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's bytes: still a valid safetensors file
    f.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="sha256 .* does not match the index"):
        zoo.state_dict(mid)
    zoo.state_dict(mid, epoch=0)  # the model's other file is intact and still readable


def test_filter_keeps_states_models_where_keeps_models(tiny_zoo: Path) -> None:
    zoo = vitzoo.load(tiny_zoo)
    final = zoo.filter(stage="finetune").models.iloc[0]
    mid, loss = final["model_id"], final["train_loss"]
    by_metric = {"train_loss": lambda v: v == loss}  # true of mid's final state only

    states = zoo.filter(**by_metric)  # filter(): the matching states
    assert states.epochs(mid) == [2]
    with pytest.raises(ZooError, match=r"epoch 0 is not in this view, which holds its epochs \[2\] "
                                       r"\(the zoo saved \[0, 1, 2\]\).*models_where"):
        states.weights(mid, epoch=0)

    models = zoo.models_where(stage="finetune", **by_metric)  # models_where(): whole models
    assert models.model_ids() == [mid] and models.epochs(mid) == [0, 1, 2]
    assert models.weights(mid, epoch=0).equal(zoo.weights(mid, epoch=0))
    assert zoo.models_where(stage="finetune", epochs=(1, 2)).epochs(mid) == [1, 2]
    assert zoo.filter(model_id=[mid]).epochs(mid) == [0, 1, 2]  # given models, all their states
    # factors are the same in every state: both agree
    assert zoo.models_where(stage="finetune").index.equals(zoo.filter(stage="finetune").index)

    early = zoo.filter(epochs=(0, 0)).models_where(**by_metric)  # tested on the final state, even when
    assert early.model_ids() == [mid] and early.epochs(mid) == [0]  # the view lacks it
    with pytest.raises(ZooError, match=r"final state is not in this view, which holds its epochs \[0\]"):
        early.weights(mid)
    with pytest.raises(ZooError, match="filter: no column 'colour'"):
        zoo.models_where(colour="red")
