"""Classic CNN zoo stages trained as populations, written into the same model folders as any run.

`generate` hands the runs of a CNN stage to :func:`train_stage`. Runs the population engine can
reproduce exactly (:func:`~vitzoo.train.population_adapter.unsupported` is empty) are grouped by
:func:`~vitzoo.train.population_adapter.split_runs` (same architecture shape, data, duration,
schedule) and each group is trained by :func:`~vitzoo.train.population.train_population`, which
vectorises where that is faster and falls back to one-by-one where it is not; any other run (say a
Lion optimizer axis) goes through the per-run loop. Each epoch's states go through the run's own
:class:`~vitzoo.zoo.writer.RunWriter`, so a CNN zoo is indistinguishable on disk from one trained
run by run, and loads with ``vitzoo.load`` like a ViT zoo.

Resume granularity is the group: a group interrupted mid-way is retrained from epoch 0 on the next
``generate`` (its finished members are skipped). Groups are minutes long on a GPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.plan import RunSpec
from vitzoo.train.loop import RunContext, build_cnn_run, finish_run, train_run
from vitzoo.train.population import train_population
from vitzoo.train.population_adapter import engine_kwargs, member_from_run, split_runs, unsupported
from vitzoo.zoo.writer import RunWriter


def train_stage(runs: list[RunSpec], ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Train a CNN stage's runs (this process's shard); yields each finished run's run.json content."""
    engine = [r for r in runs if not unsupported(r)]
    for group in split_runs(engine):
        yield from train_group(group, ctx)
    for spec in runs:
        if unsupported(spec):
            yield train_run(spec, ctx)


def train_group(runs: list[RunSpec], ctx: RunContext) -> list[dict[str, Any]]:
    """Train the unfinished runs of one population group; returns their run.json contents."""
    pending = [r for r in runs if not RunWriter(ctx.zoo_root, r.run_id).is_finished()]
    if not pending:
        return []
    cfg = pending[0].config
    model = cfg.model
    assert model is not None
    t0 = time.time()
    data = ctx.cache.splits(cfg.data)
    pp = preprocessing_for(cfg.data, model.resolved_img_size)
    train_x, train_y = ctx.cache.eval_tensors(cfg.data, "train", pp)
    evals = {"val": ctx.cache.eval_tensors(cfg.data, "val", pp)}
    if data.test is not None:
        evals["test"] = ctx.cache.eval_tensors(cfg.data, "test", pp)
    # The train-set metrics are the clean (eval-mode) ones, like the per-run loop, capped like it at 10k.
    evals["train"] = (train_x[:10_000], train_y[:10_000])
    writers = [RunWriter(ctx.zoo_root, r.run_id) for r in pending]
    for w in writers:  # a group restarts from epoch 0: drop what an interrupted attempt left
        w.reset()
        w.discard_temp_files()
    saved = set(cfg.saved_epochs())
    histories: list[list[dict[str, Any]]] = [[] for _ in pending]
    last_good: list[tuple[int, dict[str, torch.Tensor] | None]] = [(0, None) for _ in pending]
    diverged = [False] * len(pending)

    def on_epoch(epoch: int, states: list[dict[str, torch.Tensor]], metrics: list[dict[str, Any]]) -> None:
        for state, met in zip(states, metrics):
            i = met["index"]
            if diverged[i]:
                continue
            if met.get("status") == "diverged":
                diverged[i] = True
                continue
            row = {"epoch": epoch, **{f"{s}_{k}": met.get(f"{s}_{k}") for s in ("train", "val", "test")
                                      for k in ("loss", "acc")},
                   "objective_loss": met.get("running_loss")}
            histories[i].append(row)
            cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            if epoch in saved:
                writers[i].save_epoch(epoch, cpu)
                last_good[i] = (epoch, None)
            else:
                last_good[i] = (epoch, cpu)
            writers[i].save_history(histories[i])

    steps_per_epoch = math.ceil(len(train_y) / cfg.batch_size)  # the engine keeps the last, smaller batch
    train_population(members=[member_from_run(r) for r in pending], num_classes=data.num_classes, train_x=train_x,
                     train_y=train_y, evals=evals, device=ctx.device, on_epoch=on_epoch,
                     **engine_kwargs(pending[0], steps_per_epoch))
    wall = (time.time() - t0) / len(pending)  # the group's time, shared equally: what one model cost
    infos = []
    for i, spec in enumerate(pending):
        built = build_cnn_run(spec, data.num_classes, data.label_names)
        infos.append(finish_run(spec, ctx, writers[i], built, dataset=data.name, last_good=last_good[i],
                                status="diverged" if diverged[i] else "done", wall_s=wall, precision="float32"))
    return infos
