"""vitzoo: generate, publish and load model zoos (populations of trained networks as data)."""

__version__ = "0.1.0"


def load(source, revision=None, **kwargs):
    """Open a zoo from a local folder or a Hub repo id (``org/name``); see :class:`vitzoo.zoo.Zoo`."""
    from vitzoo.zoo.reader import open_zoo

    return open_zoo(source, revision=revision, **kwargs)


__all__ = ["load", "__version__"]
