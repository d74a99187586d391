"""Classic CNN zoo stages trained as populations, written into the same model folders as any run.

`generate` hands the runs of a CNN stage to :func:`train_stage`. Runs the population engine can
reproduce exactly (:func:`~vitzoo.train.population_adapter.unsupported` is empty) are grouped by
:func:`~vitzoo.train.population_adapter.split_runs` (same architecture shape, data, duration,
schedule) and each group is trained by :func:`~vitzoo.train.population.train_population`, which
vectorises where that is faster and falls back to one-by-one where it is not; any other run (say a
Lion optimizer axis) goes through the per-run loop. Each epoch's states go through the run's own
:class:`~vitzoo.zoo.writer.RunWriter`, so a CNN zoo is indistinguishable on disk from one trained
run by run, and loads with ``vitzoo.load`` like a ViT zoo.

Models are committed as soon as their last epoch is written, and each sub-population snapshots its
training state after every epoch (:mod:`vitzoo.train.population_state`), so an interrupted group
continues after its last finished epoch; the dropout masks of a resumed group equal an uninterrupted
run's when the same models resume together (the normal case).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.plan import RunSpec
from vitzoo.train import seeds
from vitzoo.train.build import build_cnn_run
from vitzoo.train.checkpoint import finish_run
from vitzoo.train.context import RunContext
from vitzoo.train.engine import train_run
from vitzoo.train.evaluate import TRAIN_EVAL_CAP
from vitzoo.train.population import population_switch, train_population
from vitzoo.train.population_adapter import engine_kwargs, member_from_run, split_runs, unsupported
from vitzoo.train.population_state import SnapshotStore
from vitzoo.zoo.writer import RunWriter

#: ``VITZOO_POPULATION`` → the engine's mode (``on`` also vectorises ResNet-18 and groups of any size).
ENGINE_MODES = {"auto": "auto", "on": "population", "off": "sequential"}


def train_stage(runs: list[RunSpec], ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Train a CNN stage's runs (this process's shard); yields each finished run's run.json content."""
    engine = [r for r in runs if not unsupported(r)]
    for group in split_runs(engine):
        yield from train_group(group, ctx)
    for spec in runs:
        if unsupported(spec):
            yield train_run(spec, ctx)


def train_group(runs: list[RunSpec], ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Train the unfinished runs of one population group; yields each run.json content as that model
    is finished.

    Each model is finished (``finish_run``) as soon as its last epoch is written, and the group's
    training state is snapshotted after every epoch in ``<zoo>/.partial/populations/``, so an
    interrupted group continues after its last finished epoch on the next ``generate``. The engine
    runs in a worker thread so that finished models reach the caller (progress, index refresh) while
    the rest of the group trains: a group of ResNet-18s trained one by one lasts days.
    """
    pending = [r for r in runs if not RunWriter(ctx.zoo_root, r.run_id).is_finished()]
    if not pending:
        return
    cfg = pending[0].config
    model = cfg.model
    assert model is not None
    data = ctx.cache.splits(cfg.data)
    pp = preprocessing_for(cfg.data, model.resolved_img_size)
    train_x, train_y = ctx.cache.eval_tensors(cfg.data, "train", pp)
    evals = {"val": ctx.cache.eval_tensors(cfg.data, "val", pp)}
    if data.test is not None:
        evals["test"] = ctx.cache.eval_tensors(cfg.data, "test", pp)
    # The train-set metrics are the clean (eval-mode) ones, like the per-run loop, capped like it at 10k.
    evals["train"] = (train_x[:TRAIN_EVAL_CAP], train_y[:TRAIN_EVAL_CAP])
    store = SnapshotStore(ctx.zoo_root / ".partial" / "populations")
    saved = set(cfg.saved_epochs())
    writers = [RunWriter(ctx.zoo_root, r.run_id) for r in pending]
    histories: list[list[dict[str, Any]]] = [[] for _ in pending]
    last_good: list[tuple[int, dict[str, torch.Tensor] | None]] = [(0, None) for _ in pending]
    diverged = [False] * len(pending)
    for w in writers:
        w.discard_temp_files()
        if store.epoch_of(w.run_id) is not None:
            try:  # scratch is not fsync'd: after an OS crash a model's files may be truncated
                w.check_partial()
            except Exception as e:  # noqa: BLE001 - any unreadable scratch file: that model starts again
                ctx.log(f"{w.run_id}: unreadable partial state ({type(e).__name__}); restarting from epoch 0")
                store.forget(w.run_id)
        if store.epoch_of(w.run_id) is None:  # starts at epoch 0: drop what an attempt left before its 1st snapshot
            w.reset()
    for cohort in store.cohorts([r.run_id for r in pending]):
        snap = store.load([pending[i].run_id for i in cohort])
        ctx.log(f"{len(cohort)} models of {pending[cohort[0]].run_id}'s population: resuming after epoch {snap.epoch}")
        for j, i in enumerate(cohort):
            # Rows the interrupted attempt wrote after its snapshot are dropped (that epoch is trained again).
            histories[i] = [h for h in writers[i].history() if h["epoch"] <= snap.epoch]
            # A diverged model's history stops at its last good epoch, which was saved when it diverged.
            diverged[i] = not bool(snap.tensors["alive"][j])
            unsaved = not diverged[i] and snap.epoch not in saved
            last_good[i] = (histories[i][-1]["epoch"], snap.row_state(j) if unsaved else None)
    built = [build_cnn_run(spec, data.num_classes, data.label_names) for spec in pending]
    finished: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()
    clock = [time.time()]

    def on_epoch(epoch: int, states: list[dict[str, torch.Tensor]], metrics: list[dict[str, Any]]) -> None:
        if stop.is_set():  # the caller went away (an exception, Ctrl-C): end the worker at an epoch boundary
            raise KeyboardInterrupt("population group abandoned by its caller")
        for state, met in zip(states, metrics):
            i = met["index"]
            if not diverged[i] and met.get("status") == "diverged":
                diverged[i] = True
                good_epoch, unsaved = last_good[i]
                if unsaved is not None:  # on disk now: a resumed run finds its last good state there
                    writers[i].save_epoch(good_epoch, unsaved)
                    last_good[i] = (good_epoch, None)
            if not diverged[i]:
                histories[i].append({"epoch": epoch, **{f"{s}_{k}": met.get(f"{s}_{k}") for s in ("train", "val", "test")
                                                        for k in ("loss", "acc")},
                                     "lr": met["lr"], "objective_loss": met.get("running_loss")})
                cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
                if epoch in saved:
                    writers[i].save_epoch(epoch, cpu)
                last_good[i] = (epoch, None if epoch in saved else cpu)
                writers[i].save_history(histories[i])
        if epoch == cfg.epochs:  # these models are done: commit them now, not at the end of the group
            done = [met["index"] for met in metrics]
            wall = (time.time() - clock[0]) / len(done)  # the sub-population's time, shared equally
            clock[0] = time.time()
            for i in done:
                finished.put(finish_run(pending[i], ctx, writers[i], built[i], dataset=data.name,
                                        last_good=last_good[i], status="diverged" if diverged[i] else "done",
                                        wall_s=wall, precision="float32"))

    steps_per_epoch = seeds.steps_per_epoch(len(train_y), cfg.batch_size)

    def work() -> None:
        try:
            if ctx.device.type == "cuda":  # the current CUDA device is per thread
                torch.cuda.set_device(ctx.device)
            train_population(members=[member_from_run(r) for r in pending], num_classes=data.num_classes,
                             train_x=train_x, train_y=train_y, evals=evals, device=ctx.device, on_epoch=on_epoch,
                             checkpoints=store, stop_after_epoch=ctx.stop_after_epoch,
                             mode=ENGINE_MODES[population_switch()], **engine_kwargs(pending[0], steps_per_epoch))
            store.discard([r.run_id for r in pending])
            finished.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            finished.put(e)

    worker = threading.Thread(target=work, name="vitzoo-population", daemon=True)
    worker.start()
    try:
        while (item := finished.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


_DONE = object()
