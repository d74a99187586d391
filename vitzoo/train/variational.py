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

This module holds the layers, the maths and the preparation of a twin (:func:`prepare_twin`). A twin
trained alone goes through the engine (:func:`vitzoo.train.engine.train_run`, objective
:class:`~vitzoo.train.objectives.VariationalDropout`) like any run: data order, seeding, resume and
divergence are the engine's. Twins of CNN-s / CNN-m parents are trained many at once by
:mod:`vitzoo.train.sparsify_population` with the same semantics and the same files, built from the
pieces here (:func:`prepare_twin`, the layers and the maths), driven by the same epoch loop.
``noise=False`` (tests only) replaces the Gaussian sample of the local reparameterisation by its mean
in both, which makes training deterministic and the two engines comparable to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.data.pipeline import Preprocessing, preprocessing_for
from vitzoo.data.sources import SplitData
from vitzoo.plan import RunSpec
from vitzoo.train.build import load_parent, make_optimizer
from vitzoo.train.context import Built, RunContext
from vitzoo.zoo.writer import RunWriter

#: Molchanov et al. (2017), eq. 14: the fitted approximation of -KL(q(w|theta, alpha) || log-uniform prior).
K1, K2, K3 = 0.63576, 1.87320, 1.48695
#: Added to w^2 inside the log of log alpha (a weight at exactly 0 has a large, finite log alpha).
LOG_ALPHA_EPS = 1e-8
#: Added to the local-reparameterisation variance before the square root (finite gradients at 0).
VAR_EPS = 1e-8


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


class VariationalDropout:
    """Sparse variational dropout (Molchanov et al. 2017): ``CE + kl_weight * kl_ramp(epoch) / N * KL``.

    ``modules`` are the network's VD layers; history rows gain ``kl`` (mean per step) and
    ``sparsity_ratio`` (of the saved, pruned state's Conv2d/Linear weights).
    """

    equal_batches = False

    def __init__(self, modules: dict[str, Any], kl_weight: float, epochs: int, n_train: int,
                 weight_keys: list[str], device: torch.device):
        self.modules, self.kl_weight, self.epochs, self.n_train = modules, kl_weight, epochs, n_train
        self.weight_keys, self.device = weight_keys, device
        self.kl_scale = 0.0
        self.kl_sum = torch.zeros((), device=device)

    def start_epoch(self, epoch: int) -> None:
        self.kl_scale = self.kl_weight * kl_ramp(epoch, self.epochs) / self.n_train
        self.kl_sum = torch.zeros((), device=self.device)

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        x, y = batch
        ce = F.cross_entropy(net(x), y)
        kl = total_kl(self.modules)
        self.kl_sum += kl.detach()
        return ce + self.kl_scale * kl, y.shape[0]

    def columns(self, state: dict[str, torch.Tensor] | None, steps: int) -> dict[str, Any]:
        kl = (self.kl_sum / steps).item() if steps else None
        return {"kl": kl, "sparsity_ratio": sparsity_ratio(state, self.weight_keys) if state is not None else None}


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
                built, make_optimizer(net, cfg, no_decay=("log_sigma2",)))


def parent_img_size(pcfg: dict[str, Any]) -> int:
    """The input resolution of a parent model, from its config.json."""
    args = pcfg.get("model_args") or {}
    return int(pcfg.get("pretrained_cfg", {}).get("input_size", [0, 0, args.get("img_size", 224)])[-1])
