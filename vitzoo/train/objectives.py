"""Training objectives: supervised cross-entropy (with mixup/cutmix/label smoothing) and SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
