"""RunSpecs → population members: the bridge between the plan and the population engine.

Why a separate module: :mod:`vitzoo.train.population` knows nothing of recipes (it is tested and
benchmarked on raw tensors); this module decides which planned runs can be trained together and
translates each into a :class:`PopulationMember`, refusing loudly (``PopulationUnsupported``) what
the engine cannot reproduce exactly, so the caller can fall back to the per-run loop.

    for group in split_runs(runs):                 # same arch, data, duration, schedule
        problems = unsupported(group[0])
        if problems: ... train one by one ...
        members = [member_from_run(r) for r in group]
        train_population(**engine_kwargs(group[0], steps_per_epoch), members=members, ...)

Groups are :func:`vitzoo.plan.populations` (one pure definition, also shown by `vitzoo plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitzoo.data.pipeline import preprocessing_for
from vitzoo.plan import RunSpec, population_key, populations
from vitzoo.train.feed import device_augment
from vitzoo.train.population import PopulationMember
from vitzoo.train.schedule import lr_schedule

#: Optimizer names of the recipes the engine implements, and its name for them.
OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd", "nesterov": "nesterov"}

ARCHS = ("cnn-s", "cnn-m", "resnet18")


class PopulationUnsupported(ValueError):
    """A run uses a setting the population engine does not implement exactly."""


def unsupported(run: RunSpec) -> list[str]:
    """Reasons ``run`` cannot be trained by the population engine (empty when it can)."""
    c = run.config
    out = []
    if c.model is None or c.model.variant not in ARCHS:
        out.append(f"model {c.model.variant if c.model else None!r} is not one of {', '.join(ARCHS)}")
    if c.parent is not None:
        out.append("fine-tuning and sparsification stages are not population-trained")
    if c.objective.name != "supervised":
        out.append(f"objective {c.objective.name!r} (only supervised cross-entropy)")
    if c.optimizer.name not in OPTIMIZERS:
        out.append(f"optimizer {c.optimizer.name!r} (population engine: {', '.join(OPTIMIZERS)})")
    a = c.aug
    if a.rand_augment or a.mixup or a.cutmix or a.re_prob or a.label_smoothing or a.scale is not None:
        out.append("augmentation beyond flip / crop (RandAugment, mixup, cutmix, erasing, smoothing, resized crop)")
    if (a.hflip or 0) not in (0.0, 0.5):
        out.append(f"hflip {a.hflip} (the engine's crop_flip flips with probability 0.5)")
    if c.data.crop_pct != 1.0 and (a.crop_padding or a.hflip):
        out.append(f"crop_pct {c.data.crop_pct} with augmentation (the engine augments the eval-size tensors)")
    if c.precision in ("bf16", "fp16"):
        out.append(f"precision {c.precision} (the engine trains in fp32)")
    return out


def member_from_run(run: RunSpec) -> PopulationMember:
    """The engine's view of one planned run (raises PopulationUnsupported)."""
    problems = unsupported(run)
    if problems:
        raise PopulationUnsupported(f"{run.run_id}: " + "; ".join(problems))
    c = run.config
    assert c.model is not None
    o = c.optimizer.resolved()
    return PopulationMember(
        init_seed=run.init_seed, data_seed=run.data_seed, optimizer=OPTIMIZERS[c.optimizer.name], lr=float(o["lr"]),
        weight_decay=float(o.get("weight_decay", 0.0)), momentum=float(o.get("momentum", 0.9)),
        activation=c.model.activation, dropout=c.model.dropout, init=c.model.init, grad_clip=c.optimizer.grad_clip,
        name=run.run_id,
    )


#: The grouping is the plan's (pure, shown by `vitzoo plan`).
group_key = population_key
split_runs = populations


def schedule_for(run: RunSpec, steps_per_epoch: int) -> Callable[[int, int], float]:
    """The run's lr multiplier per optimizer step: the per-run loop's own (warmup, min_lr_ratio, onecycle)."""
    lr_at = lr_schedule(run.config, steps_per_epoch)
    return lambda step, _total: lr_at(step)


def engine_kwargs(run: RunSpec, steps_per_epoch: int) -> dict[str, Any]:
    """Keyword arguments of ``train_population`` shared by ``run``'s group (data and members aside)."""
    c = run.config
    assert c.model is not None
    augment = device_augment(c, preprocessing_for(c.data, c.model.resolved_img_size)) or None
    return {"arch": c.model.variant, "in_chans": c.data.channels, "epochs": c.epochs, "batch_size": c.batch_size,
            "schedule": schedule_for(run, steps_per_epoch), "augment": augment}
