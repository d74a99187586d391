"""Classic CNN zoo stages trained as populations, written into the same model folders as any run.

`generate` hands each population group (runs that share architecture, data, duration and batch
size: :func:`vitzoo.plan.populations`) of a CNN stage to :func:`train_group`. It puts the data on
the device once, maps every run to a :class:`~vitzoo.train.population.PopulationMember` (own seeds,
optimizer, lr, weight decay, momentum, activation, dropout, init), and trains them with
:func:`~vitzoo.train.population.train_population`, which vectorises where that is faster and falls
back to one-by-one where it is not. Each epoch's states go through the run's own
:class:`~vitzoo.zoo.writer.RunWriter`, so a CNN zoo is indistinguishable on disk from one trained
run by run, and loads with ``vitzoo.load`` like a ViT zoo.

Resume granularity is the group: a group interrupted mid-way is retrained from epoch 0 on the next
``generate`` (its finished members are skipped). Groups are minutes long on a GPU.
"""

from __future__ import annotations

import math
import shutil
import time
from typing import Any

import torch

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.models import cnn_model_args
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.loop import Built, RunContext, _schedule, finish_run
from vitzoo.train.population import PopulationMember, train_population
from vitzoo.zoo.writer import RunWriter

#: Our optimizer presets that the population engine implements (torch.optim.Adam / momentum SGD).
_ENGINE_OPTIMIZERS = {"adam": "adam", "sgd": "sgd"}


def population_ready(stage: StageConfig) -> bool:
    """True when a stage's runs can go through the population engine instead of the per-run loop."""
    m = stage.model
    return (m is not None and not m.is_vit and stage.parent is None and stage.objective.name == "supervised"
            and stage.optimizer.name in _ENGINE_OPTIMIZERS and not stage.aug.rand_augment and not stage.aug.re_prob
            and not stage.aug.mixup and not stage.aug.cutmix and not stage.aug.label_smoothing)


def member(spec: RunSpec) -> PopulationMember:
    c = spec.config
    o = c.optimizer.resolved()
    m = c.model
    assert m is not None
    return PopulationMember(init_seed=spec.init_seed, data_seed=spec.data_seed, optimizer=_ENGINE_OPTIMIZERS[c.optimizer.name],
                            lr=o["lr"], weight_decay=o["weight_decay"], momentum=o.get("momentum", 0.9),
                            activation=m.activation, dropout=m.dropout, init=m.init, grad_clip=c.optimizer.grad_clip)


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
        shutil.rmtree(w.partial, ignore_errors=True)
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

    lr_at = _schedule(cfg, math.ceil(len(train_y) / cfg.batch_size))
    augment = "crop_flip" if (cfg.aug.scale or cfg.aug.hflip) else None
    train_population(model.variant, cfg.data.channels, data.num_classes, [member(r) for r in pending], train_x,
                     train_y, evals=evals, epochs=cfg.epochs, batch_size=cfg.batch_size, device=ctx.device,
                     on_epoch=on_epoch, schedule=lambda step, total: lr_at(step), augment=augment)
    wall = (time.time() - t0) / len(pending)  # the group's time, shared equally: what one model cost
    infos = []
    for i, spec in enumerate(pending):
        epoch, unsaved = last_good[i]
        if unsaved is not None:
            writers[i].save_epoch(epoch, unsaved)
        args = cnn_model_args(cfg.data.channels, spec.config.model.activation, spec.config.model.dropout,
                              spec.config.model.init)
        from vitzoo.models.cnn import build_cnn

        net = build_cnn(model.variant, num_classes=data.num_classes, seed=spec.init_seed, **args)
        built = Built(net, lambda n=net: n.state_dict(), f"vitzoo/{model.variant}", args, data.num_classes, 0, pp,
                      data.label_names, "linear", None)
        infos.append(finish_run(spec, ctx, writers[i], built, dataset=data.name, final_epoch=epoch,
                                status="diverged" if diverged[i] else "done", wall_s=wall, precision="float32"))
    return infos
