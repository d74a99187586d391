"""The one seeding scheme and the one lr schedule every training path shares (vitzoo.train.seeds/schedule)."""

from __future__ import annotations

import math

import pytest
import torch

from vitzoo.data.pipeline import EpochSampler
from vitzoo.train.schedule import lr_factor
from vitzoo.train.seeds import drop_last, epoch_order, mix, steps_per_epoch


def test_epoch_order_is_deterministic_and_per_seed() -> None:
    a = epoch_order(3, 1, 100)
    assert torch.equal(a, epoch_order(3, 1, 100))
    assert not torch.equal(a, epoch_order(3, 2, 100))
    assert not torch.equal(a, epoch_order(4, 1, 100))
    assert sorted(a.tolist()) == list(range(100))
    assert mix(1, 2) != mix(2, 1) and 0 <= mix(1, 2) < 2**63


def test_the_loader_sampler_is_the_same_order() -> None:
    s = EpochSampler(50, seed=7)
    s.set_epoch(3)
    assert list(s) == epoch_order(7, 3, 50).tolist()


@pytest.mark.parametrize(("n", "b", "equal", "steps"), [
    (95, 10, False, 10),   # the last 5 are kept
    (95, 10, True, 9),     # mixup / SimCLR: equal batches
    (91, 10, False, 9),    # a last batch of one sample has no batch statistics: dropped
    (90, 10, True, 9),     # nothing to drop
    (7, 10, True, 1),      # a set smaller than a batch is one batch
    (0, 10, False, 0),
])
def test_one_last_batch_rule(n: int, b: int, equal: bool, steps: int) -> None:
    assert steps_per_epoch(n, b, equal) == steps
    assert drop_last(n, b, equal) == (n > b and n % b != 0 and steps == n // b)


def test_onecycle_matches_torch() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    total = 57
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total, cycle_momentum=False)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor("onecycle", step, total), rel=1e-9)
        opt.step()
        sched.step()


def test_cosine_warmup_and_floor() -> None:
    assert lr_factor("cosine", 0, 10) == 1.0 and math.isclose(lr_factor("cosine", 10, 10), 0.0, abs_tol=1e-12)
    assert lr_factor("cosine", 0, 10, warmup=4) == pytest.approx(1 / 5)
    assert lr_factor("cosine", 10, 10, floor=0.1) == pytest.approx(0.1)
    assert lr_factor("constant", 99, 10) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_factor("linear", 0, 10)
