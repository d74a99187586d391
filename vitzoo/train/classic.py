"""Classic CNN zoo stages: which runs train stacked, and the stacked backend of the engine for them.

`generate` hands the runs of a CNN stage to :func:`train_stage`. Runs the stacked update reproduces
(:func:`~vitzoo.train.population_adapter.unsupported` is empty) are grouped by the plan's
:func:`~vitzoo.plan.populations` (same architecture shape, data, duration, schedule), then by update rule
and architecture options, and by the epoch they resume after; each group is split into balanced
sub-populations sized from device memory. A sub-population large enough to pay (:mod:`vitzoo.train.routing`:
measured thresholds, the ``VITZOO_POPULATION`` switch) is a :class:`CnnStack` driven by the engine's one epoch loop
(:func:`vitzoo.train.engine.train_group`); any other run is trained alone by the same loop
(:func:`vitzoo.train.engine.train_run`). Either way a model's folder, history and resume point are the same.

Resume: every member writes the per-run resume point after each epoch (its weights and its torch
optimizer's state dict, the format of a run trained alone), so an interrupted stack continues after its
last epoch, stacked again or one by one. The dropout stream of a stack is seeded per epoch from the
epoch and its members' run ids: the same members resumed together continue exactly as if never stopped.
A sub-population that runs out of memory is halved; its members continue from their last epoch.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.plan import RunSpec
from vitzoo.train import routing
from vitzoo.train.build import build_cnn_run, make_optimizer
from vitzoo.train.checkpoint import restore, resume_epoch
from vitzoo.train.context import Built, RunContext
from vitzoo.train.engine import Member, train_group, train_run
from vitzoo.train.evaluate import TRAIN_EVAL_CAP
from vitzoo.train.feed import crop_flip, device_augment
from vitzoo.train.population import (
    CnnPopulation,
    activation_bytes_per_sample,
    balanced_chunks,
    eval_chunk,
    max_population_size,
    probe,
)
from vitzoo.train.population_adapter import member_from_run, split_runs, unsupported
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import augment_generator, epoch_order, mix, steps_per_epoch
from vitzoo.zoo.writer import RunWriter

#: Bounds the activations of one stacked evaluation chunk.
EVAL_MEMORY_BYTES = 256 << 20
#: Seed-stream tag of the stacks' dropout draws (distinct from any other use of seeds.mix).
_DROPOUT_STREAM = 0xC1A5


def train_stage(runs: list[RunSpec], ctx: RunContext) -> Iterator[dict[str, Any]]:
    """Train a CNN stage's runs (this process's shard); yields each run.json content as it is finished."""
    switch = routing.switch()
    stacked = [r for r in runs if not unsupported(r)]
    for group in split_runs(stacked):
        yield from _train_group(group, ctx, switch)
    for spec in runs:
        if unsupported(spec):
            yield train_run(spec, ctx)


def _train_group(runs: list[RunSpec], ctx: RunContext, switch: str) -> Iterator[dict[str, Any]]:
    """One plan population: sub-groups that can share a stack, sized from memory, stacked or alone."""
    pending = [r for r in runs if not RunWriter(ctx.zoo_root, r.run_id).is_finished()]
    if not pending:
        return
    arch = pending[0].config.model.variant  # type: ignore[union-attr]
    least = routing.least_stack(ctx.device.type, routing.family(arch), switch)
    if least is None:
        yield from (train_run(s, ctx) for s in pending)
        return
    subgroups: dict[tuple[Any, ...], list[RunSpec]] = {}
    for r in pending:  # one forward (activation, dropout), one update rule, one resume epoch
        m = member_from_run(r)
        key = (m.activation, m.dropout, m.optimizer, m.betas, m.eps, resume_epoch(RunWriter(ctx.zoo_root, r.run_id)))
        subgroups.setdefault(key, []).append(r)
    c = pending[0].config
    cap = max_population_size(arch, c.data.channels, ctx.cache.splits(c.data).num_classes, c.batch_size, ctx.device,
                              width=c.model.width if c.model else None)
    for sub in subgroups.values():
        queue = balanced_chunks(sub, cap)
        while queue:
            chunk = [s for s in queue.pop(0) if not RunWriter(ctx.zoo_root, s.run_id).is_finished()]
            if len(chunk) < least:
                yield from (train_run(s, ctx) for s in chunk)
                continue
            oom = False
            try:
                stack = CnnStack(chunk, ctx)
                yield from train_group(stack, ctx, f"{arch} x{stack.P}")
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                oom = True
            if oom:  # outside the handler: the failed stack's tensors are unreferenced by now
                stack = None
                gc.collect()
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                ctx.log(f"population of {len(chunk)} ran out of memory; halving (members continue from their "
                        "last epoch)")
                queue[:0] = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]


class CnnStack:
    """P classic CNN runs trained as one :class:`~vitzoo.train.population.CnnPopulation`: a Members backend
    of :func:`vitzoo.train.engine.train_group` (stable indices; a diverged member is frozen by its mask)."""

    def __init__(self, specs: list[RunSpec], ctx: RunContext) -> None:
        cfg = specs[0].config
        assert cfg.model is not None
        self.ctx, self.device, self.cfg = ctx, ctx.device, cfg
        dev = ctx.device
        data = ctx.cache.splits(cfg.data)
        pp = preprocessing_for(cfg.data, cfg.model.resolved_img_size)
        x, y = ctx.cache.eval_tensors(cfg.data, "train", pp)
        self.train_x, self.train_y = x.to(dev), y.to(dev)
        self.evals = {"train": (self.train_x[:TRAIN_EVAL_CAP], self.train_y[:TRAIN_EVAL_CAP]),
                      "val": tuple(t.to(dev) for t in ctx.cache.eval_tensors(cfg.data, "val", pp))}
        if data.test is not None:
            self.evals["test"] = tuple(t.to(dev) for t in ctx.cache.eval_tensors(cfg.data, "test", pp))
        self.augment = device_augment(cfg, pp) or None
        self.batch = cfg.batch_size
        self.steps = steps_per_epoch(len(self.train_y), cfg.batch_size)
        if self.steps == 0:
            raise ValueError(f"{specs[0].run_id}: the training split is empty")
        self.lr_at = lr_schedule(cfg, self.steps)
        self.precision = "float32"
        self.members: list[Member] = []
        nets, opts = [], []
        for spec in specs:
            writer = RunWriter(ctx.zoo_root, spec.run_id)
            writer.discard_temp_files()
            built = build_cnn_run(spec, data.num_classes, data.label_names)
            opt = make_optimizer(built.net, spec.config)  # the run's own optimizer: its resume format
            m = Member(spec, writer, built, data.name)
            restored = restore(ctx, writer, spec, built.net, opt)
            if restored is not None:
                m.start, m.history, m.elapsed = restored
                m.fresh = False
            self.members.append(m)
            nets.append(built.net)
            opts.append(opt)
        if len({m.start for m in self.members}) != 1:
            raise ValueError("a stack's members resume after the same epoch (the caller groups them)")
        self.P = len(specs)
        pop = self.pop = CnnPopulation(cfg.model.variant, cfg.data.channels, data.num_classes,
                                       [member_from_run(s) for s in specs], dev, 0, cfg.model.width)
        with torch.no_grad():  # each member's (restored) weights, buffers and optimizer buffers as its row
            for i, (net, opt) in enumerate(zip(nets, opts, strict=True)):
                named = list(net.named_parameters())
                pop.flat[i] = torch.cat([p.detach().flatten() for _, p in named]).to(dev)
                for n, b in net.named_buffers():
                    pop.buffers[n][i] = b.to(dev)
                for k, v in pop.state.items():
                    v[i] = torch.cat([_opt_buffer(opt, p, k).flatten() for _, p in named]).to(dev)
        pop.step_count = self.members[0].start * self.steps
        self.param_groups = [o.state_dict()["param_groups"] for o in opts]
        for m in self.members:  # the metadata finish_run needs, not P host copies of the network
            b = m.built
            m.built = Built(pop.template, pop.template.state_dict, b.arch, b.model_args, b.num_classes,
                            b.num_features, b.pp, b.label_names, b.head, b.head_hidden)
        del nets, opts
        act = activation_bytes_per_sample(pop.template, tuple(self.train_x.shape[1:]))
        self.chunk = eval_chunk(self.P, act, EVAL_MEMORY_BYTES)
        probe(pop, self.train_x, self.train_y, self.batch, self.chunk, self.evals)  # an OOM shows here
        self.digest = int.from_bytes(hashlib.sha256(",".join(s.run_id for s in specs).encode()).digest()[:8],
                                     "little")
        self.epoch = self.members[0].start
        self._states: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------ the engine's Members interface
    def rng_scope(self) -> contextlib.AbstractContextManager[Any]:
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def epoch0(self, idx: list[int]) -> list[tuple[dict[str, Any], dict[str, Tensor]]]:
        metrics, states = self.evaluate(), self.states()
        return [(metrics[i], states[i]) for i in idx]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        torch.manual_seed(mix(_DROPOUT_STREAM, epoch, self.digest))  # the stack's dropout stream
        n, dev = len(self.train_y), self.device
        self.perms = torch.stack([epoch_order(m.spec.data_seed, epoch, n) for m in self.members]).to(dev)
        self.gens = [augment_generator(m.spec.data_seed, epoch, dev) for m in self.members] if self.augment else []
        self.pop.reset_running()

    def step(self, i: int, lr_factor: float) -> None:
        idx = self.perms[:, i * self.batch:(i + 1) * self.batch]
        xb = self.train_x[idx]
        if self.augment is not None:  # each member's own crops and flips, drawn as a run alone draws them
            a = self.augment
            xb = torch.stack([crop_flip(xb[j], g, a.pad, a.flip, a.fill, a.rotation) for j, g in enumerate(self.gens)])
        self.pop.train_step(xb, self.train_y[idx], lr_factor, self.pop.step_count)

    def end_epoch(self) -> list[tuple[bool, float]]:
        del self.perms
        running, _ = self.pop.running()
        alive = self.pop.alive.tolist()  # the epoch's one host sync
        return [(a and r is not None and math.isfinite(r), math.nan if r is None else r)
                for a, r in zip(alive, running, strict=True)]

    def evaluate(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in range(self.P)]
        for name, (ex, ey) in self.evals.items():
            loss, acc = self.pop.evaluate(ex, ey, self.chunk)
            for i, (lo, ac) in enumerate(zip(loss.tolist(), acc.tolist(), strict=True)):
                out[i][f"{name}_loss"], out[i][f"{name}_acc"] = lo, ac
        return out

    def states(self) -> list[dict[str, Tensor]]:
        self._states = [{k: v.detach().to("cpu", copy=True) for k, v in st.items()} for st in self.pop.states()]
        return self._states

    def columns(self, j: int, state: dict[str, Tensor], epoch0: bool = False) -> dict[str, Any]:
        return {}

    def lr(self, j: int) -> float:
        return self.pop.members[j].lr * self.lr_at(self.epoch * self.steps - 1)

    def save_resume(self, j: int, epoch: int, elapsed_s: float) -> None:
        """Member ``j``'s per-run resume point: its state and its torch optimizer's state dict."""
        pop, state = self.pop, self._states[j]
        named = [n for n, _ in pop.template.named_parameters()]
        opt_state: dict[int, dict[str, Tensor]] = {}
        if epoch > 0:
            off = 0
            for i, n in enumerate(named):
                k = state[n].numel()
                st = {key: v[j, off:off + k].view_as(state[n]).detach().to("cpu", copy=True)
                      for key, v in pop.state.items()}
                if "exp_avg" in st:
                    st = {"step": torch.tensor(float(pop.step_count)), **st}
                elif pop.members[j].momentum == 0:
                    st = {}
                if st:
                    opt_state[i] = st
                off += k
        lr = pop.members[j].lr if epoch == 0 else self.lr(j)
        groups = [{**g, "lr": lr} for g in self.param_groups[j]]
        self.members[j].writer.save_resume(epoch, state, {"state": opt_state, "param_groups": groups},
                                           {"elapsed_s": elapsed_s})

    def keep(self, idx: list[int]) -> None:
        mask = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        mask[idx] = True
        self.pop.alive &= mask


def _opt_buffer(opt: torch.optim.Optimizer, p: Tensor, key: str) -> Tensor:
    st = opt.state.get(p, {})
    v = st.get(key)
    return torch.zeros_like(p) if v is None else v.detach()


__all__ = ["CnnStack", "train_stage"]
