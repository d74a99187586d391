"""Training objectives: what a run minimises, one batch at a time.

An objective is a part of the engine, not a loop: :func:`vitzoo.train.engine.train_run` asks it for the
loss of each batch (``loss(net, batch) -> (mean loss, batch size)``), tells it when an epoch starts, and
takes its extra history columns at the end of each epoch. A new task (language modelling, a PDE
residual) is a new objective plus a model builder plus a feed. ``equal_batches``: the objective needs
batches of one size (the feed drops a partial last batch, see :func:`vitzoo.train.seeds.drop_last`).

- :class:`CrossEntropy`: supervised, with label smoothing, or timm's Mixup/CutMix on soft targets;
- :class:`SimCLR`: NT-Xent over two views of each image (:func:`info_nce`);
- :class:`vitzoo.train.variational.VariationalDropout`: cross-entropy + the ramped KL of sparse
  variational dropout (twins; it lives with its layers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitzoo.recipe import StageConfig


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over a batch of pairs: row i of ``z1`` and row i of ``z2`` are two views of
    one image (the positive pair); the other 2B-2 embeddings in the batch are the negatives."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))  # an embedding is not its own positive
    targets = positive_index(b, z.device)
    return F.cross_entropy(sim, targets)


def positive_index(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """For the 2B stacked views ``[view1; view2]``: the index of each row's positive."""
    return torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(device)


class SimCLRModel(nn.Module):
    """A ViT backbone (no classifier) plus the projection MLP used only during pre-training.

    The projector is discarded when the model is saved, as in SimCLR: the zoo keeps the backbone.
    """

    def __init__(self, backbone: nn.Module, proj_dim: int):
        super().__init__()
        d = backbone.num_features
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


@torch.no_grad()
def knn_accuracy(bank: torch.Tensor, bank_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor, k: int,
                 num_classes: int) -> float:
    """Weighted kNN top-1 (cosine similarity, as in InstDisc/DINO) of query features on a bank."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for q, y in zip(query.split(1024), query_y.split(1024)):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim / 0.07).exp())
        correct += (votes.argmax(1) == y).sum().item()
    return correct / max(1, query.shape[0])


class CrossEntropy:
    """Supervised cross-entropy (label smoothing), or timm's Mixup/CutMix with soft targets."""

    def __init__(self, cfg: StageConfig, num_classes: int, device: torch.device):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        a = cfg.aug
        self.device, self.num_classes = device, num_classes
        self.mixup = None
        if (a.mixup or 0) > 0 or (a.cutmix or 0) > 0:
            self.mixup = Mixup(mixup_alpha=a.mixup or 0.0, cutmix_alpha=a.cutmix or 0.0,
                               label_smoothing=a.label_smoothing or 0.0, num_classes=num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing or 0.0)
        self.equal_batches = self.mixup is not None

    def start_epoch(self, epoch: int) -> None:
        pass

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        x, y = batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, y = self.mixup(x, y)
        elif self.mixup is not None:  # an odd batch (odd batch_size): plain smoothed targets
            y = F.one_hot(y, self.num_classes).float()
        return self.criterion(net(x), y), x.shape[0]

    def columns(self, state: dict[str, torch.Tensor] | None, steps: int) -> dict[str, Any]:
        return {}


class SimCLR:
    """SimCLR pre-training: NT-Xent between the projections of two augmented views of each image."""

    equal_batches = True

    def __init__(self, temperature: float, device: torch.device):
        self.temperature, self.device = temperature, device

    def start_epoch(self, epoch: int) -> None:
        pass

    def loss(self, net: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        (v1, v2), _, _ = batch
        b = v1.shape[0]
        z = net(torch.cat([v1, v2]).to(self.device, non_blocking=True))
        return info_nce(z[:b], z[b:], self.temperature), b

    def columns(self, state: dict[str, torch.Tensor] | None, steps: int) -> dict[str, Any]:
        return {}
