"""Every recipe in the repo parses and expands; bad recipes fail before training, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitzoo.plan import expand
from vitzoo.recipe import RecipeError, load_recipe, recipe_from_dict

REPO = Path(__file__).parent.parent
RECIPES = sorted(REPO.glob("recipes/**/*.yaml")) + [REPO / "tests" / "tiny.yaml"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_parses_and_expands(path: Path) -> None:
    recipe = load_recipe(path)
    plan = expand(recipe)
    assert plan.runs, f"{path} expands to no runs"
    assert len({r.run_id for r in plan.runs}) == len(plan.runs)


@pytest.mark.parametrize("path", [p for p in RECIPES if p.parent.name == "recipes"], ids=lambda p: p.name)
def test_recipes_are_headed_by_their_command_and_expectation(path: Path) -> None:
    head = path.read_text().split("\n\n")[0]
    assert "vitzoo generate" in head and "Expected" in head, f"{path}: header must give the command and expected result"


def test_demo_has_the_promised_size() -> None:
    counts = expand(load_recipe(REPO / "recipes" / "demo.yaml")).counts()
    assert counts["pretrain"] >= 8 and counts["finetune"] >= 16


def _base() -> dict:
    return yaml.safe_load((REPO / "tests" / "tiny.yaml").read_text())


def _bad(mutate, match: str, tmp_path: Path) -> None:
    data = _base()
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match=match) as e:
        expand(load_recipe(path))
    assert str(path) in str(e.value), "the error names the file"


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["stages"]["pretrain"].update(epoch=3), r"stages\.pretrain\.epoch: unknown key; allowed: .*epochs"),
        (lambda d: d["stages"]["pretrain"]["optimizer"].update(lr="fast"), r"optimizer\.lr: .*expected a number"),
        (lambda d: d["stages"]["pretrain"]["optimizer"].update(lr=-1), r"lr must be >= 0"),
        (lambda d: d["stages"]["pretrain"].update(epochs=0), r"epochs must be >= 1"),
        (lambda d: d["stages"]["pretrain"]["grid"].update(objective=[]), r"grid\.objective: an axis is a non-empty list"),
        (lambda d: d["stages"]["pretrain"]["grid"].update(colour=[1, 2]), r"grid\.colour: unknown axis"),
        (lambda d: d["stages"]["pretrain"]["grid"].update(objective=["supervised", "byol"]), r"byol.*allowed: supervised, simclr"),
        (lambda d: d["stages"]["pretrain"].update(model="XL/16"), r"unknown variant 'XL/16'"),
        (lambda d: d["stages"]["pretrain"].update(aug={"level": "light", "crop_padding": 4}),
         r"aug: crop_padding \(4\) and scale .* set one"),
        (lambda d: d["stages"]["pretrain"].update(aug={"crop_padding": -1}), r"crop_padding must be an integer >= 0"),
        (lambda d: d["stages"]["pretrain"]["data"].update(val_size=0), r"data: val_size must be an integer >= 1"),
        (lambda d: d["stages"]["pretrain"].update(aug="extreme"), r"unknown aug level 'extreme'; allowed: none, light"),
        (lambda d: d["stages"]["finetune"]["finetune"].update(parent_stage="pre"), r"parent_stage 'pre' is not an earlier stage"),
        (lambda d: d["stages"]["finetune"]["finetune"].update(parent_epoch=7), r"parent_epoch 7 is not saved"),
        (lambda d: d["stages"]["pretrain"].update(schedule={"warmup": "2 days"}), r"schedule: a duration is a number with a unit"),
        (lambda d: d["stages"]["pretrain"].update(seeds={"init": [1, 1]}), r"init seeds repeat"),
        (lambda d: d["stages"]["pretrain"]["data"].update(source="s3://bucket"), r"source must start with"),
        (lambda d: d["stages"]["pretrain"].update(model={"variant": "micro", "img_size": 30}), r"not a multiple of patch_size"),
        (lambda d: d["stages"]["finetune"]["grid"].update(lr=[1e-3, "1e-3"]), r"repeats|more than once"),
        (lambda d: d["stages"]["pretrain"].update(sample={"n": 99}), r"sample\.n: 99 exceeds"),
        (lambda d: d.pop("name"), r"name: required key is missing"),
    ],
)
def test_bad_recipes_are_rejected_with_the_key(mutate, match, tmp_path) -> None:
    _bad(mutate, match, tmp_path)


def test_yaml_syntax_and_missing_file(tmp_path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\nstages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_presets_and_raw_values_mix() -> None:
    r = recipe_from_dict({"name": "x", "stages": {"s": {
        "model": {"variant": "S/16", "patch_size": 8, "img_size": 64},
        "aug": {"level": "strong", "mixup": 0.0},
        "optimizer": "sgd",
    }}})
    st = r.stages[0]
    assert st.model.resolved_patch_size == 8 and st.model.resolved_img_size == 64
    assert st.aug.mixup == 0.0 and st.aug.cutmix == 1.0 and st.aug.re_prob == 0.25  # the rest from the preset
    assert st.optimizer.resolved() == {"timm": "momentum", "lr": 1e-2, "weight_decay": 5e-4, "momentum": 0.9}


def test_yaml_scientific_notation_is_a_number() -> None:
    r = recipe_from_dict(yaml.safe_load("name: x\nstages:\n  s:\n    model: micro\n    optimizer: {lr: 1e-3}\n"))
    assert r.stages[0].optimizer.lr == 1e-3
