"""A classic CNN zoo through `vitzoo generate`: trained as a population, stored and loaded like ViT zoos."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

import vitzoo
from vitzoo.models.cnn import build_cnn
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe
from vitzoo.train.context import RunContext
from vitzoo.train.engine import train_run
from vitzoo.train.generate import generate
from vitzoo.train.population_adapter import unsupported
from vitzoo.zoo.index import write_index

RECIPE = Path(__file__).parent / "classic_micro.yaml"


def test_micro_mnist_seed_zoo(tmp_path: Path) -> None:
    recipe = load_recipe(RECIPE)
    assert not any(unsupported(r) for r in expand(recipe).runs), "the micro seed zoo is population-trained"
    generate(RECIPE, tmp_path / "zoo", progress=False, log=lambda m: None)
    zoo = vitzoo.load(tmp_path / "zoo")
    assert len(zoo) == 16 and len(zoo.index) == 16 * 3  # epochs 0, 1, 2 of every model
    mid = zoo.model_ids()[0]
    model = zoo.model(mid)
    assert sum(p.numel() for p in model.parameters()) == 2464
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert list(zoo.state_dict(mid))[0] == "module_list.0.weight", "legacy key names"
    assert zoo.config(mid)["architecture"] == "vitzoo_cnn_s"
    assert zoo.models["test_acc"].between(0, 1).all() and zoo.models["train_loss"].notna().all()
    # epoch 0 is the seeded initialisation: U(0,1) weights, every bias 0.01 (reference)
    spec = {r.run_id: r for r in expand(recipe).runs}[mid]
    init = build_cnn("cnn-s", 1, 10, "tanh", 0.0, "U", seed=spec.init_seed).state_dict()
    e0 = zoo.state_dict(mid, 0)
    assert all(torch.equal(init[k], e0[k]) for k in init)
    assert (e0["module_list.0.bias"] == 0.01).all() and e0["module_list.0.weight"].min() >= 0


def test_population_states_match_runs_trained_alone(tmp_path: Path) -> None:
    """The zoo's stored states (16 models: a vmap stack) equal the same runs trained alone by the engine."""
    generate(RECIPE, tmp_path / "zoo", progress=False, log=lambda m: None)
    zoo = vitzoo.load(tmp_path / "zoo")
    runs = expand(load_recipe(RECIPE)).runs[:3]
    ctx = RunContext(zoo_root=tmp_path / "alone", device=torch.device("cpu"), progress=False, log=lambda m: None)
    for r in runs:
        train_run(r, ctx)
    write_index(tmp_path / "alone")
    alone = vitzoo.load(tmp_path / "alone")
    for r in runs:
        stored, ref = zoo.state_dict(r.run_id), alone.state_dict(r.run_id)
        for k, v in ref.items():
            torch.testing.assert_close(stored[k], v, rtol=1e-4, atol=1e-5)


def _micro(tmp_path: Path, seeds: str, dropout: float, epochs: int = 3) -> Path:
    import yaml

    doc = yaml.safe_load(RECIPE.read_text())
    st = doc["stages"]["train"]
    st["model"]["dropout"], st["model"]["activation"], st["epochs"], st["seeds"]["init"] = dropout, "relu", epochs, seeds
    st["data"]["max_train_samples"] = 100
    path = tmp_path / f"micro-{seeds}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("seeds", ["1..16", "1..3"], ids=["vectorised", "one-by-one"])
def test_interrupted_population_resumes_exactly(tmp_path: Path, seeds: str) -> None:
    """A group stopped after epoch 1 continues from its members' resume points: the zoo equals an
    uninterrupted one file for file (dropout on: the stack's stream is seeded per epoch), and no finished
    model is retrained."""
    recipe = _micro(tmp_path, seeds, dropout=0.2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    generate(recipe, whole, progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, cut, progress=False, log=lambda m: None, stop_after_epoch=1)
    assert list(cut.glob("models/*/.partial/resume.safetensors"))
    logs: list[str] = []
    generate(recipe, cut, progress=False, log=logs.append)
    assert any("resuming after epoch 1" in m for m in logs)
    a, b = vitzoo.load(whole), vitzoo.load(cut)
    assert sorted(a.model_ids()) == sorted(b.model_ids()) and len(a) == (16 if seeds == "1..16" else 3)
    cols = ["model_id", "epoch", "val_acc", "train_loss", "test_acc"]
    pd.testing.assert_frame_equal(a.index[cols].sort_values(cols[:2]).reset_index(drop=True),
                                  b.index[cols].sort_values(cols[:2]).reset_index(drop=True))
    for mid in a.model_ids():
        for e in a.epochs(mid):
            sa, sb = a.state_dict(mid, e), b.state_dict(mid, e)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{mid} epoch {e} differs after resume"
    assert not list(cut.glob("models/*/.partial")), "scratch removed when done"


def test_unreadable_member_scratch_restarts_that_model(tmp_path: Path) -> None:
    recipe = _micro(tmp_path, "1..16", dropout=0.0, epochs=2)
    out = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, out, progress=False, log=lambda m: None, stop_after_epoch=1)
    victim = expand(load_recipe(recipe)).runs[3].run_id
    (out / "models" / victim / ".partial" / "epoch_0001.safetensors").write_bytes(b"\0" * 10)
    logs: list[str] = []
    generate(recipe, out, progress=False, log=logs.append)
    assert any(victim in m and "unreadable partial state" in m for m in logs)
    assert len(vitzoo.load(out)) == 16


def test_two_processes_train_their_populations_into_one_zoo(tmp_path: Path) -> None:
    """`accelerate launch` with 2 processes: each trains its shard as a population (16 models each,
    vectorised) with snapshots in the shared folder; the zoo equals the 1-process one to float tolerance."""
    import os
    import subprocess
    import sys

    recipe = _micro(tmp_path, "1..32", dropout=0.0, epochs=2)
    generate(recipe, tmp_path / "one", progress=False, log=lambda m: None)
    repo = Path(__file__).parent.parent
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(repo / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", "0", "-m", "vitzoo", "generate", str(recipe), "--out", str(tmp_path / "two"),
           "--no-progress"]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr  # per-model lines are diagnostics: the logger, on stderr
    assert "[0]" in out and "[1]" in out, "both processes trained models"
    assert not (tmp_path / "two" / ".partial").exists(), "a complete zoo keeps no scratch (logs included)"
    a, b = vitzoo.load(tmp_path / "one"), vitzoo.load(tmp_path / "two")
    assert sorted(a.model_ids()) == sorted(b.model_ids()) and len(a.index) == len(b.index) == 32 * 3
    for mid in a.model_ids():
        sa, sb = a.state_dict(mid), b.state_dict(mid)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "two" / ".partial" / "populations").glob("*"))


def test_bad_population_switch_names_the_variable_and_leaves_no_zoo(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITZOO_POPULATION", "sometimes")
    with pytest.raises(ValueError, match=r"VITZOO_POPULATION='sometimes'; allowed: auto, on, off"):
        generate(RECIPE, tmp_path / "zoo", progress=False, log=lambda m: None)
    assert not (tmp_path / "zoo").exists()


def test_models_are_reported_as_they_finish_not_when_their_group_ends(tmp_path: Path) -> None:
    """One-by-one groups (ResNet zoos: days) hand each finished model to `generate` (log, progress, index
    refresh) while the rest of the group still trains."""
    recipe = _micro(tmp_path, "1..3", dropout=0.0, epochs=2)
    out = tmp_path / "zoo"
    finished_at_log: list[int] = []

    def log(msg: str) -> None:
        if "done epoch" in msg:
            finished_at_log.append(len(list(out.glob("models/*/run.json"))))

    generate(recipe, out, progress=False, log=log)
    assert len(finished_at_log) == 3 and finished_at_log[0] < 3, finished_at_log
