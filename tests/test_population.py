"""Population training is proven equal to training the same models one by one.

Deterministic CPU: the vectorised engine (vmap over stacked parameters, functional Adam/SGD) and
the plain reference loop (nn.Module + torch.optim) must give the same weights at every saved
epoch to float tolerance (the grouped convolution of vmap sums in a different order).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from vitzoo.models.cnn import build_cnn
from vitzoo.train.population import (
    CropFlip,
    PopulationMember,
    crop_flip,
    member_replace,
    train_one_by_one,
    train_population,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = F.interpolate(x[:, None], size=28, mode="bilinear", align_corners=False)  # CNN-s sees 28x28
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:200], y[:200], x[1500:1700], y[1500:1700]


def _collect(store: dict[tuple[int, int], dict[str, torch.Tensor]]) -> Any:
    def on_epoch(epoch: int, states: list[dict[str, torch.Tensor]], metrics: list[dict[str, Any]]) -> None:
        for st, met in zip(states, metrics, strict=True):
            store[(met["index"], epoch)] = {k: v.detach().clone() for k, v in st.items()}

    return on_epoch


MEMBERS = [
    PopulationMember(1, 1, "adam", 1e-3, 0.0, activation="tanh", init="KU"),
    PopulationMember(2, 7, "adam", 3e-3, 1e-3, activation="tanh", init="KU", grad_clip=0.1),
    PopulationMember(3, 3, "sgd", 1e-2, 1e-3, 0.9, activation="tanh", init="KU", grad_clip=0.2),
    PopulationMember(4, 3, "sgd", 5e-2, 0.0, 0.5, activation="tanh", init="KU"),
]


def test_adamw_and_nesterov_populations_equal_torch(digits: Any) -> None:
    """AdamW (decoupled decay) and Nesterov SGD vectorise for CNNs as for ViT fine-tunes and twins."""
    tx, ty, vx, vy = digits
    members = [PopulationMember(5, 5, "adamw", 3e-3, 0.05, activation="tanh", init="KU"),
               PopulationMember(6, 2, "adamw", 1e-3, 0.01, activation="tanh", init="KU", grad_clip=0.2),
               PopulationMember(7, 4, "nesterov", 2e-2, 1e-3, 0.9, activation="tanh", init="KU")]
    pop: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    ref: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    args = ("cnn-s", 1, 10, members, tx, ty, {"val": (vx, vy)}, 2, 10, "cpu")
    train_population(*args, _collect(pop), mode="population")
    train_one_by_one(*args, _collect(ref))
    assert set(pop) == set(ref)
    for key in ref:
        for name, w in ref[key].items():
            torch.testing.assert_close(pop[key][name], w, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    assert not torch.equal(pop[(0, 2)]["module_list.0.weight"], pop[(0, 0)]["module_list.0.weight"])


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_population_equals_one_by_one(digits: Any, schedule: str) -> None:
    tx, ty, vx, vy = digits
    evals = {"train": (tx, ty), "val": (vx, vy)}
    pop: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    ref: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    epochs = 3
    h_pop = train_population("cnn-s", 1, 10, MEMBERS, tx, ty, evals, epochs, 10, "cpu", _collect(pop),
                             schedule=schedule, mode="population")
    h_ref = train_one_by_one("cnn-s", 1, 10, MEMBERS, tx, ty, evals, epochs, 10, "cpu", _collect(ref),
                             schedule=schedule)
    assert set(pop) == set(ref) == {(i, e) for i in range(len(MEMBERS)) for e in range(epochs + 1)}
    for key in ref:
        for name, w in ref[key].items():
            torch.testing.assert_close(pop[key][name], w, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    for a, b in zip(h_pop, h_ref, strict=True):
        assert [m["epoch"] for m in a] == list(range(epochs + 1))
        for ma, mb in zip(a, b, strict=True):
            assert ma["val_acc"] == pytest.approx(mb["val_acc"], abs=1e-9)
            assert ma["val_loss"] == pytest.approx(mb["val_loss"], rel=1e-4)
            assert ma["status"] == mb["status"] == "ok"
            if ma["epoch"] == 0:
                assert ma["running_loss"] is None and mb["running_acc"] is None
            else:  # training-batch averages, the legacy zoos' train metrics
                assert ma["running_acc"] == pytest.approx(mb["running_acc"], abs=1e-9)
                assert ma["running_loss"] == pytest.approx(mb["running_loss"], rel=1e-4)
    # training did something (the equality is not the trivial one of untrained models)
    assert h_ref[0][-1]["train_acc"] > h_ref[0][0]["train_acc"] + 0.2


def test_dropout_is_independent_per_model(digits: Any) -> None:
    tx, ty, _, _ = digits
    twin = PopulationMember(5, 5, "adam", 1e-3, activation="relu", init="KU", dropout=0.5)
    got: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_population("cnn-s", 1, 10, [twin, twin], tx[:50], ty[:50], {}, 1, 10, "cpu", _collect(got),
                     mode="population")
    k = "module_list.0.weight"
    assert torch.equal(got[(0, 0)][k], got[(1, 0)][k])  # same init seed
    assert not torch.equal(got[(0, 1)][k], got[(1, 1)][k])  # different dropout masks
    # without dropout the same twins stay identical (determinism of everything else)
    twin0 = PopulationMember(5, 5, "adam", 1e-3, activation="relu", init="KU")
    got0: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_population("cnn-s", 1, 10, [twin0, twin0], tx[:50], ty[:50], {}, 1, 10, "cpu", _collect(got0),
                     mode="population")
    assert torch.equal(got0[(0, 1)][k], got0[(1, 1)][k])


def test_diverged_model_is_frozen_and_the_rest_go_on(digits: Any) -> None:
    tx, ty, vx, vy = digits
    bad = PopulationMember(9, 9, "sgd", 1e30, 0.0, 0.9, activation="relu", init="N")
    members = [MEMBERS[0], bad, MEMBERS[2]]
    got: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    hist = train_population("cnn-s", 1, 10, members, tx[:100], ty[:100], {"val": (vx, vy)}, 2, 10, "cpu",
                            _collect(got), mode="population")
    assert hist[1][-1]["status"] == "diverged" and hist[1][-1]["diverged_step"] is not None
    assert all(torch.isfinite(v).all() for v in got[(1, 2)].values())
    assert hist[0][-1]["status"] == hist[2][-1]["status"] == "ok"
    ref: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    h_ref = train_one_by_one("cnn-s", 1, 10, members, tx[:100], ty[:100], {"val": (vx, vy)}, 2, 10, "cpu",
                             _collect(ref))
    assert h_ref[1][-1]["status"] == "diverged"
    assert h_ref[1][-1]["diverged_step"] == hist[1][-1]["diverged_step"]
    for i in (0, 2):  # the healthy models are untouched by their diverged neighbour
        for name, w in ref[(i, 2)].items():
            torch.testing.assert_close(got[(i, 2)][name], w, rtol=1e-4, atol=1e-5)


def test_mixed_optimizers_split_into_groups_and_keep_order(digits: Any) -> None:
    tx, ty, _, _ = digits
    members = [MEMBERS[2], MEMBERS[0], MEMBERS[3], MEMBERS[1]]
    seen: list[int] = []

    def on_epoch(epoch: int, states: list[dict[str, torch.Tensor]], metrics: list[dict[str, Any]]) -> None:
        if epoch == 0:
            seen.extend(m["index"] for m in metrics)

    hist = train_population("cnn-s", 1, 10, members, tx[:20], ty[:20], {"train": (tx[:20], ty[:20])}, 1, 10,
                            "cpu", on_epoch, mode="population", max_population=8)
    assert sorted(seen) == [0, 1, 2, 3] and len(hist) == 4
    assert all(len(h) == 2 for h in hist)


def test_auto_mode_small_groups_train_one_by_one(digits: Any) -> None:
    tx, ty, _, _ = digits
    a = train_population("cnn-s", 1, 10, MEMBERS[:2], tx[:20], ty[:20], {"t": (tx[:20], ty[:20])}, 1, 10, "cpu")
    b = train_one_by_one("cnn-s", 1, 10, MEMBERS[:2], tx[:20], ty[:20], {"t": (tx[:20], ty[:20])}, 1, 10, "cpu")
    assert a == b  # bitwise: the same loop ran


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


def test_resnet_population_equals_one_by_one_with_batchnorm_and_augmentation() -> None:
    """ResNet-18 vectorised (``mode="population"``): stacked batchnorm statistics and per-model crop/flip
    streams give the one-by-one loop's states, running statistics included; ``auto`` trains it one by one.

    In float64: batchnorm over 4 padded crops is ill-conditioned enough that float32 rounding (grouped vs
    plain convolution) grows to ~1e-3 within two steps, in either path alike; in float64 the paths agree
    to ~1e-9."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _resnet_population_vs_one_by_one()
    finally:
        torch.set_default_dtype(dtype)


def _resnet_population_vs_one_by_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    members = [PopulationMember(s, s, "sgd", 0.05, 5e-4, 0.9) for s in (1, 2)]
    members.append(PopulationMember(3, 3, "sgd", 1e30, 0.0, 0.9))  # diverges: frozen, statistics included
    aug = CropFlip(fill=(-1.0, -2.0, -0.5))
    args = ("resnet18", 3, 10, members, x, y, {"test": (x, y)}, 2, 4, "cpu")
    ref: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    h_ref = train_population(*args, _collect(ref), schedule="onecycle", augment=aug)  # auto: one by one
    pop: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    h_pop = train_population(*args, _collect(pop), schedule="onecycle", augment=aug, mode="population")
    assert "layer1.0.bn1.running_mean" in ref[(0, 1)]
    init0 = build_cnn("resnet18", 3, 10, seed=1).state_dict()["conv1.weight"]
    assert torch.equal(ref[(0, 0)]["conv1.weight"], init0) and torch.equal(pop[(0, 0)]["conv1.weight"], init0)
    for i in (0, 1):
        for e in (1, 2):
            for name, w in ref[(i, e)].items():
                torch.testing.assert_close(pop[(i, e)][name], w, rtol=1e-7, atol=1e-8)
        assert h_pop[i][-1]["test_acc"] == h_ref[i][-1]["test_acc"]
    assert h_pop[2][-1]["status"] == h_ref[2][-1]["status"] == "diverged"
    assert h_pop[2][-1]["diverged_step"] == h_ref[2][-1]["diverged_step"]
    with pytest.raises(ValueError, match="cannot be vectorised"):
        train_population("vit", 3, 10, members, x, y, {}, 1, 4, "cpu", mode="population")


def test_adapter_maps_classic_recipes_to_members() -> None:
    from pathlib import Path

    from vitzoo.plan import expand
    from vitzoo.recipe import load_recipe
    from vitzoo.train.population_adapter import engine_kwargs, member_from_run, split_runs, unsupported

    classic = Path(__file__).parent.parent / "recipes" / "classic"
    runs = expand(load_recipe(classic / "mnist-cnn-s-hyp-10-fix.yaml")).runs
    groups = split_runs(runs)
    assert len(groups) == 1 and len(groups[0]) == 2560  # activation/dropout/init/optimizer vary per member
    members = [member_from_run(r) for r in groups[0]]
    assert {m.optimizer for m in members} == {"adam", "sgd"}
    assert {(m.activation, m.dropout, m.init) for m in members} >= {("gelu", 0.5, "KN"), ("tanh", 0.0, "U")}
    assert all(m.grad_clip is None for m in members)
    kw = engine_kwargs(groups[0][0], steps_per_epoch=5000)
    assert kw["arch"] == "cnn-s" and kw["in_chans"] == 1 and kw["augment"] is None
    assert kw["schedule"](0, 250_000) == 1.0
    res = expand(load_recipe(classic / "cifar10-resnet18-seed.yaml")).runs[0]
    aug = engine_kwargs(res, 165)["augment"]
    assert not unsupported(res) and (aug.pad, aug.flip) == (4, True)
    assert aug.fill == pytest.approx([-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    seed = member_from_run(expand(load_recipe(classic / "usps-cnn-s-seed.yaml")).runs[0])
    assert (seed.optimizer, seed.lr, seed.weight_decay, seed.init, seed.activation) == ("adam", 3e-4, 1e-3, "U", "tanh")


RESUMABLE = [PopulationMember(i, 10 + i, "adam", 1e30 if i == 0 else 1e-3, 1e-4, activation="relu", init="KU",
                              dropout=0.3, name=f"m{i}") for i in range(4)]  # m0 (lr 1e30) diverges in epoch 1


@pytest.mark.parametrize("mode", ["population", "sequential"])
def test_interrupted_training_resumes_exactly(digits: Any, tmp_path: Any, mode: str) -> None:
    """Stopped after epoch 1 and resumed from the snapshot: every later state equals an uninterrupted
    run's bit for bit (dropout masks included: the group's RNG state is restored), and a diverged
    member stays diverged."""
    from vitzoo.train.population_state import SnapshotStore

    tx, ty, vx, vy = digits
    args = ("cnn-s", 1, 10, RESUMABLE, tx[:100], ty[:100], {"val": (vx, vy)}, 3, 10, "cpu")
    full: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    h_full = train_population(*args, _collect(full), mode=mode)
    store = SnapshotStore(tmp_path / "snap")
    with pytest.raises(KeyboardInterrupt):
        train_population(*args, None, mode=mode, checkpoints=store, stop_after_epoch=1)
    assert list((tmp_path / "snap").glob("*.safetensors"))
    resumed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    h_res = train_population(*args, _collect(resumed), mode=mode, checkpoints=SnapshotStore(tmp_path / "snap"))
    interrupted = range(4) if mode == "population" else range(1)  # one by one: the 1st (diverged) model
    for i in range(4):
        first = 2 if i in interrupted else 0
        assert sorted(e for j, e in resumed if j == i) == list(range(first, 4)), "no epoch trained twice"
        for e in range(first, 4):
            for name, w in full[(i, e)].items():
                assert torch.equal(resumed[(i, e)][name], w), (mode, i, e, name)
        assert h_res[i][-1]["status"] == h_full[i][-1]["status"] == ("diverged" if i == 0 else "ok")
        assert h_res[i][-1]["val_acc"] == h_full[i][-1]["val_acc"]


def test_snapshots_resume_across_engines(digits: Any, tmp_path: Any) -> None:
    """A vectorised group's snapshot resumes one by one (same layout): the result agrees to float
    tolerance with the uninterrupted population (no dropout: the streams of the two paths differ)."""
    from vitzoo.train.population_state import SnapshotStore

    tx, ty, _, _ = digits
    members = [member_replace(m, dropout=0.0) for m in RESUMABLE[1:]]
    args = ("cnn-s", 1, 10, members, tx[:100], ty[:100], {}, 3, 10, "cpu")
    full: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_population(*args, _collect(full), mode="population")
    store = SnapshotStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train_population(*args, None, mode="population", checkpoints=store, stop_after_epoch=2)
    got: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    train_population(*args, _collect(got), mode="sequential", checkpoints=SnapshotStore(tmp_path))
    assert sorted(got) == [(i, 3) for i in range(3)]
    for i in range(3):
        for name, w in full[(i, 3)].items():
            torch.testing.assert_close(got[(i, 3)][name], w, rtol=1e-4, atol=1e-5)
