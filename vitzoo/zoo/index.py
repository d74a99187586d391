"""The zoo index: one row per saved model state, rebuilt from the finished models' run.json.

The index is the single source of truth that cards, pushes and loaders read. Its columns are
listed in docs/zoo-format.md: identity and lineage, seeds, metrics, where the tensors are (file,
prefix, sha256) and every field of the run's resolved stage config, flattened with dots.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from vitzoo.zoo.io import atomic_write
from vitzoo.zoo.writer import MODELS_DIR

INDEX_FILE = "index.parquet"
METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
ID_COLUMNS = ("model_id", "stage", "parent_id", "parent_epoch", "status", "epoch", "final", "file",
              "tensor_prefix", "sha256", "size", "init_seed", "data_seed", "repeat")


#: Keys of a state row in run.json that are not metrics (``lr`` and ``objective_loss`` are training logs).
_STATE_KEYS = {"epoch", "final", "file", "tensor_prefix", "sha256", "size", "lr", "objective_loss"}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 1e-3}}`` → ``{"optimizer.lr": 1e-3}``; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if v:
                out.update(flatten(v, key + "."))
        elif isinstance(v, list):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def rows_for_run(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Index rows of one finished run (its run.json)."""
    cfg = dict(info["config"])
    for k in ("grid", "seeds", "sample", "name"):
        cfg.pop(k, None)
    factors = flatten(cfg)
    rows = []
    for st in info["states"]:
        row: dict[str, Any] = {
            "model_id": info["run_id"], "stage": info["stage"], "parent_id": info.get("parent_id"),
            "parent_epoch": info.get("parent_epoch"), "status": info["status"], "epoch": st["epoch"],
            "final": st["final"], "file": st["file"], "tensor_prefix": st["tensor_prefix"], "sha256": st["sha256"],
            "size": st["size"], "init_seed": info["init_seed"], "data_seed": info["data_seed"],
            "repeat": info.get("repeat", 0),
        }
        row.update({m: st.get(m) for m in METRICS})
        row.update({k: v for k, v in st.items() if k not in row and k not in _STATE_KEYS})  # e.g. sparsity_ratio
        row["grid_factors"] = json.dumps(sorted(info.get("factors", {})))
        for axis, value in info.get("factors", {}).items():  # each axis as the recipe names it: filter(objective=...)
            row.setdefault(axis, value if isinstance(value, (str, int, float, bool)) or value is None
                           else json.dumps(value, sort_keys=True))
        for k, v in factors.items():
            row.setdefault(k, v)
        rows.append(row)
    return rows


def finished_runs(root: str | Path) -> list[dict[str, Any]]:
    models = Path(root) / MODELS_DIR
    if not models.is_dir():
        return []
    out = []
    for p in sorted(models.iterdir()):
        f = p / "run.json"
        if f.is_file():
            out.append(json.loads(f.read_text()))
    return out


def build_index(root: str | Path) -> pd.DataFrame:
    rows = [r for info in finished_runs(root) for r in rows_for_run(info)]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=[*ID_COLUMNS, *METRICS])
    front = [c for c in (*ID_COLUMNS, *METRICS) if c in df.columns]
    df = df[front + [c for c in df.columns if c not in front]]
    return df.sort_values(["stage", "model_id", "epoch"], kind="stable").reset_index(drop=True)


def write_index(root: str | Path) -> pd.DataFrame:
    """Rebuild ``index.parquet`` atomically from the finished runs; returns it."""
    df = build_index(root)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write(Path(root) / INDEX_FILE, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    return df
