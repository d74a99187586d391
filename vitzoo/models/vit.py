"""Vision Transformers from timm, named by big_vision-style variants ("S/16", "micro").

Every model is a plain timm ``VisionTransformer``; its full constructor arguments are saved as
``model_args`` in config.json, so ``timm.create_model("local-dir:<folder>")`` and transformers'
TimmWrapper rebuild exactly the same network without vitzoo. The only vitzoo extension is the
MLP classification head of the reference ViT zoo (timm's ViT has none).

config.json's ``architecture`` is the timm entrypoint that builds the network (``vit_tiny_patch16_224``
for every size up to Ti: ``model_args`` set every size field, the name only picks timm's ViT
class); what the model really is, is written beside it (``vitzoo.architecture``, e.g. ``ViT-mu/4``).
Nothing of the entrypoint's ImageNet checkpoint (weights url, Hub id, licence) is carried over:
neither config.json nor a built model's ``pretrained_cfg`` claim weights these models never had.
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
    if cfg.width is not None:  # the width-scaled ViTs of the phase zoos: heads follow the width
        dim, heads = cfg.width, width_heads(cfg.width)
    depth = cfg.depth or depth
    args = dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
                patch_size=cfg.resolved_patch_size, img_size=cfg.resolved_img_size, in_chans=in_chans)
    if cfg.drop_path_rate:
        args["drop_path_rate"] = cfg.drop_path_rate
    return _ARCH.get(size, "vit_tiny_patch16_224"), args


def width_heads(width: int) -> int:
    """Attention heads of a width-scaled ViT: head dimension 64 as in Ti/S/B (192/3, 384/6, 768/12), one head
    below width 128. ``model.width`` must be a multiple of 64 from 128 on (checked before training)."""
    heads = max(1, width // 64)
    if width % heads:
        raise ValueError(f"model.width {width} is not divisible into {heads} heads of 64 (use a multiple of 64 from "
                         f"128, or a width below 128: one head)")
    return heads


def create(arch: str, model_args: dict[str, Any], num_classes: int, seed: int, head: str = "linear",
           head_hidden: int | None = None) -> nn.Module:
    """A freshly initialised ViT; the init depends only on ``seed`` (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **model_args)
        if head == "mlp" and num_classes > 0:
            set_head(model, num_classes, "mlp", head_hidden, seed=None)
    own = own_pretrained_cfg(dict(getattr(model, "pretrained_cfg", None) or {}))
    c = model_args.get("in_chans", 3)
    size = model_args.get("img_size", 224)
    own.update(architecture=arch, num_classes=num_classes,
               input_size=[c, *(size if isinstance(size, (list, tuple)) else (size, size))])
    model.pretrained_cfg = model.default_cfg = own
    return model


#: pretrained_cfg fields that describe the timm entrypoint's published checkpoint (where its weights
#: are, its tag, licence and papers), not a zoo model: never copied into a zoo model's metadata.
BORROWED_CFG_FIELDS = ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "custom_load",
                       "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


def own_pretrained_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` without the fields that describe someone else's checkpoint (:data:`BORROWED_CFG_FIELDS`)."""
    return {k: v for k, v in cfg.items() if k not in BORROWED_CFG_FIELDS}


def describe(arch: str, model_args: dict[str, Any]) -> str:
    """What a config.json's network is, in words: ``ViT-mu/4`` (big_vision naming), ``CNN-s``, ...

    ``architecture`` must stay the timm entrypoint name that builds the model (vit_tiny_patch16_224
    for a 25k-parameter micro ViT); this is the honest name beside it.
    """
    from vitzoo.models.names import cnn_variant

    variant = cnn_variant(arch)
    if variant is not None:
        return {"cnn-s": "CNN-s", "cnn-m": "CNN-m", "resnet18": "ResNet-18 (CIFAR stem)"}.get(variant, variant)
    dims = (model_args.get("embed_dim"), model_args.get("depth"), model_args.get("num_heads"),
            float(model_args.get("mlp_ratio", 4.0)))
    size = next((name for name, d in presets.VIT_SIZES.items() if (d[0], d[1], d[2], float(d[3])) == dims), None)
    patch = model_args.get("patch_size")
    if size is None or patch is None:
        return arch
    img = model_args.get("img_size")
    return f"ViT-{size}/{patch}" + (f" at {img}px" if img else "")


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
    """timm/transformers-readable config.json (see docs/zoo-format.md).

    ``architecture`` is what timm builds the network by; ``vitzoo.architecture`` says what it is
    (:func:`describe`). ``pretrained_cfg`` keeps the zoo's own preprocessing only
    (:func:`own_pretrained_cfg`).
    """
    out: dict[str, Any] = {"architecture": arch, "num_classes": num_classes, "num_features": num_features,
                           "model_args": model_args, "pretrained_cfg": own_pretrained_cfg(pretrained_cfg)}
    if label_names:
        out["label_names"] = label_names
    out["vitzoo"] = {"architecture": describe(arch, model_args), **vitzoo}
    return out


def from_config(cfg: dict[str, Any]) -> nn.Module:
    """Build the (uninitialised) network a config.json describes; weights are loaded by the caller."""
    head = cfg.get("vitzoo", {}).get("head", "linear")
    return create(cfg["architecture"], dict(cfg.get("model_args") or {}), cfg["num_classes"], seed=0, head=head,
                  head_hidden=cfg.get("vitzoo", {}).get("head_hidden"))
