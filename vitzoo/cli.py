"""Command line: vitzoo generate | plan | info | push | convert.

The only module that reads argv; command results (a plan, a zoo summary, what a push did) go to
stdout, diagnostics to the ``vitzoo`` logger on stderr (set up by :func:`vitzoo.log.setup`: ``-v``,
``-q``, ``--log-file``). Every error class has its own exit status (:data:`vitzoo.errors.EXIT_CODES`).
Run under ``accelerate launch -m vitzoo generate ...`` to shard a zoo over processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from vitzoo.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_MEANINGS, UsageError, exit_code, is_user_error

logger = logging.getLogger(__name__)

DESCRIPTION = ("Generate model zoos (populations of trained networks used as data) from a recipe,\n"
               "inspect them, and publish them on the Hugging Face Hub.")


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), else the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("vitzoo")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from vitzoo import __version__

        return __version__


def _cmd_generate(a: argparse.Namespace) -> int:
    from vitzoo.train.generate import generate

    meta = generate(a.recipe, a.out, progress=not a.no_progress, max_runs=a.max_runs)
    if meta:
        print(f"zoo {meta['name']} at {a.out}: {meta['status']}, models {meta['counts']} "
              f"(diverged {meta['diverged']}), {meta['wall_time_s']:.0f} s")
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from vitzoo import cost
    from vitzoo.plan import expand, populations
    from vitzoo.recipe import load_recipe

    plan = expand(load_recipe(a.recipe))
    if a.json:
        json.dump({"recipe": plan.recipe.name, "counts": plan.counts(), "storage": cost.storage_json(plan),
                   "runs": [{k: v for k, v in r.to_dict().items() if k != "config"} for r in plan.runs]},
                  sys.stdout, indent=2, default=str)
        print()
        return 0
    sizes = {s.stage: s for s in cost.storage(plan)}
    print(f"recipe {plan.recipe.name}: {len(plan.runs)} runs, checkpoints ~{cost.human(sum(s.bytes_total for s in sizes.values()))}")
    for st in plan.recipe.stages:
        runs = plan.stage_runs(st.name)
        axes = ", ".join(f"{k} ({len(v)})" for k, v in st.grid.items()) or "none"
        groups = populations(runs)
        s = sizes[st.name]
        print(f"  stage {st.name}: {len(runs)} runs, {st.epochs} epochs, saved epochs {len(st.saved_epochs())}, "
              f"axes: {axes}; {len(groups)} population(s); checkpoints ~{cost.human(s.bytes_total)} "
              f"(largest state {cost.human(s.largest_state)}, float32)")
    shown = plan.runs if a.all else plan.runs[:20]
    for r in shown:
        extra = f" parent={r.parent_id}" if r.parent_id else ""
        print(f"  {r.run_id}  init_seed={r.init_seed} data_seed={r.data_seed}{extra}  {json.dumps(r.factors, default=str)}")
    if len(shown) < len(plan.runs):
        print(f"  ... {len(plan.runs) - len(shown)} more (--all to list them, --json for machines)")
    return 0


def _zoo_summary(zoo: Any, source: str, revision: str | None) -> dict[str, Any]:
    """What ``vitzoo info --json`` prints: plain JSON types only."""
    info: dict[str, Any] = {}
    try:
        info = zoo.info
    except Exception:  # noqa: BLE001 - a zoo without zoo.json (e.g. converted) is still readable
        logger.debug("zoo %s has no readable zoo.json", source, exc_info=True)
    from vitzoo.cards import headline_column, higher_is_better

    m = zoo.models
    stages = {}
    for stage, g in m.groupby("stage", sort=False):
        acc = g["test_acc"].dropna() if "test_acc" in g else g.iloc[0:0]
        q = [float(x) for x in acc.quantile([0, 0.25, 0.5, 0.75, 1]).tolist()] if len(acc) else None
        col = headline_column(g)  # the stage's headline metric (perplexity for language models)
        hv = g[col].dropna().astype(float) if col else g.iloc[0:0]
        hq = [float(x) for x in hv.quantile([0, 0.25, 0.5, 0.75, 1]).tolist()] if len(hv) else None
        stages[str(stage)] = {
            "models": int(len(g)),
            "states": int((zoo.index["stage"] == stage).sum()),
            "status": {str(k): int(v) for k, v in g["status"].value_counts().items()},
            "diverged": int((g["status"] == "diverged").sum()),
            "test_acc": dict(zip(("min", "q1", "median", "q3", "max"), q)) if q else None,
            "headline": ({"metric": col, "higher_is_better": higher_is_better(col),
                          **dict(zip(("min", "q1", "median", "q3", "max"), hq))} if col and hq else None),
        }
    src = zoo.source
    return {
        "source": source,
        "repo_id": getattr(src, "repo_id", None),
        "revision": getattr(src, "revision", revision),
        "commit": getattr(src, "resolved_revision", None),
        "name": info.get("name"),
        "status": info.get("status"),
        "format_version": info.get("format_version"),
        "planned": info.get("planned"),
        "wall_time_s": info.get("wall_time_s"),
        "models": int(len(m)),
        "states": int(len(zoo.index)),
        "stages": stages,
        "columns": [str(c) for c in zoo.index.columns],
        "zoo_json": info or None,
    }


def _cmd_info(a: argparse.Namespace) -> int:
    import vitzoo

    if (a.revision or a.endpoint) and Path(a.zoo).exists():
        raise UsageError(f"{a.zoo} is a local folder: --revision and --endpoint apply to Hub repo ids (org/name)")
    kwargs = {"endpoint": a.endpoint} if a.endpoint else {}
    zoo = vitzoo.load(a.zoo, revision=a.revision, **kwargs)
    s = _zoo_summary(zoo, a.zoo, a.revision)
    if a.json:
        json.dump(s, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(repr(zoo))
    if s["commit"]:
        print(f"revision {s['revision']} = commit {s['commit']}")
    if s["zoo_json"]:
        print(f"name {s['name']}, status {s['status']}, planned {s['planned']}, "
              f"wall time {s['wall_time_s'] or 0:.0f} s")
    for stage, st in s["stages"].items():
        line = f"  {stage}: {st['models']} models, {st['diverged']} diverged, {st['states']} states"
        h = st["headline"]
        if h:
            vals = [round(h[k], 4) for k in ("min", "q1", "median", "q3", "max")]
            better = "higher" if h["higher_is_better"] else "lower"
            line += f"; {h['metric'].replace('_', ' ')} ({better} is better) min/q1/median/q3/max {vals}"
        print(line)
    return 0


def _exit_status_epilog() -> str:
    return "exit status:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in EXIT_MEANINGS.items())


def _common_options(top: bool) -> argparse.ArgumentParser:
    """-v / -q / --log-file, accepted before or after the subcommand (after: SUPPRESS keeps the top value)."""
    c = argparse.ArgumentParser(add_help=False)
    d = {} if top else {"default": argparse.SUPPRESS}
    c.add_argument("-v", "--verbose", action="count", help="more output: debug messages (and tracebacks of errors)",
                   **({"default": 0} if top else d))
    c.add_argument("-q", "--quiet", action="count", help="less output: warnings and errors only (-qq: errors only)",
                   **({"default": 0} if top else d))
    c.add_argument("--log-file", type=Path, metavar="PATH", help="also append every message (debug level, with "
                   "time and pid) to this file", **({"default": None} if top else d))
    return c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitzoo", description=DESCRIPTION, parents=[_common_options(top=True)],
        epilog="Run 'vitzoo <command> --help' for a command's options.\n\n" + _exit_status_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vitzoo {version()}",
                   help="print the installed vitzoo version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")
    common = [_common_options(top=False)]
    g = sub.add_parser(
        "generate", parents=common, help="train a zoo from a recipe (resumes an existing one)",
        description="Train every run of a recipe into a zoo folder and index it. Running it again on the same "
                    "folder resumes: finished models are skipped, unfinished ones continue from their last "
                    "epoch. A folder holding another recipe's zoo is refused. Under 'accelerate launch -m "
                    "vitzoo generate ...' the runs are sharded over the processes.")
    g.add_argument("recipe", type=Path, help="recipe YAML file (see recipes/ and 'vitzoo plan')")
    g.add_argument("--out", required=True, type=Path, help="zoo folder (created, or resumed if it exists)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (one line per model still)")
    g.add_argument("--max-runs", type=int, default=None, metavar="N",
                   help="train only the first N runs of each stage (a quick trial of a recipe)")
    g.set_defaults(fn=_cmd_generate)
    pl = sub.add_parser(
        "plan", parents=common, help="expand a recipe without training: runs, ids, factors, counts",
        description="Validate a recipe and expand it into its runs (id, seeds, generating factors, parent) "
                    "and the counts per stage, without training anything.")
    pl.add_argument("recipe", type=Path, help="recipe YAML file")
    pl.add_argument("--json", action="store_true", help="machine-readable output: counts and every run")
    pl.add_argument("--all", action="store_true", help="list every run (default: the first 20)")
    pl.set_defaults(fn=_cmd_plan)
    i = sub.add_parser(
        "info", parents=common, help="summarise a zoo (folder or Hub repo id)",
        description="Summarise a zoo: its name and status, and per stage the number of models, diverged "
                    "runs, saved states and the spread of test accuracy. Reads only the index and zoo.json "
                    "(from a Hub repo: downloads only the small zoo-level files, no weights).")
    i.add_argument("zoo", help="zoo folder, or Hub repo id org/name")
    i.add_argument("--json", action="store_true", help="machine-readable summary on stdout (one JSON object)")
    i.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub repo (default: main); not for local folders")
    i.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    i.set_defaults(fn=_cmd_info)
    try:
        from vitzoo import cli_hub
    except ImportError:
        cli_hub = None
    if cli_hub is not None:
        cli_hub.register(sub, parents=common)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (:data:`vitzoo.errors.EXIT_CODES`)."""
    # Before torch loads OpenMP: spinning worker threads make CPU training ~2.5x slower whenever other
    # processes share the cores (measured with the micro ViT: 0.152 vs 0.063 s/step), for ~no gain alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)  # usage errors exit 2 here (argparse), --help/--version 0
    from vitzoo import log

    log.setup(args.verbose - args.quiet, args.log_file)
    plain = {"plain": True}  # the console shows these lines as they are (argparse's "prog: error: ..." style)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        logger.error("vitzoo %s: interrupted", args.cmd, extra=plain)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`vitzoo plan --all | head`): not an error worth a traceback
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - every error becomes one exit status
        if is_user_error(e):  # one clear line; the traceback only with -v (and in --log-file)
            logger.debug("traceback of the error below", exc_info=True)
            logger.error("vitzoo %s: error: %s", args.cmd, e, extra=plain)
        else:  # a bug: keep the traceback
            logger.error("vitzoo %s: unexpected error (please report it): %s: %s", args.cmd, type(e).__name__, e,
                         exc_info=True, extra=plain)
        return exit_code(e)
    finally:
        log.teardown()


if __name__ == "__main__":
    raise SystemExit(main())
