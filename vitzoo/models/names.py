"""What config.json calls each architecture, and which of those names timm can build (no imports)."""

from __future__ import annotations

#: timm registry name of each classic zoo architecture (``timm.create_model`` and transformers'
#: TimmWrapper build it after ``import vitzoo``; timm names cannot contain ``/``).
TIMM_NAMES = {"cnn-s": "vitzoo_cnn_s", "cnn-m": "vitzoo_cnn_m", "resnet18": "vitzoo_resnet18",
              "resnet50": "vitzoo_resnet50"}

#: What config.json calls the other tasks' architectures (not timm models: GPT-2 folders are transformers
#: models, config.json ``model_type: gpt2``; PINN MLPs are read by vitzoo.models.from_config).
TASK_NAMES = {"gpt2": "GPT2LMHeadModel", "mlp": "vitzoo_mlp"}

#: The name older CNN zoos record in config.json (``vitzoo/<variant>``); still read.
LEGACY_PREFIX = "vitzoo/"


def cnn_variant(architecture: str) -> str | None:
    """The classic variant (``cnn-s``...) a config.json architecture names, or None for a timm ViT.

    Both spellings are accepted: the timm registry name ``vitzoo_cnn_s`` (what config.json records) and
    ``vitzoo/cnn-s`` (older zoos).
    """
    if architecture.startswith(LEGACY_PREFIX):
        return architecture[len(LEGACY_PREFIX):]
    return next((v for v, name in TIMM_NAMES.items() if name == architecture), None)


def timm_architecture(architecture: str) -> str | None:
    """The name ``timm.create_model`` knows a config.json architecture by (None: timm cannot build it).

    ViT names pass through; ``vitzoo/cnn-s`` and ``vitzoo_cnn_s`` give ``vitzoo_cnn_s`` (registered
    with timm by ``import vitzoo``); other ``vitzoo/...`` names (test MLPs) give None.
    """
    variant = cnn_variant(architecture)
    if variant is not None:
        return TIMM_NAMES.get(variant)
    return None if "/" in architecture else architecture
