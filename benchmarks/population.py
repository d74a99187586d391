"""Benchmark: classic zoos trained stacked (vmap) vs one by one, both through `vitzoo generate`.

Protocol: a classic seed-zoo recipe (``--arch cnn-s``: recipes/classic/mnist-cnn-s-seed.yaml, CNN-s,
Adam 3e-4, batch 10; ``--arch resnet18``: recipes/classic/cifar10-resnet18-seed.yaml, SGD + OneCycle,
crop + flip, batch 256) on synthetic data of the right shape (parquet, written once), with every state
saved and every split evaluated per epoch, exactly as a user's zoo. For each population size P the zoo
is generated with ``VITZOO_POPULATION=on`` (one stack of P, the engine's CnnStack) right after a
one-by-one baseline (``VITZOO_POPULATION=off``: each run alone through the engine) on
``--baseline-models`` models: other jobs on a shared machine drift the speed over minutes, so only
neighbouring runs are compared. Reported: model-epochs per hour (wall and process CPU time), the ratio,
and the share of wall time in the zoo writer (``RunWriter`` calls).

    python benchmarks/population.py --train-size 600 --test-size 100 --epochs 2 --sizes 16,64 --threads 1
    python benchmarks/population.py --arch resnet18 --train-size 512 --test-size 128 --epochs 1 --sizes 4
    python benchmarks/population.py --arch phase-resnet18 --width 2 --batch-size 128 --sizes 8

``--arch phase-resnet18``: one cell of recipes/phase/cifar10-resnet18-phase.yaml (SGD + OneCycle, crop +
flip + rotation 20, per-dataset normalisation) at ``--width`` and ``--batch-size``, seeds 1..P.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from seed_zoo import REPO, Timer, synthetic_mnist  # noqa: E402

RECIPES = {"cnn-s": REPO / "recipes/classic/mnist-cnn-s-seed.yaml",
           "resnet18": REPO / "recipes/classic/cifar10-resnet18-seed.yaml",
           "phase-resnet18": REPO / "recipes/phase/cifar10-resnet18-phase.yaml"}


def run(args: argparse.Namespace, data: Path, work: Path, n_models: int, switch: str) -> dict[str, Any]:
    from vitzoo.train.generate import generate
    from vitzoo.zoo.writer import RunWriter

    doc = yaml.safe_load(RECIPES[args.arch].read_text())
    st = doc["stages"]["train"]
    st["data"].update(source=f"parquet:{data}", val_size=max(1, args.train_size // 6))
    st["data"].pop("train_split", None), st["data"].pop("test_split", None)
    st["data"].update(image_column="image", label_column="label")  # the synthetic parquet's columns
    st["epochs"], st["seeds"]["init"] = args.epochs, f"1..{n_models}"
    if args.arch.startswith("phase-"):  # one cell of the phase grid: the seeds of a (width, batch size)
        st.pop("grid")
        st["model"]["width"], st["batch_size"] = args.width, args.batch_size
    recipe = work / f"{switch}-{n_models}.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = work / f"zoo-{switch}-{n_models}"
    timer = Timer()
    saved = {n: getattr(RunWriter, n) for n in ("save_epoch", "save_history", "save_resume", "finalize")}
    for n in saved:
        timer.wrap(RunWriter, n)
    os.environ["VITZOO_POPULATION"] = switch
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        generate(recipe, out, progress=False, log=lambda m: None)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    finally:
        for n, fn in saved.items():
            setattr(RunWriter, n, fn)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    shutil.rmtree(out)
    me = n_models * args.epochs
    return {"models": n_models, "switch": switch, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "model_epochs_per_hour": me / wall * 3600, "model_epochs_per_cpu_hour": me / cpu * 3600,
            "writer_fraction": timer.seconds / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(RECIPES), default="cnn-s")
    ap.add_argument("--sizes", default="16,64", help="stack sizes, comma-separated")
    ap.add_argument("--baseline-models", type=int, default=4, help="models trained one by one for the baseline")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-size", type=int, default=6000)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--width", type=int, default=2, help="phase-resnet18: the ResNet width")
    ap.add_argument("--batch-size", type=int, default=128, help="phase-resnet18: the batch size")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vitzoo-bench-"))
    channels, size = (1, 28) if args.arch == "cnn-s" else (3, 32)
    data = synthetic_mnist(work / "data", args.train_size, args.test_size, channels=channels, size=size)
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "arch": args.arch,
           "train_size": args.train_size, "test_size": args.test_size, "epochs": args.epochs,
           **({"width": args.width, "batch_size": args.batch_size} if args.arch.startswith("phase-") else {})}
    print(json.dumps(env))
    rows = []
    for p in (int(s) for s in args.sizes.split(",")):
        base = run(args, data, work, args.baseline_models, "off")
        stack = run(args, data, work, p, "on")
        stack["ratio_wall"] = stack["model_epochs_per_hour"] / base["model_epochs_per_hour"]
        stack["ratio_cpu"] = stack["model_epochs_per_cpu_hour"] / base["model_epochs_per_cpu_hour"]
        rows += [base, stack]
        print(f"one by one ({base['models']}): {base['model_epochs_per_hour']:9.0f} model-epochs/h, writer "
              f"{100 * base['writer_fraction']:4.1f}% | stack of {p}: {stack['model_epochs_per_hour']:9.0f} "
              f"model-epochs/h ({stack['ratio_wall']:.2f}x wall, {stack['ratio_cpu']:.2f}x CPU), writer "
              f"{100 * stack['writer_fraction']:4.1f}%", flush=True)
    shutil.rmtree(work)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
