"""Model architectures: ViTs (timm) and the classic zoo CNNs. Knows nothing of recipes or files.

Importing this package is cheap (no torch, no timm): ``vitzoo`` imports it to put the classic CNNs
into timm's registry when timm is imported (see :mod:`vitzoo.models.timm_registry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vitzoo.models.names import LEGACY_PREFIX, TASK_NAMES, TIMM_NAMES, cnn_variant, timm_architecture

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LEGACY_PREFIX", "TASK_NAMES", "TIMM_NAMES", "cnn_model_args", "cnn_variant", "from_config", "timm_architecture"]


def cnn_model_args(in_chans: int, activation: str | None, dropout: float, init: str | None,
                   width: int | None = None) -> dict[str, Any]:
    """What a classic-zoo model's config.json records to rebuild it (architecture ``vitzoo_cnn_s``...);
    ``width`` only for a width-scaled ResNet (absent: the standard width 64)."""
    args = {"in_chans": in_chans, "activation": activation, "dropout": dropout, "init": init}
    if width is not None:
        args["width"] = width
    return args


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build the network a model folder's config.json describes (weights are loaded by the caller)."""
    if cfg.get("model_type") == "gpt2":  # a transformers config (GPT-2 language models)
        from vitzoo.models import gpt2

        return gpt2.from_config(cfg)
    if cfg.get("architecture") == TASK_NAMES["mlp"]:  # PINN MLPs
        from vitzoo.models import mlp

        return mlp.from_config(cfg)
    variant = cnn_variant(cfg["architecture"])
    if variant is not None:
        from vitzoo.models.cnn import build_cnn

        a = cfg.get("model_args") or {}
        return build_cnn(variant, a.get("in_chans", 3), cfg["num_classes"], a.get("activation"),
                         a.get("dropout", 0.0), a.get("init"), seed=0, width=a.get("width"))
    from vitzoo.models import vit

    return vit.from_config(cfg)
