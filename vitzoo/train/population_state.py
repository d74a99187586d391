"""Resume points of population training: one safetensors snapshot per trained group of models.

Why: a classic zoo stage trains hundreds of models in one vectorised group for up to 60 epochs (and
ResNet-18s one after another for days). Restarting such a group from epoch 0 after an interruption
throws that away, and a zoo is meant to be "interrupted and resumed" like any run. After every epoch
the engine writes the complete training state of the group it is training (the models' parameters,
the optimizer buffers, the divergence mask and the RNG state) to one file; on the next ``generate``
each unfinished model continues from the latest snapshot that holds it.

Layout of a snapshot (``<dir>/<sha256 of the member names>.safetensors``; rows = members, in order):

- ``flat`` (P, n_params): every parameter of a model in one row, in ``named_parameters()`` order;
- ``opt/<name>`` (P, n_params): optimizer buffers in the same layout (``exp_avg``, ``exp_avg_sq`` for
  Adam, ``momentum_buffer`` for SGD);
- ``buffers/<name>`` (P, ...): module buffers (batchnorm running statistics), stacked;
- ``alive`` (P,) bool and ``diverged_step`` (P,) int64 (-1 while alive);
- ``rng/cpu`` (and ``rng/cuda``): the global RNG state (dropout draws) after the epoch;
- metadata ``names`` (JSON list), ``epoch`` and ``step`` (optimizer steps taken), ``params`` (JSON
  list of ``[name, shape]``, to rebuild a state dict from a row).

One format for the vectorised engine and the one-by-one loop (P = 1), so a model can resume on
either path. The RNG state belongs to the group: it is restored only when the same members resume
together (the normal case); otherwise (a re-chunked resume) the dropout stream is re-seeded — the
models continue correctly but their dropout masks differ from an uninterrupted run's.

Snapshots are scratch, written atomically without fsync (like the per-run ``.partial`` files); an
unreadable one is ignored, and its models start again from epoch 0.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from torch import Tensor

from vitzoo.zoo.io import save_safetensors


@dataclass
class Snapshot:
    """The training state of some members after ``epoch`` (rows in ``names`` order)."""

    epoch: int
    step: int
    names: list[str]
    tensors: dict[str, Tensor]
    params: list[tuple[str, list[int]]]
    rng: dict[str, Tensor] = field(default_factory=dict)
    """Empty when the rows come from a snapshot of another group (the caller re-seeds)."""

    def row_state(self, i: int) -> dict[str, Tensor]:
        """Row ``i`` as a model state dict (parameters and buffers, ``named_parameters`` names)."""
        out: dict[str, Tensor] = {}
        flat, off = self.tensors["flat"][i], 0
        for name, shape in self.params:
            k = math.prod(shape)
            out[name] = flat[off:off + k].view(shape)
            off += k
        out.update({k[len("buffers/"):]: v[i] for k, v in self.tensors.items() if k.startswith("buffers/")})
        return out


@dataclass(frozen=True)
class _Entry:
    path: Path
    row: int
    epoch: int


class SnapshotStore:
    """The snapshots in one folder, indexed by member name (each name's newest snapshot wins)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._index: dict[str, _Entry] = {}
        self._files: dict[Path, list[str]] = {}
        # Temp files of killed writes are swept by `generate` (process 0, before training): here they may
        # be another process's write in flight.
        if not self.folder.is_dir():
            return
        for p in sorted(self.folder.glob("*.safetensors")):
            try:
                with safetensors.safe_open(str(p), "pt") as f:
                    meta = f.metadata()
                names, epoch = json.loads(meta["names"]), int(meta["epoch"])
            except Exception:  # noqa: BLE001 - truncated scratch (not fsync'd): its models restart
                p.unlink(missing_ok=True)
                continue
            self._files[p] = names
            for row, n in enumerate(names):
                old = self._index.get(n)
                if old is None or epoch > old.epoch:
                    self._index[n] = _Entry(p, row, epoch)

    def epoch_of(self, name: str) -> int | None:
        """The epoch ``name`` can resume after, or None (start from epoch 0)."""
        e = self._index.get(name)
        return e.epoch if e else None

    def cohorts(self, names: list[str]) -> list[list[int]]:
        """Positions in ``names`` of the members that have snapshots, grouped as they were saved
        (same file and epoch), so that a resumed group trains with the same companions."""
        groups: dict[tuple[Path, int], list[int]] = {}
        for i, n in enumerate(names):
            e = self._index.get(n)
            if e is not None:
                groups.setdefault((e.path, e.epoch), []).append(i)
        return list(groups.values())

    def forget(self, name: str) -> None:
        """Let ``name`` start again from epoch 0 (its own files turned out unreadable)."""
        self._index.pop(name, None)

    def load(self, names: list[str]) -> Snapshot:
        """The snapshot rows of ``names`` (all at one epoch). The RNG state comes along only if
        ``names`` are exactly the members of the snapshot they were saved in, in order."""
        entries = [self._index[n] for n in names]
        epochs = {e.epoch for e in entries}
        if len(epochs) != 1:
            raise ValueError(f"members resume from different epochs {sorted(epochs)}; load them separately")
        files: dict[Path, dict[str, Tensor]] = {}
        meta: dict[str, str] = {}
        for path in dict.fromkeys(e.path for e in entries):
            with safetensors.safe_open(str(path), "pt") as f:
                meta = f.metadata()
                files[path] = {k: f.get_tensor(k) for k in f.keys()}
        keys = [k for k in files[entries[0].path] if not k.startswith("rng/")]
        tensors = {k: torch.stack([files[e.path][k][e.row] for e in entries]) for k in keys}
        rng: dict[str, Tensor] = {}
        if len(files) == 1 and self._files[entries[0].path] == list(names):
            rng = {k[4:]: v for k, v in files[entries[0].path].items() if k.startswith("rng/")}
        return Snapshot(epoch=epochs.pop(), step=int(meta["step"]), names=list(names), tensors=tensors,
                        params=[(n, list(s)) for n, s in json.loads(meta["params"])], rng=rng)

    def save(self, snap: Snapshot) -> Path:
        """Write ``snap`` (atomically; the file name is a function of its members)."""
        key = hashlib.sha256("\n".join(snap.names).encode()).hexdigest()[:20]
        path = self.folder / f"{key}.safetensors"
        tensors = dict(snap.tensors)
        tensors.update({f"rng/{k}": v for k, v in snap.rng.items()})
        meta = {"names": json.dumps(snap.names), "epoch": str(snap.epoch), "step": str(snap.step),
                "params": json.dumps(snap.params)}
        save_safetensors(path, tensors, metadata=meta, durable=False)
        self._files[path] = list(snap.names)
        for row, n in enumerate(snap.names):
            self._index[n] = _Entry(path, row, snap.epoch)
        return path

    def discard(self, names: list[str]) -> None:
        """Delete the snapshots all of whose members are in ``names`` (they finished)."""
        done = set(names)
        for path, members in list(self._files.items()):
            if done.issuperset(members):
                path.unlink(missing_ok=True)
                del self._files[path]
        for n in done:
            e = self._index.get(n)
            if e is not None and e.path not in self._files:
                del self._index[n]


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The global RNG state(s) that dropout draws from on ``device``."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
