"""Model architectures: ViTs (timm) and the classic zoo CNNs. Knows nothing of recipes or files."""

from __future__ import annotations

from typing import Any

from torch import nn


def cnn_model_args(in_chans: int, activation: str | None, dropout: float, init: str | None) -> dict[str, Any]:
    """What a classic-zoo model's config.json records to rebuild it (architecture ``vitzoo/<variant>``)."""
    return {"in_chans": in_chans, "activation": activation, "dropout": dropout, "init": init}


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build the network a model folder's config.json describes (weights are loaded by the caller)."""
    arch = cfg["architecture"]
    if arch.startswith("vitzoo/"):
        from vitzoo.models.cnn import build_cnn

        a = cfg.get("model_args") or {}
        return build_cnn(arch.split("/", 1)[1], a.get("in_chans", 3), cfg["num_classes"], a.get("activation"),
                         a.get("dropout", 0.0), a.get("init"), seed=0)
    from vitzoo.models import vit

    return vit.from_config(cfg)
