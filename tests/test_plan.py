"""Plans: pure, stable run ids; grid × seeds; reproducible random samples and random seeds."""

from __future__ import annotations

import dataclasses

from vitzoo.plan import expand, run_id, shard
from vitzoo.recipe import recipe_from_dict


def _recipe(**stage):
    base = {"model": "micro", "epochs": 1}
    return recipe_from_dict({"name": "p", "seed": 3, "stages": {"s": {**base, **stage}}})


def test_grid_times_seeds_and_ids_are_pure() -> None:
    r = _recipe(grid={"lr": [1e-3, 1e-4], "aug": ["none", "light", "strong"]}, seeds={"init": "1..4"})
    a, b = expand(r), expand(r)
    assert len(a.runs) == 2 * 3 * 4
    assert [x.run_id for x in a.runs] == [x.run_id for x in b.runs]
    one = a.runs[5]
    assert one.run_id == run_id(one.stage, one.config, one.init_seed, one.data_seed, None, None)
    assert one.run_id.startswith("s-") and len(one.run_id) == 12
    assert one.config.grid == {} and one.config.optimizer.lr in (1e-3, 1e-4)


def test_ids_change_with_any_factor() -> None:
    runs = expand(_recipe(grid={"lr": [1e-3, 2e-3]}, seeds={"init": [0, 1], "data": "offset"})).runs
    assert len({r.run_id for r in runs}) == 4
    assert all(r.data_seed == r.init_seed + 1_000_003 for r in runs)
    changed = dataclasses.replace(runs[0].config, epochs=2)
    assert run_id("s", changed, 0, 0, None, None) != runs[0].run_id


def test_random_seeds_hyp_rand_are_reproducible_and_recorded() -> None:
    r = _recipe(grid={"lr": [1e-3, 1e-4]}, seeds={"random": 10})
    runs = expand(r).runs
    assert len(runs) == 20
    seeds = [x.init_seed for x in runs]
    assert len(set(seeds)) == 20 and seeds == [x.init_seed for x in expand(r).runs]
    assert [x.repeat for x in runs[:10]] == list(range(10))


def test_random_sample_of_the_grid() -> None:
    r = _recipe(grid={"lr": [1e-3, 1e-4, 1e-5], "wd": [0.0, 0.1]}, seeds={"init": [0, 1]}, sample={"n": 5, "seed": 1})
    runs = expand(r).runs
    assert len(runs) == 5 and [x.run_id for x in runs] == [x.run_id for x in expand(r).runs]
    other = expand(_recipe(grid={"lr": [1e-3, 1e-4, 1e-5], "wd": [0.0, 0.1]}, seeds={"init": [0, 1]},
                           sample={"n": 5, "seed": 2})).runs
    assert {x.run_id for x in runs} != {x.run_id for x in other}


def test_finetune_is_parents_times_grid_and_records_parent() -> None:
    r = recipe_from_dict({"name": "f", "stages": {
        "pretrain": {"model": "micro", "epochs": 2, "grid": {"objective": ["supervised", "simclr"]}},
        "finetune": {"finetune": {"parent_stage": "pretrain"}, "epochs": 1,
                     "grid": {"head": ["linear", "mlp"], "mode": ["full", "linear", "lora"]}, "seeds": {"init": [0, 1]}},
    }})
    plan = expand(r)
    assert plan.counts() == {"pretrain": 2, "finetune": 2 * 6 * 2}
    parents = {x.run_id for x in plan.stage_runs("pretrain")}
    assert {x.parent_id for x in plan.stage_runs("finetune")} == parents


def test_shards_cover_every_run_once() -> None:
    runs = expand(_recipe(seeds={"init": "0..9"})).runs
    parts = [shard(runs, i, 3) for i in range(3)]
    ids = [r.run_id for p in parts for r in p]
    assert sorted(ids) == sorted(r.run_id for r in runs)
