"""The training engine: the epoch loop of a run trained alone, whatever its task.

A run is a function from its config to its folder. :func:`train_run` builds the run's parts
(:class:`ModuleRun`: network, optimizer, objective, feed, evaluator) and drives them through the one
loop: epoch 0 (the initialisation, evaluated and saved), then per epoch: seeding
(:func:`~vitzoo.train.seeds.seed_module_rngs`), the optimizer steps, evaluation, the divergence rule,
the history row (:func:`~vitzoo.train.checkpoint.history_row`), checkpoints and the resume point.

Determinism and resume: the data order is a function of ``(data_seed, epoch)``, every RNG is re-seeded
from ``(init_seed, data_seed, epoch)`` at the start of each epoch and the learning rate is a pure
function of the step, so a run resumed after any epoch continues exactly as if never stopped; the only
state saved is weights + optimizer.

Divergence, defined on outcomes: a run whose epoch had a non-finite loss (the loss sum stays on the
device, so no host sync per step; a non-finite loss poisons it) or whose evaluation loss is non-finite
ends as ``diverged`` with its last good epoch's state. The reference zoos contain diverged models: this
is data, not an error.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vitzoo.data.pipeline import train_loader
from vitzoo.plan import RunSpec
from vitzoo.train.build import amp_dtype, build_run, make_optimizer
from vitzoo.train.checkpoint import end_epoch, finish_run, history_row, restore
from vitzoo.train.context import Built, RunContext, progress_bar
from vitzoo.train.evaluate import evaluate
from vitzoo.train.feed import LoaderFeed, TensorFeed
from vitzoo.train.objectives import CrossEntropy, SimCLR
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import seed_module_rngs
from vitzoo.train.variational import VariationalDropout, prepare_twin
from vitzoo.zoo.writer import RunWriter


@dataclass
class ModuleRun:
    """The parts of one run trained alone: what :func:`train_run` drives."""

    spec: RunSpec
    built: Built
    optimizer: torch.optim.Optimizer
    objective: Any
    """``equal_batches``, ``start_epoch(epoch)``, ``loss(net, batch) -> (loss, n)``, ``columns(state, steps)``."""
    feed: Any
    """``steps`` and ``epoch(epoch) -> iterator of batches``."""
    evaluate: Callable[[], dict[str, Any]]
    epoch0: Callable[[], tuple[dict[str, Any], dict[str, torch.Tensor]]]
    """Epoch 0: ``(metrics, state)`` of the initialisation (a twin: its parent, evaluated unpruned)."""
    dataset: str
    amp: torch.dtype | None = None


def build_module_run(spec: RunSpec, ctx: RunContext, *, noise: bool = True) -> ModuleRun:
    """The parts of ``spec``: a sparsified twin, or a pre-training / classic / fine-tuning run."""
    if spec.config.sparsify is not None:
        return _twin_run(spec, ctx, noise)
    cfg = spec.config
    data = ctx.cache.splits(cfg.data)
    built = build_run(spec, ctx, data.num_classes, data.label_names)
    net = built.net.to(ctx.device)
    simclr = cfg.objective.name == "simclr"
    objective = (SimCLR(cfg.objective.temperature, ctx.device) if simclr
                 else CrossEntropy(cfg, data.num_classes, ctx.device))
    loader, sampler = train_loader(ctx.cache, cfg.data, built.pp, cfg.aug, cfg.batch_size, spec.data_seed,
                                   views=2 if simclr else 1, equal_batches=objective.equal_batches)

    def run_evaluate() -> dict[str, Any]:
        return evaluate(net, ctx, cfg, built.pp, simclr)

    return ModuleRun(spec, built, make_optimizer(net, cfg), objective, LoaderFeed(loader, sampler), run_evaluate,
                     lambda: (run_evaluate(), built.export()), data.name, amp_dtype(cfg.precision, ctx.device))


def _twin_run(spec: RunSpec, ctx: RunContext, noise: bool) -> ModuleRun:
    """A sparsified twin: its parent with variational dropout, the stage's tensors on the device."""
    cfg, sp = spec.config, spec.config.sparsify
    assert sp is not None
    twin = prepare_twin(spec, ctx, noise=noise)
    x, y = ctx.cache.eval_tensors(cfg.data, "train", twin.pp)
    objective = VariationalDropout(twin.modules, sp.kl_weight, cfg.epochs, len(y), twin.weight_keys, ctx.device)
    feed = TensorFeed(x.to(ctx.device), y.to(ctx.device), spec.data_seed, cfg.batch_size, objective.equal_batches)

    def run_evaluate() -> dict[str, Any]:
        return evaluate(twin.net, ctx, cfg, twin.pp)

    def epoch0() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The parent's state, unchanged, evaluated exactly as saved (no pruning mask)."""
        for m in twin.modules.values():
            m.vd_threshold = math.inf
        metrics = run_evaluate()
        for m in twin.modules.values():
            m.vd_threshold = float(sp.threshold)
        return metrics, {k: v.detach().to("cpu", copy=True) for k, v in twin.parent_state.items()}

    return ModuleRun(spec, twin.built, twin.optimizer, objective, feed, run_evaluate, epoch0, twin.data.name)


def train_run(spec: RunSpec, ctx: RunContext, *, noise: bool = True) -> dict[str, Any]:
    """Train ``spec`` into ``<zoo>/models/<run_id>``; returns its run.json content.

    ``noise=False`` (tests only) trains twins on the mean of the local reparameterisation.
    """
    writer = RunWriter(ctx.zoo_root, spec.run_id)
    if writer.is_finished():
        return json.loads((writer.folder / "run.json").read_text())
    writer.discard_temp_files()
    t_start = time.time()
    run = build_module_run(spec, ctx, noise=noise)
    cfg, net, optimizer, objective, feed = spec.config, run.built.net, run.optimizer, run.objective, run.feed
    steps = feed.steps
    if steps == 0:
        raise ValueError(f"{spec.run_id}: the training split is empty")
    lr_at = lr_schedule(cfg, steps)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=run.amp == torch.float16)
    saved = set(cfg.saved_epochs())

    restored = restore(ctx, writer, spec, net, optimizer)
    if restored is not None:
        start_epoch, history, elapsed = restored
        t_start -= elapsed
    else:  # epoch 0: the initialisation, evaluated and saved
        start_epoch = 0
        metrics, state0 = run.epoch0()
        history = [history_row(0, metrics, 0.0, None, **objective.columns(state0, 0))]
        writer.save_epoch(0, state0)
        writer.save_history(history)
        writer.save_resume(0, net.state_dict(), optimizer.state_dict(), {"elapsed_s": time.time() - t_start})
    last_good = (start_epoch, run.built.export() if start_epoch not in saved else None)

    status = "done"
    bar = progress_bar(ctx, cfg.epochs * steps, spec.run_id, start_epoch * steps)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        seed_module_rngs(spec.init_seed, spec.data_seed, epoch)
        objective.start_epoch(epoch)
        batches = feed.epoch(epoch)
        net.train()
        total, n = torch.zeros((), device=ctx.device), 0  # on the device: no host sync per step
        for i, batch in enumerate(batches):
            step = (epoch - 1) * steps + i
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_at(step)
            with torch.autocast(ctx.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
                loss, b = objective.loss(net, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optimizer.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optimizer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.detach().float() * b
            n += b
            if bar is not None:
                bar.update(1)
        objective_loss = total.item() / max(1, n)
        diverged = not math.isfinite(objective_loss)
        if not diverged:
            metrics = run.evaluate()
            diverged = any(isinstance(v, float) and not math.isfinite(v) for k, v in metrics.items()
                           if k.endswith("loss") and v is not None)
        if diverged:
            status = "diverged"
            ctx.log(f"{spec.run_id}: diverged in epoch {epoch}; keeping epoch {last_good[0]}")
            break
        state = run.built.export()
        history.append(history_row(epoch, metrics, optimizer.param_groups[0]["lr"], objective_loss,
                                   **objective.columns(state, steps)))
        last_good = end_epoch(ctx, writer, epoch, state, saved, history, net, optimizer, t_start)
    if bar is not None:
        bar.close()
    return finish_run(spec, ctx, writer, run.built, dataset=run.dataset, last_good=last_good, status=status,
                      wall_s=time.time() - t_start, precision=str(run.amp or "float32"))
