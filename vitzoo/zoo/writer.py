"""Writing one model's folder: checkpoints while it trains, consolidation when it ends.

While a run trains, its states live in ``models/<id>/.partial/`` (one safetensors file per saved
epoch, plus the optimizer state to resume from). When the run ends, :meth:`RunWriter.finalize`
writes ``model.safetensors`` (final state), ``checkpoints.safetensors`` (all other saved states,
keys prefixed ``epoch_0003/``), ``config.json`` and, last, ``run.json``. A model is finished iff
its ``run.json`` exists, so a run killed at any moment is either finished or resumable, never
half-indexed. Finalizing is idempotent: a kill during it is repaired by the next resume.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from vitzoo.zoo.io import FORMAT_VERSION, atomic_write, discard_temp_files, save_safetensors, sha256_file, write_json

MODELS_DIR = "models"
PARTIAL = ".partial"
_EPOCH_FILE = re.compile(r"^epoch_(\d{4,})\.safetensors$")


def epoch_prefix(epoch: int) -> str:
    return f"epoch_{epoch:04d}/"


class RunWriter:
    """Owns ``<zoo>/models/<run_id>/``; used only by the process that trains that run."""

    def __init__(self, zoo_root: str | Path, run_id: str):
        self.root = Path(zoo_root)
        self.run_id = run_id
        self.folder = self.root / MODELS_DIR / run_id
        self.partial = self.folder / PARTIAL

    # ---------------------------------------------------------------- state queries
    def is_finished(self) -> bool:
        return (self.folder / "run.json").is_file()

    def saved_epochs(self) -> list[int]:
        if not self.partial.is_dir():
            return []
        return sorted(int(m[1]) for p in self.partial.iterdir() if (m := _EPOCH_FILE.match(p.name)))

    def history(self) -> list[dict[str, Any]]:
        p = self.partial / "history.json"
        return json.loads(p.read_text()) if p.is_file() else []

    def discard_temp_files(self) -> None:
        """Sweep what a killed attempt left of unfinished atomic writes (called before training)."""
        discard_temp_files(self.folder)
        discard_temp_files(self.partial)

    # ---------------------------------------------------------------- while training
    def save_epoch(self, epoch: int, state: dict[str, torch.Tensor]) -> None:
        """Save the (exported, timm-named) model state of a checkpoint epoch."""
        save_safetensors(self.partial / f"epoch_{epoch:04d}.safetensors", state, durable=False)

    def save_history(self, history: list[dict[str, Any]]) -> None:
        write_json(self.partial / "history.json", history, durable=False)

    def save_resume(self, epoch: int, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    extra: dict[str, Any]) -> None:
        """Everything needed to continue after ``epoch``: weights, optimizer state, counters."""
        tensors = {f"model/{k}": v for k, v in model_state.items()}
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
        meta = {"epoch": str(epoch), "optimizer": json.dumps(opt_meta), "extra": json.dumps(extra)}
        save_safetensors(self.partial / "resume.safetensors", tensors, metadata=meta, durable=False)

    def reset(self) -> None:
        """Drop the scratch state of an unfinished run (it restarts from epoch 0)."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def load_resume(self) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]] | None:
        """The state to continue from, or None. Raises if the scratch files are unreadable (the caller
        then resets): they are written without fsync, so an OS crash can truncate them."""
        p = self.partial / "resume.safetensors"
        if not p.is_file():
            return None
        self.check_partial()
        with safetensors.safe_open(str(p), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        opt = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith(("opt/", "optgroup/"))},
                                   json.loads(meta["optimizer"]))
        return int(meta["epoch"]), model, opt, json.loads(meta["extra"])

    def check_partial(self) -> None:
        """Raise if a saved epoch or the history cannot be read (finalize needs them all)."""
        for e in self.saved_epochs():
            with safetensors.safe_open(str(self.partial / f"epoch_{e:04d}.safetensors"), "pt"):
                pass
        json.loads((self.partial / "history.json").read_text())

    # ---------------------------------------------------------------- the end
    def finalize(self, *, config_json: dict[str, Any], run_info: dict[str, Any], final_epoch: int,
                 status: str, extra_files: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Consolidate the saved states and write config.json, then run.json (the commit point).

        ``final_epoch`` is the state that becomes ``model.safetensors``: the last epoch, or the
        last good one of a diverged run. States saved after it are dropped. ``extra_files`` (name → bytes) are
        more files of the model folder (a GPT-2's tokenizer), written atomically before run.json; run.json
        lists them with their sha256 under ``files``.
        """
        epochs = [e for e in self.saved_epochs() if e <= final_epoch]
        if final_epoch not in epochs:
            raise RuntimeError(f"{self.run_id}: final epoch {final_epoch} was not saved")
        states: dict[int, dict[str, torch.Tensor]] = {}
        for e in epochs:
            states[e] = safetensors.torch.load_file(str(self.partial / f"epoch_{e:04d}.safetensors"))
        meta = {"format": "pt", "vitzoo_run_id": self.run_id, "epoch": str(final_epoch)}
        model_file = save_safetensors(self.folder / "model.safetensors", states[final_epoch], metadata=meta)
        files = {final_epoch: ("model.safetensors", "")}
        others = [e for e in epochs if e != final_epoch]
        if others:
            merged = {epoch_prefix(e) + k: v for e in others for k, v in states[e].items()}
            save_safetensors(self.folder / "checkpoints.safetensors", merged,
                             metadata={"format": "pt", "vitzoo_run_id": self.run_id,
                                       "epochs": ",".join(map(str, others))})
            for e in others:
                files[e] = ("checkpoints.safetensors", epoch_prefix(e))
        elif (self.folder / "checkpoints.safetensors").exists():
            (self.folder / "checkpoints.safetensors").unlink()
        digests = {name: (sha256_file(self.folder / name), (self.folder / name).stat().st_size)
                   for name in {f for f, _ in files.values()}}
        del model_file
        history = {h["epoch"]: h for h in self.history()}
        states_rows = []
        for e in epochs:
            name, prefix = files[e]
            row = {"epoch": e, "final": e == final_epoch, "file": f"{MODELS_DIR}/{self.run_id}/{name}",
                   "tensor_prefix": prefix, "sha256": digests[name][0], "size": digests[name][1]}
            row.update({k: v for k, v in history.get(e, {}).items() if k != "epoch"})
            states_rows.append(row)
        config_json = {**config_json, "vitzoo": {**config_json.get("vitzoo", {}), "format_version": FORMAT_VERSION}}
        write_json(self.folder / "config.json", config_json)
        extra = {}
        for name, data in sorted((extra_files or {}).items()):
            if "/" in name or name in ("config.json", "run.json") or name.endswith(".safetensors"):
                raise ValueError(f"{self.run_id}: extra file name {name!r} is reserved or not a plain name")
            atomic_write(self.folder / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
            extra[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        info = {**run_info, "run_id": self.run_id, "status": status, "final_epoch": final_epoch,
                "states": states_rows, "history": list(history.values())}
        if extra:
            info["files"] = extra
        write_json(self.folder / "run.json", info)  # the commit point
        shutil.rmtree(self.partial, ignore_errors=True)
        return info


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors (safetensors) and JSON (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state.get("state", {}).items():
        for k, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt/{idx}/{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    groups = []
    for g, group in enumerate(state.get("param_groups", [])):  # some optimizers (timm's Lamb) keep tensors here
        groups.append({k: v for k, v in group.items() if not isinstance(v, torch.Tensor)})
        tensors.update({f"optgroup/{g}/{k}": v for k, v in group.items() if isinstance(v, torch.Tensor)})
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    groups = [dict(g) for g in meta["param_groups"]]
    for key, v in tensors.items():
        kind, idx, name = key.split("/", 2)
        if kind == "optgroup":
            groups[int(idx)][name] = v
        else:
            state.setdefault(int(idx), {})[name] = v
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    return {"state": state, "param_groups": groups}
