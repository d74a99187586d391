"""Named presets for the axes users vary most.

Presets are plain data (no torch) so that `recipe.py` can validate names before anything is
imported or trained. A recipe may name a preset (``model: S/16``, ``aug: medium``,
``optimizer: adamw``) and override single fields next to it; raw values stay possible.

Model variants follow big_vision's ``"<size>/<patch>"`` convention: the size fixes width, depth
and heads, the number after the slash is the patch size. ``micro`` is a tiny ViT for tests and the
offline demo.
"""

from __future__ import annotations

import re
from typing import Any

#: ViT sizes: (embed_dim, depth, num_heads, mlp_ratio). Ti/S/B/L as in the ViT and DeiT papers.
VIT_SIZES: dict[str, tuple[int, int, int, float]] = {
    "mu": (32, 2, 2, 2.0),  # micro: ~25k parameters, for tests and the offline demo
    "Ti": (192, 12, 3, 4.0),
    "S": (384, 12, 6, 4.0),
    "M": (512, 12, 8, 4.0),
    "B": (768, 12, 12, 4.0),
    "L": (1024, 24, 16, 4.0),
}

#: Default input size per ViT size (micro models see small images).
VIT_DEFAULT_IMG_SIZE = {"mu": 32}

#: Aliases users type instead of the "<size>/<patch>" form.
VARIANT_ALIASES = {"micro": "mu/4", "tiny": "Ti/16", "small": "S/16", "base": "B/16"}

#: Classic zoo architectures (docs/reference-zoos.md#architectures); built by vitzoo.models.cnn.
CNN_VARIANTS = ("cnn-s", "cnn-m", "resnet18", "resnet50")

#: The other tasks' architectures: GPT-2 language models (transformers) and PINN MLPs (objective ``pinn``).
TASK_VARIANTS = ("gpt2", "mlp")

#: Which objective each task architecture is trained with (and the only one it accepts).
TASK_OBJECTIVE = {"gpt2": "causal_lm", "mlp": "pinn"}

#: Variants with a width axis (``model.width``) besides the ViTs.
WIDTH_VARIANTS = ("resnet18", "resnet50", "gpt2", "mlp")

_VIT_RE = re.compile(r"^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def parse_vit_variant(variant: str) -> tuple[str, int] | None:
    """Return ``(size, patch)`` for a ViT variant string, or None if it is not one."""
    variant = VARIANT_ALIASES.get(variant, variant)
    m = _VIT_RE.match(variant)
    if not m or m["size"] not in VIT_SIZES:
        return None
    return m["size"], int(m["patch"])


def known_variants() -> list[str]:
    return [f"{s}/<patch>" for s in VIT_SIZES] + list(VARIANT_ALIASES) + list(CNN_VARIANTS) + list(TASK_VARIANTS)


#: Augmentation levels built from timm's pieces. Keys are fields of recipe.AugConfig.
#: ``rand_augment`` is a timm RandAugment config string (timm.data.auto_augment).
#: "strong" is the reference ViT zoo's supervised recipe (docs/reference-zoos.md#vit-zoo), with the arguments in the
#: intended order.
AUG_LEVELS: dict[str, dict[str, Any]] = {
    "none": dict(
        scale=None, hflip=0.0, crop_padding=0, rand_augment=None, mixup=0.0, cutmix=0.0, re_prob=0.0,
        label_smoothing=0.0,
    ),
    "light": dict(
        scale=[0.6, 1.0], hflip=0.5, crop_padding=0, rand_augment=None, mixup=0.0, cutmix=0.0, re_prob=0.0,
        label_smoothing=0.0,
    ),
    "medium": dict(
        scale=[0.35, 1.0], hflip=0.5, crop_padding=0, rand_augment="rand-m9-mstd0.5-inc1", mixup=0.2, cutmix=0.0,
        re_prob=0.0, label_smoothing=0.1,
    ),
    "strong": dict(
        scale=[0.08, 1.0], hflip=0.5, crop_padding=0, rand_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0,
        re_prob=0.25, label_smoothing=0.1,
    ),
}

#: Optimizers. ``timm`` is the name handed to timm.optim.create_optimizer_v2. Our "sgd" is plain
#: momentum SGD (timm's own "sgd" is Nesterov), as in the reference zoos.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": dict(timm="adamw", lr=1e-3, weight_decay=1e-4),
    "adam": dict(timm="adam", lr=1e-3, weight_decay=0.0),
    "sgd": dict(timm="momentum", lr=1e-2, weight_decay=5e-4, momentum=0.9),
    "nesterov": dict(timm="sgd", lr=1e-2, weight_decay=5e-4, momentum=0.9),
    "lamb": dict(timm="lamb", lr=2e-3, weight_decay=0.05),
    "lion": dict(timm="lion", lr=1e-4, weight_decay=0.1),
}

#: Learning-rate schedules. All are stateless functions of the step, so resuming needs no state.
SCHEDULES = ("cosine", "constant", "onecycle")
