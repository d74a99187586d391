"""vitzoo: generate, publish and load model zoos (populations of trained networks as data)."""

__version__ = "0.1.0"

from vitzoo import log  # noqa: E402,F401 - attaches the NullHandler: the library prints nothing by default
from vitzoo.models import timm_registry as _timm_registry  # noqa: E402

_timm_registry.install()  # timm knows vitzoo_cnn_s/_cnn_m/_resnet18 once it is imported (no timm import here)


def load(source, revision=None, **kwargs):
    """Open a zoo from a local folder or a Hub repo id (``org/name``); see :class:`vitzoo.zoo.Zoo`."""
    from vitzoo.zoo.reader import open_zoo

    return open_zoo(source, revision=revision, **kwargs)


__all__ = ["load", "__version__"]
