"""The learning-rate schedule: a multiplier of each parameter group's peak lr, a pure function of the step.

Pure (no scheduler state), so resuming needs only the step count, and every path (one by one, stacked)
computes the same factor from the same definition.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vitzoo.recipe import StageConfig, parse_duration


def lr_factor(name: str, step: int, total: int, warmup: int = 0, floor: float = 0.0) -> float:
    """The multiplier at optimizer step ``step`` (0-based) of ``total``.

    ``constant`` and ``cosine`` (to ``floor``) after a linear ``warmup``; ``onecycle`` is torch's
    ``OneCycleLR`` lr curve with its defaults (pct_start 0.3, div_factor 25, final_div_factor 1e4, cosine
    annealing; momentum not cycled) and ignores warmup and floor.
    """
    if name == "onecycle":
        peak = 0.3 * total - 1
        if step <= peak:
            return _cos_anneal(1 / 25, 1.0, step / peak if peak > 0 else 1.0)
        end = total - 1
        return _cos_anneal(1.0, 1 / 25e4, (step - peak) / (end - peak) if end > peak else 1.0)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "constant":
        return 1.0
    if name == "cosine":
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2
    raise ValueError(f"unknown schedule {name!r}; allowed: constant, cosine, onecycle")


def lr_schedule(cfg: StageConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The stage's multiplier as a function of the optimizer step (warmup and floor from the recipe)."""
    total = cfg.epochs * steps_per_epoch
    value, unit = parse_duration(cfg.schedule.warmup)
    warmup = min(total - 1, int(round(value * steps_per_epoch if unit == "ep" else value)))
    name, floor = cfg.schedule.name, cfg.schedule.min_lr_ratio
    return lambda step: lr_factor(name, step, total, warmup, floor)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)
