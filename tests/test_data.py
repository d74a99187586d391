"""Data sources through `datasets`: local parquet and image folders, deterministic splits, clear errors."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vitzoo.data.sources import DataError, load_splits
from vitzoo.recipe import DataConfig


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(n)]


def test_parquet_source_with_mapped_columns_and_val_carve(tmp_path: Path) -> None:
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, n in (("train", 60), ("test", 12)):
        ds = datasets.Dataset.from_dict({"img": _images(n), "fine_label": [i % 3 for i in range(n)]}, features=feats)
        ds.to_parquet(str(tmp_path / f"{split}-00000.parquet"))
    cfg = DataConfig(source=f"parquet:{tmp_path}", image_column="img", label_column="fine_label", val_fraction=0.25)
    s = load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (45, 15, 12)
    assert s.train.column_names == ["image", "label"]
    again = load_splits(cfg)
    assert again.val["label"] == s.val["label"], "the carve is deterministic (split_seed)"


def test_imagefolder_source(tmp_path: Path) -> None:
    for split, n in (("train", 10), ("test", 4)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i, img in enumerate(_images(n)):
                img.save(d / f"{i}.png")
    s = load_splits(DataConfig(source=f"imagefolder:{tmp_path}", val_fraction=0.2))
    assert s.label_names == ["cat", "dog"] and len(s.test) == 8 and len(s.train) + len(s.val) == 20


def test_missing_split_and_column_name_the_key(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"image": _images(4), "label": [0, 1, 0, 1]})
    ds.to_parquet(str(tmp_path / "train-0.parquet"))
    with pytest.raises(DataError, match="data.label_column: column 'y' not in"):
        load_splits(DataConfig(source=f"parquet:{tmp_path}", label_column="y", test_split=None))
    with pytest.raises(DataError, match="data.test_split: split 'test' not in"):
        load_splits(DataConfig(source=f"parquet:{tmp_path}"))
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(source=f"imagefolder:{tmp_path / 'nope'}"))


def test_builtins_are_offline_and_deterministic() -> None:
    a = load_splits(DataConfig(source="builtin:shapes"))
    b = load_splits(DataConfig(source="builtin:shapes"))
    assert a.num_classes == 6 and len(a.test) == 300
    assert np.array_equal(np.asarray(a.train[0]["image"]), np.asarray(b.train[0]["image"]))


def test_crop_pct_is_a_centre_crop_that_timm_reproduces() -> None:
    import torch
    from timm.data import create_transform, resolve_data_config

    from vitzoo.data.pipeline import eval_transform, preprocessing_for

    pp = preprocessing_for(DataConfig(source="builtin:digits", channels=1, crop_pct=0.875), 28)
    img = Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 251, mode="L")
    x = eval_transform(pp)(img)
    assert x.shape == (1, 28, 28)
    expected = torch.tensor(np.asarray(img)[2:30, 2:30], dtype=torch.float32) / 255
    torch.testing.assert_close(x[0], (expected - 0.5) / 0.5)  # 32 px stays 32, then the centre 28
    timm_tf = create_transform(**resolve_data_config(pretrained_cfg=pp.pretrained_cfg(10)))
    torch.testing.assert_close(timm_tf(img), x)


def test_padded_random_crop_pads_with_black_before_normalising() -> None:
    """``aug.crop_padding`` is torchvision's RandomCrop(size, padding, fill=0) + flip, then Normalize."""
    from vitzoo.data.pipeline import Preprocessing, train_transform
    from vitzoo.recipe import AugConfig

    pp = Preprocessing(16, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0)
    t = train_transform(pp, AugConfig(crop_padding=4, hflip=0.5))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    seen = set()
    for _ in range(20):
        x = t(white)
        assert x.shape == (3, 16, 16)
        seen |= set(x.unique().tolist())
    assert seen == {2.0, -2.0}, "image pixels (1 - .5) / .25 and black padding (0 - .5) / .25"
