"""Generate a zoo: plan, shard runs over processes, train, index. Resumable and restartable.

Under ``accelerate launch`` with N processes every process expands the same plan (ids are a pure
function of the recipe) and trains the runs ``i, i+N, i+2N, ...`` of each stage on its own device:
independent models need no gradient sync. Stages are separated by a barrier (fine-tuning needs
its parents); only process 0 writes the zoo-level files (``recipe.yaml``, ``zoo.json``,
``index.parquet``). Running ``generate`` again on the same folder skips finished models and
continues unfinished ones; a different recipe under an existing zoo is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from vitzoo.errors import VitzooError
from vitzoo.plan import Plan, canonical_json, expand, shard
from vitzoo.recipe import Recipe, RecipeError, load_recipe
from vitzoo.zoo.index import write_index
from vitzoo.zoo.io import FORMAT_VERSION, discard_temp_files, write_json, write_text
from vitzoo.zoo.provenance import provenance


class ZooConflictError(VitzooError, RuntimeError):
    """The output folder holds a zoo made from a different recipe (or is not a zoo)."""


def recipe_digest(recipe: Recipe) -> str:
    from vitzoo.recipe import identity

    d = recipe.to_dict()
    d["stages"] = {name: identity(st) for name, st in d["stages"].items()}
    return hashlib.sha256(canonical_json(d).encode()).hexdigest()


def check_target(out: Path, recipe: Recipe) -> bool:
    """Return True if ``out`` already holds this recipe's zoo; raise if it holds another."""
    meta = out / "zoo.json"
    if not out.exists():
        return False
    if not meta.is_file():
        if any(out.iterdir()):
            raise ZooConflictError(f"{out}: exists, is not empty and is not a zoo; choose another --out")
        return False
    old = json.loads(meta.read_text())
    if old.get("recipe_sha256") != recipe_digest(recipe):
        raise ZooConflictError(
            f"{out}: this zoo was generated from a different recipe ({old.get('name')!r}, recipe sha256 "
            f"{str(old.get('recipe_sha256'))[:12]}…); the recipe given resolves to {recipe_digest(recipe)[:12]}…. "
            f"Generate into a new folder, or restore the recipe (see {out / 'recipe.yaml'})."
        )
    return True


def _print(msg: str) -> None:
    """One line per finished model: above the progress bars on a terminal, through the ``vitzoo`` logger
    otherwise (the CLI's handler, the zoo's per-process log file)."""
    from vitzoo import log

    log.write(msg)


def generate(recipe_path: str | Path, out: str | Path, *, progress: bool = True, max_runs: int | None = None,
             log=_print, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Generate (or resume) the zoo of ``recipe_path`` into ``out``. Returns zoo.json's content."""
    import torch
    from accelerate import PartialState

    from vitzoo.data.pipeline import DataCache

    recipe = load_recipe(recipe_path)
    plan = expand(recipe)  # every recipe error surfaces here, before any training
    out = Path(out)
    # cpu=True without CUDA: processes started by `accelerate launch --multi_gpu` (torchrun) on a CPU-only
    # machine then join one gloo group (accelerate's MULTI_CPU) instead of each running alone.
    # The long timeout: a stage can last days, and barriers must not time out meanwhile.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    resuming = check_target(out, recipe)
    t0 = time.time()
    cache = DataCache()
    _preflight(plan, cache, recipe)  # data errors (a wrong column, a missing split) before anything is written
    state.wait_for_everyone()  # every process has checked the folder before process 0 writes into it
    created = not out.exists()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        discard_temp_files(out)  # a previous process killed while writing index.parquet or zoo.json
        if not resuming:
            _write_recipe(out, recipe)
            write_json(out / "zoo.json", _zoo_json(recipe, plan, state.num_processes, status="generating"))
    state.wait_for_everyone()
    from vitzoo import log as vlog

    # Every process keeps its own log of the generation in the zoo (not pushed), whatever the console shows.
    handler = vlog.add_log_file(out / ".partial" / "logs" / f"process-{state.process_index}.log", level=logging.INFO)
    vlog.logger.info("%s %s into %s: %d runs in %d stages, process %d of %d", "resuming" if resuming else "generating",
                     recipe.name, out, len(plan.runs), len(recipe.stages), state.process_index + 1,
                     state.num_processes)
    try:
        result = _train_all(recipe, plan, out, state, cache, progress, max_runs, log, stop_after_epoch, t0)
    except Exception:
        # A zoo this call created and in which nothing finished is removed: no half-written zoo is left
        # behind, and a corrected recipe is not refused as "different" next time.
        if created and state.is_main_process and not any(out.glob("models/*/run.json")):
            vlog.logger.removeHandler(handler)
            handler.close()
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        vlog.logger.removeHandler(handler)
        handler.close()
    # The logs are kept while the zoo is unfinished (an interrupted or partial generation); a complete
    # zoo has no .partial folder left.
    if json.loads((out / "zoo.json").read_text()).get("status") == "complete":
        Path(handler.baseFilename).unlink(missing_ok=True)
        state.wait_for_everyone()
        if state.is_main_process:
            for d in (out / ".partial" / "logs", out / ".partial"):
                with contextlib.suppress(OSError):
                    d.rmdir()
    return result


def _preflight(plan: Plan, cache, recipe: Recipe) -> None:
    """Open every distinct data source of the plan (cached for training) and check it fits the runs."""
    from vitzoo.data.sources import DataError
    from vitzoo.train.tasks import task_module

    seen = set()
    for r in plan.runs:
        key = canonical_json([r.config.objective.name, dataclasses.asdict(r.config.data)])
        if key not in seen:
            seen.add(key)
            task = task_module(r.config.objective.name)
            try:
                if task is not None:  # text, collocation points: the task reads (and checks) its own data
                    task.preflight(r.config, cache)
                else:
                    cache.splits(r.config.data)
            except DataError as e:
                raise DataError(f"{recipe.source}: stages.{r.stage}.{e}") from None


#: Process 0 rebuilds index.parquet at most this often while a stage runs (and at each stage's end).
INDEX_REFRESH_S = 60.0


def _train_stage(stage, runs, ctx) -> Iterator[dict[str, Any]]:
    """This process's runs of one stage, trained by the engine that fits; yields each run.json."""
    from vitzoo.train.engine import train_run
    from vitzoo.train.tasks import task_module

    if task_module(stage.objective.name) is not None:  # GPT-2, PINN: one by one (no stack for them yet)
        return (train_run(spec, ctx) for spec in runs)
    if stage.sparsify is not None:  # sparsified twins: CNN-s/CNN-m twins as populations, the rest one by one
        from vitzoo.train import routing
        from vitzoo.train.sparsify_population import train_sparsify_stage

        switch = routing.switch()
        return train_sparsify_stage(runs, ctx, mode="sequential" if switch == "off" else "auto",
                                    min_population=1 if switch == "on" else None)
    if stage.model is not None and not stage.model.is_vit:  # classic CNN stages: populations
        from vitzoo.train.classic import train_stage

        return train_stage(runs, ctx)
    if stage.finetune is not None:  # ViT fine-tunes (parents are ViTs): populations where they pay, else per run
        from vitzoo.train.vit_population import train_stage as train_finetune_stage

        return train_finetune_stage(runs, ctx)
    return (train_run(spec, ctx) for spec in runs)


def _train_all(recipe, plan, out, state, cache, progress, max_runs, log, stop_after_epoch, t0) -> dict[str, Any]:
    import torch

    from vitzoo.train.context import RunContext

    ctx = RunContext(zoo_root=out, device=state.device, cache=cache, progress=progress and state.is_main_process,
                     hardware=provenance(state.num_processes)["hardware"], stop_after_epoch=stop_after_epoch,
                     log=lambda m: log(f"[{state.process_index}] {m}" if state.num_processes > 1 else m))
    if state.device.type == "cpu" and state.num_processes > 1:
        # CPU processes share the cores; only then, since torch.set_num_threads (even to the same count)
        # also turns MKL's dynamic threading off: small models 20-45% slower (benchmarks/RESULTS.md)
        torch.set_num_threads(max(1, torch.get_num_threads() // state.num_processes))
    for stage in recipe.stages:
        runs = plan.stage_runs(stage.name)
        if max_runs is not None:
            runs = runs[:max_runs]
        mine = shard(runs, state.process_index, state.num_processes)
        bar = _zoo_bar(ctx, len(mine), stage.name)
        indexed = time.time()
        for info in _train_stage(stage, mine, ctx):
            ctx.log(_summary(info))
            if bar is not None:
                bar.update(1)
            if state.is_main_process and time.time() - indexed > INDEX_REFRESH_S:
                write_index(out)  # `vitzoo info` / a partial `vitzoo push` see finished models during a stage
                indexed = time.time()
        if bar is not None:
            bar.close()
        state.wait_for_everyone()
        if state.is_main_process:
            write_index(out)
    result: dict[str, Any] = {}
    if state.is_main_process:
        df = write_index(out)
        meta = json.loads((out / "zoo.json").read_text())
        finals = df[df["final"]] if len(df) else df
        meta.update(
            status="complete" if len(finals) == len(plan.runs) else "partial",
            counts={s.name: int((finals["stage"] == s.name).sum()) if len(finals) else 0 for s in recipe.stages},
            planned=plan.counts(),
            diverged=int((finals["status"] == "diverged").sum()) if len(finals) else 0,
            wall_time_s=round(meta.get("wall_time_s", 0.0) + time.time() - t0, 1),
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        write_json(out / "zoo.json", meta)
        _render_cards(out)
        result = meta
    state.wait_for_everyone()
    return result


def _write_recipe(out: Path, recipe: Recipe) -> None:
    header = (f"# Resolved recipe of zoo {recipe.name!r}: presets expanded, exactly what was planned.\n"
              f"# Regenerate or resume with: vitzoo generate recipe.yaml --out <this folder>\n")
    write_text(out / "recipe.yaml", header + yaml.safe_dump(recipe.to_dict(), sort_keys=False))


def _zoo_json(recipe: Recipe, plan: Plan, num_processes: int, status: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "name": recipe.name, "description": recipe.description,
            "license": recipe.license, "recipe_sha256": recipe_digest(recipe), "status": status,
            "planned": plan.counts(), "provenance": provenance(num_processes)}


def _render_cards(out: Path) -> None:
    from vitzoo import cards

    # Per-model training-curve plots cost ~0.3 s each in matplotlib (5 min for 1,000 models): they are
    # drawn when the zoo is pushed (push re-renders every card); generate writes the cheap cards only.
    cards.render_zoo_cards(out, model_plots=False)


def _summary(info: dict[str, Any]) -> str:
    from vitzoo.cards import HEADLINE_METRICS

    h = info["history"][-1] if info.get("history") else {}
    # the stage's headline (perplexity, PINN error, accuracy): the first of cards.HEADLINE_METRICS it has
    col = next((c for c, _ in HEADLINE_METRICS if isinstance(h.get(c), (int, float))), "test_acc")
    value = h.get(col)
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else "n/a"
    return (f"{info['run_id']}: {info['status']} epoch {info['final_epoch']} {col} {shown} "
            f"({info.get('wall_time_s', 0):.1f}s)")


def _zoo_bar(ctx, total: int, stage: str):
    if not ctx.progress:
        return None
    from vitzoo import log

    return log.progress(total, f"zoo:{stage}", unit="model", position=0, dynamic_ncols=True)


__all__ = ["generate", "check_target", "ZooConflictError", "RecipeError"]
