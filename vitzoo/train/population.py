"""The stack of classic CNNs: P models of one architecture trained as one, vectorised over models.

Why: the classic zoos are thousands of tiny models (CNN-s has 2,464 parameters) trained at batch
size 10. Trained one by one, every step is a handful of kernel launches on a few kilobytes, so the
device idles and Python overhead dominates. Stacking the parameters of P models and running one
``torch.func.vmap``-ed forward/backward over all of them turns P tiny launches into one P-times
larger launch (vmap lowers batched convolutions to grouped convolutions), with every model still on
its own data order, its own optimizer state and its own hyperparameters.

:class:`CnnPopulation` holds the stack (a flat ``(P, n_params)`` buffer, stacked batchnorm buffers)
and its step (the functional update of :mod:`vitzoo.train.functional_optim`: Adam, AdamW, SGD, Nesterov,
per-model lr / weight decay / momentum / clipping; a device-side mask freezes a model whose loss or
gradient turns non-finite, no host sync), evaluation and states. The engine drives it through
:class:`vitzoo.train.classic.CnnStack`; which groups are stacked is decided there, from the constants
here and in :mod:`vitzoo.train.routing` (thresholds, the ``VITZOO_POPULATION`` switch). The numerical differences to a model
trained alone are listed in docs/training-engine.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from vitzoo.models.cnn import build_cnn
from vitzoo.train import functional_optim as fopt
from vitzoo.train import routing

EvalSets = dict[str, tuple[Tensor, Tensor]]

#: Architectures the vectorised engine can train (ResNet-18: batchnorm statistics stacked per model).
VECTORISED_ARCHS = ("cnn-s", "cnn-m", "resnet18", "resnet50")
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


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30  # fallback: assume 4 GiB


def max_population_size(arch: str, in_chans: int, num_classes: int, batch_size: int,
                        device: str | torch.device, fraction: float = 0.5, cap: int = 4096,
                        width: int | None = None) -> int:
    """How many models fit in ``fraction`` of the free device memory (an estimate, halved on OOM).

    Per model: parameters, gradients and two optimizer buffers plus temporaries (~6 copies of the
    parameters), and forward+backward activations of one batch (~3 copies of the activations).
    """
    dev = torch.device(device)
    m = build_cnn(arch, in_chans, num_classes, width=width)
    from vitzoo.models.cnn import IMG_SIZE

    img = IMG_SIZE.get(arch, 32)
    per_model = 6 * sum(p.numel() * 4 for p in m.parameters())
    per_model += 3 * batch_size * activation_bytes_per_sample(m, (in_chans, img, img))
    if dev.type == "cpu":
        cap = routing.cpu_cap("cpu", routing.family(arch), cap)
    return int(max(1, min(cap, fraction * free_bytes(dev) // max(per_model, 1))))


class CnnPopulation:
    """P classic CNNs of one architecture as one flat (P, n_params) buffer + functional optimizer updates
    (stacked batchnorm buffers; a vmap-ed forward/backward; the step, evaluation and states of the stack)."""

    def __init__(self, arch: str, in_chans: int, num_classes: int, members: Sequence[PopulationMember],
                 device: torch.device, dropout_seed: int, width: int | None = None) -> None:
        self.members = list(members)
        self.device = device
        self.P = len(members)
        m0 = members[0]
        models = [build_cnn(arch, in_chans, num_classes, m.activation, m.dropout, m.init, m.init_seed, width)
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


