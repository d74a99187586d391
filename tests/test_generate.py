"""End to end: a micro ViT zoo into a folder; its exact contents, index rows, resume and sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import torch
import yaml

import vitzoo
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe
from vitzoo.train.generate import ZooConflictError, generate
from vitzoo.zoo.io import sha256_file

TESTS = Path(__file__).parent
REPO = TESTS.parent


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _expected_tree(plan, cards: bool) -> set[str]:
    files = {"recipe.yaml", "zoo.json", "index.parquet"}
    for r in plan.runs:
        base = f"models/{r.run_id}/"
        files |= {base + f for f in ("config.json", "model.safetensors", "checkpoints.safetensors", "run.json")}
        if cards:
            files |= {base + "README.md"}  # training_curves.png is drawn at push time
    if cards:
        files |= {"README.md"} | {f"plots/accuracy_{s.name}.png" for s in plan.recipe.stages}
    return files


def test_folder_contents_and_index_rows(tiny_zoo: Path, tiny_recipe: Path) -> None:
    plan = expand(load_recipe(tiny_recipe))
    tree = _tree(tiny_zoo)
    cards = "README.md" in tree
    assert tree == _expected_tree(plan, cards), "no temp files, no .partial, nothing missing"
    idx = pd.read_parquet(tiny_zoo / "index.parquet")
    # one row per saved state: epochs 0..2 of each of 2 + 4 models
    assert len(idx) == 6 * 3
    assert set(idx["model_id"]) == {r.run_id for r in plan.runs}
    for r in plan.runs:
        rows = idx[idx.model_id == r.run_id].sort_values("epoch")
        assert rows["epoch"].tolist() == [0, 1, 2]
        assert rows["final"].tolist() == [False, False, True]
        assert rows["file"].tolist() == [f"models/{r.run_id}/checkpoints.safetensors"] * 2 + [
            f"models/{r.run_id}/model.safetensors"]
        assert rows["tensor_prefix"].tolist() == ["epoch_0000/", "epoch_0001/", ""]
        assert (rows["stage"] == r.stage).all() and (rows["init_seed"] == r.init_seed).all()
        pid = rows["parent_id"].iloc[0]
        assert (pd.isna(pid) and r.parent_id is None) or pid == r.parent_id
        for _, row in rows.iterrows():
            assert row["sha256"] == sha256_file(tiny_zoo / row["file"])
        for key, value in r.factors.items():  # generating factors are columns
            col = {"objective": "objective.name", "mode": "finetune.mode"}[key]
            assert (rows[col] == value).all()
    sup = idx[(idx["objective.name"] == "supervised") & (idx.stage == "pretrain")]
    assert sup[["train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"]].notna().all().all()
    simclr = idx[(idx["objective.name"] == "simclr") & idx.final]
    assert simclr["val_acc"].between(0, 1).all()  # kNN accuracy
    meta = json.loads((tiny_zoo / "zoo.json").read_text())
    assert meta["status"] == "complete" and meta["counts"] == {"pretrain": 2, "finetune": 4}
    assert {"packages", "git", "hardware", "command"} <= set(meta["provenance"])
    assert meta["provenance"]["packages"]["torch"] == torch.__version__.split("+")[0] or meta["provenance"]["packages"]["torch"]
    # the final state is also the last epoch's checkpoint content
    info = json.loads((tiny_zoo / f"models/{plan.runs[0].run_id}/run.json").read_text())
    assert info["status"] == "done" and info["final_epoch"] == 2 and len(info["history"]) == 3


def test_safetensors_metadata_and_epoch0_is_initialisation(tiny_zoo: Path, tiny_recipe: Path) -> None:
    from vitzoo.models import vit

    plan = expand(load_recipe(tiny_recipe))
    r = [x for x in plan.runs if x.stage == "pretrain" and x.factors["objective"] == "supervised"][0]
    zoo = vitzoo.load(tiny_zoo)
    cfg = zoo.config(r.run_id)
    fresh = vit.create(cfg["architecture"], cfg["model_args"], cfg["num_classes"], seed=r.init_seed)
    epoch0 = zoo.state_dict(r.run_id, 0)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in epoch0.items())
    assert not torch.equal(zoo.state_dict(r.run_id)["head.weight"], epoch0["head.weight"])


def test_finetuned_records_parent_and_lineage(tiny_zoo: Path) -> None:
    zoo = vitzoo.load(tiny_zoo)
    ft = zoo.filter(stage="finetune", final=True).index
    pre = set(zoo.filter(stage="pretrain").index["model_id"])
    assert set(ft["parent_id"]) <= pre and ft["parent_id"].notna().all()
    lora = ft[ft["finetune.mode"] == "lora"].iloc[0]
    sd = zoo.state_dict(lora["model_id"])
    assert not any("lora" in k for k in sd), "LoRA adapters are merged into plain timm weights"
    parent = zoo.state_dict(lora["parent_id"])
    assert not torch.equal(sd["blocks.0.attn.qkv.weight"], parent["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("objective", ["supervised", "finetune"])
def test_timm_and_transformers_load_without_vitzoo(tiny_zoo: Path, objective: str) -> None:
    import timm
    from transformers import AutoModelForImageClassification

    zoo = vitzoo.load(tiny_zoo)
    if objective == "finetune":
        mid = zoo.filter(stage="finetune", final=True).index["model_id"].iloc[0]
    else:
        mid = zoo.filter(**{"objective.name": "supervised", "stage": "pretrain"}).index["model_id"].iloc[0]
    folder = tiny_zoo / "models" / mid
    ours = zoo.model(mid)
    x = torch.randn(3, *ours.pretrained_cfg["input_size"])
    t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    h = AutoModelForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = ours(x)
        torch.testing.assert_close(t(x), ref)
        torch.testing.assert_close(h(x).logits, ref)
    # preprocessing metadata travels with the weights
    assert t.pretrained_cfg["mean"] == ours.pretrained_cfg["mean"]
    assert h.config.num_labels == ours.num_classes


def test_generate_is_idempotent_and_refuses_changed_recipe(tiny_zoo: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (tiny_zoo / "models").rglob("*.safetensors")}
    generate(tiny_recipe, tiny_zoo, progress=False, log=lambda m: None)
    after = {p: p.stat().st_mtime_ns for p in (tiny_zoo / "models").rglob("*.safetensors")}
    assert before == after, "finished models are skipped, not retrained"
    changed = yaml.safe_load(tiny_recipe.read_text())
    changed["stages"]["pretrain"]["epochs"] = 3
    p = tmp_path / "changed.yaml"
    p.write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(ZooConflictError, match="different recipe"):
        generate(p, tiny_zoo, progress=False, log=lambda m: None)


def _small_recipe(tmp_path: Path, **pretrain) -> Path:
    data = yaml.safe_load((TESTS / "tiny.yaml").read_text())
    data["stages"]["pretrain"].update(pretrain)
    data["stages"]["pretrain"]["grid"] = {"objective": ["supervised"]}
    data["stages"]["finetune"]["grid"] = {"mode": ["full"]}
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_resume_after_interruption_is_exact(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path, epochs=3)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    generate(recipe, whole, progress=False, log=lambda m: None)
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, cut, progress=False, log=lambda m: None, stop_after_epoch=1)
    pid = expand(load_recipe(recipe)).runs[0].run_id
    partial = cut / "models" / pid / ".partial"
    assert partial.is_dir() and not (cut / "models" / pid / "run.json").exists()
    logs: list[str] = []
    generate(recipe, cut, progress=False, log=logs.append)
    assert any("resuming after epoch 1" in m for m in logs)
    a, b = vitzoo.load(whole), vitzoo.load(cut)
    assert sorted(a.model_ids()) == sorted(b.model_ids())
    for mid in a.model_ids():
        for e in a.epochs(mid):
            sa, sb = a.state_dict(mid, e), b.state_dict(mid, e)
            assert all(torch.equal(sa[k], sb[k]) for k in sa), f"{mid} epoch {e} differs after resume"


def test_sigkill_at_any_moment_leaves_no_corrupt_model(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path, epochs=4)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitzoo", "generate", str(recipe), "--out", str(out), "--no-progress"]
    for delay in (4.0, 6.0):  # kill mid-way (start-up takes a few seconds), twice
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for run_json in out.glob("models/*/run.json"):  # whatever is marked finished is whole
            info = json.loads(run_json.read_text())
            for st in info["states"]:
                assert sha256_file(out / st["file"]) == st["sha256"]
        for f in out.glob("models/*/*.safetensors"):
            safetensors.torch.load_file(f)  # never a truncated file
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    zoo = vitzoo.load(out)
    assert len(zoo) == 2 and not list(out.rglob(".partial")) and not list(out.rglob("*.tmp"))
    for mid in zoo.model_ids():
        for e in zoo.epochs(mid):
            zoo.state_dict(mid, e)  # verifies sha256 against the index


def test_diverged_run_is_data_not_an_error(tmp_path: Path) -> None:
    recipe = _small_recipe(tmp_path, epochs=3, optimizer={"name": "sgd", "lr": 1e12, "grad_clip": None})
    generate(recipe, tmp_path / "div", progress=False, log=lambda m: None)
    zoo = vitzoo.load(tmp_path / "div")
    pre = zoo.filter(stage="pretrain", final=True).index.iloc[0]
    assert pre["status"] == "diverged" and pre["epoch"] < 3
    assert torch.isfinite(zoo.weights(pre["model_id"])).all(), "the last good state is kept"
    assert len(zoo.filter(stage="finetune")) == 1, "the zoo goes on (its child is fine-tuned from the last good state)"


def test_two_process_launch_shards_into_the_same_zoo(tiny_zoo: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "mp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", "0", "-m", "vitzoo", "generate", str(tiny_recipe), "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout + res.stderr  # per-model lines are diagnostics: the logger, on stderr
    assert "[0]" in lines and "[1]" in lines, "both processes trained models"
    one, two = vitzoo.load(tiny_zoo), vitzoo.load(out)
    assert sorted(one.model_ids()) == sorted(two.model_ids())
    assert len(one.index) == len(two.index)
    for mid in one.model_ids():
        sa, sb = one.state_dict(mid), two.state_dict(mid)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5)


def test_bad_data_fails_before_writing_anything(tmp_path: Path) -> None:
    from vitzoo.data.sources import DataError

    data = yaml.safe_load((TESTS / "tiny.yaml").read_text())
    data["stages"]["finetune"]["data"]["label_column"] = "category"
    p = tmp_path / "bad_data.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(DataError, match=r"bad_data.yaml: stages.finetune.data.label_column: column 'category' not in"):
        generate(p, tmp_path / "zoo", progress=False, log=lambda m: None)
    assert not (tmp_path / "zoo").exists(), "no half-written zoo"


def test_cli_plan_info_and_errors(tiny_zoo: Path, tiny_recipe: Path, tmp_path: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, "-m", "vitzoo", *a], capture_output=True, text=True)  # noqa: E731
    res = run("plan", str(tiny_recipe), "--json")
    assert res.returncode == 0
    plan = json.loads(res.stdout)
    assert plan["counts"] == {"pretrain": 2, "finetune": 4} and len(plan["runs"]) == 6
    res = run("info", str(tiny_zoo))
    assert res.returncode == 0 and "pretrain: 2 models, 0 diverged" in res.stdout and "finetune: 4 models" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  s:\n    model: micro\n    optimiser: adamw\n")
    res = run("generate", str(bad), "--out", str(tmp_path / "z"))
    assert res.returncode == 2 and "stages.s.optimiser: unknown key" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "z").exists()
    res = run("info", str(tmp_path / "nothing"))
    assert res.returncode == 3 and "no such zoo folder" in res.stderr  # a data error (vitzoo.errors.EXIT_CODES)


def test_truncated_scratch_state_restarts_the_run(tmp_path: Path) -> None:
    """Scratch files are written without fsync: after an OS crash one may be truncated; the run restarts."""
    recipe = _small_recipe(tmp_path, epochs=2)
    out = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, out, progress=False, log=lambda m: None, stop_after_epoch=1)
    pid = expand(load_recipe(recipe)).runs[0].run_id
    (out / "models" / pid / ".partial" / "epoch_0001.safetensors").write_bytes(b"\0" * 10)
    logs: list[str] = []
    generate(recipe, out, progress=False, log=logs.append)
    assert any("unreadable partial state" in m for m in logs)
    assert len(vitzoo.load(out)) == 2


def test_index_is_refreshed_while_a_stage_runs(tmp_path: Path, monkeypatch) -> None:
    import vitzoo.train.generate as gen

    monkeypatch.setattr(gen, "INDEX_REFRESH_S", 0.0)
    seen: list[int] = []

    def log(msg: str) -> None:  # runs as each model finishes, before that model's refresh: sees the ones before
        if (tmp_path / "z" / "index.parquet").exists():
            seen.append(len(pd.read_parquet(tmp_path / "z" / "index.parquet")["model_id"].unique()))

    generate(TESTS / "tiny.yaml", tmp_path / "z", progress=False, log=log)
    assert seen[:2] == [1, 2], "the index grows model by model, before the stage ends"
