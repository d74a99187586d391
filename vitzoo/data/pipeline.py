"""From SplitData to batches: timm transforms, seeded data order, cached evaluation tensors.

Evaluation uses timm's own eval transform (``crop_pct=1.0``), and the same preprocessing
metadata (input size, mean/std, interpolation) is saved in every model's config.json, so
``timm.data.resolve_data_config`` + ``create_transform`` on a loaded model reproduce it exactly.
Training augmentation comes from timm too: RandomResizedCrop, flip, RandAugment and random
erasing per image; mixup/cutmix per batch in the trainer.

Data order is a pure function of ``(data_seed, epoch)``: resuming mid-zoo replays the same order.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import torch
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler

from vitzoo.data.sources import SplitData, load_splits
from vitzoo.recipe import AugConfig, DataConfig
from vitzoo.train.seeds import drop_last, epoch_order


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects as input; saved as timm ``pretrained_cfg`` with every model."""

    img_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    crop_pct: float = 1.0

    def pretrained_cfg(self, num_classes: int) -> dict:
        return {"input_size": [self.channels, self.img_size, self.img_size], "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation, "crop_pct": self.crop_pct, "crop_mode": "center",
                "num_classes": num_classes}


def preprocessing_for(cfg: DataConfig, img_size: int) -> Preprocessing:
    if cfg.mean is not None and cfg.std is not None:  # the recipe's own normalisation (phase zoos)
        interp = "bilinear" if cfg.source.startswith("builtin:") or cfg.channels == 1 else "bicubic"
        return Preprocessing(img_size, cfg.channels, tuple(cfg.mean), tuple(cfg.std), interp, cfg.crop_pct)
    if cfg.source.startswith("builtin:") or cfg.channels == 1:
        # Small synthetic/grayscale sets: symmetric normalisation, bilinear upsampling of tiny images.
        return Preprocessing(img_size, cfg.channels, (0.5,) * cfg.channels, (0.5,) * cfg.channels, "bilinear",
                             cfg.crop_pct)
    return Preprocessing(img_size, 3, tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), "bicubic",
                         cfg.crop_pct)


def eval_transform(pp: Preprocessing):
    return create_transform(pp.img_size, is_training=False, interpolation=pp.interpolation, mean=pp.mean,
                            std=pp.std, crop_pct=pp.crop_pct)


def train_transform(pp: Preprocessing, aug: AugConfig):
    """timm's training transform for an augmentation level; plain eval transform for level none."""
    if _is_plain(aug):
        return eval_transform(pp)
    if aug.crop_padding or aug.rotation:
        return _padded_crop_transform(pp, aug)
    scale = tuple(aug.scale) if aug.scale else (1.0, 1.0)
    ratio = (3 / 4, 4 / 3) if aug.scale else (1.0, 1.0)
    return create_transform(
        pp.img_size, is_training=True, scale=scale, ratio=ratio, hflip=aug.hflip or 0.0, vflip=0.0,
        auto_augment=aug.rand_augment, interpolation=pp.interpolation, mean=pp.mean, std=pp.std,
        re_prob=aug.re_prob or 0.0, re_mode="pixel", re_count=1,
    )


def _padded_crop_transform(pp: Preprocessing, aug: AugConfig):
    """The CIFAR recipe: eval-size image, random crop after black padding, flip, (rotation), (RandAugment),
    normalise, (random erasing); timm's own pieces where it has them."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.random_erasing import RandomErasing
    from torchvision import transforms as T

    base = eval_transform(pp).transforms[:-2]  # resize + centre crop (ToTensor and Normalize follow below)
    ops = [*base]
    if aug.crop_padding:
        ops.append(T.RandomCrop(pp.img_size, padding=aug.crop_padding, fill=0))
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.rotation:
        ops.append(T.RandomRotation(aug.rotation, fill=0))
    if aug.rand_augment:
        ops.append(rand_augment_transform(aug.rand_augment, {"img_mean": tuple(round(255 * m) for m in pp.mean)}))
    ops += [T.ToTensor(), T.Normalize(pp.mean, pp.std)]
    if aug.re_prob:
        ops.append(RandomErasing(aug.re_prob, mode="pixel", max_count=1, device="cpu"))
    return T.Compose(ops)


class ImageSet(Dataset):
    """A `datasets` split with a transform; yields ``(image tensor, label)`` or two views (SimCLR)."""

    def __init__(self, ds: datasets.Dataset, transform, channels: int, views: int = 1):
        self.ds, self.transform, self.mode, self.views = ds, transform, ("L" if channels == 1 else "RGB"), views

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        img = row["image"].convert(self.mode)
        if self.views == 1:
            return self.transform(img), row["label"]
        # SimCLR: independent augmentations of the *same* image are the positive pair.
        return tuple(self.transform(img) for _ in range(self.views)), row["label"], int(i)


class EpochSampler(Sampler[int]):
    """The data order of :func:`vitzoo.train.seeds.epoch_order` as a DataLoader sampler (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.seed, self.epoch, self.n).tolist())

    def __len__(self) -> int:
        return self.n


#: Splits with more input elements than this (1 GiB of float32) are streamed instead of cached.
CACHE_LIMIT = 2**28


class DataCache:
    """Per-process cache: many runs of a zoo share one dataset and its evaluation tensors."""

    def __init__(self) -> None:
        self._splits: dict[str, SplitData] = {}
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _key(cfg: DataConfig) -> str:
        return json.dumps(dataclasses.asdict(cfg), sort_keys=True)

    def splits(self, cfg: DataConfig) -> SplitData:
        k = self._key(cfg)
        if k not in self._splits:
            self._splits[k] = load_splits(cfg)
        return self._splits[k]

    def fits(self, cfg: DataConfig, split: str, pp: Preprocessing) -> bool:
        """Whether a whole split is small enough to keep in memory as tensors (CIFAR yes, ImageNet no)."""
        return len(getattr(self.splits(cfg), split)) * pp.channels * pp.img_size**2 <= CACHE_LIMIT

    def eval_tensors(self, cfg: DataConfig, split: str, pp: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
        """All images of a split through the eval transform, stacked once and reused."""
        key = (self._key(cfg), split, pp)
        if key not in self._tensors:
            ds = getattr(self.splits(cfg), split)
            loader = DataLoader(ImageSet(ds, eval_transform(pp), pp.channels), batch_size=256,
                                num_workers=cfg.num_workers)
            xs, ys = zip(*loader) if len(ds) else ((), ())
            self._tensors[key] = (torch.cat(xs), torch.cat(ys))
        return self._tensors[key]


def train_loader(cache: DataCache, cfg: DataConfig, pp: Preprocessing, aug: AugConfig, batch_size: int,
                 data_seed: int, views: int = 1, equal_batches: bool = False) -> tuple[DataLoader, EpochSampler]:
    """The training loader; for un-augmented single-view training it serves cached tensors.

    Data order and last batch follow :mod:`vitzoo.train.seeds` (``equal_batches``: the objective needs
    batches of one size, see :func:`~vitzoo.train.seeds.drop_last`)."""
    split = cache.splits(cfg).train
    tensors = train_tensors(cache, cfg, pp, aug, views)
    if tensors is not None:
        ds: Dataset = torch.utils.data.TensorDataset(*tensors)
        workers = 0
    else:
        ds = ImageSet(split, train_transform(pp, aug), pp.channels, views=views)
        workers = cfg.num_workers
    sampler = EpochSampler(len(ds), data_seed)
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=drop_last(len(ds), batch_size, equal_batches or views > 1),
                        persistent_workers=False)
    return loader, sampler


def train_tensors(cache: DataCache, cfg: DataConfig, pp: Preprocessing, aug: AugConfig,
                  views: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached training tensors ``(x, y)`` when training needs no per-image work (one view, no
    augmentation, the split fits in memory), else None: batches can then be sliced from them."""
    if views == 1 and _is_plain(aug) and cache.fits(cfg, "train", pp):
        return cache.eval_tensors(cfg, "train", pp)
    return None


def _is_plain(aug: AugConfig) -> bool:
    return (not aug.scale and not aug.hflip and not aug.rand_augment and not aug.re_prob and not aug.crop_padding
            and not aug.rotation)
