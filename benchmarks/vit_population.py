"""Benchmark: ViT fine-tuning populations (vitzoo.train.vit_population) vs the per-run loop.

Protocol: one micro ViT parent (``tests/tiny.yaml``'s model: width 32, depth 2, patch 4, by default
16 px) pre-trained for one epoch on digits, then P fine-tuning runs of it on the built-in
``shapes`` task (AdamW, cosine schedule with one warm-up epoch, grad clip 1.0, batch 32, train /
val / test evaluated after every epoch, a checkpoint per epoch), once with ``train_run`` one by
one and once as a population (``VITZOO_POPULATION=on``), each into its own zoo folder, all of
it timed (building, loading the parent, evaluation, checkpoints, finish_run). The P runs differ in
lr (P values); ``--seeds shared`` gives them one data seed (a learning-rate grid: linear probes
then share every backbone forward), ``--seeds distinct`` one data seed each (worst case).

Reported per mode and P: wall and process CPU time per model, and their ratio (one-by-one /
population; > 1 means the population is faster). With ``--threads 1`` the CPU-time ratio is robust
to other jobs sharing the machine.

    .venv/bin/python benchmarks/vit_population.py --sizes 2,4,8 --modes full,linear --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml


def recipe(args: argparse.Namespace, p: int, mode: str) -> dict[str, Any]:
    lrs = [round(1e-3 * (1 + i), 6) for i in range(p)]
    seeds = [0] if args.seeds == "shared" else list(range(p))
    grid: dict[str, Any] = {"mode": [mode], "lr": lrs if args.seeds == "shared" else [lrs[0]]}
    return {"name": "bench", "seed": 0, "stages": {
        "pretrain": {"data": {"source": "builtin:digits", "max_train_samples": 96, "max_eval_samples": 48},
                     "model": {"variant": "micro", "img_size": args.img_size},
                     "optimizer": {"name": "adamw", "lr": 3e-3}, "epochs": 1, "batch_size": 32,
                     "seeds": {"init": [0]}},
        "finetune": {"finetune": {"parent_stage": "pretrain", "head": "linear"},
                     "data": {"source": "builtin:shapes", "max_train_samples": args.train_size,
                              "max_eval_samples": args.eval_size},
                     "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.05},
                     "schedule": {"name": "cosine", "warmup": "1ep"}, "epochs": args.epochs, "batch_size": 32,
                     "grid": grid, "seeds": {"init": seeds}}}}


def run(args: argparse.Namespace, p: int, mode: str, work: Path) -> dict[str, float]:
    from vitzoo.plan import expand
    from vitzoo.recipe import load_recipe
    from vitzoo.train import routing, vit_population
    from vitzoo.train.context import RunContext
    from vitzoo.train.engine import train_run

    folder = work / f"{mode}-{p}"
    folder.mkdir()
    (folder / "r.yaml").write_text(yaml.safe_dump(recipe(args, p, mode), sort_keys=False))
    plan = expand(load_recipe(folder / "r.yaml"))
    dev = torch.device(args.device)
    ctx_a = RunContext(zoo_root=folder / "a", device=dev, progress=False, log=lambda m: None)
    for spec in plan.stage_runs("pretrain"):
        train_run(spec, ctx_a)
    shutil.copytree(folder / "a", folder / "b")
    ctx_b = RunContext(zoo_root=folder / "b", device=dev, cache=ctx_a.cache, progress=False, log=lambda m: None)
    runs = plan.stage_runs("finetune")
    assert len(runs) == p, len(runs)
    from vitzoo.data.pipeline import preprocessing_for

    data_cfg = runs[0].config.data
    for split in ("train", "val", "test"):  # fill the shared data cache before timing either engine
        ctx_a.cache.eval_tensors(data_cfg, split, preprocessing_for(data_cfg, args.img_size))
    out: dict[str, float] = {}
    for name, fn in (("one", lambda: [train_run(s, ctx_a) for s in runs]),
                     ("pop", lambda: list(vit_population.train_stage(runs, ctx_b)))):
        os.environ[routing.ENV_SWITCH] = "on" if name == "pop" else "off"
        w, c = time.perf_counter(), time.process_time()
        infos = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[f"{name}_wall"] = (time.perf_counter() - w) / p
        out[f"{name}_cpu"] = (time.process_time() - c) / p
        assert len(infos) == p and all(i["status"] == "done" for i in infos)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2,4,8")
    ap.add_argument("--modes", default="full,linear")
    ap.add_argument("--seeds", choices=["shared", "distinct"], default="shared")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--eval-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device}, {args.threads} thread(s), img {args.img_size}, seeds {args.seeds}, "
          f"train {args.train_size}, eval {args.eval_size} x 3 splits, {args.epochs} epochs")
    print("| mode | P | one-by-one s/model (wall, CPU) | population s/model (wall, CPU) | ratio wall | ratio CPU |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            for p in (int(s) for s in args.sizes.split(",")):
                r = run(args, p, mode, Path(tmp))
                print(f"| {mode} | {p} | {r['one_wall']:.2f}, {r['one_cpu']:.2f} | {r['pop_wall']:.2f}, "
                      f"{r['pop_cpu']:.2f} | {r['one_wall'] / r['pop_wall']:.2f}x | "
                      f"{r['one_cpu'] / r['pop_cpu']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
