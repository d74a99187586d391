"""The PINN MLP: a fully connected network from a space-time point ``(x, t)`` to a scalar ``u(x, t)``.

The network of the PINN zoo (model variant ``mlp``, objective ``pinn``): ``depth`` hidden layers of
``width`` units, each followed by the activation, then a linear output. The defaults (4 hidden layers of 50,
tanh) are the network of Krishnapriyan et al. (NeurIPS 2021, ``layers 50,50,50,50,1``), whose failure of plain
PINNs on the convection equation the zoo's load axis probes. Inputs are the raw coordinates (no
normalisation layer), as in that code: what the network computes is exactly ``u = net([x, t])``.

Initialisation: ``init`` names a scheme of :func:`vitzoo.models.cnn.init_weights_` (the one seeded
initialiser of vitzoo; the global RNG is never touched); the default is ``xavier`` (Glorot uniform) with
zero biases, the common PINN practice since Raissi et al. 2019 (tanh networks). This module knows nothing
of recipes, PDEs or files: config.json's content is built by :func:`config_json` from what the task gives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from vitzoo.models.cnn import ACTIVATIONS, INIT_ALIASES, init_weights_
from vitzoo.models.names import TASK_NAMES

#: Defaults of the PINN MLP (Krishnapriyan et al.'s convection network); ``init`` None means this one.
DEFAULT_WIDTH, DEFAULT_DEPTH, DEFAULT_ACTIVATION, DEFAULT_INIT = 50, 4, "tanh", "xavier"
#: Input coordinates, in the order of the input vector, and the output.
INPUTS, OUTPUTS = ("x", "t"), ("u",)


class PinnMLP(nn.Module):
    """``(N, 2)`` points ``[x, t]`` → ``(N, 1)`` values ``u``; parameters named ``layers.{i}.weight/bias``.

    The layers are created without PyTorch's own (global-RNG) initialisation and initialised once, from
    ``seed``, by :func:`~vitzoo.models.cnn.init_weights_` with zero biases: building a network never moves
    the global RNG, and the same seed gives the same weights on every device.
    """

    def __init__(self, width: int = DEFAULT_WIDTH, depth: int = DEFAULT_DEPTH, activation: str = DEFAULT_ACTIVATION,
                 init: str = DEFAULT_INIT, seed: int = 0):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"a PINN MLP needs width >= 1 and depth >= 1 hidden layers; got width {width}, "
                             f"depth {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        fan_in = len(INPUTS)
        for _ in range(depth):
            layers += [skip_init(nn.Linear, fan_in, width), ACTIVATIONS[activation]()]
            fan_in = width
        layers.append(skip_init(nn.Linear, fan_in, len(OUTPUTS)))
        self.layers = nn.Sequential(*layers)
        self.width, self.depth, self.activation = width, depth, activation
        init_weights_(self, init, seed, bias=0.0)

    def forward(self, xt: torch.Tensor) -> torch.Tensor:
        return self.layers(xt)


def num_params(width: int, depth: int) -> int:
    """Parameters of a PINN MLP: ``2w + w`` (input layer), ``(depth - 1)(w² + w)`` (hidden), ``w + 1`` (output)."""
    return 3 * width + (depth - 1) * (width * width + width) + width + 1


def model_args(width: int | None, depth: int | None, activation: str | None, init: str | None) -> dict[str, Any]:
    """What config.json records to rebuild the network, every default resolved (a reader needs no vitzoo
    defaults to know what was trained)."""
    init = init or DEFAULT_INIT
    if init not in INIT_ALIASES:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INIT_ALIASES)}")
    return {"width": width or DEFAULT_WIDTH, "depth": depth or DEFAULT_DEPTH,
            "activation": activation or DEFAULT_ACTIVATION, "init": init}


def build(args: dict[str, Any], seed: int) -> PinnMLP:
    """The network of ``args`` (:func:`model_args`), initialised from ``seed`` by a local generator."""
    return PinnMLP(args["width"], args["depth"], args["activation"], args["init"], seed)


def config_json(args: dict[str, Any], problem: dict[str, Any], vitzoo: dict[str, Any]) -> dict[str, Any]:
    """config.json of a PINN model: the architecture and its ``model_args`` (what :func:`from_config`
    reads), the inputs/outputs and ``problem`` (the PDE, its domain: what the network approximates)."""
    return {"architecture": TASK_NAMES["mlp"], "model_args": dict(args), "num_classes": 0,
            "inputs": list(INPUTS), "outputs": list(OUTPUTS), "problem": problem,
            "vitzoo": {"architecture": f"PINN MLP {args['depth']}x{args['width']} {args['activation']}", **vitzoo}}


def from_config(cfg: dict[str, Any]) -> PinnMLP:
    """Build the (seed-0 initialised) network a config.json describes; weights are loaded by the caller."""
    a = cfg.get("model_args") or {}
    return build(model_args(a.get("width"), a.get("depth"), a.get("activation"), a.get("init")), seed=0)
