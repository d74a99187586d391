"""Benchmark: `vitzoo generate` before and after the one-engine work (issue 8), side by side in one run.

Two detached git worktrees (``/tmp/ba-before`` at ``--before``, ``/tmp/ba-after`` at ``--after``; reused
when they already exist at the right commit) each run the same micro recipes through
``python -m vitzoo generate RECIPE --out TMP --no-progress`` in a subprocess whose ``cwd`` and
``PYTHONPATH`` are that worktree, so each side imports its own code (checked before timing: ``vitzoo.__file__``
and the commit the zoo's ``zoo.json`` records). The two sides alternate within every repeat (which one goes
first alternates too), so drift of a shared machine hits both alike.

Measured per generate: the wall seconds of the whole subprocess (interpreter start, imports, data, training,
writers, index, cards), and, read back from the zoo, each stage's sum of ``run.json`` ``wall_time_s``
(a population member's ``wall_time_s`` is its share of its population's time, so the sum is the stage's
training time either way). For the ViT pre-training case also steps/s = epochs x steps per epoch / the run's
``wall_time_s`` (the training-set size is a multiple of the batch, so both sides' last-batch rules give the
same step count; the run time includes epoch 0 and the per-epoch evaluations).

Cases (recipes under tests/ are read from the AFTER tree and copied, so both sides get the same YAML):

- ``cnn-pop`` / ``cnn-1x1``: tests/classic_micro.yaml (16 CNN-s on digits), VITZOO_POPULATION=on / off
  (one by one only the first 4 runs, ``--max-runs 4``: compare the per-run figures);
- ``twins-pop`` / ``twins-1x1``: tests/sparsify_micro.yaml (4 CNN-s + 4 variational-dropout twins), on / off
  (one by one ``--max-runs 2``: 2 CNN-s and 2 twins);
- ``vit-ft-pop``: one micro-ViT pre-training run, then 4 linear-probe and 4 full fine-tunes of it on the
  built-in shapes (seeds 0..3), VITZOO_POPULATION=on;
- ``vit-pretrain``: one micro-ViT supervised pre-training run on digits (1,024 images, batch 32, 3 epochs);
- ``resnet18-1x1``: one ResNet-18 on the built-in shapes (3x32x32, 256 train images = 4 steps of batch 64,
  32 val / 32 test, 1 epoch, the CIFAR recipe's SGD + one-cycle + crop/flip), VITZOO_POPULATION=off.

Per-run figures are means over a stage's runs. Speed-ups are BEFORE / AFTER time (> 1: AFTER faster), the
median and range over the repeats' pairs.

    python benchmarks/before_after.py                         # all cases, 3 repeats, threads = all cores
    python benchmarks/before_after.py --threads 1 --cases cnn-pop,cnn-1x1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BEFORE = "a3d3060"  # the last commit before the engine work (issue 8)
TREES = {"before": Path("/tmp/ba-before"), "after": Path("/tmp/ba-after")}

VIT_MODEL = {"variant": "micro", "img_size": 16}
PRETRAIN = {  # tests/tiny.yaml's pre-training stage, supervised only, more data and epochs
    "data": {"source": "builtin:digits", "max_train_samples": 1024, "max_eval_samples": 128},
    "model": VIT_MODEL, "optimizer": {"name": "adamw", "lr": 3e-3}, "epochs": 3, "batch_size": 32,
    "seeds": {"init": [0]},
}
RECIPES: dict[str, dict[str, Any]] = {
    "vit_pretrain": {"name": "ba-vit-pretrain", "seed": 0, "stages": {"pretrain": PRETRAIN}},
    "vit_finetune": {"name": "ba-vit-finetune", "seed": 0, "stages": {
        "pretrain": {**PRETRAIN, "data": {"source": "builtin:digits", "max_train_samples": 256,
                                          "max_eval_samples": 64}, "epochs": 1},
        "finetune": {
            "finetune": {"parent_stage": "pretrain", "head": "linear"},
            "data": {"source": "builtin:shapes", "max_train_samples": 512, "max_eval_samples": 128},
            "optimizer": {"name": "adamw", "lr": 3e-3}, "epochs": 2, "batch_size": 32,
            "grid": {"mode": ["linear", "full"]}, "seeds": {"init": [0, 1, 2, 3]},
        }}},
    "resnet18": {"name": "ba-resnet18", "seed": 0, "stages": {"train": {
        "data": {"source": "builtin:shapes", "channels": 3, "max_train_samples": 256, "max_eval_samples": 32},
        "model": {"variant": "resnet18", "init": "default"},
        "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "momentum": 0.9, "grad_clip": None},
        "schedule": {"name": "onecycle"}, "aug": {"level": "none", "hflip": 0.5, "crop_padding": 4},
        "precision": "no", "epochs": 1, "batch_size": 64, "eval_batch_size": 256, "checkpoint_every": 1,
        "seeds": {"init": [1], "data": "same"}}}},
}
CASES: dict[str, tuple[str, str | None, tuple[str, ...]]] = {  # name -> (recipe, VITZOO_POPULATION, extra args)
    "cnn-pop": ("tests/classic_micro.yaml", "on", ()),
    "cnn-1x1": ("tests/classic_micro.yaml", "off", ("--max-runs", "4")),
    "twins-pop": ("tests/sparsify_micro.yaml", "on", ()),
    "twins-1x1": ("tests/sparsify_micro.yaml", "off", ("--max-runs", "2")),
    "vit-ft-pop": ("vit_finetune", "on", ()),
    "vit-pretrain": ("vit_pretrain", None, ()),
    "resnet18-1x1": ("resnet18", "off", ()),
}


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def ensure_worktree(path: Path, commit: str) -> bool:
    """A detached worktree of `commit` at `path`; True if this call created it."""
    if path.exists():
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        if head != commit:
            sys.exit(f"{path} exists at {head or '(not a worktree)'}, not {commit}: remove it first")
        return False
    git("worktree", "add", "--detach", str(path), commit)
    return True


def side_env(tree: Path, threads: int, population: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VITZOO_POPULATION", "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if population is not None:
        env["VITZOO_POPULATION"] = population
    return env


def check_imports(tree: Path, threads: int) -> str:
    out = subprocess.run([sys.executable, "-c", "import vitzoo; print(vitzoo.__file__)"], cwd=tree,
                         env=side_env(tree, threads, None), check=True, capture_output=True, text=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"{tree}: `import vitzoo` found {out}, not the worktree's copy")
    return out


def recipe_file(name: str, folder: Path) -> Path:
    """The same YAML for both sides: a tests/ recipe from the AFTER tree, or one of RECIPES."""
    dst = folder / (Path(name).name if name.endswith(".yaml") else f"{name}.yaml")
    if not dst.exists():
        if name.endswith(".yaml"):
            shutil.copyfile(TREES["after"] / name, dst)
        else:
            dst.write_text(yaml.safe_dump(RECIPES[name], sort_keys=False))
    return dst


def read_zoo(out: Path) -> dict[str, Any]:
    zoo = json.loads((out / "zoo.json").read_text())
    stages: dict[str, dict[str, Any]] = {}
    for f in sorted((out / "models").glob("*/run.json")):
        run = json.loads(f.read_text())
        key = run["stage"]
        mode = (run.get("config", {}).get("finetune") or {}).get("mode")
        if mode:
            key = f"{key}/{mode}"
        s = stages.setdefault(key, {"runs": 0, "run_wall_s": 0.0, "status": {}})
        s["runs"] += 1
        s["run_wall_s"] += float(run.get("wall_time_s") or 0.0)
        s["status"][run["status"]] = s["status"].get(run["status"], 0) + 1
        s.setdefault("epochs", run["config"]["epochs"])
        s.setdefault("batch_size", run["config"]["batch_size"])
        s.setdefault("max_train_samples", run["config"]["data"].get("max_train_samples"))
    return {"zoo_wall_s": zoo.get("wall_time_s"), "status": zoo.get("status"),
            "commit": (zoo.get("provenance", {}).get("git") or {}).get("commit"),
            "torch": zoo.get("provenance", {}).get("packages", {}).get("torch"), "stages": stages}


def run_case(side: str, case: str, folder: Path, threads: int, commits: dict[str, str]) -> dict[str, Any]:
    recipe, population, extra = CASES[case]
    tree = TREES[side]
    out = Path(tempfile.mkdtemp(prefix=f"{case}-{side}-", dir=folder))
    shutil.rmtree(out)
    cmd = [sys.executable, "-m", "vitzoo", "generate", str(recipe_file(recipe, folder)), "--out", str(out),
           "--no-progress", *extra]
    ru0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(cmd, cwd=tree, env=side_env(tree, threads, population), capture_output=True, text=True)
    wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if p.returncode != 0:
        sys.exit(f"{side} {case}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = {"side": side, "case": case, "wall_s": wall, "cpu_s": cpu, **read_zoo(out)}
    if res["commit"] and res["commit"] != commits[side]:
        sys.exit(f"{side} {case}: the zoo records commit {res['commit']}, expected {commits[side]}")
    if case == "vit-pretrain":
        s = res["stages"]["pretrain"]
        assert s["max_train_samples"] % s["batch_size"] == 0
        steps = s["epochs"] * s["max_train_samples"] // s["batch_size"]
        res["steps"], res["steps_per_s"] = steps, steps / s["run_wall_s"]
    shutil.rmtree(out, ignore_errors=True)
    return res


def rng(vals: list[float], fmt: str = "{:.1f}") -> str:
    lo, hi = min(vals), max(vals)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}–{fmt.format(hi)}"


def ratio(b: list[float], a: list[float], higher_better: bool = False) -> str:
    """Speed-up of AFTER over BEFORE (> 1: after faster): the median and range over the repeats' pairs (the two
    sides of one repeat ran back to back). Times: before / after; rates (higher_better): after / before."""
    pairs = sorted((y / x if higher_better else x / y) for x, y in zip(b, a))
    med = pairs[len(pairs) // 2] if len(pairs) % 2 else 0.5 * (pairs[len(pairs) // 2 - 1] + pairs[len(pairs) // 2])
    return f"{med:.2f}x ({pairs[0]:.2f}–{pairs[-1]:.2f})"


def report(results: list[dict[str, Any]], cases: list[str]) -> str:
    lines = ["| case | measure | before | after | speed-up after/before, median (range) of paired repeats |",
             "|---|---|---:|---:|---:|"]
    for case in cases:
        rs = {side: [r for r in results if r["case"] == case and r["side"] == side] for side in TREES}
        b, a = rs["before"], rs["after"]
        for key, what in (("wall_s", "generate wall s"), ("cpu_s", "generate CPU s (user+sys)")):
            vb, va = [r[key] for r in b], [r[key] for r in a]
            lines.append(f"| {case} | {what} | {rng(vb)} | {rng(va)} | {ratio(vb, va)} |")
        for st in sorted(set(b[0]["stages"]) | set(a[0]["stages"])):
            n = a[0]["stages"].get(st, b[0]["stages"].get(st, {})).get("runs")
            vb = [r["stages"].get(st, {}).get("run_wall_s", float("nan")) / n for r in b]
            va = [r["stages"].get(st, {}).get("run_wall_s", float("nan")) / n for r in a]
            lines.append(f"| {case} | {st}: run wall_time_s per run ({n} run{'s' if n != 1 else ''}) | {rng(vb, '{:.2f}')} | "
                         f"{rng(va, '{:.2f}')} | {ratio(vb, va)} |")
        if case == "vit-pretrain":
            sb, sa = [r["steps_per_s"] for r in b], [r["steps_per_s"] for r in a]
            lines.append(f"| {case} | steps/s ({a[0]['steps']} steps) | {rng(sb)} | {rng(sa)} | "
                         f"{ratio(sb, sa, higher_better=True)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default=BEFORE, help="commit of the BEFORE side (default: %(default)s)")
    ap.add_argument("--after", default="HEAD", help="commit of the AFTER side (default: main's HEAD)")
    ap.add_argument("--repeats", type=int, default=3, help="generate runs per case and side (default: %(default)s)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="OMP_NUM_THREADS / MKL_NUM_THREADS of every generate (default: all cores, %(default)s)")
    ap.add_argument("--json", type=Path, help="also write every measurement here")
    ap.add_argument("--keep-worktrees", action="store_true", help="leave the worktrees this run created")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(unknown))}")
    commits = {"before": git("rev-parse", args.before), "after": git("rev-parse", args.after)}
    created = [TREES[s] for s in TREES if ensure_worktree(TREES[s], commits[s])]
    try:
        for side in TREES:
            print(f"{side}: {commits[side]} imports {check_imports(TREES[side], args.threads)}", flush=True)
        results: list[dict[str, Any]] = []
        t_all = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="before-after-") as tmp:
            folder = Path(tmp)
            for rep in range(args.repeats):
                for i, case in enumerate(cases):
                    order = ("before", "after") if (rep + i) % 2 == 0 else ("after", "before")
                    for side in order:
                        r = run_case(side, case, folder, args.threads, commits)
                        r["repeat"] = rep
                        results.append(r)
                        extra = f", {r['steps_per_s']:.1f} steps/s" if "steps_per_s" in r else ""
                        print(f"repeat {rep} {case:13s} {side:6s} {r['wall_s']:6.1f} s  " + ", ".join(
                            f"{k} {v['run_wall_s']:.2f} s" for k, v in r["stages"].items()) + extra, flush=True)
        total = time.perf_counter() - t_all
        print(f"\nbefore {commits['before']}\nafter  {commits['after']}\n{platform.platform()}, "
              f"{os.cpu_count()} CPUs, threads {args.threads}, torch {results[0]['torch']}, {args.repeats} repeats, "
              f"{total:.0f} s in all\n")
        print(report(results, cases))
        if args.json:
            args.json.write_text(json.dumps({"commits": commits, "threads": args.threads, "repeats": args.repeats,
                                             "results": results}, indent=1))
    finally:
        if not args.keep_worktrees:
            for path in created:
                git("worktree", "remove", "--force", str(path))


if __name__ == "__main__":
    main()
