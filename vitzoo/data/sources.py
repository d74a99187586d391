"""Dataset sources, all read through `datasets`, and the deterministic train/val/test splits.

Sources: ``hf:<hub id>`` (with config, split names and column names from the recipe),
``imagefolder:<dir>``, ``parquet:<dir or file>``, and two offline built-ins that need no network:
``builtin:digits`` (scikit-learn's 8x8 digits) and ``builtin:shapes`` (procedurally drawn shapes;
the demo's second task, for fine-tuning). Whatever the source, the result is a
:class:`SplitData` with ``image``/``label`` columns and train, val and test splits; when a source
has no validation split it is carved from train with ``split_seed``, so the test split is never
used for model selection.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from datasets.exceptions import DatasetNotFoundError
from PIL import Image, ImageDraw

from vitzoo.errors import VitzooError
from vitzoo.recipe import DataConfig


@dataclass
class SplitData:
    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset | None
    label_names: list[str]
    name: str
    """The dataset's identity for cards (a Hub id, or the built-in name)."""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


class DataError(VitzooError, ValueError):
    """The data named by a recipe cannot be read as asked (missing split or column...)."""


def load_splits(cfg: DataConfig) -> SplitData:
    """Load the train/val/test splits a DataConfig describes."""
    kind, _, ref = cfg.source.partition(":")
    if kind == "builtin":
        dd = BUILTINS[ref]()
        name = f"vitzoo-builtin/{ref}"
    else:
        dd, name = open_source(cfg)
    return _split(dd, cfg, name)


def open_source(cfg: DataConfig) -> tuple[datasets.DatasetDict, str]:
    """The ``datasets.DatasetDict`` and the name (for cards) of an ``hf:``, ``imagefolder:`` or ``parquet:``
    source, images or text alike (vitzoo.data.text reads text sources through it). Raises DataError naming
    ``data.source``."""
    kind, _, ref = cfg.source.partition(":")
    if kind == "hf":
        try:
            dd = datasets.load_dataset(ref, cfg.config, revision=cfg.revision)
        except (DatasetNotFoundError, FileNotFoundError, ValueError, ConnectionError) as e:
            # unknown repo, config or revision; an unreachable Hub
            raise DataError(f"data.source: cannot load Hub dataset {ref!r} (config {cfg.config!r}, revision "
                            f"{cfg.revision!r}): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        _check_pin(dd, cfg)
        return dd, ref
    if kind == "imagefolder":
        if not Path(ref).is_dir():
            raise DataError(f"data.source: image folder {ref!r} does not exist")
        return datasets.load_dataset("imagefolder", data_dir=ref), Path(ref).name
    if kind == "parquet":
        p = Path(ref)
        if p.is_dir():
            files = {s: [str(f) for f in sorted(p.glob(f"{s}*.parquet"))] for s in
                     {cfg.train_split, cfg.val_split, cfg.test_split} - {None}}
            files = {k: v for k, v in files.items() if v}
        elif p.is_file():
            files = {cfg.train_split: [str(p)]}
        else:
            raise DataError(f"data.source: parquet path {ref!r} does not exist")
        return datasets.load_dataset("parquet", data_files=files), p.name
    raise DataError(f"data.source: unknown kind {kind!r}")  # DataConfig validated the prefix


def carve_val(train: datasets.Dataset, cfg: DataConfig, unit: str = "samples") -> tuple[datasets.Dataset,
                                                                                       datasets.Dataset]:
    """``(train, val)``: ``val_size`` (or ``val_fraction``) of ``train`` carved off with ``split_seed``, a
    deterministic carve, so every model of a zoo sees the same split (images or text documents alike)."""
    if cfg.val_size is not None and cfg.val_size >= len(train):
        raise DataError(f"data.val_size: {cfg.val_size} validation {unit} requested from a train split of "
                        f"{len(train)} ({cfg.source}:{cfg.train_split})")
    size = cfg.val_size if cfg.val_size is not None else cfg.val_fraction
    parts = train.train_test_split(test_size=size, seed=cfg.split_seed, shuffle=True)
    return parts["train"], parts["test"]


def loaded_commit(dd: datasets.DatasetDict) -> str | None:
    """The Hub commit a loaded dataset was built from (its cache folder is named after it)."""
    for split in dd.values():
        for f in split.cache_files:
            m = re.search(r"/([0-9a-f]{40})/", f["filename"])
            if m:
                return m[1]
    return None


def _check_pin(dd: datasets.DatasetDict, cfg: DataConfig) -> None:
    """A pinned commit gives that commit's data or an error. `datasets` answers an unreachable Hub (or
    HF_HUB_OFFLINE=1) with the latest *cached* revision and only logs a warning; a zoo must not
    silently train on other data than its recipe pins."""
    if cfg.revision and re.fullmatch(r"[0-9a-f]{40}", cfg.revision):
        got = loaded_commit(dd)
        if got is not None and got != cfg.revision:
            raise DataError(f"data.revision: {cfg.source} is pinned to commit {cfg.revision[:12]}… but `datasets` "
                            f"served cached commit {got[:12]}… (the Hub was unreachable or offline mode is on); "
                            f"connect once to download the pinned revision")


def _split(dd: datasets.DatasetDict, cfg: DataConfig, name: str) -> SplitData:
    def get(split: str, key: str) -> datasets.Dataset:
        if split not in dd:
            raise DataError(f"data.{key}: split {split!r} not in {cfg.source} (has: {', '.join(dd)})")
        ds = dd[split]
        for col, ckey in ((cfg.image_column, "image_column"), (cfg.label_column, "label_column")):
            if col not in ds.column_names:
                raise DataError(f"data.{ckey}: column {col!r} not in {cfg.source}:{split} "
                                f"(has: {', '.join(ds.column_names)})")
        ds = ds.select_columns([cfg.image_column, cfg.label_column])
        if cfg.image_column != "image":
            ds = ds.rename_column(cfg.image_column, "image")
        if cfg.label_column != "label":
            ds = ds.rename_column(cfg.label_column, "label")
        return ds

    train = get(cfg.train_split, "train_split")
    if cfg.val_split is not None:
        val = get(cfg.val_split, "val_split")
    else:
        train, val = carve_val(train, cfg)
    test = get(cfg.test_split, "test_split") if cfg.test_split is not None else None
    if cfg.max_train_samples is not None and len(train) > cfg.max_train_samples:
        train = train.select(range(cfg.max_train_samples))
    if cfg.max_eval_samples is not None:
        val = val.select(range(min(len(val), cfg.max_eval_samples)))
        if test is not None:
            test = test.select(range(min(len(test), cfg.max_eval_samples)))
    feat = train.features["label"]
    if isinstance(feat, datasets.ClassLabel):
        names = list(feat.names)
    else:
        labels = sorted(set(train["label"]) | set(val["label"]))
        if labels != list(range(len(labels))):
            raise DataError(f"data.label_column: labels of {cfg.source} are not 0..N-1 class indices: {labels[:10]}")
        names = [str(i) for i in labels]
    return SplitData(train, val, test, names, name)


# ------------------------------------------------------------------ built-in offline datasets

_FEATURES = lambda names: datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})  # noqa: E731


def digits() -> datasets.DatasetDict:
    """scikit-learn's 8x8 digits (1,797 images, shipped with the package): 80/20 train/test, seed 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = [Image.fromarray((x * (255 / 16)).round().astype(np.uint8), mode="L") for x in d.images]
    names = [str(i) for i in range(10)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": d.target.tolist()}, features=_FEATURES(names))
    return ds.train_test_split(test_size=0.2, seed=0, stratify_by_column="label")


SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")


def shapes(n_train: int = 1200, n_test: int = 300, size: int = 32, seed: int = 0) -> datasets.DatasetDict:
    """Procedurally drawn coloured shapes on noisy backgrounds (6 classes), fully deterministic.

    The demo's fine-tuning task: a different domain from digits, so fine-tuning has to transfer.
    """
    rng = np.random.default_rng(seed)

    def draw(label: int) -> Image.Image:
        bg = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
        img = Image.fromarray(bg, "RGB")
        d = ImageDraw.Draw(img)
        r = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
        color = tuple(int(v) for v in rng.integers(120, 256, size=3))
        box = [cx - r, cy - r, cx + r, cy + r]
        w = max(2, r // 3)
        shape = SHAPES[label]
        if shape == "circle":
            d.ellipse(box, fill=color)
        elif shape == "square":
            d.rectangle(box, fill=color)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
        elif shape == "cross":
            d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        elif shape == "ring":
            d.ellipse(box, outline=color, width=w)
        else:  # bar
            d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        return img

    def make(n: int) -> datasets.Dataset:
        labels = [i % len(SHAPES) for i in range(n)]
        rng.shuffle(labels)
        return datasets.Dataset.from_dict({"image": [draw(y) for y in labels], "label": labels},
                                          features=_FEATURES(list(SHAPES)))

    return datasets.DatasetDict(train=make(n_train), test=make(n_test))


BUILTINS = {"digits": digits, "shapes": shapes}
