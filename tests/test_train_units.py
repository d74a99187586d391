"""Optimizer presets (timm) and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import pytest
import torch

from vitzoo import presets
from vitzoo.models import vit
from vitzoo.recipe import ModelConfig, OptimizerConfig, ScheduleConfig, StageConfig
from vitzoo.train.build import make_optimizer
from vitzoo.train.schedule import lr_schedule


@pytest.mark.parametrize("name", list(presets.OPTIMIZERS))
def test_every_optimizer_preset_builds_and_steps(name: str, tmp_path) -> None:
    arch, args = vit.vit_args(ModelConfig(variant="micro", img_size=16), 3)
    net = vit.create(arch, args, 4, seed=0)
    opt = make_optimizer(net, StageConfig(model=ModelConfig(variant="micro"), optimizer=OptimizerConfig(name=name)))
    assert opt.param_groups[0]["initial_lr"] == presets.OPTIMIZERS[name]["lr"]
    before = net.head.weight.detach().clone()
    net(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    assert not torch.equal(before, net.head.weight)
    if name == "sgd":
        assert type(opt).__name__ == "SGD" and opt.param_groups[0]["momentum"] == 0.9
        assert not opt.param_groups[0]["nesterov"], "the reference zoos use plain momentum SGD"
    # Its state survives the resume file (timm's Lamb keeps a tensor in its param groups).
    from vitzoo.zoo.writer import RunWriter

    w = RunWriter(tmp_path, "run-x")
    w.save_history([])
    w.save_resume(1, net.state_dict(), opt.state_dict(), {})
    fresh = make_optimizer(net, StageConfig(model=ModelConfig(variant="micro"), optimizer=OptimizerConfig(name=name)))
    fresh.load_state_dict(w.load_resume()[2])
    _same(fresh.state_dict(), opt.state_dict())


def _same(a, b) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def _lr(name: str, warmup: str, epochs: int = 10, steps: int = 10, floor: float = 0.0):
    st = StageConfig(model=ModelConfig(variant="micro"), epochs=epochs,
                     schedule=ScheduleConfig(name=name, warmup=warmup, min_lr_ratio=floor))
    return lr_schedule(st, steps)


def test_warmup_cosine() -> None:
    f = _lr("cosine", "2ep", floor=0.1)
    assert f(0) == pytest.approx(1 / 21)
    assert f(19) == pytest.approx(20 / 21)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert f(100) == pytest.approx(0.1)
    assert _lr("constant", "5st")(3) == pytest.approx(4 / 6) and _lr("constant", "5st")(50) == 1.0


def test_onecycle_matches_torch() -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100, cycle_momentum=False)
    f = _lr("onecycle", "0ep")
    for step in range(100):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * f(step), rel=1e-6, abs=1e-9), step
        opt.step()
        sched.step()
