"""The PINN task (1-D convection): the MLP, the loss against the exact solution, the seeded points, a micro
zoo end to end through generate (index, cards, loading, resume) and the inputs refused before training."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from task_helpers import assert_kill_and_resume_is_exact, write_recipe

import vitzoo
from vitzoo.data.sources import DataError
from vitzoo.models import from_config, mlp
from vitzoo.plan import expand
from vitzoo.recipe import (
    LATER_DEFAULTS,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    RecipeError,
    StageConfig,
    identity,
    load_recipe,
)
from vitzoo.train.generate import generate
from vitzoo.train.tasks import pinn

MICRO = {
    "name": "pinn-micro", "seed": 0,
    "stages": {"train": {
        "data": {"source": "builtin:convection"},
        "model": {"variant": "mlp", "width": 16, "depth": 2},
        "objective": {"name": "pinn", "collocation_points": 64, "initial_points": 16, "boundary_points": 8,
                      "eval_grid": [32, 10]},
        "optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 0.0, "grad_clip": None},
        "schedule": {"name": "constant"},
        "epochs": 3, "batch_size": 32, "checkpoint_epochs": [1],
        "grid": {"beta": [1.0, 10.0]},
        "seeds": {"init": [0]},
    }},
}


def _recipe(tmp_path: Path, name: str = "micro.yaml", **train) -> Path:
    return write_recipe(MICRO, tmp_path, name, **train)


def _cfg(**objective) -> StageConfig:
    """A default PINN stage with these objective fields."""
    return StageConfig(model=ModelConfig(variant="mlp"), objective=ObjectiveConfig(name="pinn", **objective),
                       data=DataConfig(source="builtin:convection"))


# --------------------------------------------------------------------------- the network


@pytest.mark.parametrize(("width", "depth", "count"), [(50, 4, 7851), (16, 2, 337), (1, 1, 5), (128, 8, 116097)])
def test_mlp_parameter_counts_and_shapes(width: int, depth: int, count: int) -> None:
    net = mlp.build(mlp.model_args(width, depth, None, None), seed=0)
    assert sum(p.numel() for p in net.parameters()) == count == mlp.num_params(width, depth)
    assert net(torch.rand(7, 2)).shape == (7, 1)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == depth + 1 and linears[0].in_features == 2 and linears[-1].out_features == 1
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.modules()) == depth


def test_mlp_defaults_init_and_rebuild() -> None:
    args = mlp.model_args(None, None, None, None)
    assert args == {"width": 50, "depth": 4, "activation": "tanh", "init": "xavier"}
    rng = torch.get_rng_state()
    a, b, c = mlp.build(args, 3), mlp.build(args, 3), mlp.build(args, 4)
    assert torch.equal(torch.get_rng_state(), rng), "initialisation must not touch the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["layers.0.weight"], sc["layers.0.weight"])
    assert all(float(v.abs().max()) == 0.0 for k, v in sa.items() if k.endswith("bias")), "zero biases"
    w = sa["layers.2.weight"]  # xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    assert float(w.abs().max()) <= math.sqrt(6 / 100) and float(w.std()) > 0.5 * math.sqrt(2 / 100)
    relu = mlp.build(mlp.model_args(8, 2, "relu", "KN"), 0)
    assert sum(isinstance(m, torch.nn.ReLU) for m in relu.modules()) == 2
    cfg = mlp.config_json(args, {"beta": 5.0}, {"run_id": "r"})
    rebuilt = from_config(json.loads(json.dumps(cfg)))
    assert isinstance(rebuilt, mlp.PinnMLP) and (rebuilt.width, rebuilt.depth) == (50, 4)
    with pytest.raises(ValueError, match="init"):
        mlp.model_args(None, None, None, "bogus")


# --------------------------------------------------------------------------- the loss


class _Exact(torch.nn.Module):
    """A 'network' computing ``sin(x - c·t)`` (c = β: the exact solution)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return torch.sin(xt[:, :1] - self.c * xt[:, 1:])


@pytest.mark.parametrize("beta", [1.0, 30.0])
def test_exact_solution_has_zero_loss_and_error_a_wrong_one_does_not(beta: float) -> None:
    cfg = _cfg(beta=beta)
    points = pinn.ConvectionPoints(cfg, data_seed=0)
    grid = pinn.EvalGrid(64, 20, beta)
    good = pinn.evaluate(_Exact(beta), points, grid, beta, 1.0)
    for k in ("train_loss", "test_loss", "residual_loss", "ic_loss", "bc_loss"):
        assert good[k] < 1e-9 * max(1.0, beta**2), (k, good[k])
    assert good["test_rel_l2"] < 1e-6
    assert good["train_acc"] is None and good["test_acc"] is None
    # u = sin(x + βt): IC and BC hold, the residual is 2β cos(x + βt), mean square 2β² over the domain
    bad = pinn.evaluate(_Exact(-beta), points, grid, beta, 1.0)
    assert bad["ic_loss"] < 1e-12 and bad["bc_loss"] < 1e-9
    assert bad["residual_loss"] == pytest.approx(2 * beta**2, rel=0.15)
    assert bad["test_rel_l2"] > 0.5
    xt = points.collocation[:50]
    r = pinn.residual(_Exact(-beta), xt, beta, create_graph=False)
    assert torch.allclose(r, 2 * beta * torch.cos(xt[:, 0] + beta * xt[:, 1]), atol=1e-4 * beta)
    # u = sin x: right IC, wrong PDE for every β > 0 (residual β cos x)
    still = pinn.function_residual(lambda x, t: torch.sin(x), xt, beta)
    assert torch.allclose(still, beta * torch.cos(xt[:, 0]), atol=1e-5 * beta)


def test_loss_weights_and_gradients_flow() -> None:
    cfg = _cfg(beta=2.0, residual_weight=3.0)
    points = pinn.ConvectionPoints(cfg, 0)
    net = mlp.build(mlp.model_args(8, 2, None, None), 0)
    loss, parts = pinn.pinn_loss(net, points.collocation, points.initial, points.initial_u, points.boundary_t, 2.0, 3.0)
    assert loss.item() == pytest.approx((3 * parts["residual"] + parts["ic"] + parts["bc"]).item())
    loss.backward()  # through the autograd residual (create_graph): every weight gets a gradient
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_points_are_a_function_of_the_data_seed() -> None:
    cfg = _cfg(collocation_points=500, initial_points=40, boundary_points=30)
    a, b, c = pinn.ConvectionPoints(cfg, 7), pinn.ConvectionPoints(cfg, 7), pinn.ConvectionPoints(cfg, 8)
    for name in ("collocation", "initial", "initial_u", "boundary_t"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    assert a.collocation.shape == (500, 2) and a.initial.shape == (40, 2) and a.boundary_t.shape == (30,)
    x, t = a.collocation[:, 0], a.collocation[:, 1]
    assert float(x.min()) >= 0 and float(x.max()) < 2 * math.pi and float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(x.max()) > 6.0 and float(t.max()) > 0.95, "the whole domain is covered"
    assert torch.equal(a.initial[:, 1], torch.zeros(40)) and torch.allclose(a.initial_u, torch.sin(a.initial[:, 0]))
    feed = pinn.collocation_feed(a, 7, 128)
    assert feed.steps == 4
    e1, e1b, e2 = list(feed.epoch(1)), list(feed.epoch(1)), list(feed.epoch(2))
    assert [len(b[0]) for b in e1] == [128, 128, 128, 116]
    assert torch.equal(torch.cat([b[0] for b in e1]), torch.cat([b[0] for b in e1b]))
    assert not torch.equal(e1[0][0], e2[0][0])
    assert torch.equal(torch.cat([b[0] for b in e1]).sort(0).values, a.collocation.sort(0).values), "one pass"


def test_eval_grid_is_krishnapriyans() -> None:
    g = pinn.EvalGrid(256, 100, 3.0)
    assert g.points.shape == (25600, 2) and g.interior.shape == (25344, 2)
    assert float(g.points[:, 0].max()) == pytest.approx(2 * math.pi * 255 / 256)
    assert float(g.points[:, 1].min()) == 0 and float(g.points[:, 1].max()) == 1
    assert torch.allclose(g.u, torch.sin(g.points[:, 0].double() - 3.0 * g.points[:, 1].double()), atol=1e-6)


# --------------------------------------------------------------------------- a micro zoo


def test_micro_zoo_end_to_end(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    out = tmp_path / "zoo"
    info = generate(recipe, out, progress=False, log=lambda m: None)
    assert info["status"] == "complete"
    idx = pd.read_parquet(out / "index.parquet")
    plan = expand(load_recipe(recipe))
    assert len(idx) == 2 * 3  # epochs 0, 1 (checkpoint_epochs) and 3 (the last) of 2 models
    assert sorted(idx["epoch"].unique()) == [0, 1, 3]
    assert idx["test_rel_l2"].notna().all() and idx["test_acc"].isna().all()
    assert set(idx["beta"]) == {1.0, 10.0} and set(idx["objective.beta"]) == {1.0, 10.0}
    for col in ("train_loss", "test_loss", "residual_loss", "ic_loss", "bc_loss"):
        assert idx[col].map(math.isfinite).all(), col
    zoo = vitzoo.load(out)
    g = pinn.EvalGrid(32, 10, 1.0)
    for r in plan.runs:
        run = json.loads((out / "models" / r.run_id / "run.json").read_text())
        assert run["status"] == "done" and run["num_params"] == mlp.num_params(16, 2)
        cfg = json.loads((out / "models" / r.run_id / "config.json").read_text())
        assert cfg["architecture"] == "vitzoo_mlp" and cfg["model_args"]["width"] == 16
        assert cfg["problem"]["beta"] == r.config.objective.beta and cfg["inputs"] == ["x", "t"]
        rows = idx[idx.model_id == r.run_id].sort_values("epoch")
        first, last = rows.iloc[0], rows.iloc[-1]
        beta = r.config.objective.beta
        if beta == 1.0:
            assert last["train_loss"] < first["train_loss"], "training lowers the PINN loss"
        for _, row in rows.iterrows():  # the loaded model reproduces the recorded error of each state
            net = zoo.model(r.run_id, epoch=int(row["epoch"]))
            with torch.no_grad():
                u = net(g.points).squeeze(1).double()
            exact = torch.sin(g.points[:, 0].double() - beta * g.points[:, 1].double())
            rel = float(torch.linalg.vector_norm(u - exact) / torch.linalg.vector_norm(exact))
            assert rel == pytest.approx(float(row["test_rel_l2"]), rel=1e-5)
            sd = zoo.state_dict(r.run_id, int(row["epoch"]))
            fresh = mlp.PinnMLP(16, 2)
            fresh.load_state_dict(sd)
            with torch.no_grad():
                assert torch.equal(fresh(g.points), net(g.points))
    from vitzoo.cards import render_zoo_cards

    render_zoo_cards(out)
    card = (out / "README.md").read_text()
    assert "pinn-micro" in card
    model_card = (out / "models" / plan.runs[0].run_id / "README.md").read_text()
    assert "| split | loss | accuracy | relative L2 error |" in model_card
    assert "pipeline_tag" not in card.split("---")[1] and "image-classification" not in model_card.split("---")[1]
    assert "vitzoo_mlp" in model_card and "points [x, t]" in model_card
    assert "timm.create_model" not in model_card and "zoo.transform" not in model_card, "no image loaders for a PINN"


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, grid={"beta": [5.0]}, checkpoint_epochs=[2])
    assert_kill_and_resume_is_exact(recipe, tmp_path, "test_rel_l2", [0, 2, 3])


# --------------------------------------------------------------------------- refused inputs


@pytest.mark.parametrize(("change", "key"), [
    ({"objective": {"beta": 0.0}}, "beta"),
    ({"objective": {"beta": -1.0}}, "beta"),
    ({"model": {"width": 0}}, "width"),
    ({"model": {"depth": 0}}, "depth"),
    ({"objective": {"collocation_points": 0}}, "collocation_points"),
    ({"objective": {"initial_points": -3}}, "initial_points"),
    ({"objective": {"boundary_points": 1.5}}, "boundary_points"),
    ({"objective": {"residual_weight": 0.0}}, "residual_weight"),
    ({"objective": {"eval_grid": [256]}}, "eval_grid"),
    ({"objective": {"eval_grid": [256, 1]}}, "eval_grid"),
    ({"data": {"source": "builtin:digits"}}, "data.source"),
    ({"model": {"variant": "cnn-s", "width": None, "depth": None}}, "model.variant"),
])
def test_bad_recipes_are_refused_naming_the_key(tmp_path: Path, change: dict, key: str) -> None:
    with pytest.raises(RecipeError, match=key):
        load_recipe(_recipe(tmp_path, **change))


@pytest.mark.parametrize(("change", "key"), [
    ({"precision": "bf16"}, "precision"),
    ({"micro_batch_size": 16}, "micro_batch_size"),
    ({"model": {"activation": "swish"}}, "model.activation"),
    ({"model": {"init": "bogus"}}, "model.init"),
])
def test_untrainable_stages_are_refused_before_anything_is_written(tmp_path: Path, change: dict, key: str) -> None:
    out = tmp_path / "zoo"
    with pytest.raises((DataError, RecipeError), match=key):
        generate(_recipe(tmp_path, **change), out, progress=False, log=lambda m: None)
    assert not out.exists()


def test_new_fields_leave_existing_run_ids_alone() -> None:
    stage = dataclasses.asdict(_cfg())
    ident = identity(stage)["objective"]
    for k, v in LATER_DEFAULTS["objective"].items():
        assert stage["objective"][k] == v, f"LATER_DEFAULTS[objective][{k}] is not the field's default"
        assert k not in ident
    changed = dataclasses.asdict(_cfg(collocation_points=2000))
    assert identity(changed)["objective"]["collocation_points"] == 2000


def test_a_non_finite_pinn_loss_marks_the_run_diverged(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, grid={"beta": [1.0]}, optimizer={"name": "sgd", "lr": 1e30, "momentum": 0.0})
    generate(recipe, tmp_path / "div", progress=False, log=lambda m: None)
    idx = pd.read_parquet(tmp_path / "div" / "index.parquet")
    assert idx["status"].tolist() == ["diverged"] and idx["epoch"].tolist() == [0], "keeps its last good epoch"
    assert math.isfinite(idx["test_rel_l2"].iloc[0])
