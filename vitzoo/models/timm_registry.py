"""The classic zoo CNNs in timm's model registry, so zoo models load without vitzoo's loader.

``vitzoo_cnn_s``, ``vitzoo_cnn_m`` and ``vitzoo_resnet18`` are plain timm entrypoints: after
``import vitzoo``, ``timm.create_model("local-dir:<zoo>/models/<id>", pretrained=True)`` and
``transformers.AutoModelForImageClassification.from_pretrained(...)`` (TimmWrapper, which calls
``timm.create_model``) build these networks from a model folder's config.json (``architecture``,
``model_args``) and load its ``model.safetensors``, exactly as they do for the zoo's ViTs.

Why a hook instead of registering at import: ``import vitzoo`` must stay cheap (the CLI, the zoo
reader), and importing timm costs seconds. :func:`install` registers right away when timm is already
imported, else it waits for ``import timm`` (a one-shot import hook) and registers as soon as timm's
own ``__init__`` has run. Either way, by the time anyone can call ``timm.create_model``, the names are
there.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

from vitzoo.models.names import TIMM_NAMES

logger = logging.getLogger(__name__)

_registered = False


def _default_cfgs() -> dict[str, dict[str, Any]]:
    """timm pretrained_cfg defaults when a model is created by name: the architecture's own input, no
    weights (a model folder's config.json replaces these with the zoo's preprocessing)."""
    half, imagenet = (0.5,), {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    base = {"num_classes": 10, "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center"}
    return {
        "vitzoo_cnn_s": {**base, "input_size": (1, 28, 28), "mean": half, "std": half, "first_conv": "module_list.0"},
        "vitzoo_cnn_m": {**base, "input_size": (3, 32, 32), **imagenet, "first_conv": "module_list.0",
                         "classifier": "module_list.16"},
        "vitzoo_resnet18": {**base, "input_size": (3, 32, 32), **imagenet, "first_conv": "conv1", "classifier": "fc"},
        "vitzoo_resnet50": {**base, "input_size": (3, 32, 32), **imagenet, "first_conv": "conv1", "classifier": "fc"},
    }


def _build(variant: str, in_chans: int | None = None, num_classes: int = 10, activation: str | None = None,
           dropout: float = 0.0, init: str | None = None, seed: int = 0, width: int | None = None) -> Any:
    from vitzoo.models.cnn import build_cnn

    if in_chans is None:
        in_chans = 1 if variant == "cnn-s" else 3
    return build_cnn(variant, in_chans, num_classes, activation, dropout, init, seed=seed, width=width)


def _entrypoint(variant: str, name: str):
    def create(pretrained: bool = False, **kwargs: Any):
        from timm.models import build_model_with_cfg

        return build_model_with_cfg(functools.partial(_build, variant), name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"vitzoo's classic-zoo {variant} (vitzoo.models.cnn), model_args: in_chans, num_classes, "
                      "activation, dropout, init, seed")
    return create


def register() -> None:
    """Put the classic architectures into timm's registry (idempotent; imports timm)."""
    global _registered
    if _registered:
        return
    from timm.models import generate_default_cfgs, register_model

    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs(_default_cfgs())  # register_model reads the module's default_cfgs
    for variant, name in TIMM_NAMES.items():
        fn = _entrypoint(variant, name)
        setattr(module, name, fn)
        register_model(fn)
    _registered = True


def _register_quietly() -> None:
    """register(), but a failure here must never break ``import timm`` for the user."""
    try:
        register()
    except Exception as e:  # pragma: no cover - only with a timm whose registry API changed
        logger.warning("could not register vitzoo's CNNs with timm (%s); load them with vitzoo.load", e)


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the normal machinery find timm, then registers after timm's __init__ ran."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        _uninstall_hook()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _register_quietly()

        spec.loader.exec_module = exec_then_register  # this module's loader instance only
        return spec


def _uninstall_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def install() -> None:
    """Register now if timm is imported, else as soon as it is (``import vitzoo`` calls this)."""
    if _registered:
        return
    if "timm" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _TimmImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportHook())
