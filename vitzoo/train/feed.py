"""Feeds: where a run's training batches come from, in the order of :mod:`vitzoo.train.seeds`.

- :class:`LoaderFeed`: a DataLoader over per-image transforms (timm/torchvision augmentation, datasets too
  large to keep as tensors), its sampler :class:`~vitzoo.data.pipeline.EpochSampler`;
- :class:`TensorFeed`: the decoded split as tensors on the device, batches sliced from
  :func:`~vitzoo.train.seeds.epoch_order` (no per-image work, no host round trip).

Both follow the one last-batch rule (:func:`~vitzoo.train.seeds.drop_last`). A batch is whatever the
objective reads (``(x, y)``, SimCLR's ``((v1, v2), y, index)``): feeds do not interpret it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor

from vitzoo.train.seeds import epoch_order, steps_per_epoch


class LoaderFeed:
    """Batches of a DataLoader whose sampler follows ``(data_seed, epoch)``."""

    def __init__(self, loader: Any, sampler: Any):
        self.loader, self.sampler = loader, sampler
        self.steps = len(loader)

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The epoch's batches (the iterator is created now: a loader draws its worker seed at this point)."""
        self.sampler.set_epoch(epoch)
        return iter(self.loader)


class TensorFeed:
    """Batches sliced from training tensors on the device."""

    def __init__(self, x: Tensor, y: Tensor, data_seed: int, batch_size: int, equal_batches: bool = False):
        self.x, self.y, self.data_seed, self.batch_size = x, y, data_seed, batch_size
        self.steps = steps_per_epoch(len(y), batch_size, equal_batches)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(self.data_seed, epoch, len(self.y)).to(self.x.device)
        b = self.batch_size
        return ((self.x[idx], self.y[idx]) for idx in (order[i * b:(i + 1) * b] for i in range(self.steps)))
