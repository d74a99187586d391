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

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vitzoo.data.pipeline import train_loader, train_tensors
from vitzoo.plan import RunSpec
from vitzoo.train.build import amp_dtype, build_run, make_optimizer
from vitzoo.train.checkpoint import finish_run, history_row, restore
from vitzoo.train.context import Built, RunContext, progress_bar
from vitzoo.train.evaluate import evaluate
from vitzoo.train.feed import LoaderFeed, TensorFeed, device_augment
from vitzoo.train.objectives import CrossEntropy, SimCLR
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import seed_module_rngs
from vitzoo.train.tasks import task_module
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
    task = task_module(spec.config.objective.name)
    if task is not None:  # language modelling, PINNs: the task assembles its own parts
        return task.build(spec, ctx)
    cfg = spec.config
    data = ctx.cache.splits(cfg.data)
    built = build_run(spec, ctx, data.num_classes, data.label_names)
    net = built.net.to(ctx.device)
    simclr = cfg.objective.name == "simclr"
    objective = (SimCLR(cfg.objective.temperature, ctx.device) if simclr
                 else CrossEntropy(cfg, data.num_classes, ctx.device))
    cnn = cfg.model is not None and not cfg.model.is_vit
    aug = device_augment(cfg, built.pp) if cnn else False
    tensors = None if cnn else train_tensors(ctx.cache, cfg.data, built.pp, cfg.aug, views=2 if simclr else 1)
    if aug is not False and not simclr and ctx.cache.fits(cfg.data, "train", built.pp):
        # Classic CNNs: the decoded split on the device, crop + flip there (as their stacked siblings)
        x, y = ctx.cache.eval_tensors(cfg.data, "train", built.pp)
        feed: Any = TensorFeed(x.to(ctx.device), y.to(ctx.device), spec.data_seed, cfg.batch_size,
                               objective.equal_batches, aug or None)
    elif tensors is not None:
        # ViTs without per-image augmentation (mixup and smoothing are the objective's): the same batches as
        # a DataLoader over these tensors would give, sliced on the device
        feed = TensorFeed(tensors[0].to(ctx.device), tensors[1].to(ctx.device), spec.data_seed, cfg.batch_size,
                          objective.equal_batches, loader_rng=True)
    else:
        feed = LoaderFeed(*train_loader(ctx.cache, cfg.data, built.pp, cfg.aug, cfg.batch_size, spec.data_seed,
                                        views=2 if simclr else 1, equal_batches=objective.equal_batches))

    def run_evaluate() -> dict[str, Any]:
        return evaluate(net, ctx, cfg, built.pp, simclr)

    return ModuleRun(spec, built, make_optimizer(net, cfg), objective, feed, run_evaluate,
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


@dataclass
class Member:
    """One run of a group and its files: what the driver records for it, whichever backend trains it."""

    spec: RunSpec
    writer: RunWriter
    built: Built
    """Metadata for config.json (and the export of a module run)."""
    dataset: str
    start: int = 0
    """The last epoch done (0: a fresh run, or one resumed after epoch 0)."""
    fresh: bool = True
    """Nothing on disk yet: epoch 0 is still to be written."""
    history: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0
    """Seconds spent on this run before this attempt (from its resume point)."""
    last_good: tuple[int, dict[str, torch.Tensor] | None] = (0, None)
    """(epoch, its state if not on disk yet): what a diverged run falls back to, and the final state."""


class Members(Protocol):
    """P runs trained in lock-step on their own batches (P = 1: :class:`ModuleMembers`).

    Indices are stable: ``keep`` says which members are still trained; a backend may mask the others.
    """

    members: list[Member]
    steps: int
    """Optimizer steps per epoch (the same for every member)."""
    precision: str

    def rng_scope(self) -> contextlib.AbstractContextManager[Any]: ...
    def epoch0(self, idx: list[int]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]: ...
    def start_epoch(self, epoch: int) -> None: ...
    def step(self, i: int, lr_factor: float) -> None: ...
    def end_epoch(self) -> list[tuple[bool, float]]: ...
    def evaluate(self) -> list[dict[str, Any]]: ...
    def states(self) -> list[dict[str, torch.Tensor]]: ...
    def columns(self, j: int, state: dict[str, torch.Tensor], epoch0: bool = False) -> dict[str, Any]: ...
    def lr(self, j: int) -> float: ...
    def save_resume(self, j: int, epoch: int, elapsed_s: float) -> None: ...
    def keep(self, idx: list[int]) -> None: ...


class ModuleMembers:
    """A run trained alone (P = 1): an ``nn.Module``, its torch/timm optimizer, autocast and GradScaler."""

    def __init__(self, run: ModuleRun, member: Member, ctx: RunContext):
        self.run, self.ctx, self.members = run, ctx, [member]
        self.steps = run.feed.steps
        self.precision = str(run.amp or "float32")
        self.lr_at = lr_schedule(run.spec.config, self.steps)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=run.amp == torch.float16)

    def rng_scope(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # the global RNGs are re-seeded per epoch (seed_module_rngs)

    def epoch0(self, idx: list[int]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        return [self.run.epoch0()]

    def start_epoch(self, epoch: int) -> None:
        spec = self.run.spec
        seed_module_rngs(spec.init_seed, spec.data_seed, epoch)
        self.run.objective.start_epoch(epoch)
        self.batches = self.run.feed.epoch(epoch)
        self.run.built.net.train()
        self.total, self.n = torch.zeros((), device=self.ctx.device), 0  # on the device: no host sync per step

    def step(self, i: int, lr_factor: float) -> None:
        """One optimizer step on the next batch; with ``micro_batch_size``, the gradient of the whole batch
        accumulated over its micro-batches (each loss weighted by its share of the batch)."""
        run, net, optimizer, scaler = self.run, self.run.built.net, self.run.optimizer, self.scaler
        batch = next(self.batches)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lr_factor
        micro = run.spec.config.micro_batch_size
        parts = split_batch(batch, micro) if micro else [batch]
        sizes, losses = [], []
        for k, part in enumerate(parts):
            with torch.autocast(self.ctx.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
                loss_i, b_i = run.objective.loss(net, part)
            sizes.append(b_i)
            if k == 0:  # after the first forward, as before accumulation existed: the same kernels in the same order
                optimizer.zero_grad(set_to_none=True)
            if len(parts) > 1:  # backward per micro-batch: only one micro-batch's activations are alive
                scaler.scale(loss_i * (b_i / batch_size(batch))).backward()
                loss_i = loss_i.detach()
            losses.append(loss_i)
        if len(parts) == 1:
            scaler.scale(losses[0]).backward()
            loss, b = losses[0], sizes[0]
        else:
            b = sum(sizes)
            loss = sum(part_loss.detach() * n for part_loss, n in zip(losses, sizes, strict=True)) / b
        clip = run.spec.config.optimizer.grad_clip
        if clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        self.total += loss.detach().float() * b
        self.n += b

    def end_epoch(self) -> list[tuple[bool, float]]:
        objective_loss = self.total.item() / max(1, self.n)  # a non-finite loss poisons the sum
        return [(math.isfinite(objective_loss), objective_loss)]

    def evaluate(self) -> list[dict[str, Any]]:
        return [self.run.evaluate()]

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [self.run.built.export()]

    def columns(self, j: int, state: dict[str, torch.Tensor], epoch0: bool = False) -> dict[str, Any]:
        return self.run.objective.columns(state, 0 if epoch0 else self.steps)

    def lr(self, j: int) -> float:
        return self.run.optimizer.param_groups[0]["lr"]

    def save_resume(self, j: int, epoch: int, elapsed_s: float) -> None:
        self.members[0].writer.save_resume(epoch, self.run.built.net.state_dict(), self.run.optimizer.state_dict(),
                                           {"elapsed_s": elapsed_s})

    def keep(self, idx: list[int]) -> None:
        pass


def batch_size(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (a batch is a tuple of tensors, possibly nested)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    return batch_size(batch[0])


def split_batch(batch: Any, micro: int) -> list[Any]:
    """A batch cut into micro-batches of at most ``micro`` samples, every tensor of the (nested) tuple alike."""
    n = batch_size(batch)
    if micro >= n:
        return [batch]

    def part(b: Any, lo: int) -> Any:
        if isinstance(b, torch.Tensor):
            return b[lo:lo + micro]
        return type(b)(part(v, lo) for v in b)

    return [part(batch, lo) for lo in range(0, n, micro)]


def _non_finite_loss(metrics: dict[str, Any]) -> bool:
    return any(isinstance(v, float) and not math.isfinite(v) for k, v in metrics.items()
               if k.endswith("loss") and v is not None)


def train_group(group: Members, ctx: RunContext, desc: str) -> Iterator[dict[str, Any]]:
    """The epoch loop: train every member of ``group`` to its stage's last epoch (or its divergence).

    Yields each member's run.json content as soon as it is finished. Every member starts after the same
    epoch (``members[i].start``). Per epoch: seeding and feeds (``start_epoch``), the steps, one host sync
    (``end_epoch``), evaluation, the divergence rule, history rows, checkpoint epochs, resume points; then
    the stop hook (``ctx.stop_after_epoch``) once every member's files are written.
    """
    members = group.members
    cfg = members[0].spec.config
    saved = set(cfg.saved_epochs())
    lr_at = lr_schedule(cfg, group.steps)
    t0, p0 = time.time(), len(members)

    def wall(m: Member) -> float:  # this attempt's time, shared equally, plus earlier attempts
        return m.elapsed + (time.time() - t0) / p0

    def finish(m: Member, status: str) -> dict[str, Any]:
        return finish_run(m.spec, ctx, m.writer, m.built, dataset=m.dataset, last_good=m.last_good,
                          status=status, wall_s=wall(m), precision=group.precision)

    fresh = [j for j, m in enumerate(members) if m.fresh]
    if fresh:  # epoch 0: the initialisation (a twin: its parent), evaluated and saved
        for j, (metrics, state) in zip(fresh, group.epoch0(fresh), strict=True):
            m = members[j]
            m.history = [history_row(0, metrics, 0.0, None, **group.columns(j, state, epoch0=True))]
            m.writer.save_epoch(0, state)
            m.writer.save_history(m.history)
            group.save_resume(j, 0, wall(m))
            m.last_good = (0, None)
    resumed = [j for j, m in enumerate(members) if not m.fresh and m.start not in saved]
    if resumed:  # resumed after an epoch that is not a checkpoint: its state is kept in memory
        states = group.states()
        for j in resumed:
            members[j].last_good = (members[j].start, states[j])
    active = list(range(len(members)))
    start = members[0].start
    bar = progress_bar(ctx, cfg.epochs * group.steps, desc, start * group.steps)
    with group.rng_scope():
        for epoch in range(start + 1, cfg.epochs + 1):
            group.start_epoch(epoch)
            for i in range(group.steps):
                group.step(i, lr_at((epoch - 1) * group.steps + i))
                if bar is not None:
                    bar.update(1)
            ends = group.end_epoch()
            ok = [j for j in active if ends[j][0]]
            metrics = group.evaluate() if ok else []
            ok = [j for j in ok if not _non_finite_loss(metrics[j])]
            states = group.states() if ok else []
            for j in active:
                m = members[j]
                if j not in ok:
                    ctx.log(f"{m.spec.run_id}: diverged in epoch {epoch}; keeping epoch {m.last_good[0]}")
                    yield finish(m, "diverged")
                    continue
                m.history.append(history_row(epoch, metrics[j], group.lr(j), ends[j][1],
                                             **group.columns(j, states[j])))
                if epoch in saved:
                    m.writer.save_epoch(epoch, states[j])
                m.writer.save_history(m.history)
                group.save_resume(j, epoch, wall(m))
                m.last_good = (epoch, None if epoch in saved else states[j])
            active = ok
            group.keep(active)
            if not active:
                break
            if ctx.stop_after_epoch is not None and epoch >= ctx.stop_after_epoch:
                raise KeyboardInterrupt(f"stop_after_epoch={ctx.stop_after_epoch}")
    if bar is not None:
        bar.close()
    for j in active:
        yield finish(members[j], "done")


def train_run(spec: RunSpec, ctx: RunContext, *, noise: bool = True) -> dict[str, Any]:
    """Train ``spec`` alone into ``<zoo>/models/<run_id>``; returns its run.json content.

    ``noise=False`` (tests only) trains twins on the mean of the local reparameterisation.
    """
    writer = RunWriter(ctx.zoo_root, spec.run_id)
    if writer.is_finished():
        return json.loads((writer.folder / "run.json").read_text())
    writer.discard_temp_files()
    t_start = time.time()
    run = build_module_run(spec, ctx, noise=noise)
    if run.feed.steps == 0:
        raise ValueError(f"{spec.run_id}: the training split is empty")
    member = Member(spec, writer, run.built, run.dataset)
    restored = restore(ctx, writer, spec, run.built.net, run.optimizer)
    if restored is not None:
        member.start, member.history, member.elapsed = restored
        member.fresh = False
    member.elapsed += time.time() - t_start  # building and restoring count as this run's time
    infos = list(train_group(ModuleMembers(run, member, ctx), ctx, spec.run_id))
    return infos[0]
