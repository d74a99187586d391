"""The width-scaled vision models of the phase-transition zoos, and gradient accumulation.

- ResNet-18 / ResNet-50 at every width of the published grid have the parameter counts computed from the
  reference architecture (docs/phase-zoos.md#models); ``w = 64`` is the classic zoos' ResNet-18, same keys.
- A width-scaled ResNet saved by a zoo loads with timm alone (``local-dir:``) with equal outputs, at 32 and
  64 px.
- ViT widths derive their heads (head dimension 64) and refuse widths that do not split into heads.
- ``micro_batch_size``: accumulating the gradient of a batch over micro-batches trains the same model as one
  forward per batch (no batchnorm: CNN-s), and the OneCycle schedule counts optimizer steps, so it runs its
  whole length (the reference's ran 1/k of it under k-fold accumulation).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import vitzoo  # noqa: F401 - registers vitzoo_resnet18/50 with timm
from vitzoo.models.cnn import build_cnn
from vitzoo.models.resnet import ResNet, num_params
from vitzoo.plan import expand
from vitzoo.recipe import RecipeError, load_recipe, recipe_from_dict
from vitzoo.train.context import RunContext
from vitzoo.train.engine import split_batch, train_run
from vitzoo.train.schedule import lr_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

#: Computed from the reference architecture (torchvision blocks, CIFAR stem, 10 classes).
RESNET18 = {2: 11_420, 4: 44_622, 8: 176_402, 16: 701_466, 32: 2_797_610, 64: 11_173_962, 128: 44_662_922,
            256: 178_585_866}
RESNET50 = {2: 25_260, 4: 96_302, 8: 375_762, 16: 1_484_186, 32: 5_899_050, 64: 23_520_842, 128: 93_932_682,
            256: 375_429_386}


@pytest.mark.parametrize(("depth", "counts"), [(18, RESNET18), (50, RESNET50)])
def test_parameter_counts_of_the_width_grid(depth: int, counts: dict[int, int]) -> None:
    assert {w: num_params(depth, w) for w in counts} == counts


def test_the_classic_resnet18_is_the_width_64_member() -> None:
    classic = build_cnn("resnet18", 3, 10, seed=1)
    scaled = build_cnn("resnet18", 3, 10, seed=1, width=64)
    assert list(classic.state_dict()) == list(scaled.state_dict())
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in classic.state_dict().items())
    assert sum(p.numel() for p in classic.parameters()) == 11_173_962
    torchvision = pytest.importorskip("torchvision")
    ref = {k for k in torchvision.models.resnet18(num_classes=10).state_dict() if not k.startswith("conv1")}
    assert ref <= set(classic.state_dict())  # torchvision names, CIFAR stem


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("variant", ["resnet18", "resnet50"])
def test_forward_shapes_at_32_and_64_px(variant: str, size: int) -> None:
    net = build_cnn(variant, 3, 200, init="KU", seed=0, width=2).eval()
    assert net(torch.zeros(2, 3, size, size)).shape == (2, 200)
    # kaiming-uniform with biases 0.01 (the phase zoos' init): the classifier's bias
    assert torch.all(net.fc.bias == 0.01)


def test_bad_widths_are_refused_naming_the_key() -> None:
    def stage(**model):
        return {"name": "x", "stages": {"train": {"model": model}}}

    for bad, msg in [({"variant": "resnet18", "width": 0}, "stages.train.model: width must be a positive integer"),
                     ({"variant": "resnet18", "width": -4}, "width must be a positive integer"),
                     ({"variant": "cnn-s", "width": 8}, "width: variant 'cnn-s' has no width axis"),
                     ({"variant": "Ti/4", "width": 160}, "multiple of 64")]:
        with pytest.raises(RecipeError, match=msg):
            recipe_from_dict(stage(**bad))
    with pytest.raises(ValueError, match="model.width"):
        ResNet(18, 0)


def test_vit_width_sets_embedding_and_heads() -> None:
    from vitzoo.models import vit
    from vitzoo.recipe import ModelConfig

    for width, heads in [(32, 1), (64, 1), (96, 1), (128, 2), (256, 4), (384, 6)]:
        _, args = vit.vit_args(ModelConfig(variant="Ti/4", width=width, img_size=32), 3)
        assert (args["embed_dim"], args["num_heads"], args["depth"]) == (width, heads, 12)
    _, args = vit.vit_args(ModelConfig(variant="Ti/4", width=64, depth=6, img_size=32), 3)
    assert args["depth"] == 6
    net = vit.create(*vit.vit_args(ModelConfig(variant="Ti/4", width=64, depth=2, img_size=32), 3), 10, seed=0)
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


# --------------------------------------------------------------------------- zoo round trip and accumulation

RECIPE = {
    "name": "phase-micro",
    "stages": {"train": {
        "data": {"source": "builtin:digits", "channels": 3, "max_train_samples": 80, "max_eval_samples": 30},
        "model": {"variant": "resnet18", "width": 2, "init": "KU", "img_size": 32},
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "grad_clip": None},
        "schedule": "onecycle", "epochs": 2, "batch_size": 20, "checkpoint_every": 1,
        "seeds": {"init": [0]},
    }},
}


def _spec(tmp_path: Path, name: str, **train):
    recipe = copy.deepcopy(RECIPE)
    recipe["stages"]["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return expand(load_recipe(path)).runs[0]


def _ctx(root: Path) -> RunContext:
    return RunContext(zoo_root=root, device=torch.device("cpu"), progress=False, log=lambda m: None)


def test_width_scaled_resnet_loads_with_timm_alone(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    spec = _spec(tmp_path, "r", epochs=1)
    train_run(spec, _ctx(tmp_path / "zoo"))
    folder = tmp_path / "zoo" / "models" / spec.run_id
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "vitzoo_resnet18" and cfg["model_args"]["width"] == 2
    net = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert sum(p.numel() for p in net.parameters()) == RESNET18[2]
    from safetensors.torch import load_file

    ref = build_cnn("resnet18", 3, 10, width=2)
    ref.load_state_dict(load_file(folder / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)  # the adaptive pool: TinyImageNet's 64 px with the same weights
    assert torch.allclose(net(x), ref.eval()(x))


def test_split_batch_cuts_every_tensor_alike() -> None:
    x, y = torch.arange(10).view(10, 1), torch.arange(10)
    parts = split_batch(((x, x + 1), y), 4)
    assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert torch.equal(parts[2][0][1], x[8:] + 1)
    assert split_batch((x, y), 10)[0][0] is x


def test_accumulation_trains_the_same_model_and_the_schedule_counts_optimizer_steps(tmp_path: Path) -> None:
    model = {"variant": "cnn-s", "activation": "tanh", "init": "U"}
    data = {**RECIPE["stages"]["train"]["data"], "channels": 1}
    whole = _spec(tmp_path, "whole", model=model, data=data)
    accumulated = _spec(tmp_path, "acc", model=model, data=data, micro_batch_size=5)
    a = train_run(whole, _ctx(tmp_path / "a"))
    b = train_run(accumulated, _ctx(tmp_path / "b"))
    from safetensors.torch import load_file

    sa = load_file(tmp_path / "a" / "models" / whole.run_id / "model.safetensors")
    sb = load_file(tmp_path / "b" / "models" / accumulated.run_id / "model.safetensors")
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=1e-5), k
    # 80 samples / batch 20 = 4 optimizer steps per epoch whatever the micro-batches: the lr logged after each
    # epoch is the schedule's at the end of that epoch, and after the last the schedule is over
    steps = 4
    at = lr_schedule(accumulated.config, steps)
    lrs_a = [h["lr"] for h in a["history"][1:]]
    lrs_b = [h["lr"] for h in b["history"][1:]]
    assert lrs_a == lrs_b
    assert lrs_b[-1] == pytest.approx(0.1 * at(2 * steps - 1))
    assert at(2 * steps - 1) < 1e-3  # OneCycle's end: max_lr / (25 * 1e4) territory, not warm-up
    assert a["history"][-1]["test_loss"] == pytest.approx(b["history"][-1]["test_loss"], rel=1e-4)


def test_micro_batch_size_is_checked() -> None:
    base = copy.deepcopy(RECIPE)
    base["stages"]["train"]["micro_batch_size"] = 7
    with pytest.raises(RecipeError, match="micro_batch_size \\(7\\) must be >= 1 and divide batch_size \\(20\\)"):
        recipe_from_dict(base)
    base["stages"]["train"]["micro_batch_size"] = 64  # larger than the batch: one forward
    recipe_from_dict(base)


def test_device_rotation_matches_torchvision() -> None:
    """The stacks' and TensorFeed's on-device rotation turns images like torchvision's RandomRotation does
    (nearest pixel, black corners), up to pixels on rounding boundaries."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from vitzoo.train.feed import rotate_by

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    angles = torch.tensor([-20.0, 7.5, 13.0])
    ours = rotate_by((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), angles, tuple((-mean / std).tolist()))
    for i, a in enumerate(angles.tolist()):
        ref = (TF.rotate(x[i], a, InterpolationMode.NEAREST, fill=0.0) - mean.view(3, 1, 1)) / std.view(3, 1, 1)
        same = torch.isclose(ours[i], ref, atol=1e-5).float().mean().item()
        assert same > 0.97, (a, same)
    assert torch.equal(rotate_by(x, torch.zeros(3)), x)


def test_micro_batch_by_width_follows_the_reference_rule() -> None:
    """ResNet-50 zoos: w=64 & bs>=1024 -> 512, w=128 & bs>=512 -> 256, w=256 & bs>=256 -> 128 per forward."""
    plan = expand(load_recipe(Path(__file__).parent.parent / "recipes" / "phase" / "cifar10-resnet50-phase.yaml"))
    got = {(r.config.model.width, r.config.batch_size): r.config.micro_batch_size for r in plan.runs}
    want = {(64, 1024): 512, (128, 512): 256, (128, 1024): 256, (256, 256): 128, (256, 512): 128,
            (256, 1024): 128}
    assert {k: v for k, v in got.items() if v is not None} == want


def test_the_reference_augmentation_is_wired_on_both_paths() -> None:
    """Crop (pad 4) + flip (not SVHN) + rotation 20 and the per-dataset normalisation: as tensor ops for the
    device feeds and stacks, as torchvision transforms for the loader path."""
    from torchvision import transforms as T

    from vitzoo.data.pipeline import preprocessing_for, train_transform
    from vitzoo.train.feed import device_augment

    root = Path(__file__).parent.parent / "recipes" / "phase"
    for name, flip in (("cifar10-resnet18-phase", True), ("svhn-resnet18-phase", False)):
        cfg = expand(load_recipe(root / f"{name}.yaml")).runs[0].config
        pp = preprocessing_for(cfg.data, 32)
        assert pp.mean == tuple(cfg.data.mean) and pp.std == tuple(cfg.data.std)
        aug = device_augment(cfg, pp)
        assert (aug.pad, aug.flip, aug.rotation) == (4, flip, 20.0)
        ops = [type(t) for t in train_transform(pp, cfg.aug).transforms]
        assert T.RandomRotation in ops and (T.RandomHorizontalFlip in ops) == flip
        assert ops.index(T.RandomCrop) < ops.index(T.RandomRotation)
