"""The classic CNN stack (vitzoo.train.population.CnnPopulation, driven as classic.CnnStack).

- its step against plain modules and torch.optim (batchnorm statistics, crop + flip streams, a frozen
  diverged member), in float64 where float32 rounding is amplified;
- dropout masks independent per member;
- through `generate`: a diverged member finishes at its last good epoch while the others equal runs
  trained alone; small groups train alone; an interrupted stack resumes one by one; out of memory halves.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

import vitzoo
from vitzoo.models.cnn import build_cnn
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe
from vitzoo.train import classic
from vitzoo.train.context import RunContext
from vitzoo.train.engine import train_run
from vitzoo.train.feed import CropFlip, crop_flip
from vitzoo.train.generate import generate
from vitzoo.train.population import CnnPopulation, PopulationMember
from vitzoo.train.schedule import lr_factor
from vitzoo.train.seeds import augment_generator, epoch_order
from vitzoo.zoo.index import write_index

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {
    "name": "stack-micro",
    "stages": {"train": {
        "data": {"source": "builtin:digits", "channels": 1, "max_train_samples": 60, "max_eval_samples": 30},
        "model": {"variant": "cnn-s", "activation": "relu", "init": "KU"},
        "optimizer": {"name": "adam", "lr": 3e-3, "weight_decay": 1e-4, "grad_clip": None},
        "schedule": "constant", "epochs": 3, "batch_size": 10, "checkpoint_every": 1,
        "seeds": {"init": "1..4"},
    }},
}


def _recipe(tmp_path: Path, **train: Any) -> Path:
    doc = copy.deepcopy(RECIPE)
    doc["stages"]["train"].update(train)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _alone(tmp_path: Path, recipe: Path, name: str = "alone") -> Any:
    ctx = RunContext(zoo_root=tmp_path / name, device=torch.device("cpu"), progress=False, log=lambda m: None)
    for r in expand(load_recipe(recipe)).runs:
        train_run(r, ctx)
    write_index(tmp_path / name)
    return vitzoo.load(tmp_path / name)


def _assert_states_close(a: Any, b: Any, mid: str, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert a.epochs(mid) == b.epochs(mid), mid
    for e in a.epochs(mid):
        sa, sb = a.state_dict(mid, e), b.state_dict(mid, e)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=lambda m, k=k, e=e: f"{mid} {e} {k}: {m}")


# --------------------------------------------------------------------------- the stack's step


@pytest.mark.parametrize(("width", "rotation"), [(None, 0.0), (2, 20.0)], ids=["classic", "phase-w2-rotation"])
def test_resnet_stack_equals_modules_with_batchnorm_and_augmentation(width, rotation) -> None:
    """ResNet-18 stacked: per-member batchnorm statistics and crop/flip streams give plain modules' states
    (running statistics included), and a diverging member is frozen without touching the others.

    In float64: batchnorm over 4 padded crops is ill-conditioned enough that float32 rounding (grouped vs
    plain convolution) grows to ~1e-3 within two steps in either path; in float64 they agree to ~1e-9."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _resnet_stack_vs_modules(width, rotation)
    finally:
        torch.set_default_dtype(dtype)


def _resnet_stack_vs_modules(width: int | None, rotation: float) -> None:
    """(width, rotation): the phase zoos' case is a width-2 ResNet with rotation on top of crop and flip."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    members = [PopulationMember(s, s, "sgd", 0.05, 5e-4, 0.9) for s in (1, 2)]
    members.append(PopulationMember(3, 3, "sgd", 1e30, 0.0, 0.9))  # diverges: frozen, statistics included
    aug = CropFlip(fill=(-1.0, -2.0, -0.5))
    pop = CnnPopulation("resnet18", 3, 10, members, torch.device("cpu"), 0, width)
    nets = [build_cnn("resnet18", 3, 10, seed=m.init_seed, width=width) for m in members]
    opts = [torch.optim.SGD(n.parameters(), lr=m.lr, momentum=m.momentum, weight_decay=m.weight_decay, foreach=False)
            for n, m in zip(nets, members, strict=True)]
    frozen = [True] * 3
    epochs, batch, total = 2, 4, 4
    step = 0
    for epoch in (1, 2):
        perms = [epoch_order(m.data_seed, epoch, 8) for m in members]
        gens = [augment_generator(m.data_seed, epoch) for m in members]
        ref_gens = [augment_generator(m.data_seed, epoch) for m in members]
        for s in range(2):
            idx = torch.stack([p[s * batch:(s + 1) * batch] for p in perms])
            xb = torch.stack([crop_flip(x[idx[i]], gens[i], aug.pad, aug.flip, aug.fill, rotation) for i in range(3)])
            factor = lr_factor("onecycle", step, total)
            pop.train_step(xb, y[idx], factor, step)
            for i, (net, opt, m) in enumerate(zip(nets, opts, members, strict=True)):
                xi = crop_flip(x[idx[i]], ref_gens[i], aug.pad, aug.flip, aug.fill, rotation)
                if not frozen[i]:
                    continue
                before = copy.deepcopy(net.state_dict())
                net.train()
                loss = F.cross_entropy(net(xi), y[idx[i]])
                opt.zero_grad()
                loss.backward()
                for grp in opt.param_groups:
                    grp["lr"] = m.lr * factor
                ok = math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in net.parameters())
                if ok:
                    opt.step()
                else:  # the stack's rule: the bad step is not applied and the model is frozen
                    net.load_state_dict(before)
                    frozen[i] = False
            step += 1
    assert frozen == [True, True, False] and pop.alive.tolist() == [True, True, False]
    states = pop.states()
    for i in range(2):  # (the diverged member is finished at its last good epoch: its stack row is not kept)
        for k, v in nets[i].state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            torch.testing.assert_close(states[i][k], v, rtol=1e-7, atol=1e-8, msg=lambda m, k=k, i=i: f"{i} {k}: {m}")
    assert "layer1.0.bn1.running_mean" in states[0]
    assert epochs == 2


def test_dropout_masks_are_independent_per_member() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 10, 1, 28, 28, generator=g), torch.randint(0, 10, (2, 10), generator=g)
    for dropout, same in ((0.5, False), (0.0, True)):
        twin = PopulationMember(5, 5, "adam", 1e-3, activation="relu", init="KU", dropout=dropout)
        pop = CnnPopulation("cnn-s", 1, 10, [twin, twin], torch.device("cpu"), 0)
        torch.manual_seed(0)
        pop.train_step(torch.stack([x[0], x[0]]), torch.stack([y[0], y[0]]), 1.0, 0)
        assert torch.equal(pop.flat[0], pop.flat[1]) == same, dropout


def test_crop_flip_is_seeded_and_keeps_shape() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    a = crop_flip(x, torch.Generator().manual_seed(0))
    b = crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b)
    same = crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for i in range(2):  # no padding: each sample is the image or its mirror
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))
    # The padding is a black pixel in normalised space (torchvision's RandomCrop(fill=0) before Normalize).
    ones = torch.ones(16, 3, 8, 8)
    out = crop_flip(ones, torch.Generator().manual_seed(1), pad=2, fill=(-1.0, -2.0, -3.0))
    for c, v in enumerate((-1.0, -2.0, -3.0)):
        assert set(out[:, c].unique().tolist()) == {1.0, v}


def test_adapter_maps_classic_recipes_to_members() -> None:
    from vitzoo.data.pipeline import preprocessing_for
    from vitzoo.train.feed import device_augment
    from vitzoo.train.population_adapter import member_from_run, split_runs, unsupported

    recipes = Path(__file__).parent.parent / "recipes" / "classic"
    runs = expand(load_recipe(recipes / "mnist-cnn-s-hyp-10-fix.yaml")).runs
    groups = split_runs(runs)
    assert len(groups) == 1 and len(groups[0]) == 2560  # activation/dropout/init/optimizer vary per member
    members = [member_from_run(r) for r in groups[0]]
    assert {m.optimizer for m in members} == {"adam", "sgd"}
    assert {(m.activation, m.dropout, m.init) for m in members} >= {("gelu", 0.5, "KN"), ("tanh", 0.0, "U")}
    assert all(m.grad_clip is None for m in members)
    res = expand(load_recipe(recipes / "cifar10-resnet18-seed.yaml")).runs[0]
    aug = device_augment(res.config, preprocessing_for(res.config.data, 32))
    assert not unsupported(res) and (aug.pad, aug.flip) == (4, True)
    assert aug.fill == pytest.approx([-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    seed = member_from_run(expand(load_recipe(recipes / "usps-cnn-s-seed.yaml")).runs[0])
    assert (seed.optimizer, seed.lr, seed.weight_decay, seed.init, seed.activation) == ("adam", 3e-4, 1e-3, "U", "tanh")


# --------------------------------------------------------------------------- through generate


def test_diverged_member_finishes_and_the_rest_equal_runs_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITZOO_POPULATION", "on")
    recipe = _recipe(tmp_path, grid={"lr": [3e-3, 1e30]}, seeds={"init": "1..2"}, epochs=2)
    generate(recipe, tmp_path / "zoo", progress=False, log=lambda m: None)
    zoo = vitzoo.load(tmp_path / "zoo")
    alone = _alone(tmp_path, recipe)
    finals = zoo.models.set_index("model_id")
    runs = expand(load_recipe(recipe)).runs
    for r in runs:
        if r.config.optimizer.lr > 1:
            assert finals.loc[r.run_id, "status"] == "diverged" and zoo.epochs(r.run_id) == [0]
        else:  # healthy members are untouched by their diverged neighbours
            assert finals.loc[r.run_id, "status"] == "done"
            _assert_states_close(zoo, alone, r.run_id)


def test_small_groups_train_alone_and_out_of_memory_halves(tmp_path: Path, monkeypatch) -> None:
    built: list[int] = []
    init = classic.CnnStack.__init__

    def spy(self: classic.CnnStack, specs: list, ctx: RunContext) -> None:
        built.append(len(specs))
        if len(specs) > 2:
            raise torch.OutOfMemoryError("simulated")
        init(self, specs, ctx)

    monkeypatch.setattr(classic.CnnStack, "__init__", spy)
    recipe = _recipe(tmp_path, epochs=1)
    generate(recipe, tmp_path / "auto", progress=False, log=lambda m: None)  # auto on CPU: 4 < MIN_POPULATION
    assert built == [] and len(vitzoo.load(tmp_path / "auto")) == 4
    monkeypatch.setenv("VITZOO_POPULATION", "on")
    logs: list[str] = []
    generate(recipe, tmp_path / "on", progress=False, log=logs.append)
    assert built == [4, 2, 2] and any("halving" in m for m in logs)
    assert len(vitzoo.load(tmp_path / "on")) == 4


def test_an_interrupted_stack_resumes_one_by_one(tmp_path: Path, monkeypatch) -> None:
    """One resume format: a stack stopped after epoch 1 continues with VITZOO_POPULATION=off (runs alone)
    and agrees with the uninterrupted stack to float tolerance (no dropout: the streams differ)."""
    monkeypatch.setenv("VITZOO_POPULATION", "on")
    recipe = _recipe(tmp_path)
    generate(recipe, tmp_path / "whole", progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, tmp_path / "cut", progress=False, log=lambda m: None, stop_after_epoch=1)
    monkeypatch.setenv("VITZOO_POPULATION", "off")
    logs: list[str] = []
    generate(recipe, tmp_path / "cut", progress=False, log=logs.append)
    assert sum("resuming after epoch 1" in m for m in logs) == 4
    a, b = vitzoo.load(tmp_path / "whole"), vitzoo.load(tmp_path / "cut")
    for mid in a.model_ids():
        _assert_states_close(a, b, mid)
