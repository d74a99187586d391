"""Sparsified twins trained as populations (vitzoo.train.sparsify_population) vs one by one (sparsify.py).

Deterministic CPU, one thread. With the Gaussian noise of the local reparameterisation switched off
(``noise=False``, in both paths) the population and the one-by-one runs agree at every saved epoch
to float tolerance; with it on (per-twin draws from one stream in a population, per-twin seeds one by
one) they are different samples of the same training, so only the outcome is compared, loosely.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vitzoo.data.pipeline import DataCache
from vitzoo.plan import RunSpec, expand
from vitzoo.recipe import recipe_from_dict
from vitzoo.train import routing
from vitzoo.train import sparsify_population as spp
from vitzoo.train.context import RunContext
from vitzoo.train.engine import Member
from vitzoo.train.engine import train_run as train_sparsify_run
from vitzoo.train.sparsify_population import train_sparsify_stage, unsupported
from vitzoo.zoo.reader import LocalSource, read_state

RECIPE = Path(__file__).parent / "sparsify_micro.yaml"
EPOCHS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _recipe() -> dict[str, Any]:
    data = yaml.safe_load(RECIPE.read_text())
    data["stages"]["twins"]["data"]["max_train_samples"] = 200  # 20 steps per epoch: fast
    return data


@pytest.fixture(scope="module")
def parents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro recipe's train stage alone: 4 CNN-s parents (their ids are those of the full recipe)."""
    from vitzoo.train.generate import generate

    data = _recipe()
    del data["stages"]["twins"]
    root = tmp_path_factory.mktemp("twin-parents")
    (root / "train.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    generate(root / "train.yaml", root / "zoo", progress=False, log=lambda m: None)
    return root / "zoo"


def _twins() -> list[RunSpec]:
    specs = expand(recipe_from_dict(_recipe())).stage_runs("twins")
    assert len(specs) == 4 and len({s.parent_id for s in specs}) == 4
    return specs


def _variant(spec: RunSpec, tag: str, data_seed: int, **kw: Any) -> RunSpec:
    """``spec`` with other optimizer / sparsify settings and data seed (a grid would do the same)."""
    c = spec.config
    opt = dataclasses.replace(c.optimizer, **{k: v for k, v in kw.items() if k in ("name", "lr", "weight_decay",
                                                                                    "grad_clip", "momentum")})
    sp = dataclasses.replace(c.sparsify, **{k: v for k, v in kw.items() if k in ("kl_weight", "log_sigma2_init")})
    return dataclasses.replace(spec, run_id=f"{spec.run_id}-{tag}", data_seed=data_seed,
                               config=dataclasses.replace(c, optimizer=opt, sparsify=sp))


def _variants() -> list[RunSpec]:
    """Different parents, data seeds, lr, weight decay, clipping, kl_weight, log_sigma2_init and update rules.

    Four Adam twins form one population; AdamW, SGD and Nesterov twins form their own. Settings are
    kept where training is well conditioned: with unclipped SGD at lr 0.03, say, the one-by-one path
    itself moves by 0.2 when its gradients are perturbed by 1e-7 (max-pool argmax switches and
    1/w KL gradients of pruned weights), and no two float orders can agree there.
    """
    s = _twins()
    return [
        _variant(s[0], "a", 0, lr=3e-3),
        _variant(s[1], "b", 7, lr=2e-3, weight_decay=1e-3, grad_clip=1.0, kl_weight=50.0),
        _variant(s[2], "c", 3, lr=1e-3, grad_clip=0.5, kl_weight=200.0, log_sigma2_init=-8.0),
        _variant(s[3], "d", 3, lr=3e-3),
        _variant(s[0], "e", 5, name="adamw", lr=3e-3, weight_decay=0.05),
        _variant(s[1], "f", 7, name="adamw", lr=2e-3, weight_decay=1e-2, grad_clip=1.0),
        _variant(s[2], "g", 3, name="sgd", lr=0.05, weight_decay=1e-3, grad_clip=0.5),
        _variant(s[3], "h", 3, name="nesterov", lr=0.03, weight_decay=1e-3, grad_clip=0.5),
    ]


def _zoo(parents: Path, path: Path, **ctx_kw: Any) -> RunContext:
    (path / "models").mkdir(parents=True)
    for p in (parents / "models").iterdir():
        shutil.copytree(p, path / "models" / p.name)
    return RunContext(zoo_root=path, device=torch.device("cpu"), cache=DataCache(), progress=False,
                      log=lambda m: None, **ctx_kw)


def _states(ctx: RunContext, info: dict[str, Any]) -> dict[int, dict[str, torch.Tensor]]:
    return {s["epoch"]: read_state(LocalSource(ctx.zoo_root), info, s["epoch"]) for s in info["states"]}


def _train(parents: Path, path: Path, specs: list[RunSpec], mode: str, noise: bool) -> dict[str, dict[str, Any]]:
    ctx = _zoo(parents, path)
    infos = {i["run_id"]: i for i in train_sparsify_stage(specs, ctx, mode=mode, noise=noise)}
    assert set(infos) == {s.run_id for s in specs}
    return {rid: {"info": info, "states": _states(ctx, info), "folder": ctx.zoo_root / "models" / rid}
            for rid, info in infos.items()}


@pytest.fixture(scope="module")
def noiseless(parents: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("noiseless")
    specs = _variants()
    return {mode: _train(parents, root / mode, specs, mode, noise=False) for mode in ("sequential", "population")}


def _assert_close_states(a: dict[int, dict[str, torch.Tensor]], b: dict[int, dict[str, torch.Tensor]],
                         what: str) -> None:
    assert sorted(a) == sorted(b), what
    for epoch in a:
        assert list(a[epoch]) == list(b[epoch]), f"{what} epoch {epoch}: keys"
        for k in a[epoch]:
            # Two float orders (vmap vs one module), amplified over 60 steps: worst seen 3.3e-4 abs on 3 of
            # 1,200 weights of an AdamW twin (the data order of vitzoo.train.seeds), 1e-4 under the old one.
            torch.testing.assert_close(a[epoch][k], b[epoch][k], rtol=1e-3, atol=5e-4,
                                       msg=lambda m, e=epoch, k=k: f"{what} {e} {k}: {m}")


# --------------------------------------------------------------------------- equivalence


def test_population_equals_one_by_one_without_noise(noiseless: dict[str, dict[str, dict[str, Any]]]) -> None:
    seq, pop = noiseless["sequential"], noiseless["population"]
    for rid, ref in seq.items():
        got = pop[rid]
        assert got["info"]["status"] == ref["info"]["status"] == "done"
        assert sorted(got["states"]) == list(range(EPOCHS + 1))
        _assert_close_states(got["states"], ref["states"], rid)
        # epoch 0 is the parent itself, bit for bit, in both
        assert all(torch.equal(got["states"][0][k], v) for k, v in ref["states"][0].items())
        for hg, hr in zip(got["info"]["history"], ref["info"]["history"], strict=True):
            assert list(hg) == list(hr), "the same history columns, in the same order"
            for k, v in hr.items():
                if v is None or k == "epoch":
                    assert hg[k] == v, k
                elif k.endswith("_acc"):
                    assert hg[k] == pytest.approx(v, abs=0.011), (rid, hr["epoch"], k)  # at most one sample
                elif k == "sparsity_ratio":
                    assert hg[k] == pytest.approx(v, abs=1e-3), (rid, hr["epoch"], k)
                else:
                    assert hg[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (rid, hr["epoch"], k)
    # training did something: the twins got sparser and moved away from their parents
    final = [r["info"]["history"][-1]["sparsity_ratio"] for r in seq.values()]
    assert min(final) > 0.05, final


def test_population_twins_look_like_one_by_one_twins_on_disk(noiseless: dict[str, dict[str, dict[str, Any]]]) -> None:
    seq, pop = noiseless["sequential"], noiseless["population"]
    volatile = {"wall_time_s", "finished_at", "history", "states"}
    for rid, ref in seq.items():
        got = pop[rid]
        assert sorted(p.name for p in got["folder"].iterdir()) == sorted(p.name for p in ref["folder"].iterdir())
        assert json.loads((got["folder"] / "config.json").read_text()) == \
            json.loads((ref["folder"] / "config.json").read_text())
        a, b = got["info"], ref["info"]
        assert {k: v for k, v in a.items() if k not in volatile} == {k: v for k, v in b.items() if k not in volatile}
        strip = ("sha256", "size") + tuple(k for k in a["history"][0] if k != "epoch")  # metrics compared above
        assert [{k: v for k, v in s.items() if k not in strip} for s in a["states"]] == \
            [{k: v for k, v in s.items() if k not in strip} for s in b["states"]]
        weights = [k for k in got["states"][EPOCHS] if k.endswith(".weight")]
        zeros = sum(int((got["states"][EPOCHS][k] == 0).sum()) for k in weights)
        total = sum(got["states"][EPOCHS][k].numel() for k in weights)
        assert a["history"][-1]["sparsity_ratio"] == pytest.approx(zeros / total)  # pruned weights are exact zeros


# --------------------------------------------------------------------------- with noise, resume, divergence


@pytest.fixture(scope="module")
def noisy(parents: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("noisy")
    return {mode: _train(parents, root / mode, _twins(), mode, noise=True) for mode in ("sequential", "population")}


def test_with_noise_population_twins_are_comparable(noisy: dict[str, dict[str, dict[str, Any]]]) -> None:
    def final(mode: str, key: str) -> list[float]:
        return [r["info"]["history"][-1][key] for r in noisy[mode].values()]

    sp_seq, sp_pop = final("sequential", "sparsity_ratio"), final("population", "sparsity_ratio")
    acc_seq, acc_pop = final("sequential", "test_acc"), final("population", "test_acc")
    assert min(sp_pop) > 0.2 and min(sp_seq) > 0.2, (sp_pop, sp_seq)
    assert abs(sum(sp_pop) / 4 - sum(sp_seq) / 4) < 0.05, (sp_pop, sp_seq)
    assert abs(sum(acc_pop) / 4 - sum(acc_seq) / 4) < 0.08, (acc_pop, acc_seq)
    # the noise is on: the same twin differs between the paths (different draws)
    rid = next(iter(noisy["sequential"]))
    assert not torch.equal(noisy["sequential"][rid]["states"][1]["module_list.0.weight"],
                           noisy["population"][rid]["states"][1]["module_list.0.weight"])


def test_population_resumes_per_epoch_on_either_path(parents: Path, tmp_path: Path,
                                                     noisy: dict[str, dict[str, dict[str, Any]]]) -> None:
    specs = _twins()
    ctx = _zoo(parents, tmp_path / "zoo", stop_after_epoch=1)
    with pytest.raises(KeyboardInterrupt):
        list(train_sparsify_stage(specs, ctx, mode="population"))
    for s in specs:  # every twin saved epoch 1 and its resume point, none finished
        folder = ctx.zoo_root / "models" / s.run_id
        assert (folder / ".partial" / "epoch_0001.safetensors").is_file() and not (folder / "run.json").exists()
    shutil.copytree(ctx.zoo_root, tmp_path / "copy")
    # 1. the same population resumes after epoch 1 and ends exactly where the uninterrupted one did
    ctx.stop_after_epoch = None
    infos = {i["run_id"]: i for i in train_sparsify_stage(specs, ctx, mode="population")}
    ref = noisy["population"]
    for rid, info in infos.items():
        assert info["status"] == "done" and [h["epoch"] for h in info["history"]] == list(range(EPOCHS + 1))
        got = _states(ctx, info)
        assert all(torch.equal(got[e][k], ref[rid]["states"][e][k]) for e in got for k in got[e]), rid
        assert [h["sparsity_ratio"] for h in info["history"]] == \
            [h["sparsity_ratio"] for h in ref[rid]["info"]["history"]]
    # 2. a twin interrupted in a population resumes one by one from the same files (epoch 1 kept)
    ctx2 = RunContext(zoo_root=tmp_path / "copy", device=torch.device("cpu"), cache=ctx.cache, progress=False,
                      log=lambda m: None)
    info = train_sparsify_run(specs[0], ctx2)
    assert info["status"] == "done" and info["final_epoch"] == EPOCHS
    got = _states(ctx2, info)
    for e in (0, 1):
        assert all(torch.equal(got[e][k], ref[specs[0].run_id]["states"][e][k]) for k in got[e])
    assert info["history"][1] == ref[specs[0].run_id]["info"]["history"][1]


def test_diverged_twin_is_frozen_and_finished_at_once(parents: Path, tmp_path: Path,
                                                      noiseless: dict[str, dict[str, dict[str, Any]]]) -> None:
    good = _variants()[:2]
    bad = _variant(_twins()[2], "bad", 1, lr=1e30)
    ctx = _zoo(parents, tmp_path / "zoo")
    infos = list(train_sparsify_stage([good[0], bad, good[1]], ctx, mode="population", noise=False))
    assert [i["run_id"] for i in infos][0] == bad.run_id, "finished as soon as it diverged, before the others"
    b = infos[0]
    assert b["status"] == "diverged" and b["final_epoch"] == 0 and [s["epoch"] for s in b["states"]] == [0]
    parent = read_state(LocalSource(parents), json.loads((parents / "models" / bad.parent_id / "run.json")
                                                          .read_text()), 2)
    state0 = _states(ctx, b)[0]
    assert all(torch.equal(state0[k], v) for k, v in parent.items())
    ref = noiseless["sequential"]
    for info in infos[1:]:  # the healthy twins are untouched by their diverged neighbour
        assert info["status"] == "done"
        _assert_close_states(_states(ctx, info), ref[info["run_id"]]["states"], info["run_id"])


# --------------------------------------------------------------------------- routing


def test_generate_routes_twins_by_architecture_and_population_size(parents: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from vitzoo.train.generate import _train_stage

    data = _recipe()
    data["stages"]["twins"]["epochs"] = 1
    recipe = recipe_from_dict(data)
    specs = expand(recipe).stage_runs("twins")
    calls: list[int] = []
    init = spp._TwinPopulation.__init__

    def spy(self: spp._TwinPopulation, part: Any, ctx: RunContext) -> None:
        calls.append(len(part))
        init(self, part, ctx)

    monkeypatch.setattr(spp._TwinPopulation, "__init__", spy)
    # auto on CPU: 4 twins are below the measured threshold (not faster stacked): one by one
    assert routing.MIN_STACK[("cpu", "twin")] > 4
    ctx = _zoo(parents, tmp_path / "a")
    assert len(list(_train_stage(recipe.stages[1], specs[:2], ctx))) == 2 and calls == []
    # a lower threshold: the same stage goes to the population engine (finished twins are skipped)
    monkeypatch.setitem(routing.MIN_STACK, ("cpu", "twin"), 2)
    infos = list(_train_stage(recipe.stages[1], specs, ctx))
    assert calls == [2] and len(infos) == 4 and all(i["status"] == "done" for i in infos)
    # what stays one by one
    assert unsupported(specs[0], {"architecture": "vitzoo/resnet18"})
    assert unsupported(specs[0], {"architecture": "vit_small_patch16_224"})
    lion = _variant(specs[0], "lion", 0, name="lion")
    assert unsupported(lion, {"architecture": "vitzoo/cnn-s"}) and not unsupported(specs[0], {"architecture":
                                                                                              "vitzoo/cnn-m"})
    with pytest.raises(ValueError, match="cannot be vectorised"):
        list(train_sparsify_stage([lion], ctx, mode="population"))


def test_cnn_m_twins_step_like_one_by_one() -> None:
    """CNN-m (3 channels, 32x32, always-present p=0 dropout layers): one noiseless step equals torch's."""
    import torch.nn.functional as F

    from vitzoo.models import cnn_model_args
    from vitzoo.models.cnn import build_cnn
    from vitzoo.train.variational import prepare_twin, total_kl

    data = {"source": "builtin:shapes", "channels": 3, "max_train_samples": 20, "max_eval_samples": 10}
    recipe = recipe_from_dict({"name": "m", "stages": {
        "train": {"data": data, "model": {"variant": "cnn-m"}, "epochs": 1},
        "twins": {"sparsify": {"parent_stage": "train"}, "data": data, "epochs": 1, "batch_size": 5,
                  "optimizer": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.1, "grad_clip": 0.3}}}})
    spec0 = expand(recipe).stage_runs("twins")[0]
    specs = [dataclasses.replace(spec0, run_id=f"m{i}", data_seed=i) for i in range(2)]
    ctx = RunContext(zoo_root=Path("unused"), device=torch.device("cpu"), cache=DataCache(), progress=False)

    def parent(seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        net = build_cnn("cnn-m", 3, 6, "tanh", 0.0, None, seed)
        return ({"architecture": "vitzoo/cnn-m", "model_args": cnn_model_args(3, "tanh", 0.0, None),
                 "num_classes": 6, "pretrained_cfg": {"input_size": [3, 32, 32]}}, copy.deepcopy(net.state_dict()))

    twins = [prepare_twin(s, ctx, noise=False, parent=parent(i)) for i, s in enumerate(specs)]
    stacked = [prepare_twin(s, ctx, noise=False, parent=parent(i)) for i, s in enumerate(specs)]
    pop = spp._TwinPopulation([(tw, Member(tw.spec, tw.writer, tw.built, tw.data.name)) for tw in stacked], ctx)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 5, 3, 32, 32, generator=g), torch.randint(0, 6, (2, 5), generator=g)
    pop.loss_sum, pop.kl_sum = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for _ in range(3):
        pop.train_step(x, y, 1.0, torch.full((2,), 1e-3))
        for i, tw in enumerate(twins):
            tw.net.train()
            loss = F.cross_entropy(tw.net(x[i]), y[i]) + 1e-3 * total_kl(tw.modules)
            tw.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tw.net.parameters(), 0.3)
            tw.optimizer.step()
    for i, tw in enumerate(twins):
        for n, p in tw.net.named_parameters():
            torch.testing.assert_close(pop.params[n][i], p.detach(), rtol=1e-4, atol=1e-5, msg=n)
