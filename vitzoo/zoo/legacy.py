"""Convert a zoo in the original Ray Tune layout (Model Zoos, NeurIPS 2022) into the vitzoo format.

Legacy layout (``docs/reference-zoos.md#published-layout``)::

    <zoo>/NN_tune_trainable_<hash>_<i>_<factors>_<date>/
        params.json                 flat keys: "model::nlin", "optim::lr", "seed", ...
        result.json                 JSON lines, one per reported epoch (train_loss, train_acc, test_loss, ...)
        checkpoint_000050/checkpoints   torch.save'd state_dict, keys module_list.{i}.weight|bias
        checkpoint_50/optimizer          (both folder spellings exist; optimizer state is not converted)

Why convert rather than read in place: the published CNN/ResNet zoos then get the same index,
cards, push and ``vitzoo.load`` as generated zoos, and their weights leave pickle behind.

Safety: checkpoints are pickles. They are read with ``torch.load(weights_only=True)`` only, which
refuses any object other than tensors and plain containers; anything that fails that, or is not a
mapping of tensors, is refused with :class:`LegacyZooError` (never retried unsafely).

The CNN key names (``module_list.{i}.*``) are kept: :mod:`vitzoo.models.cnn` rebuilds the same
layer stacks, so converted states load with ``load_state_dict``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from vitzoo.models.names import TIMM_NAMES
from vitzoo.zoo.io import FORMAT_VERSION, write_json, write_text

_CKPT_DIR = re.compile(r"^checkpoint_(\d+)$")
_METRIC_ALIASES = {
    "train_loss": ("train_loss", "loss_train"), "train_acc": ("train_acc", "acc_train"),
    "val_loss": ("val_loss", "loss_val"), "val_acc": ("val_acc", "acc_val"),
    "test_loss": ("test_loss", "loss_test"), "test_acc": ("test_acc", "acc_test"),
}


class LegacyZooError(ValueError):
    """The folder is not a legacy zoo, or a checkpoint cannot be read safely."""


@dataclasses.dataclass
class ConversionResult:
    zoo: Path
    converted: list[str]
    skipped: list[str]
    """Run ids already converted by an earlier (interrupted) call."""
    refused: dict[str, str]
    """Trial folder → reason, for trials that could not be converted (no checkpoints, unsafe pickle...)."""

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} models into {self.zoo}"
                 + (f" ({len(self.skipped)} already there)" if self.skipped else "")]
        for trial, why in sorted(self.refused.items()):
            lines.append(f"refused {trial}: {why}")
        return "\n".join(lines)


@dataclasses.dataclass
class LegacyTrial:
    folder: Path
    params: dict[str, Any]
    results: list[dict[str, Any]]
    checkpoints: dict[int, Path]
    """epoch → path of the ``checkpoints`` file."""


def find_trials(legacy_dir: str | Path) -> list[LegacyTrial]:
    """Every trial folder (has ``params.json``) under ``legacy_dir``, sorted by folder name."""
    root = Path(legacy_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"legacy zoo folder {root} does not exist")
    trials = []
    for params_file in sorted(root.glob("*/params.json")):
        folder = params_file.parent
        params = json.loads(params_file.read_text())
        results = []
        if (folder / "result.json").is_file():
            for line in (folder / "result.json").read_text().splitlines():
                if line.strip():
                    results.append(json.loads(line))
        ckpts: dict[int, Path] = {}
        for d in folder.iterdir():
            m = _CKPT_DIR.match(d.name)
            if m and d.is_dir() and (d / "checkpoints").is_file():
                ckpts[int(m.group(1))] = d / "checkpoints"
        trials.append(LegacyTrial(folder, params, results, dict(sorted(ckpts.items()))))
    if not trials:
        raise LegacyZooError(f"{root}: no trial folders with params.json: not a legacy (Ray Tune) zoo")
    return trials


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A legacy state_dict, read with ``weights_only=True`` only; anything else is refused."""
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, EOFError) as err:
        raise LegacyZooError(f"{path}: refused: not loadable with torch.load(weights_only=True) "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if isinstance(obj, dict) and "model_state_dict" in obj and isinstance(obj["model_state_dict"], dict):
        obj = obj["model_state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LegacyZooError(f"{path}: refused: expected a state_dict (mapping of names to tensors)")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def infer_architecture(state: dict[str, Any], params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``vitzoo_cnn_s`` / ``vitzoo_cnn_m`` / ``vitzoo_resnet18`` (timm names) and its model_args, from the weights."""
    first = state.get("module_list.0.weight")
    activation = params.get("model::nlin") or params.get("model::activation")
    dropout = float(params.get("model::dropout", 0.0) or 0.0)
    if first is not None and first.dim() == 4:
        out_ch, in_chans, kh, _ = first.shape
        variant = {(8, 5): "cnn-s", (16, 3): "cnn-m"}.get((int(out_ch), int(kh)))
        if variant is None:
            raise LegacyZooError(f"unknown CNN layout: first conv {tuple(first.shape)}")
    elif any(k.startswith("layer4.") for k in state):
        variant = "resnet18"
        conv = state.get("conv1.weight")
        in_chans = int(conv.shape[1]) if conv is not None else int(params.get("model::channels_in", 3))
    else:
        raise LegacyZooError("cannot tell the architecture from the checkpoint keys "
                             f"({', '.join(list(state)[:4])}, ...); pass architecture=")
    args = {"variant": variant, "in_chans": int(in_chans), "activation": activation, "dropout": dropout}
    return TIMM_NAMES[variant], args


def _num_classes(state: dict[str, Any]) -> int:
    linears = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    return int(linears[-1].shape[0]) if linears else 10


def _nest(params: dict[str, Any]) -> dict[str, Any]:
    """``{"optim::lr": 1e-3}`` → ``{"optim": {"lr": 1e-3}}`` (so the index columns read ``optim.lr``)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        parts = [p for p in re.split(r"::|/", str(key)) if p]
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                nxt = node[p] = {"value": nxt}
            node = nxt
        node[parts[-1] if parts else str(key)] = value
    return out


def _history(trial: LegacyTrial) -> list[dict[str, Any]]:
    """Per-epoch metrics. Epoch: the line's ``epoch`` if any; else ``training_iteration``, shifted to
    start at 0 when there is one line per checkpoint including the untrained epoch-0 state."""
    lines = trial.results
    if not lines:
        return []
    if all("epoch" in r for r in lines):
        epochs = [int(r["epoch"]) for r in lines]
    else:
        its = [int(r.get("training_iteration", i + 1)) for i, r in enumerate(lines)]
        shift = 1 if min(its) == 1 and 0 in trial.checkpoints and len(lines) == len(trial.checkpoints) else 0
        epochs = [i - shift for i in its]
    out = []
    for epoch, r in zip(epochs, lines, strict=True):
        row: dict[str, Any] = {"epoch": epoch}
        for name, aliases in _METRIC_ALIASES.items():
            for a in aliases:
                if a in r and isinstance(r[a], (int, float)):
                    row[name] = float(r[a])
                    break
        out.append(row)
    return out


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def convert(legacy_dir: str | Path, zoo_dir: str | Path, *, name: str | None = None, architecture: str | None = None,
            stage: str = "train", license: str | None = None) -> ConversionResult:
    """Convert every trial of ``legacy_dir`` into model folders of ``zoo_dir``, then write the index.

    Resumable: trials whose model folder already has ``run.json`` are skipped. Trials that cannot be
    converted safely are listed in the result, not half-written.
    """
    from vitzoo.plan import canonical_json
    from vitzoo.zoo.index import write_index
    from vitzoo.zoo.writer import RunWriter

    legacy, out = Path(legacy_dir), Path(zoo_dir)
    trials = find_trials(legacy)
    keys = sorted({k for t in trials for k in t.params})
    varying = [k for k in keys if len({canonical_json(t.params.get(k)) for t in trials}) > 1]
    seed_keys = {"seed", "model::init_seed", "training::seed"}
    grid = [k for k in varying if k not in seed_keys]
    out.mkdir(parents=True, exist_ok=True)
    result = ConversionResult(out, [], [], {})
    for trial in trials:
        digest = hashlib.sha256(canonical_json({"params": trial.params, "trial": trial.folder.name}).encode())
        run_id = f"{stage}-{digest.hexdigest()[:10]}"
        writer = RunWriter(out, run_id)
        if writer.is_finished():
            result.skipped.append(run_id)
            continue
        if not trial.checkpoints:
            result.refused[trial.folder.name] = "no checkpoint_*/checkpoints files"
            continue
        try:
            states = {e: load_checkpoint(p) for e, p in trial.checkpoints.items()}
            arch, model_args = (architecture, {}) if architecture else infer_architecture(
                states[max(states)], trial.params)
        except LegacyZooError as err:
            result.refused[trial.folder.name] = str(err)
            continue
        history = _history(trial)
        by_epoch = {h["epoch"]: h for h in history}
        good = [e for e in states if all(_finite(v) for k, v in by_epoch.get(e, {}).items() if k.endswith("loss"))]
        final_epoch = max(good) if good else max(states)
        status = "done" if final_epoch == max(states) else "diverged"
        for e, state in states.items():
            writer.save_epoch(e, state)
        writer.save_history(history)
        num_classes = _num_classes(states[final_epoch])
        img = {"cnn-s": 28, "cnn-m": 32, "resnet18": 32}.get(str(model_args.get("variant")), 32)
        in_chans = int(model_args.get("in_chans", 3))
        config_json = {
            "architecture": arch, "num_classes": num_classes, "model_args": model_args,
            "pretrained_cfg": {"input_size": [in_chans, img, img], "num_classes": num_classes},
            "vitzoo": {"run_id": run_id, "stage": stage, "legacy_trial": trial.folder.name},
        }
        config = _nest(trial.params)
        config["name"] = stage
        seed = trial.params.get("seed", trial.params.get("model::init_seed", 0))
        run_info = {
            "stage": stage, "config": config, "factors": {k.replace("::", "."): trial.params.get(k) for k in grid},
            "init_seed": int(seed) if isinstance(seed, (int, float)) else 0, "data_seed": 42,
            "parent_id": None, "parent_epoch": None, "repeat": 0,
            "legacy": {"trial": trial.folder.name, "params": trial.params},
        }
        writer.finalize(config_json=config_json, run_info=run_info, final_epoch=final_epoch, status=status)
        result.converted.append(run_id)
    index = write_index(out)
    zoo_name = name or out.name
    counts = index[index["final"]].groupby("stage").size().to_dict() if len(index) else {}
    from vitzoo import __version__

    write_json(out / "zoo.json", {
        "format_version": FORMAT_VERSION, "name": zoo_name,
        "description": f"Converted from the legacy (Ray Tune layout) model zoo `{legacy.name}`.",
        "license": license, "status": "complete", "counts": counts,
        "provenance": {"converted_from": legacy.name, "converted_by": f"vitzoo {__version__}",
                       "trials": len(trials), "refused": len(result.refused)},
    })
    grid_values = {k.replace("::", "."): sorted({canonical_json(t.params.get(k)) for t in trials}) for k in grid}
    write_text(out / "recipe.yaml", "# Converted zoo: a record of the legacy grid, not a runnable recipe.\n"
               + json.dumps({"name": zoo_name, "source": "legacy-ray-tune", "stages": {stage: {
                   "grid": {k: [json.loads(v) for v in vs] for k, vs in grid_values.items()}}}}, indent=2) + "\n")
    return result
