"""The evaluator of every run: loss and top-1 per split (or SimCLR's kNN accuracy), in eval mode.

Splits: ``train`` (capped at :data:`TRAIN_EVAL_CAP` images: it is a statistic, not a sweep), ``val`` and
``test`` when the data has one, all through the eval transform (cached tensors when the split fits in
memory, else streamed). Sums stay on the device (float64) and are read once per split: no host sync per
batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vitzoo.data.pipeline import Preprocessing, eval_transform
from vitzoo.recipe import StageConfig
from vitzoo.train.context import RunContext
from vitzoo.train.objectives import knn_accuracy

#: Training images evaluated for the per-epoch train metrics.
TRAIN_EVAL_CAP = 10_000


def splits_of(ctx: RunContext, cfg: StageConfig) -> list[str]:
    """The splits a run is evaluated on."""
    return ["train", "val"] + (["test"] if ctx.cache.splits(cfg.data).test is not None else [])


@torch.no_grad()
def evaluate(net, ctx: RunContext, cfg: StageConfig, pp: Preprocessing, simclr: bool = False) -> dict[str, Any]:
    """``<split>_loss`` and ``<split>_acc`` of ``net`` (SimCLR: kNN accuracy of the backbone, no loss)."""
    net.eval()
    out: dict[str, Any] = {}
    bs = cfg.eval_batch_size or 4 * cfg.batch_size
    if simclr:
        backbone = net.backbone
        bank_x, bank_y = features(backbone, ctx, cfg, "train", pp, bs, limit=cfg.objective.knn_bank_size)
        for split in splits_of(ctx, cfg):
            out[f"{split}_loss"] = None
            if split == "train":
                out["train_acc"] = None
                continue
            fx, fy = features(backbone, ctx, cfg, split, pp, bs)
            out[f"{split}_acc"] = knn_accuracy(bank_x, bank_y, fx, fy, cfg.objective.knn_k, int(bank_y.max()) + 1)
        return out
    for split in splits_of(ctx, cfg):
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        correct = torch.zeros((), dtype=torch.long, device=ctx.device)
        n = 0
        for x, y in eval_batches(ctx, cfg, split, pp, bs):
            logits = net(x.to(ctx.device)).float()
            y = y.to(ctx.device)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            n += y.numel()
        out[f"{split}_loss"] = loss_sum.item() / max(1, n)
        out[f"{split}_acc"] = correct.item() / max(1, n)
    return out


def eval_batches(ctx: RunContext, cfg: StageConfig, split: str, pp: Preprocessing, bs: int, limit: int | None = None):
    """Every image of a split (train capped at :data:`TRAIN_EVAL_CAP`) through the eval transform."""
    ds = getattr(ctx.cache.splits(cfg.data), split)
    n = len(ds)
    if split == "train":
        limit = min(limit or TRAIN_EVAL_CAP, TRAIN_EVAL_CAP)
    if limit is not None:
        n = min(n, limit)
    if ctx.cache.fits(cfg.data, split, pp):
        x, y = ctx.cache.eval_tensors(cfg.data, split, pp)
        for i in range(0, n, bs):
            yield x[i:min(i + bs, n)], y[i:min(i + bs, n)]
        return
    from torch.utils.data import DataLoader

    from vitzoo.data.pipeline import ImageSet

    sub = ds.select(range(n))
    yield from DataLoader(ImageSet(sub, eval_transform(pp), pp.channels), batch_size=bs,
                          num_workers=cfg.data.num_workers)


def features(backbone, ctx: RunContext, cfg: StageConfig, split: str, pp: Preprocessing, bs: int,
             limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone's features and the labels of a split (SimCLR's kNN bank and queries)."""
    fs, ys = [], []
    for x, y in eval_batches(ctx, cfg, split, pp, bs, limit):
        fs.append(backbone(x.to(ctx.device)).float())
        ys.append(y.to(ctx.device))
    return torch.cat(fs), torch.cat(ys)
