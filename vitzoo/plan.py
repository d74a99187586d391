"""Recipe → Plan: the runs of a zoo, their ids, generating factors and populations.

A run's identity is derived from its resolved configuration by one pure function
(:func:`run_id`): the same name is its folder (``models/<id>``), its index rows and its card
title. Re-expanding the same recipe gives the same ids, which is what makes resume and sharding
safe. No torch here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vitzoo.recipe import Recipe, RecipeError, StageConfig, apply_axes, axis_path, identity


@dataclass(frozen=True)
class RunSpec:
    """One model to train: a stage's config with its grid point and seeds applied."""

    run_id: str
    stage: str
    config: StageConfig
    """The stage config with this run's grid values applied (grid/seeds/sample cleared)."""
    factors: dict[str, Any]
    """Generating factors: the grid values of this run, as the recipe wrote them."""
    init_seed: int
    data_seed: int
    parent_id: str | None = None
    parent_epoch: str | None = None
    repeat: int = 0
    """Which repetition of its grid point this run is (0-based)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "stage": self.stage, "factors": self.factors,
            "init_seed": self.init_seed, "data_seed": self.data_seed, "parent_id": self.parent_id,
            "parent_epoch": self.parent_epoch, "repeat": self.repeat,
            "config": dataclasses.asdict(self.config),
        }


@dataclass
class Plan:
    recipe: Recipe
    runs: list[RunSpec] = field(default_factory=list)

    def stage_runs(self, stage: str) -> list[RunSpec]:
        return [r for r in self.runs if r.stage == stage]

    def counts(self) -> dict[str, int]:
        return dict(Counter(r.stage for r in self.runs))

    def by_id(self) -> dict[str, RunSpec]:
        return {r.run_id: r for r in self.runs}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_id(stage: str, config: StageConfig, init_seed: int, data_seed: int, parent_id: str | None,
           parent_epoch: str | None) -> str:
    """The one function that names a run: ``<stage>-<10 hex digits of sha256(resolved config)>``."""
    payload = {
        "stage": stage, "config": identity(dataclasses.asdict(config)), "init_seed": init_seed, "data_seed": data_seed,
        "parent_id": parent_id, "parent_epoch": parent_epoch,
    }
    return f"{stage}-{hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:10]}"


def expand(recipe: Recipe) -> Plan:
    """Expand every stage: grid product × seeds (× parents for fine-tuning), optionally sampled."""
    try:
        return _expand(recipe)
    except RecipeError as e:
        raise RecipeError(f"{recipe.source}: {e}") from None


def _expand(recipe: Recipe) -> Plan:
    plan = Plan(recipe)
    for stage in recipe.stages:
        parents = [None]
        if stage.parent is not None:
            parents = plan.stage_runs(stage.parent.parent_stage)
        points = grid_points(stage)
        seeded = [(pt, rep, seed) for pt_i, pt in enumerate(points) for rep, seed in
                  enumerate(_seeds(stage, recipe.seed, pt_i))]
        if stage.sample is not None:
            if stage.sample.n > len(seeded):
                raise RecipeError(
                    f"stages.{stage.name}.sample.n: {stage.sample.n} exceeds the {len(seeded)} runs of the grid × seeds"
                )
            rng = random.Random(stage.sample.seed)
            keep = sorted(rng.sample(range(len(seeded)), stage.sample.n))
            seeded = [seeded[i] for i in keep]
        configs = {}
        for parent in parents:
            for pt, rep, seed in seeded:
                key = canonical_json(pt)
                if key not in configs:
                    configs[key] = apply_axes(stage, pt, f"stages.{stage.name}.grid")
                cfg = configs[key]
                data_seed = {"same": seed, "offset": seed + 1_000_003, "fixed": stage.seeds.fixed_data_seed}[
                    stage.seeds.data]
                pid = parent.run_id if parent else None
                pep = stage.parent.parent_epoch if stage.parent else None
                rid = run_id(stage.name, cfg, seed, data_seed, pid, pep)
                plan.runs.append(RunSpec(rid, stage.name, cfg, _factors(pt, cfg), seed, data_seed, pid, pep, rep))
    dupes = [k for k, n in Counter(r.run_id for r in plan.runs).items() if n > 1]
    if dupes:  # identical configs: two grid values that resolve to the same setting
        raise RecipeError(f"runs {dupes[:3]} appear more than once: two grid values resolve to the same setting "
                          f"(e.g. 1e-3 and '1e-3'); each value of an axis must differ")
    return plan


def _factors(point: dict[str, Any], cfg: StageConfig) -> dict[str, Any]:
    """The grid values as validated (``"1e-3"`` → 0.001); a preset name stays the name (``aug: light``)."""
    out = {}
    for key, raw in point.items():
        value: Any = cfg
        for part in axis_path(key).split("."):
            value = getattr(value, part)
        out[key] = raw if dataclasses.is_dataclass(value) else value
    return out


def grid_points(stage: StageConfig) -> list[dict[str, Any]]:
    """The grid's product in a stable order (axes as written, values as listed)."""
    keys = list(stage.grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(stage.grid[k] for k in keys))]


def _seeds(stage: StageConfig, recipe_seed: int, point_index: int) -> list[int]:
    if stage.seeds.random:
        # Hyp-10-rand: each repetition of each grid point draws its own seed, reproducibly.
        rng = random.Random(canonical_json([recipe_seed, stage.name, point_index]))
        return [rng.randrange(2**31 - 1) for _ in range(stage.seeds.random)]
    return list(stage.seeds.init)


def population_key(run: RunSpec) -> str:
    """What runs trained together must share: architecture shape, data, duration, schedule, augmentation.

    Seeds, optimizer hyperparameters, activation, dropout and init vary within a population (the
    engine sub-groups by activation/dropout/optimizer itself; init only matters when building).
    """
    c = run.config
    model = dataclasses.asdict(c.model) if c.model else None
    if model is not None:
        for k in ("activation", "dropout", "init"):
            model.pop(k, None)
    return canonical_json([
        run.stage, model, dataclasses.asdict(c.data), c.epochs, c.batch_size, dataclasses.asdict(c.schedule),
        dataclasses.asdict(c.aug), c.precision, c.objective.name, c.eval_batch_size,
        dataclasses.asdict(c.parent) if c.parent else None,
    ])


def populations(runs: list[RunSpec]) -> list[list[RunSpec]]:
    """Runs grouped by :func:`population_key`, in first-appearance order (stable for sharding).

    Pure data, so that `vitzoo plan` shows the groups the population engine
    (vitzoo.train.classic) will train.
    """
    groups: dict[str, list[RunSpec]] = {}
    for r in runs:
        groups.setdefault(population_key(r), []).append(r)
    return list(groups.values())


def shard(runs: list[RunSpec], index: int, count: int) -> list[RunSpec]:
    """Runs for process ``index`` of ``count``: round-robin, so each run is trained exactly once."""
    return [r for i, r in enumerate(runs) if i % count == index]
