"""Sparsified twins trained as a stack: many variational-dropout twins of CNN-s/CNN-m at once.

Why: a classic zoo's ``sparsify:`` stage trains one twin per parent (1,000+ CNN-s twins at batch size
10 for 25 epochs); alone, every step is a handful of tiny kernel launches. The parameters of P twins
(weights, biases and every ``log_sigma2``) are rows of one flat ``(P, n_params)`` buffer; one
``torch.func.vmap``-ed ``functional_call`` of the variational-dropout network (the very
:class:`~vitzoo.train.variational.VDConv2d` / :class:`~vitzoo.train.variational.VDLinear` modules of a twin
trained alone) computes every twin's loss and gradients, and :mod:`vitzoo.train.functional_optim`
updates all of them, with every hyperparameter read from the twin's own torch optimizer (weight decay
per parameter group, never on ``log_sigma2``). :class:`_TwinPopulation` is a Members backend of the
engine's loop (:func:`vitzoo.train.engine.train_group`), which owns epoch 0, divergence, history rows,
checkpoints and the resume points (the format of a twin trained alone: either path resumes the other).

Groups: twins whose parents share the network shape and whose stage settings share data, duration,
batch size, schedule, checkpoints, update rule and threshold (:func:`group_key`), split into balanced
sub-populations sized from device memory (capped on CPU, :mod:`vitzoo.train.routing`), halved on out of
memory, and by resume epoch. Trained alone (the engine's ``train_run``): twins of ResNet-18 and ViTs,
optimizers other than Adam/AdamW/SGD/Nesterov, and in ``auto`` groups smaller than
:mod:`vitzoo.train.routing`'s threshold (benchmarks/RESULTS.md, "Sparsified twins as populations"). ``noise=False``
(tests only) trains on the mean of the local reparameterisation, which makes the two paths comparable
to float tolerance. Numerical differences to twins trained alone: docs/training-engine.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from vitzoo.models import cnn_variant
from vitzoo.plan import RunSpec, canonical_json
from vitzoo.train import routing
from vitzoo.train.build import load_parent
from vitzoo.train.checkpoint import finish_run, restore
from vitzoo.train.context import RunContext
from vitzoo.train.engine import Member, train_group, train_run
from vitzoo.train.evaluate import TRAIN_EVAL_CAP
from vitzoo.train.functional_optim import adam_, clip_coefficients, sgd_
from vitzoo.train.population import (
    activation_bytes_per_sample,
    balanced_chunks,
    eval_chunk,
    max_population_size,
)
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import epoch_order, mix, steps_per_epoch
from vitzoo.train.variational import (
    Twin,
    kl_approx,
    kl_ramp,
    log_alpha,
    parent_img_size,
    prepare_twin,
    sparsity_ratio,
)
from vitzoo.zoo.writer import RunWriter

#: Parent architectures whose twins are vectorised (plain conv/linear stacks without buffers).
VECTORISED_ARCHS = ("cnn-s", "cnn-m")

#: Recipe optimizer names the functional update reproduces (timm: Adam, AdamW, SGD momentum / Nesterov).
OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")

#: Bytes of activations one vectorised evaluation chunk may use, per device type. On CPU a chunk that
#: stays in the caches is fastest (measured, 16-64 twins: 53-57 us per twin-sample at 16 MB, 91-96 at
#: 256 MB; one by one 62); GPUs want large launches.
EVAL_MEMORY_BYTES = {"cpu": 16 << 20, "cuda": 256 << 20}

#: Domain separation of the noise stream's seed (the population draws per twin from one stream).
_NOISE_STREAM = 0x5A_7215


def unsupported(spec: RunSpec, pcfg: dict[str, Any]) -> list[str]:
    """Why the twin ``spec`` of a parent with config.json ``pcfg`` cannot be vectorised (empty: it can)."""
    out = []
    if cnn_variant(str(pcfg.get("architecture"))) not in VECTORISED_ARCHS:
        out.append(f"parent architecture {pcfg.get('architecture')!r} is not one of {', '.join(VECTORISED_ARCHS)}")
    if spec.config.micro_batch_size is not None:
        out.append("micro_batch_size (gradient accumulation is the module backend's)")
    if spec.config.optimizer.name not in OPTIMIZERS:
        out.append(f"optimizer {spec.config.optimizer.name!r} (vectorised: {', '.join(OPTIMIZERS)})")
    return out


def group_key(spec: RunSpec, pcfg: dict[str, Any]) -> str:
    """What twins trained together must share: the network (not its weights), data, duration, schedule,
    checkpoints, update rule and pruning threshold. Seeds, lr, weight decay, momentum, clipping,
    ``kl_weight`` and ``log_sigma2_init`` vary within a population."""
    c = spec.config
    assert c.sparsify is not None
    args = {k: v for k, v in (pcfg.get("model_args") or {}).items() if k != "init"}  # weights come from the parent
    return canonical_json([
        spec.stage, pcfg["architecture"], args, int(pcfg["num_classes"]), parent_img_size(pcfg),
        dataclasses.asdict(c.data), c.epochs, c.batch_size, dataclasses.asdict(c.schedule), c.saved_epochs(),
        c.optimizer.name, c.sparsify.threshold,
    ])


def finish_twin(twin: Twin, ctx: RunContext, last_good: tuple[int, dict[str, Tensor] | None], status: str,
                wall_s: float) -> dict[str, Any]:
    """config.json + run.json of a trained twin (the commit point); returns run.json's content."""
    return finish_run(twin.spec, ctx, twin.writer, twin.built, dataset=twin.data.name, last_good=last_good,
                      status=status, wall_s=wall_s, precision="float32")


def train_sparsify_stage(runs: list[RunSpec], ctx: RunContext, *, mode: str = "auto",
                         max_population: int | None = None, min_population: int | None = None,
                         noise: bool = True) -> Iterator[dict[str, Any]]:
    """Train a ``sparsify:`` stage's twins (this process's shard); yields each twin's run.json content
    as soon as it is finished (a finished one from an earlier attempt at once).

    ``mode``: ``auto`` (vectorise groups of CNN-s/CNN-m twins of at least ``min_population``, default
    :mod:`vitzoo.train.routing`'s threshold for the device; the rest one by one), ``population`` (vectorise every
    supported twin, even alone; error for an unsupported one) or ``sequential`` (all one by one).
    ``max_population`` caps a sub-population (default: from device memory, at most 16 on CPU).
    ``noise=False``: tests only (see the module docstring).
    """
    if mode not in ("auto", "population", "sequential"):
        raise ValueError(f"mode must be auto, population or sequential; got {mode!r}")
    pending: list[RunSpec] = []
    for spec in runs:
        writer = RunWriter(ctx.zoo_root, spec.run_id)
        if writer.is_finished():
            yield json.loads((writer.folder / "run.json").read_text())
        else:
            pending.append(spec)
    if mode == "sequential":
        for spec in pending:
            yield train_run(spec, ctx, noise=noise)
        return
    groups: dict[str, list[tuple[RunSpec, tuple[dict[str, Any], dict[str, Tensor]]]]] = {}
    alone: list[RunSpec] = []
    for spec in pending:
        pcfg, state = load_parent(spec, ctx)  # waits for a parent trained by another process
        problems = unsupported(spec, pcfg)
        if problems:
            if mode == "population":
                raise ValueError(f"{spec.run_id}: cannot be vectorised: " + "; ".join(problems))
            alone.append(spec)  # its parent state is dropped here (a ViT's can be large) and reloaded later
            continue
        groups.setdefault(group_key(spec, pcfg), []).append((spec, (pcfg, state)))
    least = 1 if mode == "population" else (min_population or routing.least_stack(ctx.device.type, "twin", "auto"))
    for items in groups.values():
        pcfg = items[0][1][0]
        cap = max_population or _max_population(items[0][0], pcfg, ctx.device)
        for chunk in balanced_chunks(items, cap):  # type: ignore[arg-type]
            if len(chunk) < least:
                for spec, _ in chunk:
                    yield train_run(spec, ctx, noise=noise)
                continue
            yield from _train_chunk(chunk, ctx, least, noise)
    for spec in alone:
        yield train_run(spec, ctx, noise=noise)


def _max_population(spec: RunSpec, pcfg: dict[str, Any], device: torch.device) -> int:
    """Population size from memory: the main engine's estimate for the plain CNN, for a quarter instead
    of half of the free memory (a twin has 1.5x the parameters and about twice the activations)."""
    args = pcfg.get("model_args") or {}
    n = max_population_size(str(cnn_variant(pcfg["architecture"])), int(args.get("in_chans", 3)),
                            int(pcfg["num_classes"]), spec.config.batch_size, device, fraction=0.25)
    return routing.cpu_cap(device.type, "twin", n)


# --------------------------------------------------------------------------- members and their files


def _member(spec: RunSpec, parent: tuple[dict[str, Any], dict[str, Tensor]], ctx: RunContext,
            noise: bool) -> tuple[Twin, Member]:
    """A twin ready to train and its record (restored from its resume point, if any)."""
    twin = prepare_twin(spec, ctx, noise=noise, parent=parent)
    twin.writer.discard_temp_files()
    m = Member(spec, twin.writer, twin.built, twin.data.name)
    restored = restore(ctx, twin.writer, spec, twin.net, twin.optimizer)
    if restored is not None:
        m.start, m.history, m.elapsed = restored
        m.fresh = False
        m.last_good = (m.start, twin.built.export() if m.start not in set(spec.config.saved_epochs()) else None)
    return twin, m


def _train_chunk(chunk: list[tuple[RunSpec, tuple[dict[str, Any], dict[str, Tensor]]]], ctx: RunContext,
                 least: int, noise: bool) -> Iterator[dict[str, Any]]:
    """Restore the chunk's twins, split them by resume point, and train each part (OOM: halved)."""
    members = [_member(spec, parent, ctx, noise) for spec, parent in chunk]
    parts: dict[int, list[tuple[Twin, Member]]] = {}
    for tw, m in members:  # normally one part; two after an interruption in the middle of writing an epoch
        parts.setdefault(m.start, []).append((tw, m))
    for start, part in sorted(parts.items()):
        if start >= part[0][0].spec.config.epochs:  # all epochs done, killed before finishing
            for tw, m in part:
                yield finish_twin(tw, ctx, m.last_good, "done", m.elapsed)
            continue
        if len(part) < least:
            for tw, _ in part:
                yield train_run(tw.spec, ctx, noise=noise)
            continue
        queue = [part]
        while queue:
            sub = queue.pop(0)
            try:
                pop = _TwinPopulation(sub, ctx)
            except torch.OutOfMemoryError:
                if len(sub) == 1:
                    raise
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
                queue[:0] = [sub[:len(sub) // 2], sub[len(sub) // 2:]]
                continue
            yield from train_group(pop, ctx, f"twins x{pop.P}")
            del pop


# --------------------------------------------------------------------------- the vectorised engine


class _TwinPopulation:
    """P twins (one network shape, one resume point) as one flat (P, n_params) buffer."""

    def __init__(self, part: list[tuple[Twin, Member]], ctx: RunContext) -> None:
        self.twins = twins = [tw for tw, _ in part]
        self.members = [m for _, m in part]
        self.P = len(part)
        self.device = dev = ctx.device
        self.precision = "float32"
        members = self.members
        t0 = twins[0]
        self.cfg = cfg = t0.spec.config
        assert cfg.sparsify is not None
        self.template = copy.deepcopy(t0.net).to(dev)
        if any(True for _ in self.template.buffers()):
            raise ValueError(f"{t0.pcfg['architecture']}: networks with buffers (batchnorm) are not vectorised")
        self.names = [n for n, _ in self.template.named_parameters()]
        shapes = {n: p.shape for n, p in self.template.named_parameters()}
        self.vd = [(f"{n}.weight" if n else "weight", f"{n}.log_sigma2" if n else "log_sigma2", m.vd_threshold)
                   for n, m in t0.modules.items()]
        ls2 = {s for _, s, _ in self.vd}
        self.export_keys = [k for k in self.template.state_dict() if k not in ls2]  # the parent's keys, in order

        # Parameters: one row per twin, views per tensor for functional_call.
        self.flat = torch.stack([torch.cat([p.detach().flatten() for p in tw.net.parameters()]) for tw in twins]).to(dev)
        self.params: dict[str, Tensor] = {}
        self.cols: dict[str, slice] = {}
        off = 0
        for n in self.names:
            k = shapes[n].numel()
            self.cols[n] = slice(off, off + k)
            self.params[n] = self.flat[:, off:off + k].view(self.P, *shapes[n])
            off += k
        self.n_params = off

        # The update rule and every hyperparameter, read from the twins' own torch.optim objects.
        self._read_optimizers(twins)
        f64 = dict(dtype=torch.float64, device=dev)
        self.kl_weight = torch.tensor([tw.spec.config.sparsify.kl_weight for tw in twins], **f64)  # type: ignore[union-attr]
        clips = [tw.spec.config.optimizer.grad_clip for tw in twins]
        self.clip = (torch.tensor([c if c else math.inf for c in clips], dtype=torch.float32, device=dev)
                     if any(clips) else None)
        self.alive = torch.ones(self.P, dtype=torch.bool, device=dev)

        template = self.template
        vd = self.vd

        def loss_fn(params: dict[str, Tensor], x: Tensor, y: Tensor, kl_scale: Tensor) -> tuple[Tensor, Tensor]:
            ce = F.cross_entropy(functional_call(template, params, (x,)), y)
            # sparsify.total_kl, on the functional parameters: per-layer sums, stacked, summed
            kl = torch.stack([kl_approx(log_alpha(params[w], params[s])).sum() for w, s, _ in vd]).sum()
            loss = ce + kl_scale * kl
            return loss, kl.detach()

        def fwd(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(template, params, (x,))

        noisy = any(m.vd_noise for m in t0.modules.values()) or any(
            isinstance(m, torch.nn.Dropout) and m.p > 0 for m in template.modules())
        self.randomness = "different" if noisy else "error"
        self._grad = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0), randomness=self.randomness)
        self._fwd = vmap(fwd, in_dims=(0, None), randomness=self.randomness)

        # Data: the stage's tensors on the device once; the train-set evaluation capped as in sparsify.py.
        x, y = ctx.cache.eval_tensors(cfg.data, "train", t0.pp)
        self.train_x, self.train_y = x.to(dev), y.to(dev)
        self.n_train = len(self.train_y)
        if self.n_train == 0:
            raise ValueError(f"{t0.spec.run_id}: the training split is empty")
        self.steps = steps_per_epoch(self.n_train, cfg.batch_size)
        self.batch = min(cfg.batch_size, self.n_train)
        self.seen = min(self.steps * cfg.batch_size, self.n_train)  # samples visited per epoch
        self.step_count = members[0].start * self.steps  # optimizer steps taken (Adam's ``step``)
        self.lr_at = lr_schedule(cfg, self.steps)
        splits = ["train", "val"] + (["test"] if t0.data.test is not None else [])
        self.evals: dict[str, tuple[Tensor, Tensor]] = {}
        for s in splits:
            ex, ey = ctx.cache.eval_tensors(cfg.data, s, t0.pp)
            n = min(len(ey), TRAIN_EVAL_CAP) if s == "train" else len(ey)
            self.evals[s] = (ex[:n].to(dev), ey[:n].to(dev))
        self.template.eval()
        act = activation_bytes_per_sample(self.template, tuple(self.train_x.shape[1:]))
        self.eval_chunk = eval_chunk(self.P, act, EVAL_MEMORY_BYTES.get(dev.type, 256 << 20))
        self._probe()  # an OOM surfaces here, before anything is written

    # ------------------------------------------------------------------ optimizer state

    def _read_optimizers(self, twins: list[Twin]) -> None:
        dev, P, n = self.device, self.P, self.n_params
        opt0 = twins[0].optimizer
        if type(opt0) in (torch.optim.Adam, torch.optim.AdamW):
            self.kind = "adam"
        elif type(opt0) is torch.optim.SGD:
            self.kind = "sgd"
        else:
            raise ValueError(f"{type(opt0).__name__} is not vectorised")
        g0 = opt0.param_groups[0]
        if g0.get("maximize") or g0.get("amsgrad") or g0.get("dampening", 0) != 0:
            raise ValueError("maximize / amsgrad / dampening are not vectorised")
        self.decoupled = bool(g0.get("decoupled_weight_decay", False))
        self.nesterov = bool(g0.get("nesterov", False))
        b1, b2 = g0.get("betas", (0.9, 0.999))
        self.betas = (float(b1), float(b2))
        self.eps = float(g0.get("eps", 1e-8))
        # Per twin: lr, and per parameter group a weight decay; group_of[col] maps columns to groups.
        names_of = [{id(p): name for name, p in tw.net.named_parameters()} for tw in twins]
        n_groups = len(opt0.param_groups)
        group_of = torch.zeros(n, dtype=torch.long)
        for gi, g in enumerate(opt0.param_groups):
            for p in g["params"]:
                group_of[self.cols[names_of[0][id(p)]]] = gi
        wd = torch.zeros(P, n_groups, dtype=torch.float64)
        lr, mom = [], []
        for i, tw in enumerate(twins):
            o = tw.optimizer
            if len(o.param_groups) != n_groups or type(o) is not type(opt0):
                raise ValueError("twins of one population need the same optimizer layout")
            for gi, g in enumerate(o.param_groups):
                if any(names_of[i][id(p)] != names_of[0][id(q)] for p, q in zip(g["params"],
                                                                                 opt0.param_groups[gi]["params"])):
                    raise ValueError("twins of one population need the same parameter groups")
                wd[i, gi] = float(g["weight_decay"])
            lr.append(float(o.param_groups[0]["initial_lr"]))
            if any(float(g["initial_lr"]) != lr[-1] for g in o.param_groups):
                raise ValueError("per-group learning rates are not vectorised")
            mom.append(float(o.param_groups[0].get("momentum", 0.0)))
        self.lr0 = torch.tensor(lr, dtype=torch.float64, device=dev)
        self.mom = torch.tensor(mom, dtype=torch.float32, device=dev)
        self.momenta = mom
        self.any_momentum = any(m != 0 for m in mom)
        self.any_wd = bool((wd != 0).any())
        self.wd_groups = wd.to(dev)
        self.group_of = group_of.to(dev)
        self.wd_cols = self.wd_groups.float()[:, self.group_of] if self.any_wd else None  # (P, n) float32
        # Optimizer buffers, from the twins' (restored) torch state.
        keys = ("exp_avg", "exp_avg_sq") if self.kind == "adam" else ("momentum_buffer",)
        self.state: dict[str, Tensor] = {}
        for k in keys:
            rows = []
            for i, tw in enumerate(twins):
                by_name = {names_of[i][id(p)]: s for p, s in tw.optimizer.state.items()}
                rows.append(torch.cat([
                    (by_name[name][k] if name in by_name and by_name[name].get(k) is not None
                     else torch.zeros_like(p)).detach().flatten() for name, p in tw.net.named_parameters()]))
            self.state[k] = torch.stack(rows).to(dev)

    def write_back(self, i: int) -> None:
        """Copy twin ``i``'s row (parameters, optimizer buffers, step) into its own net and torch.optim
        object, whose state dicts are the resume format shared with the one-by-one path."""
        tw = self.twins[i]
        params = dict(tw.net.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(self.flat[i, self.cols[n]].view_as(params[n]))
        opt = tw.optimizer
        for n, p in params.items():
            row = {k: v[i, self.cols[n]].view_as(p).clone() for k, v in self.state.items()}
            if self.kind == "adam":
                opt.state[p] = {"step": torch.tensor(float(self.step_count), dtype=torch.float32), **row}
            elif self.momenta[i] != 0:  # torch's SGD keeps no buffer without momentum
                opt.state[p] = row
        t = self.step_count  # the lr the one-by-one path's param groups hold after the last step
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * self.lr_at(t - 1) if t > 0 else g["initial_lr"]

    # ------------------------------------------------------------------ one step

    def train_step(self, x: Tensor, y: Tensor, factor: float, kl_scale: Tensor) -> None:
        """One optimizer step of every twin on its own batch x[i], y[i] (no host sync)."""
        self.template.train()
        grads, (loss, kl) = self._grad(self.params, x, y, kl_scale)
        g = torch.cat([grads[n].flatten(1) for n in self.names], 1)  # (P, n_params), like self.flat
        ok = self.alive & torch.isfinite(loss) & torch.isfinite(g).all(1)
        self.alive = ok
        if self.clip is not None:  # torch.nn.utils.clip_grad_norm_ over all parameters, per twin
            norms = torch.stack([torch.linalg.vector_norm(grads[n].flatten(1), 2, dim=1) for n in self.names])
            g = g * clip_coefficients(norms, self.clip)[:, None]
        self.loss_sum += torch.where(ok, loss.double() * x.shape[1], 0.0)
        self.kl_sum += torch.where(ok, kl.double(), 0.0)
        lr = self.lr0 * factor * ok.double()  # frozen twins: a zero step on a zeroed gradient
        self.step_count += 1
        p = self.flat
        with torch.no_grad():
            g = torch.where(ok[:, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
            # Weight decay per parameter group (sparsify._optimizer: Conv/Linear weights only).
            if self.any_wd and self.decoupled:  # AdamW: param.mul_(1 - lr * weight_decay)
                p.mul_((1 - lr[:, None] * self.wd_groups).to(p.dtype)[:, self.group_of])
            elif self.any_wd:  # Adam / SGD: grad = grad.add(param, alpha=weight_decay)
                g = g + self.wd_cols * p
            if self.kind == "adam":
                adam_(p, g, self.state["exp_avg"], self.state["exp_avg_sq"], lr, self.step_count, self.betas,
                      self.eps)
            else:
                sgd_(p, g, self.state["momentum_buffer"], lr, self.mom, self.nesterov)

    def _probe(self) -> None:
        """One gradient and one evaluation forward on copies (no state changes): OOM shows here."""
        idx = torch.zeros(self.P, self.batch, dtype=torch.long, device=self.device)
        kl = torch.zeros(self.P, device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.template.train()
            grads, _ = self._grad(self.params, self.train_x[idx], self.train_y[idx], kl)
            del grads
            with torch.no_grad():
                self.template.eval()
                x = next(iter(self.evals.values()))[0]
                self._fwd(self.params, x[:self.eval_chunk])

    # ------------------------------------------------------------------ evaluation and export

    @torch.no_grad()
    def evaluate(self, pruned: bool = True) -> list[dict[str, float]]:
        """Loss and top-1 of every twin on train (capped), val, test, in eval mode: pruned weights
        masked, or (``pruned=False``, epoch 0) the state as it is."""
        self.template.eval()
        vd_modules = [m for m in self.template.modules() if hasattr(m, "vd_threshold")]
        if not pruned:
            for m in vd_modules:
                m.vd_threshold = math.inf
        out: list[dict[str, float]] = [{} for _ in range(self.P)]
        try:
            for split, (x, y) in self.evals.items():
                loss_sum = torch.zeros(self.P, dtype=torch.float64, device=self.device)
                correct = torch.zeros(self.P, dtype=torch.long, device=self.device)
                for s in range(0, len(y), self.eval_chunk):
                    xb, yb = x[s:s + self.eval_chunk], y[s:s + self.eval_chunk]
                    logits = self._fwd(self.params, xb).float()  # (P, b, classes)
                    nll = -F.log_softmax(logits, -1).gather(-1, yb.expand(self.P, -1).unsqueeze(-1)).squeeze(-1)
                    loss_sum += nll.sum(1, dtype=torch.float64)
                    correct += (logits.argmax(-1) == yb).sum(1)
                n = max(1, len(y))
                for i, (lo, c) in enumerate(zip(loss_sum.tolist(), correct.tolist())):
                    out[i][f"{split}_loss"] = lo / n
                    out[i][f"{split}_acc"] = c / n
        finally:
            for m, (_, _, thr) in zip(vd_modules, self.vd):
                m.vd_threshold = thr
        return out

    @torch.no_grad()
    def pruned_states(self) -> list[dict[str, Tensor]]:
        """Every twin's state in the parent's keys, pruned weights exactly 0 (CPU, one transfer),
        computed with the same elementwise ops as ``sparsify.pruned_state``."""
        masked = {w: self.params[w] * (log_alpha(self.params[w], self.params[s]) < thr).to(self.flat.dtype)
                  for w, s, thr in self.vd}
        blocks = [(k, masked[k] if k in masked else self.params[k]) for k in self.export_keys]
        flat = torch.cat([b.flatten(1) for _, b in blocks], 1).to("cpu")
        out: list[dict[str, Tensor]] = [{} for _ in range(self.P)]
        off = 0
        for k, b in blocks:
            n = b[0].numel()
            for i in range(self.P):
                out[i][k] = flat[i, off:off + n].view(b.shape[1:]).clone()
            off += n
        return out

    # ------------------------------------------------------------------ the engine's Members interface

    def rng_scope(self) -> contextlib.AbstractContextManager[Any]:
        """The noise stream is the group's (seeded per epoch in ``start_epoch``); the caller's RNG is kept."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    def epoch0(self, idx: list[int]) -> list[tuple[dict[str, Any], dict[str, Tensor]]]:
        """The parents' states, unchanged, evaluated unpruned."""
        metrics = self.evaluate(pruned=False)
        return [(metrics[i], {k: v.detach().to("cpu", copy=True) for k, v in self.twins[i].parent_state.items()})
                for i in idx]

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        digest = int.from_bytes(hashlib.sha256(",".join(tw.spec.run_id for tw in self.twins).encode())
                                .digest()[:8], "little")
        torch.manual_seed(mix(_NOISE_STREAM, epoch, digest))
        self.order = torch.stack([epoch_order(tw.spec.data_seed, epoch, self.n_train)
                                  for tw in self.twins]).to(self.device)  # (P, N)
        self.kl_scale = (self.kl_weight * kl_ramp(epoch, self.cfg.epochs) / self.n_train).float()
        self.loss_sum = torch.zeros(self.P, dtype=torch.float64, device=self.device)
        self.kl_sum = torch.zeros(self.P, dtype=torch.float64, device=self.device)

    def step(self, i: int, lr_factor: float) -> None:
        idx = self.order[:, i * self.batch:(i + 1) * self.batch]
        self.train_step(self.train_x[idx], self.train_y[idx], lr_factor, self.kl_scale)

    def end_epoch(self) -> list[tuple[bool, float]]:
        del self.order
        alive = self.alive.tolist()  # one host sync per epoch
        objective = (self.loss_sum / self.seen).tolist()
        self.kl_epoch = (self.kl_sum / self.steps).tolist()
        return [(a and math.isfinite(o), o) for a, o in zip(alive, objective, strict=True)]

    def states(self) -> list[dict[str, Tensor]]:
        return self.pruned_states()

    def columns(self, j: int, state: dict[str, Tensor], epoch0: bool = False) -> dict[str, Any]:
        return {"kl": None if epoch0 else self.kl_epoch[j],
                "sparsity_ratio": sparsity_ratio(state, self.twins[j].weight_keys)}

    def lr(self, j: int) -> float:
        return float(self.lr0[j]) * self.lr_at(self.epoch * self.steps - 1)

    def save_resume(self, j: int, epoch: int, elapsed_s: float) -> None:
        """The per-run resume point (shared with twins trained alone): row ``j`` written back into the twin's
        own net and torch optimizer, whose state dicts are saved."""
        tw = self.twins[j]
        if epoch > 0:
            self.write_back(j)
        tw.writer.save_resume(epoch, tw.net.state_dict(), tw.optimizer.state_dict(), {"elapsed_s": elapsed_s})

    def keep(self, idx: list[int]) -> None:
        """Members not in ``idx`` are frozen (zero steps); the stack keeps its shape."""
        mask = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        mask[idx] = True
        self.alive &= mask
