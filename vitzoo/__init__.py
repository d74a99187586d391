"""vitzoo: generate, publish and load model zoos (populations of trained networks as data)."""

__version__ = "0.1.0"

from vitzoo import log  # noqa: E402,F401 - attaches the NullHandler: the library prints nothing by default


def load(source, revision=None, **kwargs):
    """Open a zoo from a local folder or a Hub repo id (``org/name``); see :class:`vitzoo.zoo.Zoo`."""
    from vitzoo.zoo.reader import open_zoo

    return open_zoo(source, revision=revision, **kwargs)


__all__ = ["load", "__version__"]
