"""The classic zoo architectures match the reference (docs/reference-zoos.md#architectures) and load legacy checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitzoo.models.cnn import build_cnn, num_params


@pytest.mark.parametrize(
    ("variant", "in_chans", "num_classes", "expected"),
    [
        ("cnn-s", 1, 10, 2_464),
        ("cnn-s", 3, 10, 2_864),
        ("cnn-m", 3, 10, 10_853),
        ("resnet18", 3, 10, 11_173_962),
        ("resnet18", 3, 100, 11_220_132),
        ("resnet18", 3, 200, 11_271_432),
    ],
)
def test_parameter_counts(variant: str, in_chans: int, num_classes: int, expected: int) -> None:
    assert num_params(build_cnn(variant, in_chans, num_classes)) == expected


def _legacy_cnn_s(channels_in: int, dropout: float) -> nn.Module:
    """The published zoos' CNN layer list (ModuleList named module_list), rebuilt for key names."""

    class Legacy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ml = [nn.Conv2d(channels_in, 8, 5), nn.MaxPool2d(2, 2), nn.Tanh()]
            ml += [nn.Dropout(dropout)] if dropout > 0 else []
            ml += [nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), nn.Tanh()]
            ml += [nn.Dropout(dropout)] if dropout > 0 else []
            ml += [nn.Conv2d(6, 4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 20), nn.Tanh()]
            ml += [nn.Dropout(dropout)] if dropout > 0 else []
            ml += [nn.Linear(20, 10)]
            self.module_list = nn.ModuleList(ml)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.module_list:
                x = layer(x)
            return x

    return Legacy()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_legacy_checkpoint_loads_and_agrees(dropout: float) -> None:
    legacy = _legacy_cnn_s(1, dropout).eval()
    ours = build_cnn("cnn-s", 1, 10, "tanh", dropout, "U", seed=0).eval()
    assert list(ours.state_dict()) == list(legacy.state_dict())
    ours.load_state_dict(legacy.state_dict())
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(ours(x), legacy(x))


def test_cnn_m_keys_do_not_depend_on_dropout() -> None:
    keys = [k for k in build_cnn("cnn-m", 3, 10, "relu", 0.0, "KU", 0).state_dict()]
    assert keys == [k for k in build_cnn("cnn-m", 3, 10, "relu", 0.5, "KU", 0).state_dict()]
    assert keys[0] == "module_list.0.weight" and keys[-1] == "module_list.16.bias"


def test_resnet_key_names_and_shapes() -> None:
    m = build_cnn("resnet18", 3, 200, seed=0)
    sd = m.state_dict()
    assert "layer2.0.downsample.0.weight" in sd and "fc.weight" in sd and "bn1.running_mean" in sd
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 200)  # Tiny-ImageNet size through the adaptive pool


@pytest.mark.parametrize("init", ["U", "N", "KU", "KN", "xavier"])
def test_init_is_seeded_local_and_biases_are_0_01(init: str) -> None:
    state = torch.get_rng_state()
    a = build_cnn("cnn-s", 1, 10, "tanh", 0.0, init, seed=7).state_dict()
    assert torch.equal(state, torch.get_rng_state()), "building a model must not touch the global RNG"
    b = build_cnn("cnn-s", 1, 10, "tanh", 0.0, init, seed=7).state_dict()
    c = build_cnn("cnn-s", 1, 10, "tanh", 0.0, init, seed=8).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k])
        if k.endswith("bias"):
            assert torch.all(a[k] == 0.01)
    assert not torch.equal(a["module_list.0.weight"], c["module_list.0.weight"])
    if init == "U":
        w = a["module_list.0.weight"]
        assert w.min() >= 0 and w.max() <= 1


@pytest.mark.parametrize("act", ["tanh", "relu", "sigmoid", "gelu"])
def test_forward_shapes(act: str) -> None:
    assert build_cnn("cnn-s", 3, 10, act, 0.3, "KN", 1)(torch.randn(4, 3, 28, 28)).shape == (4, 10)
    assert build_cnn("cnn-m", 3, 10, act, 0.3, "KN", 1)(torch.randn(4, 3, 32, 32)).shape == (4, 10)


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="variant"):
        build_cnn("cnn-xl", 1, 10)
    with pytest.raises(ValueError, match="activation"):
        build_cnn("cnn-s", 1, 10, activation="swish2")
    with pytest.raises(ValueError, match="init"):
        build_cnn("cnn-s", 1, 10, init="orthogonal")
