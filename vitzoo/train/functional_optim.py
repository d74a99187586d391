"""Optimizer updates of P models at once, on flat ``(P, n)`` buffers, op for op as ``torch.optim``.

Why one module: every population engine (classic CNNs, ViT fine-tunes, sparsified twins) keeps all
parameters of a model in one row of a flat buffer and must reproduce ``torch.optim``'s
single-tensor (``foreach=False``) Adam / AdamW / SGD exactly, with per-model learning rate, weight
decay and momentum; three copies of that arithmetic would drift apart. Rows of frozen (diverged)
models get ``lr = 0`` and a zero gradient from the caller, so their parameters stay unchanged.

Each function updates ``p`` and the optimizer buffers in place; ``lr`` and the other per-model
hyperparameters are ``(P,)`` tensors (the learning rate is used in float64, as torch uses the
Python float of its param group).
"""

from __future__ import annotations

import torch
from torch import Tensor


def adam_(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: Tensor, step: int,
          betas: tuple[float, float], eps: float) -> None:
    """``torch.optim.Adam``'s update (weight decay already applied by the caller: coupled L2 adds
    ``wd * p`` to ``g``; AdamW's decoupled decay is :func:`decay_`)."""
    b1, b2 = betas
    exp_avg.lerp_(g, 1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = 1 - b1**step
    bc2_sqrt = (1 - b2**step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    step_size = (lr.double() / bc1).to(p.dtype)
    p.sub_(step_size[:, None] * (exp_avg / denom))  # param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_(p: Tensor, g: Tensor, momentum_buffer: Tensor, lr: Tensor, momentum: Tensor, nesterov: bool = False) -> None:
    """``torch.optim.SGD(momentum, dampening=0, nesterov)``'s update (weight decay in ``g`` already).
    A zero buffer behaves as torch's missing one (``buf = g`` at the first step)."""
    momentum_buffer.mul_(momentum[:, None]).add_(g)
    update = g + momentum[:, None] * momentum_buffer if nesterov else momentum_buffer
    p.sub_(lr.double().to(p.dtype)[:, None] * update)


def decay_(p: Tensor, lr: Tensor, weight_decay: Tensor) -> None:
    """AdamW's decoupled weight decay, ``param.mul_(1 - lr * weight_decay)``, per model."""
    p.mul_((1 - lr.double() * weight_decay.double()).to(p.dtype)[:, None])


def clip_coefficients(norms: Tensor, max_norm: Tensor) -> Tensor:
    """``clip_grad_norm_``'s scale per model from its per-parameter gradient norms ``(n_params, P)``."""
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)
