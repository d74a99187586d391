"""Errors a user can cause and fix (bad recipe, missing model, wrong file...).

The CLI prints these as one clear line; anything else is a bug and keeps its traceback. This
module imports nothing, so the Hub and recipe code can subclass it without importing torch. It also
holds the command's exit status per error class (:data:`EXIT_CODES`, :func:`exit_code`).
"""


class VitzooError(Exception):
    """Base of every user-facing vitzoo error."""


class ZooError(VitzooError, LookupError):
    """A zoo, model, epoch or file that is not there, or not what the index says."""


class UsageError(VitzooError, ValueError):
    """A command-line call that cannot work as given (options that do not fit together)."""


# Exit status of the ``vitzoo`` command per error class: the one place it is defined (the README's table
# is checked against it by tests/test_cli.py). Classes are named rather than imported so that this module
# stays import-free (ZooConflictError lives with the training code, DataError with the data code); the
# first class of an exception's MRO found here decides, so a subclass may be listed apart from its base.
EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_CONFLICT = 4
EXIT_HUB = 5
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

EXIT_CODES: dict[str, int] = {
    "UsageError": EXIT_USAGE,                # options that do not fit together
    "RecipeError": EXIT_USAGE,               # vitzoo.recipe: a recipe that does not validate
    "DataError": EXIT_DATA,                  # vitzoo.data.sources: a data source, split or column is wrong
    "LegacyZooError": EXIT_DATA,             # vitzoo.zoo.legacy: a legacy zoo that cannot be converted
    "ZooIndexMismatchError": EXIT_DATA,      # vitzoo.hub: index.parquet disagrees with the zoo's files
    "ZooError": EXIT_DATA,                   # a zoo, model, epoch or file that is not there
    "FileNotFoundError": EXIT_DATA,          # a path given on the command line does not exist
    "ZooConflictError": EXIT_CONFLICT,       # vitzoo.train.generate: --out holds another recipe's zoo
    "PushInProgressError": EXIT_CONFLICT,    # vitzoo.hub: another process is pushing the same folder
    "HubError": EXIT_HUB,                    # vitzoo.hub: repo/revision/file not found, network, auth
    "VitzooError": EXIT_UNEXPECTED,          # any other vitzoo error (still one line, no traceback)
}

EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug: the traceback is printed)",
    EXIT_USAGE: "usage or recipe error (bad arguments, a recipe that does not validate)",
    EXIT_DATA: "data error (a data source, zoo, model or file missing or not as indexed)",
    EXIT_CONFLICT: "zoo conflict (--out holds another recipe's zoo; another push of the folder is running)",
    EXIT_HUB: "Hub or network error (repo, revision or file not found, authentication, connection)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_BROKEN_PIPE: "output closed early (piped into head), as for a process ended by SIGPIPE",
}


def exit_code(err: BaseException) -> int:
    """The ``vitzoo`` command's exit status for ``err`` (see :data:`EXIT_CODES`)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    for cls in type(err).__mro__:
        if cls.__name__ in EXIT_CODES:
            return EXIT_CODES[cls.__name__]
    return EXIT_UNEXPECTED


def is_user_error(err: BaseException) -> bool:
    """Errors reported as one line without a traceback: vitzoo's own, and a missing path."""
    return any(cls.__name__ in EXIT_CODES for cls in type(err).__mro__)
