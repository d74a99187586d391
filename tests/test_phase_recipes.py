"""The phase-transition recipes: each expands to the model count its header states (the published counts),
and `vitzoo plan` prints the checkpoint storage each will need before anything runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vitzoo import cost
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe

REPO = Path(__file__).parent.parent
PHASE = sorted((REPO / "recipes" / "phase").glob("*.yaml"))
#: The published counts (docs/phase-zoos.md#the-12-zoos): 8 ResNet zoos of 192, 2 ViT of 147, GPT-2 264, PINN 700.
PUBLISHED = {"resnet18": 192, "resnet50": 192, "vit": 147, "gpt2": 264, "pinn": 700}


def test_there_are_the_twelve_zoos() -> None:
    names = [p.stem for p in PHASE]
    assert len(names) == 12, names
    assert sum("resnet" in n for n in names) == 8


@pytest.mark.parametrize("path", PHASE, ids=lambda p: p.stem)
def test_recipe_expands_to_its_published_count(path: Path) -> None:
    plan = expand(load_recipe(path))
    header = re.search(r"# Expected: ([\d,]+) models", path.read_text())
    assert header, f"{path.name}: no 'Expected: N models' line"
    assert len(plan.runs) == int(header[1].replace(",", ""))
    kind = next(k for k in PUBLISHED if k in path.stem)
    assert len(plan.runs) == PUBLISHED[kind]
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)
    # the launch command heads the recipe
    assert f"recipes/phase/{path.name}" in path.read_text().split("\nname:")[0]


def test_storage_estimate_is_the_state_of_the_real_model() -> None:
    from vitzoo.models.cnn import build_cnn

    plan = expand(load_recipe(REPO / "recipes" / "phase" / "cifar10-resnet18-phase.yaml"))
    run = next(r for r in plan.runs if r.config.model.width == 4)
    real = sum(4 * t.numel() for t in build_cnn("resnet18", 3, 10, width=4).state_dict().values())
    assert cost.state_bytes(run) == real
    (stage,) = cost.storage(plan)
    widest = next(r for r in plan.runs if r.config.model.width == 256)
    assert stage.largest_state == cost.state_bytes(widest) > 178_585_866 * 4  # + batchnorm buffers
    assert stage.bytes_total == sum(cost.state_bytes(r) * len(r.config.saved_epochs()) for r in plan.runs)
    assert 400e9 < stage.bytes_total < 600e9  # ~0.5 TB with its 21 states; all 151 epochs would be ~3.5 TB


def test_cli_plan_prints_storage(capsys) -> None:
    from vitzoo.cli import main

    assert main(["plan", str(REPO / "recipes" / "phase" / "svhn-resnet50-phase.yaml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"192 runs, checkpoints ~\d+\.\d [GT]B", out)
    assert "largest state 1.5 GB" in out
