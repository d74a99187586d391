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
