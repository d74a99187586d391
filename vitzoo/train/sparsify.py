"""Sparsified twins (Model Zoos §1): variational-dropout sparsification of a parent model.

Each run of a ``sparsify:`` stage takes its parent's state (``spec.parent_id`` at
``spec.parent_epoch``) and trains it further with sparse variational dropout (Molchanov, Ashukha &
Vetrov 2017, "Variational Dropout Sparsifies Deep Neural Networks"), as the reference zoos did:

- every ``nn.Conv2d`` / ``nn.Linear`` weight ``w`` gets a parameter ``log_sigma2`` of its shape
  (initialised at ``sparsify.log_sigma2_init``, -10); the posterior is N(w, sigma^2) per weight;
- training samples pre-activations with the local reparameterisation trick:
  ``mu = op(x, w) + b``, ``var = op(x^2, sigma^2)``, ``out = mu + sqrt(var) * N(0, 1)``;
- ``log alpha = log sigma^2 - log(w^2 + eps)``; a weight with ``log alpha >= threshold`` (3) is
  pruned: masked to zero in evaluation and in every saved state;
- loss per batch = cross-entropy (mean) + ``kl_weight * min(1, 0.01 * epoch / epochs) * KL / N_train``
  with Molchanov's approximation ``-KL ~ k1 sigmoid(k2 + k3 log alpha) - 0.5 log(1 + 1/alpha) - k1``
  (summed over all weights; N_train = training samples, i.e. the ELBO per sample).

BatchNorm layers, biases and everything else train as usual (BatchNorm keeps its running stats).

Saved states are plain state dicts of the *original* architecture (the parent's keys, no
``log_sigma2``) with the pruned weights set to exactly zero, so a twin loads like any model of the
zoo. Epoch 0 is the parent's state itself, unchanged. Every history row holds the metrics of the
pruned network and ``sparsity_ratio``: the fraction of Conv2d/Linear weight entries that are exactly
zero in that state (biases and norms excluded).

Like :mod:`vitzoo.train.loop`: the data order is a function of ``(data_seed, epoch)``, RNGs are
re-seeded per epoch, state (weights, ``log_sigma2``, optimizer) is saved after every epoch and a
killed run resumes after its last finished epoch; a non-finite loss stops the run as ``diverged``
with its last good state.

This module trains one twin at a time (:func:`train_sparsify_run`): the reference loop, and the path of
ResNet-18 and ViT twins. Twins of CNN-s / CNN-m parents are trained many at once by
:mod:`vitzoo.train.sparsify_population` with the same semantics and the same files, built from the
pieces here (:func:`prepare_twin`, :func:`write_epoch0`, :func:`history_row`, :func:`finish_twin`).
``noise=False`` (tests only) replaces the Gaussian sample of the local reparameterisation by its mean
in both, which makes training deterministic and the two engines comparable to float tolerance.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.data.pipeline import Preprocessing, preprocessing_for
from vitzoo.data.sources import SplitData
from vitzoo.plan import RunSpec
from vitzoo.recipe import StageConfig
from vitzoo.train.loop import (
    Built,
    RunContext,
    end_epoch,
    finish_run,
    load_parent,
    progress_bar,
    restore,
)
from vitzoo.train.schedule import lr_schedule
from vitzoo.train.seeds import epoch_order, seed_module_rngs, steps_per_epoch
from vitzoo.zoo.writer import RunWriter

#: Molchanov et al. (2017), eq. 14: the fitted approximation of -KL(q(w|theta, alpha) || log-uniform prior).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: Added to w^2 inside the log of log alpha (a weight at exactly 0 has a large, finite log alpha).
LOG_ALPHA_EPS = 1e-8
#: Added to the local-reparameterisation variance before the square root (finite gradients at 0).
VAR_EPS = 1e-8
#: Training images evaluated for the per-epoch train metrics (a statistic, as in loop.py).
TRAIN_EVAL_LIMIT = 10_000


# --------------------------------------------------------------------------- the math


def log_alpha(weight: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``log alpha = log sigma^2 - log(w^2 + eps)`` (elementwise)."""
    return log_sigma2 - torch.log(weight * weight + LOG_ALPHA_EPS)


def kl_approx(la: torch.Tensor) -> torch.Tensor:
    """Molchanov's approximation of KL(q || log-uniform prior) per weight, from log alpha.

    ``KL ~ k1 - k1 sigmoid(k2 + k3 log alpha) + 0.5 log(1 + exp(-log alpha))``: positive,
    decreasing in alpha, and -> 0 as alpha -> inf (the constant C = -k1 of the paper).
    """
    return K1 - K1 * torch.sigmoid(K2 + K3 * la) + 0.5 * F.softplus(-la)


def kl_ramp(epoch: int, epochs: int) -> float:
    """The reference's KL ramp: ``min(1, 0.01 * epoch / epochs)`` (epoch counted from 1)."""
    return min(1.0, 0.01 * epoch / epochs)


def _noise_like(mu: torch.Tensor) -> torch.Tensor:
    """N(0, 1) of ``mu``'s shape, laid out contiguously: the same values as ``randn_like`` for a contiguous
    ``mu``, and 4x faster under vmap, whose batched conv outputs are strided (normal_ has no fast path there)."""
    return torch.randn_like(mu, memory_format=torch.contiguous_format)


class _VDMixin:
    """Shared by the variational-dropout Conv2d/Linear (modules are re-classed in place)."""

    log_sigma2: nn.Parameter
    vd_threshold: float
    vd_noise: bool = True
    """False: training uses the mean of the local reparameterisation (no Gaussian sample). Tests only:
    it makes training deterministic, so the population engine can be proven equal to this one."""
    weight: nn.Parameter

    def log_alpha(self) -> torch.Tensor:
        return log_alpha(self.weight, self.log_sigma2)

    def keep_mask(self) -> torch.Tensor:
        """1 where the weight is kept, 0 where it is pruned (log alpha >= threshold)."""
        return (self.log_alpha() < self.vd_threshold).to(self.weight.dtype)

    def kl(self) -> torch.Tensor:
        return kl_approx(self.log_alpha()).sum()

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: the local reparameterisation ``op(x, w) + b + sqrt(op(x^2, sigma^2)) * N(0, 1)``;
        evaluation: the pruned weight."""
        if self.training:
            mu = self._op(x, self.weight, self.bias)
            if not self.vd_noise:
                return mu
            var = self._op(x * x, torch.exp(self.log_sigma2), None)
            return mu + torch.sqrt(var + VAR_EPS) * _noise_like(mu)
        return self._op(x, self.weight * self.keep_mask(), self.bias)


class VDConv2d(_VDMixin, nn.Conv2d):
    """An ``nn.Conv2d`` with sparse variational dropout on its weight (same parameters + log_sigma2)."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class VDLinear(_VDMixin, nn.Linear):
    """An ``nn.Linear`` with sparse variational dropout on its weight (same parameters + log_sigma2)."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


_VD_CLASSES: dict[type, type] = {nn.Conv2d: VDConv2d, nn.Linear: VDLinear}


def attach_variational_dropout(net: nn.Module, log_sigma2_init: float = -10.0,
                               threshold: float = 3.0, noise: bool = True) -> dict[str, _VDMixin]:
    """Give every ``nn.Conv2d`` / ``nn.Linear`` of ``net`` (exact types) a ``log_sigma2``, in place.

    The modules are re-classed to :class:`VDConv2d` / :class:`VDLinear`: names, weights and biases
    are untouched, ``<module>.log_sigma2`` is added. Returns the sparsified modules by name.
    Subclasses (e.g. torch's quantizable attention projections) are left alone. ``noise=False``
    (tests only) trains on the mean of the local reparameterisation, see ``_VDMixin.vd_noise``.
    """
    out: dict[str, _VDMixin] = {}
    for name, m in net.named_modules():
        cls = _VD_CLASSES.get(type(m))
        if cls is None:
            continue
        m.__class__ = cls
        m.register_parameter("log_sigma2", nn.Parameter(torch.full_like(m.weight, float(log_sigma2_init))))
        m.vd_threshold = float(threshold)
        m.vd_noise = bool(noise)
        out[name] = m  # type: ignore[assignment]
    if not out:
        raise ValueError(f"{type(net).__name__} has no Conv2d/Linear layer to sparsify")
    return out


def total_kl(modules: dict[str, _VDMixin]) -> torch.Tensor:
    return torch.stack([m.kl() for m in modules.values()]).sum()


@torch.no_grad()
def pruned_state(net: nn.Module, modules: dict[str, _VDMixin]) -> dict[str, torch.Tensor]:
    """The network's state in the original architecture's keys, pruned weights set to exactly 0 (CPU)."""
    sd = net.state_dict()
    for name, m in modules.items():
        p = f"{name}." if name else ""
        del sd[p + "log_sigma2"]
        sd[p + "weight"] = m.weight * m.keep_mask()
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def sparsity_ratio(state: dict[str, torch.Tensor], weight_keys: list[str]) -> float:
    """Fraction of the entries of ``weight_keys`` (the Conv2d/Linear weights) that are exactly zero."""
    zeros = sum(int((state[k] == 0).sum()) for k in weight_keys)
    total = sum(state[k].numel() for k in weight_keys)
    return zeros / max(1, total)


# --------------------------------------------------------------------------- one twin


@dataclass
class Twin:
    """One twin ready to train: its parent, data, network (variational dropout attached) and optimizer.

    Shared by :func:`train_sparsify_run` and the population engine
    (:mod:`vitzoo.train.sparsify_population`), which uses ``net`` and ``optimizer`` as the twin's
    on-disk resume format: both engines read and write the same ``.partial/resume.safetensors``.
    """

    spec: RunSpec
    writer: RunWriter
    pcfg: dict[str, Any]
    parent_state: dict[str, torch.Tensor]
    data: SplitData
    pp: Preprocessing
    net: nn.Module
    modules: dict[str, _VDMixin]
    weight_keys: list[str]
    """The Conv2d/Linear weights (what ``sparsity_ratio`` counts)."""
    built: Built
    optimizer: torch.optim.Optimizer


def prepare_twin(spec: RunSpec, ctx: RunContext, *, noise: bool = True,
                 parent: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None) -> Twin:
    """Load the parent of ``spec`` (or take ``parent = (config.json, state)``), check it fits the stage's
    data, attach variational dropout and build the optimizer. The network is on ``ctx.device``."""
    cfg = spec.config
    sp = cfg.sparsify
    if sp is None or spec.parent_id is None:
        raise ValueError(f"{spec.run_id}: not a sparsification run (no `sparsify` section or no parent)")
    pcfg, parent_state = parent if parent is not None else load_parent(spec, ctx)
    data = ctx.cache.splits(cfg.data)
    num_classes = int(pcfg["num_classes"])
    if data.num_classes != num_classes:
        raise ValueError(f"{spec.run_id}: stages.{spec.stage}.data has {data.num_classes} classes but the parent "
                         f"{spec.parent_id} has {num_classes}")
    args = dict(pcfg.get("model_args") or {})
    if args.get("in_chans", 3) != cfg.data.channels:
        raise ValueError(f"stages.{spec.stage}.data.channels={cfg.data.channels} but the parent model takes "
                         f"{args.get('in_chans')} channels")
    pp = preprocessing_for(cfg.data, parent_img_size(pcfg))

    from vitzoo.models import from_config

    net = from_config(pcfg)
    net.load_state_dict(parent_state)
    weight_keys = [f"{n}.weight" if n else "weight" for n, m in net.named_modules() if type(m) in _VD_CLASSES]
    modules = attach_variational_dropout(net, sp.log_sigma2_init, sp.threshold, noise)
    net = net.to(ctx.device)
    vz = pcfg.get("vitzoo", {})
    built = Built(net, lambda: pruned_state(net, modules), pcfg["architecture"], args, num_classes,
                  int(pcfg.get("num_features", 0)), pp, pcfg.get("label_names") or data.label_names,
                  vz.get("head", "linear"), vz.get("head_hidden"))
    return Twin(spec, RunWriter(ctx.zoo_root, spec.run_id), pcfg, parent_state, data, pp, net, modules, weight_keys,
                built, _optimizer(net, cfg))


def parent_img_size(pcfg: dict[str, Any]) -> int:
    """The input resolution of a parent model, from its config.json."""
    args = pcfg.get("model_args") or {}
    return int(pcfg.get("pretrained_cfg", {}).get("input_size", [0, 0, args.get("img_size", 224)])[-1])


def write_epoch0(twin: Twin, metrics: dict[str, Any], elapsed_s: float) -> list[dict[str, Any]]:
    """Epoch 0 of a twin: its parent's state, unchanged, with ``metrics`` (the parent's, unpruned).
    Saves the state, the history and the resume point; returns the history."""
    state0 = {k: v.detach().to("cpu", copy=True) for k, v in twin.parent_state.items()}
    history = [{"epoch": 0, **metrics, "lr": 0.0, "objective_loss": None, "kl": None,
                "sparsity_ratio": sparsity_ratio(state0, twin.weight_keys)}]
    twin.writer.save_epoch(0, state0)
    twin.writer.save_history(history)
    twin.writer.save_resume(0, twin.net.state_dict(), twin.optimizer.state_dict(), {"elapsed_s": elapsed_s})
    return history


def history_row(epoch: int, metrics: dict[str, Any], lr: float, objective: float, kl: float,
                state: dict[str, torch.Tensor], weight_keys: list[str]) -> dict[str, Any]:
    """One epoch's history row: the pruned network's metrics, the last step's lr, the epoch's mean loss
    and mean KL per step, and the saved state's sparsity."""
    return {"epoch": epoch, **metrics, "lr": lr, "objective_loss": objective, "kl": kl,
            "sparsity_ratio": sparsity_ratio(state, weight_keys)}


def finish_twin(twin: Twin, ctx: RunContext, last_good: tuple[int, dict[str, torch.Tensor] | None], status: str,
                wall_s: float) -> dict[str, Any]:
    """config.json + run.json of a trained twin (the commit point); returns run.json's content."""
    return finish_run(twin.spec, ctx, twin.writer, twin.built, dataset=twin.data.name, last_good=last_good,
                      status=status, wall_s=wall_s, precision="float32")


def train_sparsify_run(spec: RunSpec, ctx: RunContext, *, noise: bool = True) -> dict[str, Any]:
    """Train the sparsified twin ``spec`` into ``<zoo>/models/<run_id>``; returns its run.json content.

    ``noise=False`` (tests only) trains without the Gaussian sample of the local reparameterisation.
    """
    writer = RunWriter(ctx.zoo_root, spec.run_id)
    if writer.is_finished():
        return json.loads((writer.folder / "run.json").read_text())
    t_start = time.time()
    twin = prepare_twin(spec, ctx, noise=noise)
    cfg, sp, net, modules, optimizer = spec.config, spec.config.sparsify, twin.net, twin.modules, twin.optimizer
    assert sp is not None

    x_train, y_train = _on(ctx.cache.eval_tensors(cfg.data, "train", twin.pp), ctx.device)
    n_train = x_train.shape[0]
    if n_train == 0:
        raise ValueError(f"{spec.run_id}: the training split is empty")
    steps = steps_per_epoch(n_train, cfg.batch_size)
    lr_at = lr_schedule(cfg, steps)
    saved = set(cfg.saved_epochs())

    def evaluate() -> dict[str, Any]:
        return _evaluate(net, ctx, cfg, twin.pp)

    restored = restore(ctx, writer, spec, net, optimizer)
    if restored is not None:
        start_epoch, history, elapsed = restored
        t_start -= elapsed
    else:  # epoch 0: the parent's state, unchanged
        start_epoch = 0
        net.eval()
        with torch.no_grad():  # evaluate exactly the saved state (no mask): the parent itself
            for m in modules.values():
                m.vd_threshold = math.inf
            metrics = evaluate()
            for m in modules.values():
                m.vd_threshold = float(sp.threshold)
        history = write_epoch0(twin, metrics, time.time() - t_start)
    last_good: tuple[int, dict[str, torch.Tensor] | None] = (
        start_epoch, twin.built.export() if start_epoch not in saved else None)

    status = "done"
    bar = progress_bar(ctx, cfg.epochs * steps, spec.run_id, start_epoch * steps)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        seed_module_rngs(spec.init_seed, spec.data_seed, epoch)
        order = epoch_order(spec.data_seed, epoch, n_train).to(x_train.device)
        kl_scale = sp.kl_weight * kl_ramp(epoch, cfg.epochs) / n_train
        net.train()
        total = torch.zeros((), device=ctx.device)
        total_kl_sum = torch.zeros((), device=ctx.device)
        seen = 0
        diverged = False
        for i in range(steps):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x, y = x_train[idx], y_train[idx]
            step = (epoch - 1) * steps + i
            for g in optimizer.param_groups:
                g["lr"] = g["initial_lr"] * lr_at(step)
            ce = F.cross_entropy(net(x), y)
            kl = total_kl(modules)
            loss = ce + kl_scale * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optimizer.grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optimizer.grad_clip)
            optimizer.step()
            total += loss.detach() * y.shape[0]
            total_kl_sum += kl.detach()
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
        objective = (total / max(1, seen)).item()  # one host sync per epoch, not per step
        diverged = not math.isfinite(objective)
        if not diverged:
            metrics = evaluate()
            diverged = any(isinstance(v, float) and not math.isfinite(v) for k, v in metrics.items()
                           if k.endswith("loss"))
        if diverged:
            status = "diverged"
            ctx.log(f"{spec.run_id}: diverged in epoch {epoch}; keeping epoch {last_good[0]}")
            break
        state = twin.built.export()
        history.append(history_row(epoch, metrics, optimizer.param_groups[0]["lr"], objective,
                                   (total_kl_sum / steps).item(), state, twin.weight_keys))
        last_good = end_epoch(ctx, writer, epoch, state, saved, history, net, optimizer, t_start)
    if bar is not None:
        bar.close()
    return finish_twin(twin, ctx, last_good, status, time.time() - t_start)


# --------------------------------------------------------------------------- helpers


def _on(xy: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return xy[0].to(device), xy[1].to(device)


def _optimizer(net: nn.Module, cfg: StageConfig) -> torch.optim.Optimizer:
    """The stage's optimizer; weight decay (if any) on weights only: never on biases, norms or log_sigma2."""
    from timm.optim import create_optimizer_v2

    o = cfg.optimizer.resolved()
    skip = set(getattr(net, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith((".bias", "log_sigma2")) or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": o["weight_decay"]}]
    kwargs: dict[str, Any] = {}
    if "momentum" in o:
        kwargs["momentum"] = o["momentum"]
    opt = create_optimizer_v2([g for g in groups if g["params"]], opt=o["timm"], lr=o["lr"],
                              weight_decay=o["weight_decay"], **kwargs)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt


@torch.no_grad()
def _evaluate(net: nn.Module, ctx: RunContext, cfg: StageConfig, pp) -> dict[str, Any]:
    """Loss and top-1 of the network in eval mode (pruned weights masked) on train (capped), val, test."""
    net.eval()
    splits = ["train", "val"] + (["test"] if ctx.cache.splits(cfg.data).test is not None else [])
    bs = cfg.eval_batch_size or 4 * cfg.batch_size
    out: dict[str, Any] = {}
    for split in splits:
        x_all, y_all = ctx.cache.eval_tensors(cfg.data, split, pp)
        n = min(len(y_all), TRAIN_EVAL_LIMIT) if split == "train" else len(y_all)
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), device=ctx.device, dtype=torch.long)
        for i in range(0, n, bs):
            x, y = x_all[i:min(i + bs, n)].to(ctx.device), y_all[i:min(i + bs, n)].to(ctx.device)
            logits = net(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        out[f"{split}_loss"] = loss_sum.item() / max(1, n)
        out[f"{split}_acc"] = correct.item() / max(1, n)
    return out
