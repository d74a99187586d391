"""Benchmark: per-run ViT training through the engine vs a bare timm loop (issue 8, "vit_step").

What a new user tries first: one micro ViT (``tests/tiny.yaml``'s model: ViT-mu/4 at 16 px, width 32,
depth 2) trained for one epoch on the built-in digits (all 1,293 training images, batch 64,
``aug: none``, AdamW 3e-3 with timm's weight-decay groups, cosine schedule, grad clip 1.0, the device's
default precision), evaluated as the engine evaluates (the initialisation and after every epoch: train
capped at 10,000 images, val, test; eval batch 4 x 64). Three ways, each timed over the whole run:

- ``bare``: ``timm.create_model`` + timm's AdamW + an explicit permutation, sliced from the preprocessed
  tensors already in memory (on the device), and the same evaluation passes. No vitzoo code in the loop
  (vitzoo only prepares the tensors and reads the recipe's model arguments beforehand);
- ``engine``: ``vitzoo.train.engine.train_run`` into a fresh folder with a warm data cache (what every
  run but the first of a zoo sees): feed, evaluation, history, checkpoints, resume points, run.json;
- ``generate``: ``vitzoo.train.generate.generate`` on the one-run recipe into a fresh folder, the entry
  point of ``vitzoo generate``: the above plus loading and preprocessing the data, accelerate's
  PartialState, the index and the cards. ``run in generate`` is that run's own ``wall_time_s``.

Process state is part of what is measured, so every sample is a fresh child process: ``torch.set_num_threads``
changes how later operations run in that process (it also turns MKL's dynamic thread choice off; ``generate``
called it), and ``OMP_WAIT_POLICY`` (the CLI sets ``PASSIVE`` before torch loads) is read once when OpenMP
starts. A ``pair`` child times ``bare`` and ``engine`` alternately in one process; a ``generate`` child times
``generate`` and then ``bare`` in the state ``generate`` leaves (``bare after generate``). Children of every
configuration alternate, repeat after repeat. ``--threads``: ``default`` never calls ``torch.set_num_threads``
(torch's default: all cores), ``same`` calls ``torch.set_num_threads(torch.get_num_threads())`` (what generate
did in one process), a number calls ``torch.set_num_threads(n)`` first. ``--policies``: the children's
``OMP_WAIT_POLICY`` (``unset``: a plain ``python script.py``) or other settings (``PASSIVE+MKL_DYNAMIC=FALSE``).
``--trees``: source trees alternated the same way (before / after a change, in one run).

Reported, as min-max (median) over every round: seconds per epoch (the run's wall time / epochs: epoch 0 and the
per-run costs included), process CPU seconds, train steps/s and the ratio bare / engine (1.0 = the engine
costs nothing over the bare loop; issue 8's bar: pipeline, evaluation and writers at most 20% of a bare
step, i.e. >= 0.83). ``--breakdown`` adds where the engine's and the bare loop's time goes (one extra,
instrumented round per pair child, not part of the timings above).

    .venv/bin/python benchmarks/vit_step.py --repeats 3 --breakdown --json /tmp/vit_step.jsonl
    .venv/bin/python benchmarks/vit_step.py --kinds pair --threads default,same \
        --policies PASSIVE,PASSIVE+MKL_DYNAMIC=FALSE --repeats 4          # the thread-setting diagnosis
    .venv/bin/python benchmarks/vit_step.py --trees /tmp/before,/tmp/after --policies PASSIVE --repeats 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml


def recipe(args: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"source": "builtin:digits"}
    if args["train_size"]:
        data["max_train_samples"] = args["train_size"]
    return {"name": "vit-step", "seed": 0, "stages": {"pretrain": {
        "data": data, "model": {"variant": "micro", "img_size": args["img_size"]},
        "optimizer": {"name": "adamw", "lr": args["lr"]}, "aug": "none", "epochs": args["epochs"],
        "batch_size": args["batch_size"], "seeds": {"init": [0]}}}}


# ------------------------------------------------------------------ the bare loop


class Bare:
    """A plain timm loop on tensors in memory: the same model, optimizer, steps and evaluation passes."""

    def __init__(self, spec, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        from vitzoo.models import vit

        cfg = spec.config
        self.cfg, self.device = cfg, device
        self.arch, self.model_args = vit.vit_args(cfg.model, cfg.data.channels)
        self.num_classes = int(tensors["train"][1].max()) + 1
        self.wd = cfg.optimizer.resolved()["weight_decay"]
        self.data = {k: (x.to(device), y.to(device)) for k, (x, y) in tensors.items()}
        # the engine's "auto" precision: bf16 autocast on a GPU that has it, full precision otherwise
        self.amp = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self.sections = {"train": 0.0, "eval": 0.0}

    @torch.no_grad()
    def evaluate(self, net) -> list[tuple[float, float]]:
        t = time.perf_counter()
        net.eval()
        out = []
        bs = 4 * self.cfg.batch_size
        for split, (x, y) in self.data.items():
            n = min(len(y), 10_000) if split == "train" else len(y)  # the engine's TRAIN_EVAL_CAP
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            for i in range(0, n, bs):
                logits = net(x[i:min(i + bs, n)]).float()
                loss += torch.nn.functional.cross_entropy(logits, y[i:min(i + bs, n)], reduction="sum").double()
                correct += (logits.argmax(1) == y[i:min(i + bs, n)]).sum()
            out.append((loss.item() / n, correct.item() / n))
        self.sections["eval"] += time.perf_counter() - t
        return out

    def run(self) -> int:
        """One run: build, evaluate the initialisation, then per epoch the steps and an evaluation."""
        import timm
        from timm.optim import create_optimizer_v2

        cfg, dev = self.cfg, self.device
        torch.manual_seed(0)
        net = timm.create_model(self.arch, pretrained=False, num_classes=self.num_classes, **self.model_args).to(dev)
        opt = create_optimizer_v2(net, opt="adamw", lr=cfg.optimizer.lr, weight_decay=self.wd, filter_bias_and_bn=True)
        x, y = self.data["train"]
        n, b = len(y), cfg.batch_size
        steps = n // b if n > b and n % b == 1 else -(-n // b)  # the engine's last-batch rule
        total = cfg.epochs * steps
        self.evaluate(net)
        g = torch.Generator().manual_seed(0)
        for epoch in range(cfg.epochs):
            t = time.perf_counter()
            net.train()
            perm = torch.randperm(n, generator=g).to(dev)
            loss_sum = torch.zeros((), device=dev)
            for i in range(steps):
                idx = perm[i * b:(i + 1) * b]
                for group in opt.param_groups:  # cosine, no warm-up (the recipe's default)
                    group["lr"] = cfg.optimizer.lr * (1 + math.cos(math.pi * (epoch * steps + i) / total)) / 2
                with torch.autocast(dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                    loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                loss_sum += loss.detach().float() * len(idx)
            assert math.isfinite(loss_sum.item())
            self.sections["train"] += time.perf_counter() - t
            self.evaluate(net)
        return total


# ------------------------------------------------------------------ a child process: one sample


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def instrument() -> dict[str, float]:
    """Wrap the engine's parts with timers (module attributes, nothing in vitzoo is edited)."""
    from vitzoo.train import engine, feed
    from vitzoo.zoo.writer import RunWriter

    acc: dict[str, float] = {"build": 0.0, "feed": 0.0, "eval": 0.0, "writers": 0.0}

    def wrap(owner, name: str, key: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        def timed_fn(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t

        setattr(owner, name, timed_fn)

    wrap(engine, "build_module_run", "build")
    wrap(engine, "evaluate", "eval")
    for m in ("save_epoch", "save_history", "save_resume", "finalize"):
        wrap(RunWriter, m, "writers")

    def timed_batches(it):
        it = iter(it)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                acc["feed"] += time.perf_counter() - t
                return
            acc["feed"] += time.perf_counter() - t
            yield batch

    for cls_name in ("LoaderFeed", "TensorFeed"):
        cls = getattr(feed, cls_name, None)
        if cls is not None:
            epoch_fn = cls.epoch

            def timed_epoch(self, epoch, _fn=epoch_fn):
                t = time.perf_counter()
                it = _fn(self, epoch)
                acc["feed"] += time.perf_counter() - t
                return timed_batches(it)

            cls.epoch = timed_epoch
    return acc


def child(a: dict[str, Any]) -> dict[str, Any]:
    if a["threads"] == "same":  # what generate does in a single process: the same count, set explicitly
        torch.set_num_threads(torch.get_num_threads())
    elif a["threads"] != "default":
        torch.set_num_threads(int(a["threads"]))
    from vitzoo.data.pipeline import DataCache, preprocessing_for
    from vitzoo.plan import expand
    from vitzoo.recipe import load_recipe
    from vitzoo.train.context import RunContext
    from vitzoo.train.engine import train_run
    from vitzoo.train.generate import generate

    work = Path(tempfile.mkdtemp(prefix="vit_step-"))
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe(a), sort_keys=False))
    spec = expand(load_recipe(work / "recipe.yaml")).runs[0]
    dev = torch.device(a["device"])
    cfg = spec.config
    cache = DataCache()
    pp = preprocessing_for(cfg.data, cfg.model.resolved_img_size)
    splits = ["train", "val"] + (["test"] if cache.splits(cfg.data).test is not None else [])
    bare = Bare(spec, {s: cache.eval_tensors(cfg.data, s, pp) for s in splits}, dev)
    ctx = RunContext(zoo_root=work / "zoo", device=dev, cache=cache, progress=a["progress"], log=lambda m: None)
    count = iter(range(10**6))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def run_bare() -> None:
        bare.run()
        sync()

    def run_engine() -> None:
        ctx.zoo_root = work / f"engine{next(count)}"
        info = train_run(spec, ctx)
        sync()
        assert info["status"] == "done", info["status"]

    gen_walls: list[float] = []

    def run_generate() -> None:
        out = work / f"gen{next(count)}"
        meta = generate(work / "recipe.yaml", out, progress=a["progress"], log=lambda m: None)
        sync()
        assert meta["status"] == "complete", meta
        gen_walls.append(json.loads(next((out / "models").glob("*/run.json")).read_text())["wall_time_s"])

    modes = {"bare": run_bare, "engine": run_engine} if a["kind"] == "pair" else {"generate": run_generate,
                                                                                  "bare": run_bare}
    for fn in modes.values():  # warm-up: imports, first calls, allocator; the generate child's first generate
        fn()
    gen_walls.clear()
    rounds: list[dict[str, float]] = []
    for r in range(a["rounds"]):
        names = list(modes)
        if a["kind"] == "pair" and r % 2:
            names.reverse()  # alternate which side goes first
        row: dict[str, float] = {}
        for name in names:
            row[f"{name}_wall"], row[f"{name}_cpu"] = timed(modes[name])
        if gen_walls:
            row["run_in_generate_wall"] = gen_walls[-1]
        rounds.append(row)
    from vitzoo.train.seeds import steps_per_epoch

    steps = cfg.epochs * steps_per_epoch(len(bare.data["train"][1]), cfg.batch_size)
    import vitzoo

    result: dict[str, Any] = {"kind": a["kind"], "threads": a["threads"], "torch_threads": torch.get_num_threads(),
                              "policy": a["policy"], "tree": a["tree"], "vitzoo": str(Path(vitzoo.__file__).parent),
                              "rounds": rounds, "train_steps": steps}
    if a["breakdown"] and a["kind"] == "pair":
        bare.sections = {"train": 0.0, "eval": 0.0}
        result["bare_breakdown"] = {"total": timed(run_bare)[0], **bare.sections}
        acc = instrument()
        total = timed(run_engine)[0]
        result["engine_breakdown"] = {"total": total, **acc, "steps_and_rest": total - sum(acc.values())}
    return result


# ------------------------------------------------------------------ the driver


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """``min-max (median)``: on shared cores the range is wide, the median says where most rounds were."""
    if not values:
        return "-"
    lo, hi, med = (fmt.format(v) for v in (min(values), max(values), statistics.median(values)))
    return lo if lo == hi else f"{lo}-{hi} ({med})"


def summarise(samples: list[dict[str, Any]], epochs: int) -> list[dict[str, Any]]:
    """One row per (code tree, environment, threads): ranges over every round of every child."""
    rows = []
    order = {k: i for i, k in enumerate(dict.fromkeys((s["tree"], s["policy"], s["threads"]) for s in samples))}
    for tree, policy, threads in sorted(order, key=lambda k: (k[0], k[1], k[2] != "default", k[2])):
        mine = [s for s in samples if (s["tree"], s["policy"], s["threads"]) == (tree, policy, threads)]
        pair = [r for s in mine if s["kind"] == "pair" for r in s["rounds"]]
        gen = [r for s in mine if s["kind"] == "generate" for r in s["rounds"]]
        steps = mine[0]["train_steps"]
        col = lambda rs, k: [r[k] for r in rs if k in r]  # noqa: E731
        row = {"tree": tree, "policy": policy, "threads": threads, "torch_threads": mine[0]["torch_threads"],
               "steps": steps,
               "bare_s": col(pair, "bare_wall"), "bare_cpu_s": col(pair, "bare_cpu"),
               "engine_s": col(pair, "engine_wall"), "engine_cpu_s": col(pair, "engine_cpu"),
               "generate_s": col(gen, "generate_wall"), "generate_cpu_s": col(gen, "generate_cpu"),
               "run_in_generate_s": col(gen, "run_in_generate_wall"), "bare_after_generate_s": col(gen, "bare_wall"),
               "ratio_bare_engine": [r["bare_wall"] / r["engine_wall"] for r in pair],
               "ratio_bare_generate_same_process": [r["bare_wall"] / r["generate_wall"] for r in gen]}
        # generate against the bare loop of the pair children (a process without generate's thread setting)
        bare_med = statistics.median(row["bare_s"]) if row["bare_s"] else float("nan")
        row["ratio_bare_generate"] = [bare_med / g for g in row["generate_s"]]
        row["epochs"] = epochs
        for k in ("bare_breakdown", "engine_breakdown"):
            parts = [s[k] for s in mine if k in s]
            if parts:
                row[k] = {p: [d[p] for d in parts] for p in parts[0]}
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    def per_epoch(r: dict[str, Any], k: str) -> str:
        return spread([v / r["epochs"] for v in r[k]])

    def steps_per_s(r: dict[str, Any], k: str) -> str:
        return spread([r["steps"] / v for v in r[k]], "{:.0f}")

    def part(d: dict[str, list[float]], k: str) -> str:
        return spread(d.get(k, []), "{:.3f}")

    print("\nSeconds per epoch (run wall / epochs; epoch 0 and per-run costs included), min-max (median):\n")
    print("| code | env | threads | bare | engine (train_run) | generate | run in generate | bare after generate "
          "| bare / engine | bare / generate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tree']} | {r['policy']} | {r['threads']} ({r['torch_threads']}) | {per_epoch(r, 'bare_s')} | "
              f"{per_epoch(r, 'engine_s')} | {per_epoch(r, 'generate_s')} | {per_epoch(r, 'run_in_generate_s')} | "
              f"{per_epoch(r, 'bare_after_generate_s')} | {spread(r['ratio_bare_engine'])} | "
              f"{spread(r['ratio_bare_generate'])} |")
    print("\nTrain steps/s (whole run) and process CPU seconds per run, min-max (median):\n")
    print("| code | env | threads | bare steps/s | engine steps/s | generate steps/s | bare CPU s | engine CPU s "
          "| generate CPU s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tree']} | {r['policy']} | {r['threads']} | {steps_per_s(r, 'bare_s')} | "
              f"{steps_per_s(r, 'engine_s')} | {steps_per_s(r, 'generate_s')} | {spread(r['bare_cpu_s'])} | "
              f"{spread(r['engine_cpu_s'])} | {spread(r['generate_cpu_s'])} |")
    if any("engine_breakdown" in r for r in rows):
        print("\nWhere the time goes (one instrumented round per pair child, seconds per run, min-max (median)):\n")
        print("| code | env | threads | bare: train steps | bare: evaluation | engine: build | engine: feed "
              "| engine: evaluation | engine: writers | engine: steps + rest |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            b, g = r.get("bare_breakdown", {}), r.get("engine_breakdown", {})
            print(f"| {r['tree']} | {r['policy']} | {r['threads']} | {part(b, 'train')} | {part(b, 'eval')} | "
                  f"{part(g, 'build')} | {part(g, 'feed')} | {part(g, 'eval')} | {part(g, 'writers')} | "
                  f"{part(g, 'steps_and_rest')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="child processes per configuration and kind")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per child (after one warm-up round)")
    ap.add_argument("--threads", default="default,1",
                    help="'default' (no set_num_threads), 'same' (set_num_threads(get_num_threads()), what generate "
                         "does in one process) and/or thread counts")
    ap.add_argument("--policies", default="unset,PASSIVE",
                    help="OMP_WAIT_POLICY of the children: 'unset' (a plain python script), PASSIVE (what the "
                         "vitzoo CLI sets), ACTIVE; or NAME=VALUE[+NAME=VALUE] environment settings")
    ap.add_argument("--trees", default="",
                    help="comma-separated source trees put first on the children's PYTHONPATH, alternated like the "
                         "other settings (before/after a change: --trees /tmp/before,/tmp/after); default: the "
                         "installed vitzoo")
    ap.add_argument("--kinds", default="pair,generate", help="pair (bare + train_run) and/or generate")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-size", type=int, default=None, help="cap on training images (default: all 1,293)")
    ap.add_argument("--no-progress", action="store_true", help="engine and generate without progress bars")
    ap.add_argument("--breakdown", action="store_true", help="also time the engine's parts (extra round)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="append the results here (one JSON line per invocation)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    base = {"rounds": args.rounds, "epochs": args.epochs, "batch_size": args.batch_size, "img_size": args.img_size,
            "lr": args.lr, "train_size": args.train_size, "device": args.device, "progress": not args.no_progress,
            "breakdown": args.breakdown}
    configs = [(tree, p, t, k) for tree in args.trees.split(",") for p in args.policies.split(",")
               for t in args.threads.split(",") for k in args.kinds.split(",")]
    env_info = {"processor": torch.cuda.get_device_name() if args.device.startswith("cuda") else
                platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                "python": platform.python_version(), "load_avg_start": os.getloadavg(), **base,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(env_info), flush=True)
    samples: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        shift = rep % len(configs)
        for tree, policy, threads, kind in configs[shift:] + configs[:shift]:  # rotate: none always first
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            for item in policy.split("+"):
                if "=" in item:
                    env[item.split("=")[0]] = item.split("=", 1)[1]
                elif item != "unset":
                    env["OMP_WAIT_POLICY"] = item
            if tree:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")]))
            job = {**base, "threads": threads, "kind": kind, "policy": policy, "tree": tree or "installed"}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.stderr.write(p.stderr)
                raise SystemExit(f"child {tree}/{policy}/{threads}/{kind} failed ({p.returncode})")
            s = json.loads(p.stdout.strip().splitlines()[-1])
            samples.append(s)
            walls = "  ".join(f"{k[:-5]} {v:.2f}" for r in s["rounds"] for k, v in r.items() if k.endswith("_wall"))
            print(f"repeat {rep} {tree or 'installed'} {policy:7s} threads {threads:7s} {kind:8s}: {walls}", flush=True)
    rows = summarise(samples, args.epochs)
    report(rows)
    env_info["load_avg_end"] = os.getloadavg()
    print(f"\nload average at start {env_info['load_avg_start']}, at end {env_info['load_avg_end']}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"env": env_info, "summary": rows, "samples": samples}) + "\n")


if __name__ == "__main__":
    main()
