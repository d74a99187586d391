"""Sparsified twins (vitzoo.train.variational, trained by vitzoo.train.engine): the variational-dropout math, and a micro zoo end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import vitzoo
from vitzoo.models.cnn import build_cnn
from vitzoo.plan import expand
from vitzoo.recipe import load_recipe
from vitzoo.train.engine import train_run as train_sparsify_run
from vitzoo.train.variational import (
    VDConv2d,
    VDLinear,
    attach_variational_dropout,
    kl_approx,
    kl_ramp,
    log_alpha,
    pruned_state,
    sparsity_ratio,
)

RECIPE = Path(__file__).parent / "sparsify_micro.yaml"


# --------------------------------------------------------------------------- the math


def test_kl_approximation_matches_the_exact_kl() -> None:
    """Molchanov's fit vs a Monte-Carlo estimate of KL(N(w, alpha w^2) || log-uniform), up to its constant.

    -KL = 0.5 log alpha - E_{e ~ N(1, alpha)} log|e| + C; C makes KL -> 0 as alpha -> inf, where
    0.5 log alpha - E log|e| -> (gamma + log 2) / 2.
    """
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2_000_000, generator=g, dtype=torch.float64)
    c = (0.5772156649015329 + math.log(2)) / 2
    for la in (-6.0, -3.0, -1.0, 0.0, 1.0, 3.0, 6.0):
        alpha = math.exp(la)
        exact = c - (0.5 * la - torch.log(torch.abs(1 + math.sqrt(alpha) * z)).mean().item())
        approx = kl_approx(torch.tensor(la, dtype=torch.float64)).item()
        assert approx == pytest.approx(exact, abs=0.02), la
    las = torch.linspace(-12, 12, 101)
    kl = kl_approx(las)
    assert (kl > 0).all() and (kl.diff() < 0).all(), "positive and decreasing in alpha"
    assert kl_approx(torch.tensor(30.0)).item() < 1e-3 and kl_approx(torch.tensor(-10.0)).item() > 5.0


def test_kl_ramp_is_the_reference_schedule() -> None:
    assert kl_ramp(1, 25) == pytest.approx(0.0004) and kl_ramp(25, 25) == pytest.approx(0.01)


def test_log_alpha_masking_in_eval_training_noise_and_saved_state() -> None:
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.5, 1e-3, -2.0], [0.2, -0.3, 0.0, 0.7], [1e-4, 1.0, -1.0, 0.05]]))
    net = nn.Sequential(lin)
    mods = attach_variational_dropout(net, log_sigma2_init=-10.0, threshold=3.0)
    assert list(mods) == ["0"] and isinstance(lin, VDLinear)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "0.log_sigma2"]
    # log alpha = -10 - log(w^2 + 1e-8) >= 3  <=>  w^2 <= exp(-13) - 1e-8, |w| <~ 1.5e-3
    la = log_alpha(lin.weight, lin.log_sigma2)
    assert la[0, 0].item() == pytest.approx(-10.0, abs=1e-6)
    expected_keep = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(lin.keep_mask(), expected_keep)
    with torch.no_grad():  # raise one weight's variance above the threshold: pruned too
        lin.log_sigma2[1, 3] = 3.0 + math.log(0.7**2) + 0.01
    expected_keep[1, 3] = 0
    assert torch.equal(lin.keep_mask(), expected_keep)
    x = torch.randn(5, 4)
    net.eval()
    assert torch.allclose(net(x), F.linear(x, lin.weight * expected_keep, lin.bias))
    state = pruned_state(net, mods)
    assert list(state) == ["0.weight", "0.bias"]
    assert torch.equal(state["0.weight"] == 0, expected_keep == 0)
    assert sparsity_ratio(state, ["0.weight"]) == pytest.approx(4 / 12)
    # training: local reparameterisation, mean = the unmasked layer, variance = x^2 @ sigma^2
    net.train()
    torch.manual_seed(0)
    xs = x[:1].expand(20_000, 4)
    out = net(xs)
    mu = F.linear(x[:1], lin.weight, lin.bias)
    var = F.linear(x[:1] ** 2, lin.log_sigma2.exp())
    assert torch.allclose(out.mean(0), mu[0], atol=4 * (var[0].sqrt().max().item() / 140 + 1e-4))
    assert torch.allclose(out.var(0), var[0] + 1e-8, rtol=0.05, atol=1e-6)
    out.sum().backward()
    assert lin.log_sigma2.grad is not None and lin.weight.grad is not None


def test_attach_covers_conv_and_linear_keeps_keys_and_function() -> None:
    net = build_cnn("resnet18", 3, 10, seed=0)
    keys = list(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    ref = net(x)
    # log_sigma2 = -30: nothing is pruned, eval is the plain network (at the reference's -10, weights with
    # |w| < ~1.5e-3 are pruned from the start: a few percent of a fresh ResNet-18's small conv weights)
    mods = attach_variational_dropout(net, log_sigma2_init=-30.0)
    assert sum(isinstance(m, VDConv2d) for m in mods.values()) == 20 and isinstance(mods["fc"], VDLinear)
    net.eval()
    assert torch.allclose(net(x), ref, atol=1e-5)
    state = pruned_state(net, mods)
    assert list(state) == keys
    assert all(not isinstance(m, nn.BatchNorm2d) or type(m) is nn.BatchNorm2d for m in net.modules())


# --------------------------------------------------------------------------- a micro zoo


@pytest.fixture(scope="module")
def micro_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitzoo.train.generate import generate

    out = tmp_path_factory.mktemp("sparsify") / "zoo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny CNN-s steps: one thread is faster than two on a busy 2-core machine
    try:
        generate(RECIPE, out, progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return out


def test_micro_zoo_twins(micro_zoo: Path) -> None:
    zoo = vitzoo.load(micro_zoo)
    idx = zoo.index
    train_ids = sorted(idx.loc[idx.stage == "train", "model_id"].unique())
    twins = idx[idx.stage == "twins"]
    twin_ids = sorted(twins["model_id"].unique())
    assert len(train_ids) == 4 and len(twin_ids) == 4
    assert sorted(twins.groupby("model_id")["parent_id"].first()) == train_ids
    assert sorted(twins["epoch"].unique()) == [0, 1, 2, 3]
    assert (twins["status"] == "done").all()
    assert "sparsity_ratio" in idx.columns and twins["sparsity_ratio"].notna().all()
    mean = twins.groupby("epoch")["sparsity_ratio"].mean()
    assert mean[0] == 0.0 and mean[3] > 0.1
    assert (mean.diff().dropna() > -0.02).all(), f"sparsity should grow: {mean.to_dict()}"

    weight_keys = [k for k in zoo.state_dict(twin_ids[0]) if k.endswith(".weight")]  # CNN-s: conv + linear only
    for tid in twin_ids:
        parent = twins.loc[twins.model_id == tid, "parent_id"].iloc[0]
        p_final = int(idx[(idx.model_id == parent) & idx.final]["epoch"].iloc[0])
        # epoch 0 of a twin is its parent's final state, bit for bit
        e0, pstate = zoo.state_dict(tid, 0), zoo.state_dict(parent, p_final)
        assert list(e0) == list(pstate) and all(torch.equal(e0[k], pstate[k]) for k in e0)
        for epoch in (1, 2, 3):  # pruned weights are exact zeros: the index's ratio counts them
            row = twins[(twins.model_id == tid) & (twins.epoch == epoch)].iloc[0]
            state = zoo.state_dict(tid, epoch)
            assert sparsity_ratio(state, weight_keys) == pytest.approx(row["sparsity_ratio"])
            assert not any(torch.equal(state[k], pstate[k]) for k in weight_keys)
    assert zoo.config(twin_ids[0])["vitzoo"]["parent_id"] in train_ids


def test_twin_loads_and_its_metrics_are_those_of_the_saved_pruned_state(micro_zoo: Path) -> None:
    from vitzoo.data.pipeline import DataCache, preprocessing_for

    zoo = vitzoo.load(micro_zoo)
    idx = zoo.index
    row = idx[(idx.stage == "twins") & idx.final].iloc[0]
    model = zoo.model(row["model_id"])
    assert sum(p.numel() for p in model.parameters()) == 2464
    cfg = load_recipe(RECIPE).stages[1]
    x, y = DataCache().eval_tensors(cfg.data, "test", preprocessing_for(cfg.data, 28))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(row["test_acc"], abs=1e-6)


def test_twin_resumes_after_a_kill_to_the_same_states(micro_zoo: Path, tmp_path: Path) -> None:
    """Kill a twin after epoch 1, resume it: the states equal those of the uninterrupted run."""
    import shutil

    from vitzoo.data.pipeline import DataCache
    from vitzoo.train.context import RunContext

    plan = expand(load_recipe(RECIPE))
    spec = plan.stage_runs("twins")[0]
    zoo_dir = tmp_path / "zoo"
    (zoo_dir / "models").mkdir(parents=True)
    shutil.copytree(micro_zoo / "models" / spec.parent_id, zoo_dir / "models" / spec.parent_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = RunContext(zoo_root=zoo_dir, device=torch.device("cpu"), cache=DataCache(), progress=False,
                         log=lambda m: None, stop_after_epoch=1)
        with pytest.raises(KeyboardInterrupt):
            train_sparsify_run(spec, ctx)
        assert (zoo_dir / "models" / spec.run_id / ".partial" / "epoch_0001.safetensors").is_file()
        ctx.stop_after_epoch = None
        info = train_sparsify_run(spec, ctx)
    finally:
        torch.set_num_threads(threads)
    assert info["status"] == "done" and info["final_epoch"] == 3
    ref = vitzoo.load(micro_zoo)
    from vitzoo.zoo.reader import LocalSource, read_state

    for epoch in (0, 1, 2, 3):
        a = read_state(LocalSource(zoo_dir), info, epoch)
        b = ref.state_dict(spec.run_id, epoch)
        assert all(torch.equal(a[k], b[k]) for k in b), epoch
    assert [h["sparsity_ratio"] for h in info["history"]] == \
        ref.index[ref.index.model_id == spec.run_id].sort_values("epoch")["sparsity_ratio"].tolist()


def test_vit_twin_of_a_finetuned_model(tmp_path: Path) -> None:
    """timm ViTs work too (Linear layers and the patch-embedding Conv2d), MLP heads included."""
    from vitzoo.train.generate import generate

    data = {"source": "builtin:digits", "max_train_samples": 64, "max_eval_samples": 32}
    recipe = tmp_path / "vit.yaml"
    recipe.write_text(yaml.safe_dump({"name": "vit-twins", "stages": {
        "pretrain": {"data": data, "model": {"variant": "micro", "img_size": 16}, "epochs": 1, "batch_size": 32},
        "finetune": {"finetune": {"parent_stage": "pretrain", "head": "mlp"}, "data": data, "epochs": 1,
                     "batch_size": 32},
        "twins": {"sparsify": {"parent_stage": "finetune", "kl_weight": 100.0}, "data": data,
                  "optimizer": {"name": "adamw", "lr": 1e-2}, "epochs": 2, "batch_size": 16},
    }}, sort_keys=False))
    generate(recipe, tmp_path / "zoo", progress=False, log=lambda m: None)
    zoo = vitzoo.load(tmp_path / "zoo")
    idx = zoo.index
    twin = idx[(idx.stage == "twins") & idx.final].iloc[0]
    assert twin["sparsity_ratio"] > 0
    parent = idx[(idx.model_id == twin["parent_id"]) & idx.final].iloc[0]
    assert parent["stage"] == "finetune"
    e0, p = zoo.state_dict(twin["model_id"], 0), zoo.state_dict(parent["model_id"])
    assert list(e0) == list(p) and all(torch.equal(e0[k], p[k]) for k in p)
    model = zoo.model(twin["model_id"])
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert zoo.state_dict(twin["model_id"])["blocks.0.attn.qkv.weight"].eq(0).any()


def test_diverging_twin_keeps_its_last_good_state(micro_zoo: Path, tmp_path: Path) -> None:
    import shutil

    from vitzoo.data.pipeline import DataCache
    from vitzoo.recipe import recipe_from_dict
    from vitzoo.train.context import RunContext

    data = yaml.safe_load(RECIPE.read_text())
    data["stages"]["twins"]["optimizer"] = {"name": "sgd", "lr": 1e30, "momentum": 0.0, "grad_clip": None}
    spec = expand(recipe_from_dict(data)).stage_runs("twins")[0]
    zoo_dir = tmp_path / "zoo"
    (zoo_dir / "models").mkdir(parents=True)
    shutil.copytree(micro_zoo / "models" / spec.parent_id, zoo_dir / "models" / spec.parent_id)
    ctx = RunContext(zoo_root=zoo_dir, device=torch.device("cpu"), cache=DataCache(), progress=False,
                     log=lambda m: None)
    info = train_sparsify_run(spec, ctx)
    assert info["status"] == "diverged" and info["final_epoch"] == 0
    assert [s["epoch"] for s in info["states"]] == [0]
    from vitzoo.zoo.reader import LocalSource, read_state

    final = read_state(LocalSource(zoo_dir), info, 0)
    parent = vitzoo.load(micro_zoo).state_dict(spec.parent_id)
    assert all(torch.equal(final[k], parent[k]) for k in parent)
