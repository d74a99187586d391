"""Feeds: where a run's training batches come from, in the order of :mod:`vitzoo.train.seeds`.

- :class:`LoaderFeed`: a DataLoader over per-image transforms (timm/torchvision augmentation, datasets too
  large to keep as tensors), its sampler :class:`~vitzoo.data.pipeline.EpochSampler`;
- :class:`TensorFeed`: the decoded split as tensors on the device, batches sliced from
  :func:`~vitzoo.train.seeds.epoch_order` (no per-image work, no host round trip).

Both follow the one last-batch rule (:func:`~vitzoo.train.seeds.drop_last`). A batch is whatever the
objective reads (``(x, y)``, SimCLR's ``((v1, v2), y, index)``): feeds do not interpret it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitzoo.data.pipeline import Preprocessing
from vitzoo.recipe import StageConfig
from vitzoo.train.seeds import augment_generator, epoch_order, steps_per_epoch


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
    """Batches sliced from training tensors on the device, optionally cropped and flipped there.

    ``loader_rng``: draw once from the global torch RNG when an epoch starts, as a DataLoader's iterator
    does (its base seed): a run fed this way instead of by a DataLoader over the same tensors keeps its
    dropout / drop-path stream, so its results stay the same bit for bit.
    """

    def __init__(self, x: Tensor, y: Tensor, data_seed: int, batch_size: int, equal_batches: bool = False,
                 augment: CropFlip | None = None, loader_rng: bool = False):
        self.x, self.y, self.data_seed, self.batch_size, self.augment = x, y, data_seed, batch_size, augment
        self.loader_rng = loader_rng
        self.steps = steps_per_epoch(len(y), batch_size, equal_batches)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        if self.loader_rng:
            torch.empty((), dtype=torch.int64).random_()
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        order = epoch_order(self.data_seed, epoch, len(self.y)).to(self.x.device)
        gen = augment_generator(self.data_seed, epoch, self.x.device) if self.augment else None
        b = self.batch_size
        for i in range(self.steps):
            idx = order[i * b:(i + 1) * b]
            x = self.x[idx]
            if self.augment is not None:
                assert gen is not None
                x = crop_flip(x, gen, self.augment.pad, self.augment.flip, self.augment.fill, self.augment.rotation)
            yield x, self.y[idx]


@dataclass(frozen=True)
class CropFlip:
    """Device-side training augmentation of the CIFAR recipe (applied by :func:`crop_flip`)."""

    pad: int = 4
    """Random crop of the original size after padding every side by ``pad`` pixels (0 = no crop)."""
    flip: bool = True
    """Horizontal flip with probability 0.5."""
    fill: tuple[float, ...] = (0.0,)
    """Padding value per channel, in the (normalised) input space: the value of a black pixel,
    ``-mean / std``, reproduces ``RandomCrop(padding=pad, fill=0)`` applied before normalisation."""
    rotation: float = 0.0
    """Random rotation by up to this many degrees either way, after crop and flip (nearest pixel, corners
    ``fill``), as torchvision's ``RandomRotation(degrees, fill=0)``."""


def crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
              fill: Sequence[float] = (0.0,), rotation: float = 0.0) -> Tensor:
    """Random crop (padding ``pad`` filled with ``fill`` per channel) + horizontal flip per sample, then a
    random rotation when ``rotation`` > 0, on x's device, no host sync. The generator draws the offsets, then
    the flips (whatever is switched off), then the angles (only with a rotation: earlier zoos keep their draws)."""
    b, c, h, w = x.shape
    dev = x.device
    xp = x.new_empty(b, c, h + 2 * pad, w + 2 * pad)
    xp[:] = torch.as_tensor(fill, dtype=x.dtype, device=dev).expand(c).view(1, c, 1, 1)
    xp[:, :, pad:pad + h, pad:pad + w] = x
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator, device=generator.device).to(dev)
    flip_draw = torch.rand(b, generator=generator, device=generator.device).to(dev)
    flip = flip_draw < (0.5 if flip else 0.0)
    rows = off[:, 0:1] + torch.arange(h, device=dev)  # (b, h)
    cols = off[:, 1:2] + torch.arange(w, device=dev)  # (b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=dev)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (b, h, w, c)
    out = out.permute(0, 3, 1, 2).contiguous()
    if rotation:
        out = rotate(out, generator, rotation, fill)
    return out


def rotate(x: Tensor, generator: torch.Generator, degrees: float, fill: Sequence[float] = (0.0,)) -> Tensor:
    """Rotate each image by an angle drawn uniformly from ``[-degrees, degrees]`` about its centre (nearest
    pixel; what falls outside is ``fill``), as ``torchvision.transforms.RandomRotation(degrees, fill=0)``
    does to a PIL image before normalisation (``fill`` = the normalised value of black)."""
    u = torch.rand(x.shape[0], generator=generator, device=generator.device).to(x.device)
    return rotate_by(x, (u * 2 - 1) * degrees, fill)


def rotate_by(x: Tensor, degrees: Tensor, fill: Sequence[float] = (0.0,)) -> Tensor:
    """Rotate image i of ``x`` counter-clockwise by ``degrees[i]`` about its centre (nearest pixel, ``fill``
    outside)."""
    import torch.nn.functional as F

    c = x.shape[1]
    theta = -degrees * (torch.pi / 180)  # affine_grid maps output to input pixels: the inverse rotation
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # in affine_grid's (x right, y down) normalised coordinates of a square image, torchvision's sign
    mat = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
    grid = F.affine_grid(mat.to(x.dtype), list(x.shape), align_corners=False)
    f = torch.as_tensor(fill, dtype=x.dtype, device=x.device).expand(c).view(1, c, 1, 1)
    # grid_sample pads with zeros: shift so that zero is the fill value
    return F.grid_sample(x - f, grid, mode="nearest", padding_mode="zeros", align_corners=False) + f


def device_augment(cfg: StageConfig, pp: Preprocessing) -> CropFlip | None | bool:
    """The run's training augmentation as on-device tensor ops: a :class:`CropFlip`, None (no
    augmentation), or False when it needs per-image transforms (RandAugment, mixup, erasing, resized
    crops, smoothing: a :class:`LoaderFeed`). The CIFAR recipe's ``RandomCrop(padding, fill=black)`` +
    flip becomes a crop of the normalised tensors padded with each channel's black value."""
    a = cfg.aug
    if a.rand_augment or a.mixup or a.cutmix or a.re_prob or a.scale is not None:
        return False
    if (a.hflip or 0) not in (0.0, 0.5) or (cfg.data.crop_pct != 1.0 and (a.crop_padding or a.hflip or a.rotation)):
        return False
    if not (a.crop_padding or a.hflip or a.rotation):
        return None
    return CropFlip(pad=a.crop_padding or 0, flip=bool(a.hflip), rotation=float(a.rotation or 0.0),
                    fill=tuple(-m / s for m, s in zip(pp.mean, pp.std, strict=True)))
