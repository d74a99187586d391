"""RunSpecs → stack members: which classic runs the vectorised CNN update reproduces, and their view.

:func:`unsupported` lists what the stack cannot reproduce exactly (those runs train alone through the
engine); :func:`member_from_run` turns a run into the :class:`~vitzoo.train.population.PopulationMember`
the stack reads its hyperparameters from. Groups are :func:`vitzoo.plan.populations` (one pure
definition, also shown by `vitzoo plan`).
"""

from __future__ import annotations

from vitzoo.plan import RunSpec, populations
from vitzoo.train.population import PopulationMember

#: Optimizer names of the recipes the engine implements, and its name for them.
OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd", "nesterov": "nesterov"}

ARCHS = ("cnn-s", "cnn-m", "resnet18", "resnet50")


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
    if c.micro_batch_size is not None and c.micro_batch_size < c.batch_size:
        out.append("micro_batch_size (gradient accumulation is the module backend's)")
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
split_runs = populations
