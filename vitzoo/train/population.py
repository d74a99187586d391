"""Population training: many models of one architecture trained together, vectorised over models.

Why: the classic zoos are thousands of tiny models (CNN-s has 2,464 parameters) trained at batch
size 10. Trained one by one, every step is a handful of kernel launches on a few kilobytes, so the
device idles and Python overhead dominates. Stacking the parameters of P models and running one
``torch.func.vmap``-ed forward/backward over all of them turns P tiny launches into one P-times
larger launch (vmap lowers batched convolutions to grouped convolutions), with every model still
on its own data order, its own optimizer state and its own hyperparameters.

API (no dependency on recipes or the zoo writer; ``population_adapter`` maps RunSpecs to this)::

    members = [PopulationMember(init_seed=s, data_seed=s, optimizer="adam", lr=3e-4,
                                activation="tanh", init="U") for s in range(1, 1001)]

    def on_epoch(epoch, states, metrics):
        # epoch 0 is the untrained model; states[i] maps state-dict keys (module_list.0.weight...)
        # to tensors of model metrics[i]["index"] (its position in `members`). The tensors are
        # live views (CPU for vectorised groups; the model's own device for one-by-one runs):
        # save or clone them inside the callback.
        ...

    history = train_population("cnn-s", 1, 10, members, train_x, train_y,
                               evals={"train": (train_x, train_y), "val": (vx, vy), "test": (tx, ty)},
                               epochs=50, batch_size=10, device="cuda", on_epoch=on_epoch)
    # history[i] = [metrics of epoch 0, 1, ..., epochs] of members[i]

Semantics, shared exactly by the vectorised engine and the reference loop (:func:`train_one_by_one`):

- Init: ``vitzoo.models.cnn.build_cnn(arch, ..., seed=member.init_seed)`` (local generator).
- Data order: epoch ``e`` (1-based) visits the training set in the order
  :func:`vitzoo.train.seeds.epoch_order` ``(data_seed, e, N)``; batches are consecutive slices of it,
  the last one kept or dropped by :func:`vitzoo.train.seeds.drop_last` (the rule of every path).
- Loss: ``F.cross_entropy`` (= log_softmax + NLL, mean over the batch).
- Optimizers: ``adam`` matches ``torch.optim.Adam`` (coupled, L2-style ``weight_decay`` added to the
  gradient), ``adamw`` ``torch.optim.AdamW`` (decoupled decay), ``sgd`` and ``nesterov``
  ``torch.optim.SGD(momentum=..., dampening=0, nesterov=False/True)``, every parameter decayed (the
  classic zoos' rule), op for op (single-tensor implementation), with per-model lr / weight decay / momentum, and
  optional per-model global-norm gradient clipping (``clip_grad_norm_`` semantics).
- Schedule: a per-step multiplier of each model's lr (``constant``, ``cosine``, ``onecycle`` as
  ``torch.optim.lr_scheduler.OneCycleLR``'s lr curve with its defaults, momentum not cycled), or any
  ``f(step, total_steps) -> float``; the reference loop applies the same through ``LambdaLR``.
- Divergence: a model whose loss or gradient turns non-finite is ``diverged`` (``diverged_step``: the
  first such step) and frozen; the others go on. The population freezes it at that step (a device-side
  mask), the reference loop at the start of that epoch (its last good state; the check is read once per
  epoch). No host sync per step on either path; zoos keep the last good epoch either way.
- Metrics per epoch and eval set: ``<name>_loss`` (mean CE) and ``<name>_acc`` (top-1), models in
  eval mode; plus ``running_loss`` / ``running_acc``: the averages over the epoch's training
  batches before each update (None at epoch 0), which is what the legacy zoos report as train
  metrics. They cost nothing, so a caller may drop the "train" eval pass (50k of the 70k evaluated
  MNIST samples per epoch) and use them instead.

Known differences (documented, tested where possible):

- Floating point: a vmap-ed (grouped) convolution sums in a different order than a single one,
  so population and reference agree to float tolerance, not bitwise (tests/test_population.py).
- Dropout: the population draws independent masks per model from one seeded stream
  (``vmap(randomness="different")``); a model's masks therefore depend on its sub-population (and
  so on the population size chosen for the device), and the reference loop draws its own (seeded
  per model). Both are reproducible on the same device; they are not equal to each other.
- ResNet-18: batchnorm buffers are stacked like the parameters and each model's forward updates its
  own running statistics (those of a frozen model are restored); the random crop + flip draws from
  each model's own generator, as one by one. ``auto`` still trains ResNet-18 one by one
  (:data:`AUTO_VECTORISED_ARCHS`): an 11M-parameter model at batch 128-256 is not launch-bound, and
  whether stacking pays on a GPU is not measured; ``mode="population"`` vectorises it.

Resume: with ``checkpoints`` (a :class:`~vitzoo.train.population_state.SnapshotStore`) every
sub-population (and every one-by-one model) writes its whole training state after each epoch, in one
layout for both paths; a later call continues each model after its snapshot's epoch, bit for bit
where the same models resume together (tests/test_population.py).

Population size: :func:`max_population_size` estimates how many models fit in (a fraction of) the
device memory; larger member lists are split into sub-populations, and members that cannot share
one forward (different activation or dropout: a different module) or one update rule (optimizer)
are grouped apart. If a sub-population still runs out of memory in its first step it is halved.
On CPU sub-populations are capped at ``CPU_MAX_POPULATION`` (64) models: the step is bound by
memory bandwidth there and larger stacks only spill the caches.
On CPU, groups of fewer than ``MIN_POPULATION['cpu']`` models are trained by the reference loop
(below that the vectorised step is not faster; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from vitzoo.models.cnn import build_cnn
from vitzoo.train import functional_optim as fopt
from vitzoo.train.feed import CropFlip, crop_flip
from vitzoo.train.population_state import Snapshot, SnapshotStore, rng_state, set_rng_state
from vitzoo.train.schedule import lr_factor
from vitzoo.train.seeds import augment_generator, epoch_order, mix, steps_per_epoch

Schedule = str | Callable[[int, int], float]
OnEpoch = Callable[[int, list[dict[str, Tensor]], list[dict[str, Any]]], None]
EvalSets = dict[str, tuple[Tensor, Tensor]]

#: Architectures the vectorised engine can train (ResNet-18: batchnorm statistics stacked per model).
VECTORISED_ARCHS = ("cnn-s", "cnn-m", "resnet18")
#: Those ``auto`` mode vectorises. ResNet-18 is not among them until measured on a GPU: an 11M-parameter
#: model at batch 128-256 is not launch-bound as CNN-s at batch 10 is, so stacking may not pay
#: (``mode="population"`` / ``VITZOO_POPULATION=on`` force it; benchmarks/population.py --arch resnet18).
AUTO_VECTORISED_ARCHS = ("cnn-s", "cnn-m")

#: Environment switch read by every population engine (classic groups, sparsified twins, ViT fine-tunes):
#: ``auto`` (default: vectorise where measured faster), ``on`` (vectorise every group the engine supports,
#: whatever its size, architecture or device: for measuring new hardware), ``off`` (everything one by one).
ENV_SWITCH = "VITZOO_POPULATION"


def population_switch() -> str:
    """``auto``, ``on`` or ``off`` from :data:`ENV_SWITCH` (an invalid value is an error naming it)."""
    v = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if v not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_SWITCH}={v!r}; allowed: auto, on, off")
    return v


#: Smallest group that ``auto`` mode vectorises, per device type. Measured on a shared 2-core CPU,
#: one thread (benchmarks/RESULTS.md): per-model step time 3.4 ms at 2 models, 2.2 ms at 8 (no
#: better than a plain step, 2.0-2.4 ms), 1.7 ms at 16, 1.4 ms at 32-128. On GPUs 2+ gains.
MIN_POPULATION = {"cpu": 16, "cuda": 2}

#: Largest sub-population on CPU: the step is memory-bandwidth bound there, and the per-model
#: step time is flat from ~32 to ~128 models and worse beyond (activations leave the caches).
CPU_MAX_POPULATION = 64


#: Update rules the vectorised engine reproduces (the recipe names of vitzoo.presets.OPTIMIZERS).
OPTIMIZERS = ("adam", "adamw", "sgd", "nesterov")


@dataclass(frozen=True)
class PopulationMember:
    """One model of a population: its seeds, optimizer hyperparameters and architecture options."""

    init_seed: int
    data_seed: int
    optimizer: str = "adam"
    """``adam``, ``adamw``, ``sgd`` (momentum SGD) or ``nesterov``."""
    lr: float = 1e-3
    """Peak learning rate (the schedule multiplies it)."""
    weight_decay: float = 0.0
    momentum: float = 0.9
    """SGD momentum (ignored by Adam)."""
    activation: str | None = None
    dropout: float = 0.0
    init: str | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None
    """Clip each model's global gradient norm (``torch.nn.utils.clip_grad_norm_``); None = off."""
    name: str = ""
    """Unique key of the model in resume snapshots (``checkpoint_dir``); the caller's run id."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ValueError(f"invalid hyperparameters: lr={self.lr}, wd={self.weight_decay}, momentum={self.momentum}")


# --------------------------------------------------------------------------- shared pieces


def step_factor(schedule: Schedule, step: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``: a callable, or a name
    of :func:`vitzoo.train.schedule.lr_factor` (no warmup)."""
    if callable(schedule):
        return float(schedule(step, total))
    return lr_factor(schedule, step, total)


def _group_key(m: PopulationMember) -> tuple[Any, ...]:
    """Members that can share one vectorised forward and update rule."""
    return (m.activation, m.dropout, m.optimizer, m.betas, m.eps)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_chunk(n_models: int, act_bytes_per_sample: int, budget_bytes: int, cap: int = 4096) -> int:
    return max(1, min(cap, budget_bytes // max(1, n_models * act_bytes_per_sample)))


def activation_bytes_per_sample(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Bytes of all intermediate outputs of one sample's forward (a memory estimate for sizing)."""
    total = 0

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros(1, *in_shape, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    return total


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # fallback: assume 4 GiB


def max_population_size(arch: str, in_chans: int, num_classes: int, batch_size: int,
                        device: str | torch.device, fraction: float = 0.5, cap: int = 4096) -> int:
    """How many models fit in ``fraction`` of the free device memory (an estimate, halved on OOM).

    Per model: parameters, gradients and two optimizer buffers plus temporaries (~6 copies of the
    parameters), and forward+backward activations of one batch (~3 copies of the activations).
    """
    dev = _resolve_device(device)
    m = build_cnn(arch, in_chans, num_classes)
    from vitzoo.models.cnn import IMG_SIZE

    img = IMG_SIZE.get(arch, 32)
    per_model = 6 * sum(p.numel() * 4 for p in m.parameters())
    per_model += 3 * batch_size * activation_bytes_per_sample(m, (in_chans, img, img))
    if dev.type == "cpu":
        cap = min(cap, CPU_MAX_POPULATION)
    return int(max(1, min(cap, fraction * _free_bytes(dev) // max(per_model, 1))))


def _metrics_template(index: int, epoch: int) -> dict[str, Any]:
    return {"index": index, "epoch": epoch, "status": "ok", "diverged_step": None}


# --------------------------------------------------------------------------- vectorised engine


class CnnPopulation:
    """P classic CNNs of one architecture as one flat (P, n_params) buffer + functional optimizer updates
    (stacked batchnorm buffers; a vmap-ed forward/backward; the step, evaluation and states of the stack)."""

    def __init__(self, arch: str, in_chans: int, num_classes: int, members: Sequence[PopulationMember],
                 device: torch.device, dropout_seed: int) -> None:
        self.members = list(members)
        self.device = device
        self.P = len(members)
        m0 = members[0]
        models = [build_cnn(arch, in_chans, num_classes, m.activation, m.dropout, m.init, m.init_seed)
                  for m in members]
        self.template = models[0].to(device)
        self.names = [n for n, _ in self.template.named_parameters()]
        # Module buffers (batchnorm running statistics) are stacked too: under vmap each model's
        # forward updates its own row in place, exactly as a lone module updates its buffers.
        self.buffers = {n: torch.stack([dict(mm.named_buffers())[n] for mm in models]).to(device)
                        for n, _ in self.template.named_buffers()}
        # All parameters of a model live in one row of a flat (P, n_params) buffer; the dict
        # handed to functional_call holds (P, *shape) views of it. The optimizer then updates
        # every parameter of every model in a handful of kernels, whatever the layer count.
        stacked = [torch.stack([dict(mm.named_parameters())[n].detach() for mm in models]) for n in self.names]
        self.flat = torch.cat([t.flatten(1) for t in stacked], 1).to(device).contiguous()
        self.params: dict[str, Tensor] = {}
        off = 0
        for n, t in zip(self.names, stacked, strict=True):
            k = t[0].numel()
            self.params[n] = self.flat[:, off:off + k].view(self.P, *t.shape[1:])
            off += k
        del models, stacked
        self.optimizer = m0.optimizer
        f32 = dict(dtype=torch.float32, device=device)
        self.lr = torch.tensor([m.lr for m in members], **f32)
        self.wd = torch.tensor([m.weight_decay for m in members], **f32)
        self.mom = torch.tensor([m.momentum for m in members], **f32)
        self.any_wd = any(m.weight_decay != 0 for m in members)
        self.clip = None
        if any(m.grad_clip is not None for m in members):
            self.clip = torch.tensor([m.grad_clip if m.grad_clip is not None else math.inf for m in members], **f32)
        self.betas, self.eps = m0.betas, m0.eps
        self.state: dict[str, Tensor] = {}
        if self.optimizer in ("adam", "adamw"):
            self.state["exp_avg"] = torch.zeros_like(self.flat)
            self.state["exp_avg_sq"] = torch.zeros_like(self.flat)
        else:
            self.state["momentum_buffer"] = torch.zeros_like(self.flat)
        self.step_count = 0
        self.alive = torch.ones(self.P, dtype=torch.bool, device=device)
        self.diverged_step = torch.full((self.P,), -1, dtype=torch.long, device=device)
        self.dropout = m0.dropout
        self.dropout_seed = dropout_seed
        self.reset_running()

        template = self.template

        def loss_fn(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                    y: Tensor) -> tuple[Tensor, Tensor]:
            logits = functional_call(template, (params, buffers), (x,))
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).sum()

        def fwd(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(template, (params, buffers), (x,))

        rnd = "different" if self.dropout > 0 else "error"
        self._grad = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0), randomness=rnd)
        self._fwd = vmap(fwd, in_dims=(0, 0, None))

    def snapshot(self, epoch: int, names: list[str]) -> Snapshot:
        """The whole training state after ``epoch`` (see :mod:`vitzoo.train.population_state`)."""
        tensors = {"flat": self.flat, "alive": self.alive, "diverged_step": self.diverged_step}
        tensors.update({f"opt/{k}": v for k, v in self.state.items()})
        tensors.update({f"buffers/{k}": v for k, v in self.buffers.items()})
        return Snapshot(epoch, self.step_count, names, tensors,
                        [(n, list(p.shape[1:])) for n, p in self.params.items()], rng_state(self.device))

    def load(self, snap: Snapshot) -> None:
        """Continue from ``snap`` (rows in member order)."""
        with torch.no_grad():
            self.flat.copy_(snap.tensors["flat"])
            for k, v in self.state.items():
                v.copy_(snap.tensors[f"opt/{k}"])
            for k, v in self.buffers.items():
                v.copy_(snap.tensors[f"buffers/{k}"])
        self.alive = snap.tensors["alive"].to(self.device)
        self.diverged_step = snap.tensors["diverged_step"].to(self.device)
        self.step_count = snap.step

    def reset_running(self) -> None:
        """Zero the running (during-training) loss / correct counts of the epoch."""
        self.run_loss = torch.zeros(self.P, dtype=torch.float64, device=self.device)
        self.run_correct = torch.zeros(self.P, dtype=torch.long, device=self.device)
        self.run_seen = 0

    def running(self) -> tuple[list[float | None], list[float | None]]:
        if not self.run_seen:
            return [None] * self.P, [None] * self.P
        return (self.run_loss / self.run_seen).tolist(), (self.run_correct.double() / self.run_seen).tolist()

    def train_step(self, x: Tensor, y: Tensor, factor: float, step_index: int) -> None:
        """One optimizer step of every model on its own batch x[i], y[i] (no host sync)."""
        self.template.train()
        was_alive = self.alive
        before = {n: b.clone() for n, b in self.buffers.items()} if self.buffers else {}
        grads, (loss, correct) = self._grad(self.params, self.buffers, x, y)
        for n, b in self.buffers.items():  # a frozen model's statistics stay frozen too
            b.copy_(torch.where(was_alive.view(-1, *[1] * (b.dim() - 1)), b, before[n]))
        g = torch.cat([grads[n].flatten(1) for n in self.names], 1)  # (P, n_params), like self.flat
        ok = self.alive & torch.isfinite(loss) & torch.isfinite(g).all(1)
        newly = self.alive & ~ok
        self.diverged_step = torch.where(newly, torch.full_like(self.diverged_step, step_index), self.diverged_step)
        self.alive = ok
        okf = ok.to(torch.float32)
        if self.clip is not None:  # torch.nn.utils.clip_grad_norm_(foreach=False), per model
            norms = torch.stack([torch.linalg.vector_norm(grads[n].flatten(1), 2, dim=1) for n in self.names])
            g = g * fopt.clip_coefficients(norms, self.clip)[:, None]
        b = x.shape[1]
        self.run_loss += torch.where(ok, loss.double() * b, 0.0)
        self.run_correct += torch.where(ok, correct, 0)
        self.run_seen += b
        lr = self.lr * (factor * okf)  # frozen models: zero step on zeroed gradients: params unchanged
        self.step_count += 1
        t = self.step_count
        p = self.flat
        with torch.no_grad():
            if self.any_wd and self.optimizer == "adamw":  # torch.optim.AdamW: param.mul_(1 - lr * wd) first
                fopt.decay_(p, lr, self.wd)
            elif self.any_wd:  # torch: grad = grad.add(param, alpha=weight_decay)
                g = g + self.wd[:, None] * p
            g = torch.where(ok[:, None], g, torch.zeros((), dtype=g.dtype, device=g.device))
            if self.optimizer in ("adam", "adamw"):  # torch.optim.Adam(W), single-tensor path, op for op
                fopt.adam_(p, g, self.state["exp_avg"], self.state["exp_avg_sq"], lr, t, self.betas, self.eps)
            else:  # torch.optim.SGD(momentum, dampening=0, nesterov)
                fopt.sgd_(p, g, self.state["momentum_buffer"], lr, self.mom, self.optimizer == "nesterov")

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
        """Mean CE and top-1 of every model on (x, y): (P,) tensors on the device."""
        self.template.eval()
        loss_sum = torch.zeros(self.P, dtype=torch.float64, device=self.device)
        correct = torch.zeros(self.P, dtype=torch.long, device=self.device)
        for s in range(0, len(x), chunk):
            xb, yb = x[s:s + chunk], y[s:s + chunk]
            logits = self._fwd(self.params, self.buffers, xb)  # (P, b, classes)
            lp = F.log_softmax(logits, dim=-1)
            nll = -lp.gather(-1, yb.expand(self.P, -1).unsqueeze(-1)).squeeze(-1)
            loss_sum += nll.sum(1, dtype=torch.float64)
            correct += (logits.argmax(-1) == yb).sum(1)
        return loss_sum / len(x), correct.double() / len(x)

    def states(self) -> list[dict[str, Tensor]]:
        flat = self.flat if self.device.type == "cpu" else self.flat.to("cpu")  # one transfer per epoch
        out: list[dict[str, Tensor]] = [{} for _ in range(self.P)]
        off = 0
        for n, p in self.params.items():
            k = p[0].numel()
            block = flat[:, off:off + k].view(p.shape)
            for i in range(self.P):
                out[i][n] = block[i]
            off += k
        for n, b in self.buffers.items():
            b = b if self.device.type == "cpu" else b.to("cpu")
            for i in range(self.P):
                out[i][n] = b[i]
        return out


def _train_vectorised(arch: str, in_chans: int, num_classes: int, members: Sequence[PopulationMember],
                      indices: Sequence[int], train_x: Tensor, train_y: Tensor, evals: EvalSets, epochs: int,
                      batch_size: int, device: torch.device, on_epoch: OnEpoch | None, schedule: Schedule,
                      dropout_seed: int, eval_budget: int, store: SnapshotStore | None = None,
                      stop_after_epoch: int | None = None, augment: CropFlip | None = None) -> list[list[dict[str, Any]]]:
    pop = CnnPopulation(arch, in_chans, num_classes, members, device, dropout_seed)
    names = [m.name for m in members]
    start = _start(store, names)
    if start is not None:
        pop.load(start)
    n = len(train_x)
    steps = steps_per_epoch(n, batch_size)
    total = steps * epochs
    act = activation_bytes_per_sample(pop.template, tuple(train_x.shape[1:]))
    chunk = eval_chunk(pop.P, act, eval_budget)
    history: list[list[dict[str, Any]]] = [[] for _ in members]
    # Probe one step on copies first: an OOM surfaces here, before any callback has run.
    probe(pop, train_x, train_y, batch_size, chunk, evals)

    def report(epoch: int) -> None:
        mets = [_metrics_template(idx, epoch) for idx in indices]
        for name, (ex, ey) in evals.items():
            loss, acc = pop.evaluate(ex, ey, chunk)
            for i, (lo, ac) in enumerate(zip(loss.tolist(), acc.tolist(), strict=True)):
                mets[i][f"{name}_loss"], mets[i][f"{name}_acc"] = lo, ac
        rl, ra = pop.running()
        factor = step_factor(schedule, gstep - 1, total) if epoch else 0.0
        for i in range(pop.P):
            mets[i]["running_loss"], mets[i]["running_acc"] = rl[i], ra[i]
            mets[i]["lr"] = members[i].lr * factor
        pop.reset_running()
        alive = pop.alive.tolist()
        dstep = pop.diverged_step.tolist()
        for i in range(pop.P):
            if not alive[i]:
                mets[i]["status"], mets[i]["diverged_step"] = "diverged", dstep[i]
            history[i].append(mets[i])
        if on_epoch is not None:
            on_epoch(epoch, pop.states(), mets)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _seed_dropout(start, device, dropout_seed, *[m.init_seed for m in members[:8]], len(members))
        if start is None:
            report(0)
        first, gstep = (start.epoch + 1, start.step) if start is not None else (1, 0)
        for epoch in range(first, epochs + 1):
            perms = torch.stack([epoch_order(m.data_seed, epoch, n) for m in members]).to(device)
            # Each model's own augmentation stream, seeded as train_one seeds it: the same crops and flips.
            gens = [augment_generator(m.data_seed, epoch, device) for m in members] if augment is not None else []
            for s in range(steps):
                idx = perms[:, s * batch_size:(s + 1) * batch_size]
                xb = train_x[idx]
                if augment is not None:
                    xb = torch.stack([crop_flip(xb[i], g, augment.pad, augment.flip, augment.fill)
                                      for i, g in enumerate(gens)])
                pop.train_step(xb, train_y[idx], step_factor(schedule, gstep, total), gstep)
                gstep += 1
            del perms
            report(epoch)
            _checkpoint(store, epoch, epochs, lambda e: pop.snapshot(e, names), stop_after_epoch)
    return history


def _start(store: SnapshotStore | None, names: list[str]) -> Snapshot | None:
    """The snapshot a group resumes from (the caller groups members by resume epoch), or None."""
    if store is None or store.epoch_of(names[0]) is None:
        return None
    return store.load(names)


def _seed_dropout(start: Snapshot | None, device: torch.device, *seed: int) -> None:
    """Seed the global RNG (dropout) of a group: fresh, or the snapshot's state, or — when the group's
    members were saved with other companions — a seed derived from the resume epoch."""
    if start is not None and start.rng:
        set_rng_state(start.rng, device)
    else:
        torch.manual_seed(mix(*seed, *([start.epoch] if start is not None else [])))


def _checkpoint(store: SnapshotStore | None, epoch: int, epochs: int, snapshot: Callable[[int], Snapshot],
                stop_after_epoch: int | None) -> None:
    """After ``epoch`` (and its ``on_epoch``): write the resume snapshot (none after the last epoch:
    the caller finishes the models then). ``stop_after_epoch`` then simulates an interruption."""
    if store is not None and epoch < epochs:
        store.save(snapshot(epoch))
    if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < epochs:
        raise KeyboardInterrupt(f"stop_after_epoch={stop_after_epoch}")


def probe(pop: CnnPopulation, train_x: Tensor, train_y: Tensor, batch_size: int, chunk: int, evals: EvalSets) -> None:
    idx = torch.zeros(pop.P, min(batch_size, len(train_x)), dtype=torch.long, device=train_x.device)
    with torch.random.fork_rng(devices=[pop.device] if pop.device.type == "cuda" else []):
        buffers = {n: b.clone() for n, b in pop.buffers.items()}  # the probe must not move running statistics
        grads, _ = pop._grad(pop.params, buffers, train_x[idx], train_y[idx])
        del grads
        for ex, _ey in list(evals.values())[:1]:
            with torch.no_grad():
                pop.template.eval()
                pop._fwd(pop.params, buffers, ex[:chunk])


# --------------------------------------------------------------------------- reference loop


def _make_optimizer(model: nn.Module, m: PopulationMember) -> torch.optim.Optimizer:
    if m.optimizer in ("adam", "adamw"):
        cls = torch.optim.AdamW if m.optimizer == "adamw" else torch.optim.Adam
        return cls(model.parameters(), lr=m.lr, betas=m.betas, eps=m.eps, weight_decay=m.weight_decay, foreach=False)
    return torch.optim.SGD(model.parameters(), lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay,
                           nesterov=m.optimizer == "nesterov", foreach=False)


@torch.no_grad()
def _evaluate_one(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> tuple[float, float]:
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for s in range(0, len(x), chunk):
        logits = model(x[s:s + chunk])
        yb = y[s:s + chunk]
        loss_sum += F.cross_entropy(logits, yb, reduction="none").sum(dtype=torch.float64)
        correct += (logits.argmax(-1) == yb).sum()
    return float(loss_sum) / len(x), float(correct) / len(x)


def train_one(arch: str, in_chans: int, num_classes: int, member: PopulationMember, train_x: Tensor,
              train_y: Tensor, evals: EvalSets, epochs: int, batch_size: int, device: str | torch.device | None = None,
              on_epoch: OnEpoch | None = None, schedule: Schedule = "constant", index: int = 0,
              augment: CropFlip | None = None, dropout_seed: int = 0, eval_batch_size: int = 1000,
              store: SnapshotStore | None = None, stop_after_epoch: int | None = None) -> list[dict[str, Any]]:
    """The plain reference loop: one model, ``torch.optim`` and an ``nn.Module``, same semantics.

    ``augment`` (a :class:`CropFlip`) applies :func:`crop_flip` on the device with a generator seeded per
    (data_seed, epoch). Dropout (and nothing else) uses the global RNG, seeded per model inside a
    forked RNG state, so the caller's RNG is untouched. With a ``store`` the model resumes from
    its snapshot and writes one after every epoch (P = 1: the same format as a vectorised group).
    """
    dev = _resolve_device(device)
    m = member
    model = build_cnn(arch, in_chans, num_classes, m.activation, m.dropout, m.init, m.init_seed).to(dev)
    opt = _make_optimizer(model, m)
    n = len(train_x)
    steps = steps_per_epoch(n, batch_size)
    total = steps * epochs
    history: list[dict[str, Any]] = []
    diverged_step: int | None = None
    start = _start(store, [m.name])
    if start is not None:
        _load_one(model, opt, start)
        diverged_step = None if bool(start.tensors["alive"][0]) else int(start.tensors["diverged_step"][0])
    running = {"loss": torch.zeros((), dtype=torch.float64, device=dev), "correct": torch.zeros((), dtype=torch.long,
               device=dev), "seen": 0}

    def report(epoch: int) -> None:
        met = _metrics_template(index, epoch)
        seen = running["seen"]
        met["running_loss"] = float(running["loss"]) / seen if seen else None
        met["running_acc"] = float(running["correct"]) / seen if seen else None
        running.update(loss=torch.zeros_like(running["loss"]), correct=torch.zeros_like(running["correct"]), seen=0)
        met["lr"] = m.lr * step_factor(schedule, gstep - 1, total) if epoch else 0.0
        for name, (ex, ey) in evals.items():
            met[f"{name}_loss"], met[f"{name}_acc"] = _evaluate_one(model, ex, ey, eval_batch_size)
        if diverged_step is not None:
            met["status"], met["diverged_step"] = "diverged", diverged_step
        history.append(met)
        if on_epoch is not None:
            on_epoch(epoch, [dict(model.state_dict())], [met])

    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        _seed_dropout(start, dev, dropout_seed, m.init_seed, m.data_seed)
        if start is None:
            report(0)
        first, gstep = (start.epoch + 1, start.step) if start is not None else (1, 0)
        for epoch in range(first, epochs + 1):
            if diverged_step is None:
                first_bad = torch.full((), -1, dtype=torch.long, device=dev)
                good = {k: v.clone() for k, v in model.state_dict().items()}  # restored if the epoch diverges
                model.train()
                perm = epoch_order(m.data_seed, epoch, n).to(dev)
                gen = None
                if augment:
                    gen = augment_generator(m.data_seed, epoch, dev)
                for s in range(steps):
                    idx = perm[s * batch_size:(s + 1) * batch_size]
                    x, y = train_x[idx], train_y[idx]
                    if augment is not None:
                        assert gen is not None
                        x = crop_flip(x, gen, augment.pad, augment.flip, augment.fill)
                    opt.zero_grad(set_to_none=True)
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                    loss.backward()
                    # No host sync per step: the first non-finite loss or gradient is noted on the device
                    # (a non-finite entry makes its tensor's norm non-finite) and read once per epoch.
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    finite = torch.isfinite(loss) & torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
                    first_bad = torch.where(~finite & (first_bad < 0), gstep, first_bad)
                    if m.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), m.grad_clip, foreach=False)
                    for g in opt.param_groups:  # = LambdaLR: base lr x the schedule's factor at this step
                        g["lr"] = m.lr * step_factor(schedule, gstep, total)
                    opt.step()
                    gstep += 1
                    running["loss"] += loss.detach().double() * len(y)
                    running["correct"] += (logits.detach().argmax(-1) == y).sum()
                    running["seen"] += len(y)
                if int(first_bad) >= 0:  # the epoch's one sync: the model diverged in it, and is frozen
                    diverged_step = int(first_bad)  # at its last good (finite) state, the epoch's start
                    model.load_state_dict(good)
                del good
            report(epoch)
            _checkpoint(store, epoch, epochs, lambda e, s=gstep, d=diverged_step: _snapshot_one(model, opt, e, s, d, m.name),
                        stop_after_epoch)
    return history


def _snapshot_one(model: nn.Module, opt: torch.optim.Optimizer, epoch: int, step: int, diverged_step: int | None,
                  name: str) -> Snapshot:
    """A one-model snapshot in the vectorised engine's layout (flat rows, named_parameters order)."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    flat = torch.cat([p.detach().flatten() for p in params])[None]
    keys = ("exp_avg", "exp_avg_sq") if isinstance(opt, torch.optim.Adam) else ("momentum_buffer",)
    tensors = {"flat": flat, "alive": torch.tensor([diverged_step is None]),
               "diverged_step": torch.tensor([-1 if diverged_step is None else diverged_step])}
    for k in keys:
        tensors[f"opt/{k}"] = torch.cat([(opt.state[p].get(k) if opt.state[p].get(k) is not None
                                         else torch.zeros_like(p)).detach().flatten() for p in params])[None]
    tensors.update({f"buffers/{k}": v[None] for k, v in model.named_buffers()})
    return Snapshot(epoch, step, [name], tensors, [(k, list(p.shape)) for k, p in named], rng_state(flat.device))


def _load_one(model: nn.Module, opt: torch.optim.Optimizer, snap: Snapshot) -> None:
    """Continue a one-model run from row 0 of ``snap`` (which either engine may have written)."""
    model.load_state_dict(snap.row_state(0))
    named = list(model.named_parameters())
    adam = isinstance(opt, torch.optim.Adam)
    state: dict[int, dict[str, Any]] = {i: {"step": torch.tensor(float(snap.step))} if adam else {}
                                        for i in range(len(named))}
    for key, rows in snap.tensors.items():
        if key.startswith("opt/"):
            off = 0
            for i, (_, p) in enumerate(named):
                state[i][key[4:]] = rows[0, off:off + p.numel()].view_as(p).clone()
                off += p.numel()
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def train_one_by_one(arch: str, in_chans: int, num_classes: int, members: Sequence[PopulationMember],
                     train_x: Tensor, train_y: Tensor, evals: EvalSets, epochs: int, batch_size: int,
                     device: str | torch.device | None = None, on_epoch: OnEpoch | None = None,
                     schedule: Schedule = "constant", augment: CropFlip | None = None, dropout_seed: int = 0,
                     eval_batch_size: int = 1000) -> list[list[dict[str, Any]]]:
    """Train ``members`` sequentially with :func:`train_one` (the baseline and the ResNet path)."""
    dev = _resolve_device(device)
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    evals = {k: (x.to(dev), y.to(dev)) for k, (x, y) in evals.items()}
    return [train_one(arch, in_chans, num_classes, m, train_x, train_y, evals, epochs, batch_size, dev, on_epoch,
                      schedule, i, augment, dropout_seed, eval_batch_size) for i, m in enumerate(members)]


# --------------------------------------------------------------------------- entry point


def train_population(arch: str, in_chans: int, num_classes: int, members: Sequence[PopulationMember],
                     train_x: Tensor, train_y: Tensor, evals: EvalSets, epochs: int, batch_size: int,
                     device: str | torch.device | None = None, on_epoch: OnEpoch | None = None,
                     schedule: Schedule = "constant", mode: str = "auto", max_population: int | None = None,
                     augment: CropFlip | None = None, dropout_seed: int = 0, eval_memory_bytes: int = 256 << 20,
                     min_population: int | None = None, checkpoints: SnapshotStore | None = None,
                     stop_after_epoch: int | None = None) -> list[list[dict[str, Any]]]:
    """Train ``members`` (one architecture) and return each member's per-epoch metrics.

    ``mode``: ``auto`` (vectorise groups of :data:`AUTO_VECTORISED_ARCHS` of at least ``min_population``
    models, else one by one), ``population`` (force vectorised; error where impossible) or ``sequential``.
    ``max_population`` caps the models per vectorised sub-population (default: from device memory).
    ``eval_memory_bytes`` bounds the activations of one vectorised evaluation chunk.
    ``min_population``: in ``auto`` mode, groups smaller than this train one by one (default
    :data:`MIN_POPULATION` for the device type: below it the vectorised step is not faster).
    Data (``train_x`` float (N, C, H, W), ``train_y`` long (N,), and ``evals``) is moved to the
    device once. ``on_epoch`` is called after every epoch (0 = untrained) per sub-population.

    ``checkpoints``: after every epoch (and its ``on_epoch``) each sub-population writes a resume
    snapshot there (:mod:`vitzoo.train.population_state`; members need unique ``name`` s); members
    found there continue after their snapshot's epoch, with the companions they were saved with
    (no ``on_epoch`` call for the epochs already done). The caller discards the snapshots when done.
    ``stop_after_epoch`` raises KeyboardInterrupt after that epoch's snapshot (tests: an interruption).
    """
    if mode not in ("auto", "population", "sequential"):
        raise ValueError(f"mode must be auto, population or sequential; got {mode!r}")
    dev = _resolve_device(device)
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    evals = {k: (x.to(dev), y.to(dev)) for k, (x, y) in evals.items()}
    members = list(members)
    history: list[list[dict[str, Any]]] = [[] for _ in members]
    vectorisable = arch in (VECTORISED_ARCHS if mode == "population" else AUTO_VECTORISED_ARCHS)
    if mode == "population" and not vectorisable:
        raise ValueError(f"{arch} cannot be vectorised (engine: {', '.join(VECTORISED_ARCHS)}); "
                         "use mode='sequential'")
    store = checkpoints
    if store is not None:
        names = [m.name for m in members]
        if "" in names or len(set(names)) != len(names):
            raise ValueError("checkpoints need a unique, non-empty name per member")
    resume = {"store": store, "stop_after_epoch": stop_after_epoch}

    def sequential(idx: list[int]) -> None:
        for i in idx:
            history[i] = train_one(arch, in_chans, num_classes, members[i], train_x, train_y, evals, epochs,
                                   batch_size, dev, on_epoch, schedule, i, augment, dropout_seed, **resume)

    if mode == "sequential" or not vectorisable:
        sequential(list(range(len(members))))
        return history

    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(_group_key(m), []).append(i)
    cap = max_population or max_population_size(arch, in_chans, num_classes, batch_size, dev)
    least = min_population or MIN_POPULATION.get(dev.type, 2)
    for idx in groups.values():
        # Members with snapshots resume together with the companions they were saved with; the rest
        # (and everyone on a fresh run) are split into balanced sub-populations.
        cohorts = [[idx[j] for j in c] for c in store.cohorts([members[i].name for i in idx])] if store else []
        resumed = {i for c in cohorts for i in c}
        units = [chunk for c in cohorts for chunk in balanced_chunks(c, cap)]
        units += balanced_chunks([i for i in idx if i not in resumed], cap)
        for chunk in units:
            if mode == "auto" and len(chunk) < least:
                sequential(chunk)
                continue
            _run_chunks(arch, in_chans, num_classes, members, chunk, len(chunk), train_x, train_y, evals, epochs,
                        batch_size, dev, on_epoch, schedule, dropout_seed, eval_memory_bytes, history,
                        augment=augment, **resume)
    return history


def balanced_chunks(idx: list[int], cap: int) -> list[list[int]]:
    """Split ``idx`` into the fewest chunks of at most ``cap``, of near-equal size (70, cap 64 → 35 + 35:
    no straggler chunk too small to vectorise well)."""
    n = max(1, -(-len(idx) // max(cap, 1)))
    size, extra = divmod(len(idx), n)
    out, s = [], 0
    for k in range(n):
        e = s + size + (1 if k < extra else 0)
        out.append(idx[s:e])
        s = e
    return [c for c in out if c]


def _run_chunks(arch: str, in_chans: int, num_classes: int, members: list[PopulationMember], idx: list[int], cap: int,
                train_x: Tensor, train_y: Tensor, evals: EvalSets, epochs: int, batch_size: int, dev: torch.device,
                on_epoch: OnEpoch | None, schedule: Schedule, dropout_seed: int, eval_budget: int,
                history: list[list[dict[str, Any]]], **resume: Any) -> None:
    queue = [idx[s:s + cap] for s in range(0, len(idx), cap)]
    while queue:
        chunk = queue.pop(0)
        try:
            hist = _train_vectorised(arch, in_chans, num_classes, [members[i] for i in chunk], chunk, train_x,
                                     train_y, evals, epochs, batch_size, dev, on_epoch, schedule, dropout_seed,
                                     eval_budget, **resume)
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            half = len(chunk) // 2
            queue[:0] = [chunk[:half], chunk[half:]]
            continue
        for i, h in zip(chunk, hist, strict=True):
            history[i] = h


def member_replace(m: PopulationMember, **kw: Any) -> PopulationMember:
    """``dataclasses.replace`` for members (convenience for grids in tests and benchmarks)."""
    return dataclasses.replace(m, **kw)
