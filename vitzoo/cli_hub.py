"""``vitzoo push`` (and ``vitzoo convert``): the Hub-facing subcommands, registered by vitzoo.cli.

Kept apart from the main CLI so that importing it costs nothing (no torch, no huggingface_hub until
a command runs). ``register(subparsers)`` adds the subcommands; each sets ``fn`` (as vitzoo.cli does) to a callable
taking the parsed ``argparse.Namespace`` and returning an exit status. Errors are raised, not printed:
:func:`vitzoo.cli.main` reports them as one line and maps each class to its exit status.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any


def register(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add ``push`` (and ``convert`` when available) to an ``argparse`` subparsers object.

    ``parents``: parsers whose options every subcommand also accepts (vitzoo.cli's -v/-q/--log-file).
    """
    p = subparsers.add_parser(
        "push", parents=list(parents), help="upload a zoo folder to the Hugging Face Hub (finished models only) and tag it",
        description="Upload a zoo folder to a Hub repo: creates the repo if needed, checks index.parquet "
                    "against the files first, skips unfinished models, resumes an interrupted upload and "
                    "tags the pushed version (v1, v2, ... unless --tag is given). The token comes from "
                    "HF_TOKEN or 'hf auth login'.")
    p.add_argument("zoo", help="zoo folder")
    p.add_argument("repo_id", help="Hub repo id, org/name")
    p.add_argument("--revision", default=None, help="branch to push to (default: main; created if missing)")
    tag = p.add_mutually_exclusive_group()
    tag.add_argument("--tag", default=None, help="tag for this version (default: the next vN)")
    tag.add_argument("--no-tag", action="store_true", help="do not tag the pushed commit")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--no-verify-hashes", action="store_true",
                   help="check that indexed files exist and have the right size, but skip sha256 (faster)")
    p.add_argument("--no-cards", action="store_true",
                   help="push README.md/model cards as they are instead of re-rendering them from the index")
    p.add_argument("--index-dataset", nargs="?", const=True, default=None, metavar="ORG/NAME-INDEX",
                   action=_IndexDatasetName,
                   help="also publish index.parquet (and analysis.parquet when present) as a dataset repo, "
                        "browsable in the Hub's table viewer and loadable with datasets.load_dataset "
                        "(default name: REPO_ID-index); recorded in zoo.json so the zoo card links it")
    p.set_defaults(fn=cmd_push)

    c = subparsers.add_parser(
        "convert", parents=list(parents), help="convert a legacy (Ray Tune layout) model zoo into a vitzoo zoo folder",
        description="Read a zoo in the original Ray Tune layout (params.json, result.json, "
                    "checkpoint_*/checkpoints) and write it in the vitzoo format. Checkpoints are read with "
                    "torch.load(weights_only=True) only; anything else is refused.")
    c.add_argument("legacy", help="legacy zoo folder (one subfolder per trial)")
    c.add_argument("zoo", help="output zoo folder")
    c.add_argument("--name", default=None, help="zoo name (default: the output folder's name)")
    c.add_argument("--architecture", default=None, help="vitzoo architecture (default: inferred: vitzoo_cnn_s, ...)")
    c.set_defaults(fn=cmd_convert)


class _IndexDatasetName(argparse.Action):
    """``--index-dataset [ORG/NAME]``: its optional value would swallow the zoo folder when the flag comes
    first (``push --index-dataset zoos/x org/x``); a value that is a local path is refused, saying why."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from pathlib import Path

        if isinstance(values, str) and (Path(values).exists() or values.count("/") != 1):
            parser.error(f"--index-dataset {values!r}: not a Hub dataset id ORG/NAME"
                         f"{' (it is a local path)' if Path(values).exists() else ''}; put --index-dataset after "
                         "the zoo folder and repo id, or write --index-dataset=ORG/NAME")
        setattr(namespace, self.dest, values)


def cmd_push(args: argparse.Namespace) -> int:
    from vitzoo.hub import push

    result = push(args.zoo, args.repo_id, revision=args.revision,
                  tag=False if args.no_tag else args.tag, endpoint=args.endpoint, private=args.private,
                  check_hashes=not args.no_verify_hashes, cards=not args.no_cards,
                  index_dataset=args.index_dataset)
    print(result)  # the command's result (stdout); progress went to the log (stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from vitzoo.errors import UsageError

    try:
        from vitzoo.zoo.legacy import convert
    except ImportError:  # pragma: no cover - legacy support not installed
        raise UsageError("legacy conversion is not available in this version") from None
    summary = convert(args.legacy, args.zoo, name=args.name, architecture=args.architecture)
    print(summary)
    return 0
