"""Small spec-conformant zoo folders for tests, written with vitzoo's own writer.

``RunWriter`` + ``write_index`` produce the folders, so what the Hub tests push is exactly what
``vitzoo generate`` produces, only with tiny tensors. Plain helpers (no fixtures): the fixtures
that use them are in ``conftest_hub.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKEN = "hf_TestTokenDoNotLeak0123456789abcdef"


def _tiny_state(seed: int, epoch: int, big: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    state = {"fc1.weight": torch.randn(8, 4, generator=g), "fc1.bias": torch.randn(8, generator=g),
             "head.weight": torch.randn(3, 8, generator=g), "head.bias": torch.randn(3, generator=g)}
    if big:
        state["big.weight"] = torch.randn(big, generator=g)
    return state


def write_test_zoo(root: str | Path, n_models: int = 3, n_unfinished: int = 0, epochs: int = 2,
                   stage: str = "pretrain", big: int = 0, seed0: int = 0, parent_id: str | None = None,
                   zoo_info: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Path:
    """A zoo folder with ``n_models`` finished models (``epochs+1`` states each) and unfinished ones.

    ``config``: more fields of every run's resolved config (e.g. list-valued ones, which become list
    columns of the index).

    Finished models go through :class:`vitzoo.zoo.writer.RunWriter` (model.safetensors,
    checkpoints.safetensors, config.json, run.json); unfinished ones only have ``.partial/``.
    ``index.parquet``, ``zoo.json``, ``recipe.yaml`` and ``README.md`` are written like process 0 does.
    """
    from vitzoo.zoo.index import write_index
    from vitzoo.zoo.io import write_json, write_text
    from vitzoo.zoo.writer import RunWriter

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(seed0, seed0 + n_models + n_unfinished):
        run_id = f"{stage}-{i:010x}"
        w = RunWriter(root, run_id)
        if w.is_finished():
            continue
        history = []
        for e in range(epochs + 1):
            w.save_epoch(e, _tiny_state(i, e, big))
            history.append({"epoch": e, "train_loss": 1.0 / (e + 1), "train_acc": 0.1 * e + 0.01 * i,
                            "val_loss": 1.1 / (e + 1), "val_acc": 0.09 * e + 0.01 * i,
                            "test_loss": 1.2 / (e + 1), "test_acc": 0.08 * e + 0.01 * i})
        w.save_history(history)
        if i >= seed0 + n_models:
            continue  # unfinished: stays in .partial/
        lr = [1e-3, 1e-4][i % 2]
        cfg = {"model": {"variant": "tiny"}, "optimizer": {"name": "adamw", "lr": lr}, "epochs": epochs}
        cfg.update(config or {})
        w.finalize(config_json={"architecture": "vitzoo/test-mlp", "num_classes": 3,
                                "vitzoo": {"run_id": run_id, "stage": stage}},
                   run_info={"stage": stage, "config": cfg, "factors": {"optimizer.lr": lr}, "init_seed": i,
                             "data_seed": 0, "parent_id": parent_id, "parent_epoch": "last" if parent_id else None,
                             "repeat": 0},
                   final_epoch=epochs, status="done")
    index = write_index(root)
    counts = index[index["final"]].groupby("stage").size().to_dict() if len(index) else {}
    write_json(root / "zoo.json", {"format_version": 1, "name": root.name, "counts": counts, **(zoo_info or {})})
    write_text(root / "recipe.yaml", f"name: {root.name}\nstages:\n  {stage}:\n    epochs: {epochs}\n")
    write_text(root / "README.md", f"---\nlicense: mit\nlibrary_name: vitzoo\ntags:\n- model-zoo\n---\n# {root.name}\n")
    return root


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every pushable file of a zoo folder (what must arrive byte-identical)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and "/.partial/" not in f"/{rel}" and not p.name.startswith(".vitzoo-"):
            out[rel] = p.read_bytes()
    return out


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
