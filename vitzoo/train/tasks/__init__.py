"""Tasks beyond image classification, as parts of the one engine: each is a model builder, an objective, a
feed and an evaluator, assembled into a :class:`~vitzoo.train.engine.ModuleRun` by the task's ``build``.

A task module (one per objective name in :data:`TASKS`) provides:

- ``build(spec, ctx) -> ModuleRun``: the run's parts; :func:`vitzoo.train.engine.build_module_run` calls it,
  and :func:`vitzoo.train.engine.train_group` trains it like any other run (epoch 0, evaluation, divergence,
  history rows, checkpoints, resume);
- ``preflight(cfg, cache) -> None``: open and check the stage's data before anything is written (a text
  dataset without the named column fails here, naming the key).

Image classification (supervised, simclr) is not listed: it is the engine's own path.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Objective name → the module of its task.
TASKS = {"causal_lm": "vitzoo.train.tasks.language", "pinn": "vitzoo.train.tasks.pinn"}


def task_module(objective: str) -> ModuleType | None:
    """The task module of an objective, or None for image classification."""
    name = TASKS.get(objective)
    return importlib.import_module(name) if name else None
