"""Errors a user can cause and fix (bad recipe, missing model, wrong file...).

The CLI prints these as one clear line; anything else is a bug and keeps its traceback. This
module imports nothing, so the Hub and recipe code can subclass it without importing torch.
"""


class VitzooError(Exception):
    """Base of every user-facing vitzoo error."""


class ZooError(VitzooError, LookupError):
    """A zoo, model, epoch or file that is not there, or not what the index says."""
