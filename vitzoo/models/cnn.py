"""The classic zoo architectures: CNN-s, CNN-m and the CIFAR ResNet-18 (docs/reference-zoos.md#architectures).

Why these exact layouts: the published Model Zoos (NeurIPS 2022) ship checkpoints whose state
dicts are keyed ``module_list.{i}.weight|bias``, where ``i`` counts *every* layer of an
``nn.ModuleList`` (pooling, activations and dropout included). Rebuilding the layer list in the
same order, as an ``nn.Sequential`` named ``module_list``, keeps those keys, so legacy
checkpoints load with ``load_state_dict`` and the generated zoos stay comparable with them.

Legacy quirks kept on purpose:

- CNN-s adds its ``Dropout`` layers (after the 1st and 2nd conv activation and after the hidden
  linear activation) only when ``dropout > 0``, so the layer indices differ between dropout and
  no-dropout models, exactly as in the published zoos.
- CNN-m always has its four ``Dropout`` layers (after each conv block and after the hidden linear
  activation; ``p = 0`` is the identity), so its keys never depend on the dropout value.

Initialisation is seeded with a local :class:`torch.Generator`: building a model never touches the
global RNG, and the same ``seed`` always gives the same weights (what the population engine
relies on to stack independently initialised models). Every bias is set to 0.01 for the CNNs, as
in the reference. The ResNets (:mod:`vitzoo.models.resnet`: CIFAR stem, width-scaled, torchvision/timm
key names) use PyTorch's default init unless an init scheme is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: Init scheme names (the reference's short codes and the legacy long names).
INIT_ALIASES = {
    "U": "uniform", "uniform": "uniform",
    "N": "normal", "normal": "normal",
    "KU": "kaiming_uniform", "kaiming_uniform": "kaiming_uniform",
    "KN": "kaiming_normal", "kaiming_normal": "kaiming_normal",
    "xavier": "xavier_uniform", "xavier_uniform": "xavier_uniform", "XU": "xavier_uniform",
    "xavier_normal": "xavier_normal", "XN": "xavier_normal",
    "default": "default", "torch": "default",
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
    "leakyrelu": nn.LeakyReLU,
    "silu": nn.SiLU,
}

CNN_VARIANTS = ("cnn-s", "cnn-m", "resnet18", "resnet50")

#: Input resolution each variant is built for (the flatten sizes of the CNNs assume it; the ResNets take any).
IMG_SIZE = {"cnn-s": 28, "cnn-m": 32, "resnet18": 32, "resnet50": 32}


def _act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}") from None


def build_cnn_s(in_chans: int = 1, num_classes: int = 10, activation: str = "tanh", dropout: float = 0.0) -> nn.Module:
    """CNN-s (28x28): 2,464 parameters for 1 channel, 2,864 for 3 (10 classes)."""
    layers: list[nn.Module] = [nn.Conv2d(in_chans, 8, 5), nn.MaxPool2d(2, 2), _act(activation)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), _act(activation)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Conv2d(6, 4, 2), _act(activation), nn.Flatten(), nn.Linear(3 * 3 * 4, 20), _act(activation)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(20, num_classes))
    return _Legacy(layers)


def build_cnn_m(in_chans: int = 3, num_classes: int = 10, activation: str = "tanh", dropout: float = 0.0) -> nn.Module:
    """CNN-m (32x32): 10,853 parameters for 3 channels, 10 classes."""
    layers: list[nn.Module] = []
    for cin, cout in ((in_chans, 16), (16, 32), (32, 15)):
        layers += [nn.Conv2d(cin, cout, 3), nn.MaxPool2d(2, 2), _act(activation), nn.Dropout(dropout)]
    layers += [nn.Flatten(), nn.Linear(15 * 2 * 2, 20), _act(activation), nn.Dropout(dropout),
               nn.Linear(20, num_classes)]
    return _Legacy(layers)


class _Legacy(nn.Module):
    """A plain layer stack whose parameters are named ``module_list.{i}.*`` like the legacy zoos."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.module_list = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module_list(x)


# --------------------------------------------------------------------------- init


def init_weights_(model: nn.Module, init: str | None, seed: int, bias: float | None = 0.01) -> nn.Module:
    """(Re)initialise every conv/linear layer from ``seed`` with a local generator, in module order.

    ``init`` is one of U, N, KU, KN, xavier (or the legacy long names); ``None``/``default``
    reproduces PyTorch's own ``reset_parameters`` (kaiming_uniform with a=sqrt(5), fan-in uniform
    bias), but seeded. ``bias`` (0.01 in the reference) overrides every bias when not None.
    Batchnorm layers get weight 1, bias 0. The global RNG is never used.
    """
    scheme = INIT_ALIASES.get(init or "default")
    if scheme is None:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INIT_ALIASES)}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                # Generate on CPU (the generator's device) and copy: same weights on every device.
                tmp = torch.empty(w.shape, dtype=torch.float32)
                if scheme == "uniform":
                    nn.init.uniform_(tmp, 0.0, 1.0, generator=g)
                elif scheme == "normal":
                    nn.init.normal_(tmp, 0.0, 1.0, generator=g)
                elif scheme == "kaiming_uniform":
                    nn.init.kaiming_uniform_(tmp, generator=g)
                elif scheme == "kaiming_normal":
                    nn.init.kaiming_normal_(tmp, generator=g)
                elif scheme == "xavier_uniform":
                    nn.init.xavier_uniform_(tmp, generator=g)
                elif scheme == "xavier_normal":
                    nn.init.xavier_normal_(tmp, generator=g)
                else:  # PyTorch default (nn.Conv2d / nn.Linear reset_parameters)
                    nn.init.kaiming_uniform_(tmp, a=math.sqrt(5), generator=g)
                w.copy_(tmp)
                if m.bias is not None:
                    if bias is not None:
                        m.bias.fill_(bias)
                    else:
                        fan_in = w[0].numel()
                        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                        m.bias.copy_(torch.empty(m.bias.shape).uniform_(-bound, bound, generator=g))
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
    return model


def build_cnn(variant: str, in_chans: int, num_classes: int, activation: str | None = None, dropout: float = 0.0,
              init: str | None = None, seed: int = 0, width: int | None = None) -> nn.Module:
    """Build and seed-initialise one classic or phase zoo convolutional model.

    ``variant`` is ``cnn-s``, ``cnn-m``, ``resnet18`` or ``resnet50`` (``width``: the ResNets' first stage
    width, default 64, :mod:`vitzoo.models.resnet`). Defaults: activation ``tanh`` for the CNNs, ``relu``
    for the ResNets; init ``U`` is *not* assumed: ``None`` means PyTorch's default init (seeded). CNN biases
    are set to 0.01 whatever the scheme (reference); the ResNets keep PyTorch's bias init unless an explicit
    init scheme is named (the phase zoos: ``KU``, kaiming-uniform with biases 0.01).
    """
    if variant not in CNN_VARIANTS:
        raise ValueError(f"unknown CNN variant {variant!r}; allowed: {', '.join(CNN_VARIANTS)}")
    # nn layers draw their default init from the global RNG while being constructed; fork it so
    # the caller's RNG stream is untouched (everything is re-initialised from `seed` below).
    with torch.random.fork_rng(devices=[]):
        if variant == "cnn-s":
            model = build_cnn_s(in_chans, num_classes, activation or "tanh", dropout)
        elif variant == "cnn-m":
            model = build_cnn_m(in_chans, num_classes, activation or "tanh", dropout)
        else:
            from vitzoo.models.resnet import STANDARD_WIDTH, ResNet

            act = activation or "relu"
            model = ResNet(int(variant[6:]), width or STANDARD_WIDTH, in_chans, num_classes, lambda: _act(act),
                           dropout)
    if width is not None and not variant.startswith("resnet"):
        raise ValueError(f"model.width: {variant} has no width axis")
    bias = 0.01 if not variant.startswith("resnet") or init not in (None, "default", "torch") else None
    return init_weights_(model, init, seed, bias=bias)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
