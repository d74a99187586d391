"""Benchmark: population training vs a plain one-model-at-a-time loop (issue 4).

Protocol: the CNN-s MNIST seed zoo (tanh, U init, Adam lr 3e-4, wd 0, batch 10; evaluation of
train/val/test after every epoch; a checkpoint of every model at every epoch including epoch 0).
Data: MNIST-shaped synthetic tensors (1x28x28, 10 classes) unless ``--data`` names an ``.npz``
with ``x_train, y_train, x_test, y_test`` (keras' mnist.npz layout); ``--train-size`` and
``--eval-size`` shrink the sets so the benchmark fits a CPU. ``--train-metrics running`` drops the
per-epoch evaluation pass over the train set (the engine's running averages replace it).

Checkpoints are written the way ``vitzoo generate`` does it while training (docs/zoo-format.md):
one safetensors file and one history.json per model per epoch under ``models/<id>/.partial/``
(atomic temp + rename, scratch not fsync'd, via ``vitzoo.zoo.io``), one resume snapshot per
sub-population per epoch (``vitzoo.train.population_state``), then, when a model finishes, its
states consolidated into ``checkpoints.safetensors`` (keys ``epoch_0003/<param>``) +
``model.safetensors`` (fsync'd). All of it is timed as checkpoint time.

Reported per population size P: wall seconds, models x epochs per hour, the fraction of the wall
time spent writing checkpoints, and the speed-up over the one-by-one loop (measured on
``--baseline-models`` models, per model, same device and settings). The ratio is also given in
process CPU time, which is robust to other jobs sharing the machine (with ``--threads 1``).

    .venv/bin/python benchmarks/population.py --train-size 500 --eval-size 100 --epochs 2 \\
        --sizes 1,16,256,1000 --threads 1
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
import safetensors.torch
import torch

from vitzoo.train.population import AUTO_VECTORISED_ARCHS, MIN_POPULATION, CropFlip, PopulationMember, train_population
from vitzoo.train.population_state import Snapshot, SnapshotStore
from vitzoo.zoo.io import save_safetensors, write_json


def load_data(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val / test tensors (float 0..1, N x 1 x 28 x 28; long labels)."""
    g = torch.Generator().manual_seed(0)
    if args.data:
        d = np.load(args.data)
        x = torch.tensor(d["x_train"], dtype=torch.float32)[:, None] / 255.0
        y = torch.tensor(d["y_train"], dtype=torch.long)
        xt = torch.tensor(d["x_test"], dtype=torch.float32)[:, None] / 255.0
        yt = torch.tensor(d["y_test"], dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(42))
        x, y = x[perm], y[perm]
        n_val = 10_000
        sets = {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val]), "test": (xt, yt)}
    else:
        shape = (1, 28, 28) if args.arch != "resnet18" else (3, 32, 32)  # MNIST / CIFAR

        def synth(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.rand(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)

        sets = {"train": synth(args.train_size), "val": synth(args.eval_size), "test": synth(args.eval_size)}
    out = {}
    for k, (x, y) in sets.items():
        n = args.train_size if k == "train" else args.eval_size
        out[k] = (x[:n].contiguous(), y[:n].contiguous())
    return out


class CheckpointWriter:
    """Per-model, per-epoch safetensors writes as the zoo writer does them; timed."""

    def __init__(self, root: Path, epochs: int) -> None:
        self.root, self.epochs, self.seconds, self.files = root, epochs, 0.0, 0
        self.history: dict[int, list[dict[str, Any]]] = {}

    def __call__(self, epoch: int, states: list[dict[str, torch.Tensor]], metrics: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        for st, met in zip(states, metrics, strict=True):
            run = self.root / "models" / f"train-{met['index']:06d}"
            save_safetensors(run / ".partial" / f"epoch_{epoch:04d}.safetensors", st, durable=False)
            hist = self.history.setdefault(met["index"], [])
            hist.append(met)
            write_json(run / ".partial" / "history.json", hist, durable=False)
            self.files += 2
            if epoch == self.epochs:
                self._consolidate(run)
        self.seconds += time.perf_counter() - t0

    def _consolidate(self, run: Path) -> None:
        part = run / ".partial"
        allstates: dict[str, torch.Tensor] = {}
        final = None
        for e in range(self.epochs + 1):
            st = safetensors.torch.load_file(part / f"epoch_{e:04d}.safetensors")
            if e == self.epochs:
                final = st
            else:
                allstates.update({f"epoch_{e:04d}/{k}": v for k, v in st.items()})
        save_safetensors(run / "checkpoints.safetensors", allstates)
        assert final is not None
        save_safetensors(run / "model.safetensors", final)
        shutil.rmtree(part)
        self.files += 2


class TimedSnapshots(SnapshotStore):
    """The engine's resume snapshots (one per sub-population per epoch), timed into the writer's total."""

    def __init__(self, folder: Path, writer: CheckpointWriter) -> None:
        super().__init__(folder)
        self.writer = writer

    def save(self, snap: Snapshot) -> Path:
        t0 = time.perf_counter()
        path = super().save(snap)
        self.writer.seconds += time.perf_counter() - t0
        self.writer.files += 1
        return path


def run(args: argparse.Namespace, data: dict[str, tuple[torch.Tensor, torch.Tensor]], n_models: int, mode: str,
        device: str) -> dict[str, Any]:
    resnet = args.arch == "resnet18"
    if resnet:  # the CIFAR ResNet-18 seed zoo: SGD .05 momentum .9 wd 5e-4, OneCycle, crop + flip, batch 256
        members = [PopulationMember(init_seed=s, data_seed=s, optimizer="sgd", lr=0.05, weight_decay=5e-4,
                                    momentum=0.9, init="default", name=f"m{s}") for s in range(1, n_models + 1)]
    else:  # the MNIST CNN-s seed zoo
        members = [PopulationMember(init_seed=s, data_seed=s, optimizer="adam", lr=3e-4, weight_decay=0.0,
                                    activation="tanh", init="U", name=f"m{s}") for s in range(1, n_models + 1)]
    tmp = Path(tempfile.mkdtemp(prefix="vitzoo-bench-", dir=args.tmp))
    writer = CheckpointWriter(tmp, args.epochs)
    snapshots = TimedSnapshots(tmp / ".partial" / "populations", writer)
    tx, ty = data["train"]
    evals = data if args.train_metrics == "eval" else {k: v for k, v in data.items() if k != "train"}
    t0, c0 = time.perf_counter(), time.process_time()
    hist = train_population(args.arch, tx.shape[1], 10, members, tx, ty, evals, args.epochs,
                            256 if resnet else 10, device, writer, mode=mode, checkpoints=snapshots,
                            min_population=1 if mode == "population" else None,
                            schedule="onecycle" if resnet else "constant",
                            augment=CropFlip(pad=4, flip=True, fill=(0.0,)) if resnet else None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    shutil.rmtree(tmp)
    return {
        "models": n_models, "mode": mode, "wall_s": wall, "ckpt_s": writer.seconds, "ckpt_files": writer.files,
        "ckpt_fraction": writer.seconds / wall, "model_epochs_per_hour": n_models * args.epochs / wall * 3600,
        "cpu_s": cpu, "model_epochs_per_cpu_hour": n_models * args.epochs / cpu * 3600,
        "final_test_acc_mean": float(np.mean([h[-1]["test_acc"] for h in hist])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["cnn-s", "resnet18"], default="cnn-s",
                    help="cnn-s: the MNIST seed-zoo protocol (batch 10); resnet18: the CIFAR-10 one (batch 256, "
                         "SGD + OneCycle, crop + flip), vectorised only when forced (auto trains it one by one)")
    ap.add_argument("--sizes", default="1,16,256,1000", help="population sizes, comma-separated")
    ap.add_argument("--baseline-models", type=int, default=16, help="models trained one by one for the baseline")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=50_000)
    ap.add_argument("--eval-size", type=int, default=10_000, help="size of val and of test")
    ap.add_argument("--data", default=None, help="mnist.npz (x_train, y_train, x_test, y_test); default synthetic")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--tmp", default=None, help="folder for the checkpoint files (default: system temp)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--train-metrics", choices=["eval", "running"], default="eval",
                    help="eval: a separate pass over the train set every epoch (default); running: the averages "
                         "over the training batches (legacy zoos' train metrics), no train eval pass")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args)
    env = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
        "train_size": args.train_size, "eval_size": args.eval_size, "epochs": args.epochs,
        "train_metrics": args.train_metrics, "arch": args.arch,
    }
    print(json.dumps(env))
    # Warm-up: first vmap call imports torch._dynamo (seconds); not part of any measurement.
    warm = argparse.Namespace(**{**vars(args), "epochs": 1})
    small = {k: (x[:20], y[:20]) for k, (x, y) in data.items()}
    run(warm, small, 2, "population", args.device)

    rows = []
    for p in (int(s) for s in args.sizes.split(",")):
        # A fresh one-by-one baseline right before each size: other jobs on a shared machine drift
        # the speed over minutes, and a ratio is only meaningful between neighbouring runs.
        base = run(args, data, args.baseline_models, "sequential", args.device)
        rows.append(base)
        print(f"one-by-one ({base['models']} models): {base['model_epochs_per_hour']:9.0f} model-epochs/h "
              f"({base['model_epochs_per_cpu_hour']:.0f} per CPU-hour)  ckpt {100 * base['ckpt_fraction']:4.1f}% "
              f"of wall  wall {base['wall_s']:.1f}s", flush=True)
        # `auto` is what the engine does (it trains small groups one by one where vectorising does
        # not pay); below that threshold the forced vectorised figure is shown too.
        below_min = p < MIN_POPULATION.get(torch.device(args.device).type, 2)
        modes = ["auto"] + (["population"] if below_min or args.arch not in AUTO_VECTORISED_ARCHS else [])
        for mode in modes:
            r = run(args, data, p, mode, args.device)
            r["speedup_vs_one_by_one"] = r["model_epochs_per_hour"] / base["model_epochs_per_hour"]
            r["cpu_speedup_vs_one_by_one"] = r["model_epochs_per_cpu_hour"] / base["model_epochs_per_cpu_hour"]
            rows.append(r)
            print(f"P={p:5d} {mode:10s}: {r['model_epochs_per_hour']:9.0f} model-epochs/h  "
                  f"ratio {r['speedup_vs_one_by_one']:5.2f}x (CPU-time ratio {r['cpu_speedup_vs_one_by_one']:5.2f}x)  "
                  f"ckpt {100 * r['ckpt_fraction']:4.1f}% of wall  wall {r['wall_s']:.1f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
