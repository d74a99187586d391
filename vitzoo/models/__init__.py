"""Model architectures: ViTs (timm) and the classic zoo CNNs. Knows nothing of recipes or files."""

from __future__ import annotations

from typing import Any

from torch import nn


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build the network a model folder's config.json describes (weights not loaded)."""
    arch = cfg["architecture"]
    if arch.startswith("vitzoo/"):
        from vitzoo.models import cnn

        return cnn.from_config(cfg)
    from vitzoo.models import vit

    return vit.from_config(cfg)
