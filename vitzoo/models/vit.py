"""Vision Transformers from timm, named by big_vision-style variants ("S/16", "micro").

Every model is a plain timm ``VisionTransformer``; its full constructor arguments are saved as
``model_args`` in config.json, so ``timm.create_model("local-dir:<folder>")`` and transformers'
TimmWrapper rebuild exactly the same network without vitzoo. The only vitzoo extension is the
MLP classification head of the reference ViT zoo (timm's ViT has none).
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from vitzoo import presets
from vitzoo.recipe import ModelConfig

#: timm registry names used as the base architecture (model_args override every size field).
_ARCH = {"Ti": "vit_tiny_patch16_224", "S": "vit_small_patch16_224", "B": "vit_base_patch16_224",
         "L": "vit_large_patch16_224"}


def vit_args(cfg: ModelConfig, in_chans: int) -> tuple[str, dict[str, Any]]:
    """(timm architecture name, model_args) for a ViT ModelConfig."""
    parsed = presets.parse_vit_variant(cfg.variant)
    if parsed is None:
        raise ValueError(f"{cfg.variant!r} is not a ViT variant")
    size, _ = parsed
    dim, depth, heads, mlp_ratio = presets.VIT_SIZES[size]
    args = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                patch_size=cfg.resolved_patch_size, img_size=cfg.resolved_img_size, in_chans=in_chans)
    if cfg.drop_path_rate:
        args["drop_path_rate"] = cfg.drop_path_rate
    return _ARCH.get(size, "vit_tiny_patch16_224"), args


def create(arch: str, model_args: dict[str, Any], num_classes: int, seed: int, head: str = "linear",
           head_hidden: int | None = None) -> nn.Module:
    """A freshly initialised ViT; the init depends only on ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
        if head == "mlp" and num_classes > 0:
            set_head(model, num_classes, "mlp", head_hidden, seed=None)
    return model


def set_head(model: nn.Module, num_classes: int, head: str, hidden: int | None, seed: int | None) -> None:
    """Replace the classifier (fine-tuning): linear, or Linear-GELU-Linear (the reference's MLP head)."""
    ctx = torch.random.fork_rng(devices=[]) if seed is not None else _null()
    with ctx:
        if seed is not None:
            torch.manual_seed(seed)
        if head == "linear":
            model.reset_classifier(num_classes)
        else:
            d = model.num_features
            h = hidden or d
            model.head = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, num_classes))
            model.num_classes = num_classes


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def config_json(arch: str, model_args: dict[str, Any], num_classes: int, label_names: list[str] | None,
                pretrained_cfg: dict[str, Any], num_features: int, vitzoo: dict[str, Any]) -> dict[str, Any]:
    """timm/transformers-readable config.json (see docs/zoo-format.md)."""
    out: dict[str, Any] = {"architecture": arch, "num_classes": num_classes, "num_features": num_features,
                           "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    if label_names:
        out["label_names"] = label_names
    out["vitzoo"] = vitzoo
    return out


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build the (uninitialised) network a config.json describes; weights are loaded by the caller."""
    head = cfg.get("vitzoo", {}).get("head", "linear")
    return create(cfg["architecture"], dict(cfg.get("model_args") or {}), cfg["num_classes"], seed=0, head=head,
                  head_hidden=cfg.get("vitzoo", {}).get("head_hidden"))
