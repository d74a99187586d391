"""One seeding scheme for every training path: data order, last batch, augmentation and RNG streams.

Why one module: a model's data order, its augmentation draws and its dropout masks must not depend on
which path trains it (one by one, stacked with companions, a fallback run beside vectorised siblings)
nor on the device, or siblings in one zoo train under different rules. Everything here is a pure
function of integers the plan fixes (``init_seed``, ``data_seed``, ``epoch``), through :func:`mix`
(sha256: decorrelated and stable across platforms and library versions).

- data order: :func:`epoch_order` ``(data_seed, epoch, n)``, batches are consecutive slices of it;
- last batch: :func:`drop_last`, the one rule (kept, unless the objective needs equal batches);
- on-device augmentation (crop + flip): :func:`augment_generator` ``(data_seed, epoch)``, per model;
- per-run RNGs (dropout, drop-path, host-side augmentation): :func:`seed_module_rngs` at every epoch;
- stacked populations draw their noise from one stream per group, seeded by :func:`mix` of the group.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch import Tensor


def mix(*parts: int) -> int:
    """A 63-bit seed from integers, decorrelated (sha256), stable across platforms and versions."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def epoch_order(data_seed: int, epoch: int, n: int) -> Tensor:
    """The order in which a model with ``data_seed`` visits ``n`` training samples in ``epoch``.

    A CPU generator seeded per (data_seed, epoch): the same on every device and independent of how many
    models train together or in which order.
    """
    g = torch.Generator(device="cpu").manual_seed(mix(data_seed, epoch))
    return torch.randperm(n, generator=g)


def drop_last(n: int, batch_size: int, equal_batches: bool = False) -> bool:
    """Whether an epoch drops its last, partial batch: the one rule of every path.

    Kept (a DataLoader's ``drop_last=False``, the classic zoos' reference) unless the objective needs
    equal batches (``equal_batches``: mixup/cutmix pair samples within a batch, SimCLR's negatives are the
    rest of the batch), or the remainder is a single sample (no batch statistics for batchnorm). A
    training set smaller than one batch is always one (smaller) batch.
    """
    rest = n % batch_size
    return n > batch_size and rest != 0 and (equal_batches or rest == 1)


def steps_per_epoch(n: int, batch_size: int, equal_batches: bool = False) -> int:
    """Optimizer steps per epoch under :func:`drop_last`."""
    if n == 0:
        return 0
    return n // batch_size if drop_last(n, batch_size, equal_batches) else -(-n // batch_size)


def augment_generator(data_seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of a model's on-device crop + flip draws in ``epoch`` (the same on every path)."""
    return torch.Generator(device=device).manual_seed(mix(data_seed, epoch, 1))


def seed_module_rngs(init_seed: int, data_seed: int, epoch: int) -> None:
    """Seed the global RNGs (torch, numpy, random) of a run trained alone, at the start of ``epoch``:
    dropout, drop-path and host-side augmentation are then a function of the run's seeds and epoch, so a
    run resumed after any epoch continues exactly as if never stopped."""
    s = (init_seed * 1_000_003 + data_seed * 10_007 + epoch) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
