"""Benchmark: sparsified twins stacked (vitzoo.train.sparsify_population) vs one by one (sparsify.py).

What is timed: one training step of a variational-dropout CNN-s twin (batch 10, MNIST-shaped 1x28x28
input, 10 classes, Adam, KL term, local-reparameterisation noise on), i.e. what a ``sparsify:`` stage
of the classic MNIST zoos repeats 5,000 times per epoch per twin:

- one by one: the inner loop of the engine's ``train_run`` (``nn.Module`` forward, cross-entropy +
  ``total_kl``, backward, ``torch.optim.Adam``), on the twin's own network and optimizer;
- stacked: ``_TwinPopulation.train_step`` for P twins (vmap-ed forward/backward + functional Adam).

Reported per P: microseconds of process CPU time and of wall time per twin-step (``--threads 1``
makes the CPU-time figure robust to other jobs sharing the machine; on a GPU only the wall time,
synchronised, means anything; each figure is the best of
``--repeats`` runs, the one-by-one baseline measured again next to every size), and the ratio.
Parents are freshly initialised CNN-s (the step cost does not depend on the weights); the data are
random tensors (a speed test).

    .venv/bin/python benchmarks/sparsify_population.py --sizes 1,2,4,8,16,32,64 --steps 200 --threads 1

``--stage N`` instead times a whole ``sparsify:`` stage of N twins end to end, everything included
(parent loading, per-epoch evaluation of train/val/test, checkpoints, resume points, run folders):
``train_sparsify_stage`` in ``sequential`` mode vs ``auto`` mode (populations where ``auto`` picks
them), on the offline digits set at 28x28 (``--train-size`` training images, ``--eval-size`` val and
test images each; the per-epoch train evaluation covers the whole training set below 10,000 images).
The parents (one epoch of CNN-s training each) are made first and not timed.

    .venv/bin/python benchmarks/sparsify_population.py --stage 64 --train-size 500 --eval-size 100 --epochs 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitzoo.data.pipeline import DataCache
from vitzoo.models import cnn_model_args
from vitzoo.models.cnn import build_cnn
from vitzoo.plan import RunSpec
from vitzoo.recipe import recipe_from_dict
from vitzoo.train.context import RunContext
from vitzoo.train.engine import Member
from vitzoo.train.sparsify_population import _TwinPopulation
from vitzoo.train.variational import kl_ramp, prepare_twin, total_kl


def _specs(n: int, batch_size: int) -> list[RunSpec]:
    data = {"source": "builtin:digits", "channels": 1, "max_train_samples": 200, "max_eval_samples": 50}
    recipe = recipe_from_dict({"name": "bench", "stages": {
        "train": {"data": data, "model": {"variant": "cnn-s", "activation": "tanh", "init": "U"}, "epochs": 1},
        "twins": {"sparsify": {"parent_stage": "train"}, "data": data, "epochs": 25, "batch_size": batch_size,
                  "optimizer": {"name": "adam", "lr": 3e-4, "weight_decay": 0.0, "grad_clip": None},
                  "schedule": "constant"}}})
    cfg = recipe.stages[1]
    return [RunSpec(f"twin-{i:04d}", "twins", dataclasses.replace(cfg, grid={}), {}, i, i, f"parent-{i:04d}", "last")
            for i in range(n)]


def _parent(seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    net = build_cnn("cnn-s", 1, 10, "tanh", 0.0, "U", seed)
    pcfg = {"architecture": "vitzoo/cnn-s", "model_args": cnn_model_args(1, "tanh", 0.0, "U"), "num_classes": 10,
            "pretrained_cfg": {"input_size": [1, 28, 28]}}
    return pcfg, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _batches(n: int, p: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(p, batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (p, batch_size), generator=g))
            for _ in range(n)]


def _sync(ctx: RunContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)


def time_one_by_one(ctx: RunContext, steps: int, batch_size: int) -> tuple[float, float]:
    """(CPU s, wall s) per twin-step of sparsify.py's inner loop."""
    spec = _specs(1, batch_size)[0]
    twin = prepare_twin(spec, ctx, parent=_parent(0))
    net, opt, modules = twin.net, twin.optimizer, twin.modules
    kl_scale = kl_ramp(1, 25) / 50_000
    data = [(x.to(ctx.device), y.to(ctx.device)) for x, y in _batches(steps + 10, 1, batch_size, 0)]
    net.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(net(x[0]), y[0]) + kl_scale * total_kl(modules)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for x, y in data[:10]:  # warm-up
        step(x, y)
    _sync(ctx)
    c0, w0 = time.process_time(), time.perf_counter()
    for x, y in data[10:]:
        step(x, y)
    _sync(ctx)
    return (time.process_time() - c0) / steps, (time.perf_counter() - w0) / steps


def time_stacked(ctx: RunContext, p: int, steps: int, batch_size: int, repeats: int) -> tuple[float, float]:
    """(CPU s, wall s) per twin-step of the vectorised step with P twins (best of ``repeats``)."""
    twins = [prepare_twin(s, ctx, parent=_parent(i)) for i, s in enumerate(_specs(p, batch_size))]
    pop = _TwinPopulation([(tw, Member(tw.spec, tw.writer, tw.built, tw.data.name)) for tw in twins], ctx)
    pop.loss_sum = torch.zeros(p, dtype=torch.float64, device=ctx.device)
    pop.kl_sum = torch.zeros(p, dtype=torch.float64, device=ctx.device)
    kl_scale = (pop.kl_weight * kl_ramp(1, 25) / 50_000).float()
    data = [(x.to(ctx.device), y.to(ctx.device)) for x, y in _batches(steps + 5, p, batch_size, 1)]
    for x, y in data[:5]:
        pop.train_step(x, y, 1.0, kl_scale)
    best = (math.inf, math.inf)
    for _ in range(repeats):
        _sync(ctx)
        c0, w0 = time.process_time(), time.perf_counter()
        for x, y in data[5:]:
            pop.train_step(x, y, 1.0, kl_scale)
        _sync(ctx)
        best = (min(best[0], (time.process_time() - c0) / steps / p), min(best[1], (time.perf_counter() - w0) / steps / p))
    return best


def time_stage(n: int, train_size: int, eval_size: int, epochs: int, batch_size: int,
               device: torch.device) -> dict[str, Any]:
    """Wall and CPU seconds of a whole twins stage, one by one vs auto (see the module docstring)."""
    import shutil

    from vitzoo.plan import expand
    from vitzoo.train.generate import generate
    from vitzoo.train.sparsify_population import train_sparsify_stage

    data = {"source": "builtin:digits", "channels": 1, "max_train_samples": train_size,
            "max_eval_samples": eval_size}
    stages = {"train": {"data": data, "model": {"variant": "cnn-s", "activation": "tanh", "init": "U"},
                        "optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "grad_clip": None},
                        "schedule": "constant", "epochs": 1, "batch_size": 10, "seeds": {"init": f"1..{n}"}},
              "twins": {"sparsify": {"parent_stage": "train"}, "data": data, "epochs": epochs,
                        "batch_size": batch_size, "schedule": "constant",
                        "optimizer": {"name": "adam", "lr": 3e-4, "weight_decay": 0.0, "grad_clip": None}}}
    out: dict[str, Any] = {"twins": n, "train_size": train_size, "eval_size": eval_size, "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        root = Path(tmp)
        (root / "parents.yaml").write_text(yaml.safe_dump({"name": "p", "stages": {"train": stages["train"]}}))
        generate(root / "parents.yaml", root / "parents", progress=False, log=lambda m: None)
        specs = expand(recipe_from_dict({"name": "t", "stages": stages})).stage_runs("twins")
        cache = DataCache()
        for mode in ("sequential", "auto"):
            zoo = root / mode
            shutil.copytree(root / "parents" / "models", zoo / "models")
            ctx = RunContext(zoo_root=zoo, device=device, cache=cache, progress=False, log=lambda m: None)
            c0, w0 = time.process_time(), time.perf_counter()
            infos = list(train_sparsify_stage(specs, ctx, mode=mode))
            out[mode] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                         "final_sparsity_mean": sum(i["history"][-1]["sparsity_ratio"] for i in infos) / n,
                         "final_test_acc_mean": sum(i["history"][-1]["test_acc"] for i in infos) / n}
            print(f"{mode:>10}: {out[mode]['wall_s']:.1f} s wall, {out[mode]['cpu_s']:.1f} s CPU, "
                  f"{n * epochs / out[mode]['wall_s'] * 3600:,.0f} twin-epochs/h, "
                  f"mean final sparsity {out[mode]['final_sparsity_mean']:.3f}, "
                  f"test acc {out[mode]['final_test_acc_mean']:.3f}", flush=True)
    out["speedup_wall"] = out["sequential"]["wall_s"] / out["auto"]["wall_s"]
    out["speedup_cpu"] = out["sequential"]["cpu_s"] / out["auto"]["cpu_s"]
    print(f"auto vs one by one: {out['speedup_wall']:.2f}x wall, {out['speedup_cpu']:.2f}x CPU")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64", help="population sizes (comma-separated)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3,
                    help="measurements per size, best kept (one-by-one baseline measured again for every size)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--stage", type=int, default=0, help="time a whole stage of this many twins instead")
    ap.add_argument("--train-size", type=int, default=500)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.stage:
        print(f"torch {torch.__version__}, threads {args.threads}, {args.stage} twins, batch {args.batch_size}")
        res = time_stage(args.stage, args.train_size, args.eval_size, args.epochs, args.batch_size, device)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(zoo_root=Path(tmp), device=device, cache=DataCache(), progress=False, log=lambda m: None)
        rows = []
        print(f"torch {torch.__version__}, {device}, {platform.processor() or platform.machine()}, threads {args.threads}, "
              f"batch {args.batch_size}, {args.steps} steps")
        print(f"{'P':>4} {'1x1 cpu us':>11} {'stacked cpu us':>15} {'ratio cpu':>10} {'1x1 wall us':>12} "
              f"{'stacked wall us':>16} {'ratio wall':>11}")
        for p in sizes:
            base = [time_one_by_one(ctx, args.steps, args.batch_size) for _ in range(args.repeats)]
            b_cpu, b_wall = min(c for c, _ in base), min(w for _, w in base)
            s_cpu, s_wall = time_stacked(ctx, p, args.steps, args.batch_size, args.repeats)
            row = {"P": p, "one_by_one_cpu_us": b_cpu * 1e6, "one_by_one_wall_us": b_wall * 1e6,
                   "stacked_cpu_us": s_cpu * 1e6, "stacked_wall_us": s_wall * 1e6,
                   "speedup_cpu": b_cpu / s_cpu, "speedup_wall": b_wall / s_wall}
            rows.append(row)
            print(f"{p:>4} {b_cpu * 1e6:>11.0f} {s_cpu * 1e6:>15.0f} {b_cpu / s_cpu:>9.2f}x {b_wall * 1e6:>12.0f} "
                  f"{s_wall * 1e6:>16.0f} {b_wall / s_wall:>10.2f}x", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
