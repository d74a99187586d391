"""ViT fine-tuning populations are proven equal to fine-tuning the same runs one by one with ``train_run``.

Deterministic CPU, one thread: the same fine-tuning runs of one micro-ViT parent are trained into two
zoo folders, by the per-run loop and by the population engine (forced on), and every saved state,
every history row and the status must agree (rtol 1e-4 / atol 1e-5). The one exception is the key
bias of each attention block (``qkv.bias[d:2d]``): its gradient is identically zero (softmax is
invariant to a per-query constant), so its value is pure rounding noise that Adam normalises into
steps of size ~lr; it does not change the function, so it is checked through the logits instead.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vitzoo.models import vit
from vitzoo.plan import RunSpec, expand
from vitzoo.recipe import load_recipe
from vitzoo.train import routing, vit_population
from vitzoo.train.context import RunContext
from vitzoo.train.engine import train_run
from vitzoo.zoo.reader import LocalSource, read_state

TESTS = Path(__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _population_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(routing.ENV_SWITCH, "on")


def _recipe(tmp: Path, finetune: dict[str, Any]) -> list[RunSpec]:
    """The runs of a tiny two-stage recipe: one micro parent (16 px digits) and ``finetune`` on shapes."""
    ft = {"finetune": {"parent_stage": "pretrain", "head": "linear"},
          "data": {"source": "builtin:shapes", "max_train_samples": 96, "max_eval_samples": 48},
          "optimizer": {"name": "adamw", "lr": 3e-3}, "schedule": {"name": "cosine", "warmup": "1ep"},
          "epochs": 3, "batch_size": 32, "seeds": {"init": [0, 1]}, **finetune}
    rec = {"name": "vitpop", "seed": 0, "stages": {
        "pretrain": {"data": {"source": "builtin:digits", "max_train_samples": 96, "max_eval_samples": 48},
                     "model": {"variant": "micro", "img_size": 16}, "optimizer": {"name": "adamw", "lr": 3e-3},
                     "epochs": 1, "batch_size": 32, "seeds": {"init": [0]}},
        "finetune": ft}}
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(rec, sort_keys=False))
    return expand(load_recipe(tmp / "recipe.yaml")).runs


def _ctx(root: Path, **kw: Any) -> RunContext:
    return RunContext(zoo_root=root, device=torch.device("cpu"), progress=False, log=lambda m: None, **kw)


def _two_roots(tmp: Path, runs: list[RunSpec]) -> tuple[Path, Path]:
    """The parent trained once into ``a``, copied to ``b``."""
    a, b = tmp / "a", tmp / "b"
    for spec in runs:
        if spec.stage == "pretrain":
            train_run(spec, _ctx(a))
    shutil.copytree(a, b)
    return a, b


def _info(root: Path, run_id: str) -> dict[str, Any]:
    return json.loads((root / "models" / run_id / "run.json").read_text())


def _key_bias_free(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            d = v.numel() // 3
            out[k] = torch.cat([v[:d], v[2 * d:]])
    return out


def assert_same_run(ref_root: Path, pop_root: Path, run_id: str, rtol: float = 1e-4, atol: float = 1e-5,
                    acc_atol: float = 1e-5) -> float:
    """Statuses, saved epochs, states and histories of one run agree; returns the largest weight difference.

    ``acc_atol``: accuracies may differ by this much (bf16: a sample near the decision boundary may flip).
    """
    ia, ib = _info(ref_root, run_id), _info(pop_root, run_id)
    assert (ib["status"], ib["final_epoch"]) == (ia["status"], ia["final_epoch"])
    assert [s["epoch"] for s in ib["states"]] == [s["epoch"] for s in ia["states"]]
    assert ib["num_params"] == ia["num_params"] and ib["config"] == ia["config"]
    worst = 0.0
    for st in ia["states"]:
        sa = read_state(LocalSource(ref_root), ia, st["epoch"])
        sb = read_state(LocalSource(pop_root), ib, st["epoch"])
        assert sa.keys() == sb.keys()
        fa, fb = _key_bias_free(sa), _key_bias_free(sb)
        torch.testing.assert_close(fb, fa, rtol=rtol, atol=atol, msg=lambda m, e=st["epoch"]: f"{run_id} epoch {e}: {m}")
        worst = max(worst, max((fa[k] - fb[k]).abs().max().item() for k in fa))
    # The function, key bias included: logits of the final models.
    cfg = json.loads((ref_root / "models" / run_id / "config.json").read_text())
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits = []
    for root, info in ((ref_root, ia), (pop_root, ib)):
        net = vit.from_config(cfg).eval()
        net.load_state_dict(read_state(LocalSource(root), info, info["final_epoch"]))
        with torch.no_grad():
            logits.append(net(x))
    torch.testing.assert_close(logits[1], logits[0], rtol=rtol, atol=atol)
    assert len(ia["history"]) == len(ib["history"])
    for ha, hb in zip(ia["history"], ib["history"], strict=True):
        assert ha.keys() == hb.keys()
        for k, v in ha.items():
            if isinstance(v, float):
                tol = acc_atol if k.endswith("_acc") else atol
                assert hb[k] == pytest.approx(v, rel=rtol, abs=tol), (run_id, ha["epoch"], k)
            else:
                assert hb[k] == v, (run_id, ha["epoch"], k)
    return worst


def test_population_equals_train_run(tmp_path: Path) -> None:
    """AdamW, full fine-tunes and linear probes: members differ in seeds (each grid point draws its own),
    lr and weight decay (0 = timm's single param group, > 0 = no decay on biases, norms, embeddings)."""
    runs = _recipe(tmp_path, {"grid": {"mode": ["full", "linear"], "lr": [3e-3, 1e-2], "wd": [0.0, 0.05]},
                              "seeds": {"random": 1}})
    a, b = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    assert len(ft) == 8 and len({r.init_seed for r in ft}) == 8
    for spec in ft:
        train_run(spec, _ctx(a))
    infos = list(vit_population.train_stage(ft, _ctx(b)))
    assert sorted(i["run_id"] for i in infos) == sorted(r.run_id for r in ft)
    for spec in ft:
        assert_same_run(a, b, spec.run_id, rtol=1e-3, atol=5e-5)  # torch >= 2.14 reorders float32 sums


@pytest.mark.parametrize("case", ["optimizers", "augmentation", "bf16"])
def test_other_optimizers_and_augmentation(tmp_path: Path, case: str) -> None:
    """Nesterov SGD and coupled-decay Adam with gradient clipping; augmented batches (random resized crop,
    flip) with label smoothing and momentum SGD: each member's loader draws from its own parked RNG state,
    as when trained alone; bf16 autocast (agreement to bf16 rounding only: 8 mantissa bits)."""
    # float32: torch >= 2.14 reorders float32 sums, as in the test above (measured: 1 weight of 1,024 off by 1.5e-5
    # under 2.14.1 at the commit before this session's changes, same failure)
    tol = {"rtol": 1e-2, "atol": 1e-2, "acc_atol": 0.05} if case == "bf16" else {"rtol": 1e-3, "atol": 5e-5}
    if case == "bf16":
        ft_cfg = {"precision": "bf16", "grid": {"mode": ["full", "linear"]}}
    elif case == "optimizers":
        ft_cfg = {"optimizer": {"name": "sgd", "lr": 1e-2, "weight_decay": 1e-3, "grad_clip": 0.5},
                  "grid": {"mode": ["full", "linear"], "optimizer.name": ["nesterov", "adam"]}}
    else:
        ft_cfg = {"optimizer": {"name": "sgd", "lr": 1e-2, "grad_clip": 0.5}, "epochs": 2,
                  "aug": {"level": "light", "label_smoothing": 0.1}, "grid": {"mode": ["full", "linear"]}}
    runs = _recipe(tmp_path, ft_cfg)
    a, b = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    for spec in ft:
        train_run(spec, _ctx(a))
    list(vit_population.train_stage(ft, _ctx(b)))
    for spec in ft:
        assert_same_run(a, b, spec.run_id, **tol)


def test_unsupported_runs_fall_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _recipe(tmp_path, {"epochs": 1, "seeds": {"init": [0]},
                              "grid": {"mode": ["full", "lora"], "optimizer.name": ["adamw", "lion"]}})
    a, _ = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    reasons = {(r.config.finetune.mode, r.config.optimizer.name): vit_population.unsupported(r) for r in ft}
    assert reasons[("full", "adamw")] == []
    assert any("lora" in s for s in reasons[("lora", "adamw")])
    assert any("lion" in s for s in reasons[("full", "lion")])
    spec = ft[0]
    fp16 = dataclasses.replace(spec, config=dataclasses.replace(spec.config, precision="fp16"))
    assert any("fp16" in s for s in vit_population.unsupported(fp16))
    assert any("drop_path_rate" in s for s in vit_population.unsupported(
        spec, {"architecture": "vit_tiny_patch16_224", "model_args": {"drop_path_rate": 0.1}}))
    per_run: list[str] = []
    real = vit_population.train_run
    monkeypatch.setattr(vit_population, "train_run", lambda s, c: per_run.append(s.run_id) or real(s, c))
    infos = list(vit_population.train_stage(ft, _ctx(a)))
    assert sorted(i["run_id"] for i in infos) == sorted(r.run_id for r in ft)
    assert sorted(per_run) == sorted(r.run_id for r in ft if vit_population.unsupported(r))
    assert all(i["status"] == "done" for i in infos)


def test_diverging_member_is_recorded_and_others_finish(tmp_path: Path) -> None:
    runs = _recipe(tmp_path, {"optimizer": {"name": "sgd", "lr": 1e-2, "grad_clip": None},
                              "schedule": {"name": "constant"}, "seeds": {"init": [0]},
                              "grid": {"lr": [1e-2, 1e7, 3e-2]}})
    a, b = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    for spec in ft:
        train_run(spec, _ctx(a))
    infos = {i["run_id"]: i for i in vit_population.train_stage(ft, _ctx(b))}
    status = {r.config.optimizer.lr: infos[r.run_id]["status"] for r in ft}
    assert status == {1e-2: "done", 1e7: "diverged", 3e-2: "done"}
    for spec in ft:  # the diverged one too: same last good epoch and state as the per-run loop
        assert_same_run(a, b, spec.run_id)
    bad = next(r for r in ft if r.config.optimizer.lr == 1e7)
    assert infos[bad.run_id]["final_epoch"] < 3 and not (b / "models" / bad.run_id / ".partial").exists()


def test_interrupted_population_resumes_per_epoch(tmp_path: Path) -> None:
    """Killed after epoch 1: one member continues as a population, the other with train_run (same format)."""
    runs = _recipe(tmp_path, {"grid": {"lr": [3e-3, 1e-2]}, "seeds": {"init": [0]}})
    a, b = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    for spec in ft:
        train_run(spec, _ctx(a))
    with pytest.raises(KeyboardInterrupt):
        list(vit_population.train_stage(ft, _ctx(b, stop_after_epoch=1)))
    assert all((b / "models" / r.run_id / ".partial" / "resume.safetensors").is_file() for r in ft)
    train_run(ft[0], _ctx(b))
    list(vit_population.train_stage(ft, _ctx(b)))
    for spec in ft:
        assert_same_run(a, b, spec.run_id)


def test_out_of_memory_halves_the_population(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OOM in a population's first step: it is halved and its members continue from epoch 0's resume point."""
    runs = _recipe(tmp_path, {"grid": {"lr": [3e-3, 1e-2]}, "seeds": {"init": [0]}, "epochs": 2})
    a, b = _two_roots(tmp_path, runs)
    ft = [r for r in runs if r.stage == "finetune"]
    for spec in ft:
        train_run(spec, _ctx(a))
    real, sizes = vit_population._Population.step, []

    def step(self: Any, *args: Any, **kw: Any) -> None:
        sizes.append(self.P)
        if self.P > 1:
            raise torch.OutOfMemoryError("simulated")
        real(self, *args, **kw)

    monkeypatch.setattr(vit_population._Population, "step", step)
    list(vit_population.train_stage(ft, _ctx(b)))
    assert sizes[0] == 2 and set(sizes[1:]) == {1}
    for spec in ft:
        assert_same_run(a, b, spec.run_id)


def test_generate_with_populations_loads(tmp_path: Path) -> None:
    import vitzoo
    from vitzoo.train.generate import generate

    data = yaml.safe_load((TESTS / "tiny.yaml").read_text())
    data["stages"]["pretrain"]["grid"] = {"objective": ["supervised"]}
    data["stages"]["finetune"]["grid"] = {"mode": ["full", "linear", "lora"], "head": ["linear", "mlp"]}
    data["stages"]["finetune"]["finetune"]["head_hidden"] = 16
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "zoo"
    meta = generate(recipe, out, progress=False, log=lambda m: None)
    assert meta["status"] == "complete" and meta["counts"] == {"pretrain": 1, "finetune": 6}
    zoo = vitzoo.load(out)
    ft = zoo.filter(stage="finetune", final=True)
    assert len(ft.index) == 6 and set(ft.index["status"]) == {"done"}
    for mid in ft.model_ids():
        model = zoo.model(mid)
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 6)
    linear = zoo.filter(stage="finetune", final=True, mode="linear", head="mlp").index.iloc[0]
    child, parent = zoo.state_dict(linear["model_id"]), zoo.state_dict(linear["parent_id"])
    assert all(torch.equal(v, parent[k]) for k, v in child.items() if not k.startswith("head")), "frozen backbone"
