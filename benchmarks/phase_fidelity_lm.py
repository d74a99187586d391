"""Fidelity check of the GPT-2 task (not a test): does test perplexity fall with model_dim on builtin:arithmetic?

A micro zoo over ``width`` (depth 2, context 32, AdamW, cosine schedule) generated through
``vitzoo.train.generate.generate``; prints the final val/test perplexity and next-token accuracy per width
(mean over seeds). Usage::

    .venv/bin/python benchmarks/phase_fidelity_lm.py [--widths 8 16 32 64] [--epochs 4] [--seeds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--train-blocks", type=int, default=1200)
    a = ap.parse_args()
    recipe = {"name": "lm-fidelity", "seed": 0, "stages": {"train": {
        "data": {"source": "builtin:arithmetic", "max_train_samples": a.train_blocks},
        "model": {"variant": "gpt2", "depth": 2, "positions": 32},
        "objective": {"name": "causal_lm", "context_length": 32},
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup": "0ep"},
        "epochs": a.epochs, "batch_size": 32, "checkpoint_epochs": [],
        "grid": {"width": a.widths}, "seeds": {"init": list(range(a.seeds))},
    }}}
    from vitzoo.train.generate import generate

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "r.yaml"
        p.write_text(yaml.safe_dump(recipe))
        t = time.time()
        generate(p, Path(d) / "zoo", progress=False, log=lambda m: None)
        idx = pd.read_parquet(Path(d) / "zoo" / "index.parquet")
    fin = idx[idx["epoch"] == a.epochs]
    print(fin.groupby("model.width")[["val_perplexity", "test_perplexity", "test_acc", "train_loss"]].mean()
          .round(4).to_string())
    print(f"{len(fin)} models in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
