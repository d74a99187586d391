"""Benchmark: the MNIST CNN-s seed zoo end to end through `vitzoo generate` (issue 4's zoo target).

`benchmarks/population.py` compares stacked and one-by-one training; this script times what a user runs: the
real recipe (`recipes/classic/mnist-cnn-s-seed.yaml`: 1,000 CNN-s, Adam 3e-4, batch 10, 50 epochs,
all 51 states per model), data loading, the writers, the index and the cards, on MNIST-shaped data
(machines without Hub access: a synthetic, learnable 28x28 ten-class set written as parquet, 60,000
train + 10,000 test, carved 50,000 / 10,000 / 10,000 like the recipe; or ``--data`` with a parquet
folder of the real MNIST: ``train*.parquet`` / ``test*.parquet`` with ``image`` and ``label``).

Checkpoint time is every call of the zoo writer (``RunWriter.save_epoch`` / ``save_history`` /
``save_resume`` / ``finalize``), timed inside the run.

    python benchmarks/seed_zoo.py                                   # the full target: 1,000 x 50 epochs
    python benchmarks/seed_zoo.py --models 16 --epochs 1 --train-size 1200 --test-size 200   # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "classic" / "mnist-cnn-s-seed.yaml"


def synthetic_mnist(folder: Path, train: int, test: int, seed: int = 0, channels: int = 1, size: int = 28) -> Path:
    """MNIST-shaped parquet files (or CIFAR-shaped: ``channels=3, size=32``): ten class templates (random
    strokes) + per-sample noise and shifts, so models learn something (accuracy is not comparable)."""
    import datasets
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels == 1 else (size, size, channels)
    templates = (rng.random((10, *shape)) > 0.8).astype(np.float32)

    def make(n: int) -> datasets.Dataset:
        labels = rng.integers(0, 10, n)
        imgs = []
        for y in labels:
            x = np.roll(templates[y], tuple(rng.integers(-1, 2, 2)), (0, 1)) * 255 + rng.normal(0, 20, shape)
            imgs.append(Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), mode="L" if channels == 1 else "RGB"))
        return datasets.Dataset.from_dict({"image": imgs, "label": labels.tolist()}).cast_column(
            "image", datasets.Image())

    make(train).to_parquet(str(folder / "train.parquet"))
    make(test).to_parquet(str(folder / "test.parquet"))
    return folder


class Timer:
    """Wraps methods and sums the seconds spent in them."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def wrap(self, owner: type, name: str) -> None:
        fn = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        setattr(owner, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--train-size", type=int, default=60_000, help="synthetic train images (10,000 become val)")
    ap.add_argument("--test-size", type=int, default=10_000)
    ap.add_argument("--data", default=None, help="parquet folder (train*.parquet, test*.parquet); default synthetic")
    ap.add_argument("--out", default=None, help="zoo folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    from vitzoo.train.generate import generate
    from vitzoo.zoo.writer import RunWriter

    work = Path(tempfile.mkdtemp(prefix="vitzoo-seedzoo-"))
    data = Path(args.data) if args.data else synthetic_mnist(work / "data", args.train_size, args.test_size)
    doc = yaml.safe_load(RECIPE.read_text())
    st = doc["stages"]["train"]
    st["data"]["source"] = f"parquet:{data}"
    st["data"]["val_size"] = min(st["data"]["val_size"], args.train_size // 6)
    st["epochs"], st["seeds"]["init"] = args.epochs, f"1..{args.models}"
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = Path(args.out) if args.out else work / "zoo"

    ckpt = Timer()
    for name in ("save_epoch", "save_history", "save_resume", "finalize"):
        ckpt.wrap(RunWriter, name)
    t0 = time.perf_counter()
    meta = generate(recipe, out, progress=False, log=lambda m: None)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0

    import vitzoo

    zoo = vitzoo.load(out)
    finals = zoo.models
    row = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "models": args.models, "epochs": args.epochs,
        "train_size": args.train_size, "data": "synthetic" if not args.data else str(data),
        "wall_s": round(wall, 1), "zoo_status": meta.get("status"), "states": len(zoo.index),
        "ckpt_s": round(ckpt.seconds, 1), "ckpt_calls": ckpt.calls, "ckpt_fraction": round(ckpt.seconds / wall, 4),
        "model_epochs_per_hour": round(args.models * args.epochs / wall * 3600),
        "test_acc_median": float(finals["test_acc"].median()),
        "zoo_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
    }
    print(json.dumps(row, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
