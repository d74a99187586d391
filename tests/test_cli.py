"""The ``vitzoo`` command line: --version, help texts, ``info --json``/``--revision`` and one exit status per error class."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from zoo_factory import TOKEN

from vitzoo import errors
from vitzoo.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "tiny.yaml"


def test_version():
    res = subprocess.run([sys.executable, "-m", "vitzoo", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == f"vitzoo {version('vitzoo')}"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_a_description_and_every_argument_help():
    parser = build_parser()
    top = parser.format_help()
    assert "``" not in top and "`" not in top, "no raw RST markup in the top-level help"
    subs = _subparsers(parser)
    assert {"generate", "plan", "info", "push", "convert"} <= set(subs)
    for name, sub in subs.items():
        assert sub.description and len(sub.description) > 40, f"{name}: no description"
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.dest}: no help"
        assert "``" not in sub.format_help()


def test_info_json(make_zoo, capsys):
    zoo = make_zoo(n_models=3, n_unfinished=1)
    assert main(["info", str(zoo), "--json"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out)  # stdout is exactly one JSON object: no log line mixed in
    assert s["name"] == zoo.name and s["models"] == 3 and s["states"] == 9 and s["commit"] is None
    st = s["stages"]["pretrain"]
    assert st["models"] == 3 and st["states"] == 9 and st["diverged"] == 0 and st["status"] == {"done": 3}
    assert set(st["test_acc"]) == {"min", "q1", "median", "q3", "max"}
    assert st["test_acc"]["min"] <= st["test_acc"]["median"] <= st["test_acc"]["max"]
    assert "model_id" in s["columns"] and s["zoo_json"]["format_version"] == 1


def test_info_of_a_hub_repo_at_a_revision(hub, hf_cache, make_zoo, capsys, monkeypatch):
    from vitzoo.hub import push

    repo = "vitzoo-test/info-zoo"
    v1 = push(make_zoo("a", n_models=2), repo, token=TOKEN, endpoint=hub.endpoint)
    push(make_zoo("a", n_models=3), repo, token=TOKEN, endpoint=hub.endpoint)  # main moves on: 3 models
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["info", repo, "--json", "--revision", "v1", "--endpoint", hub.endpoint]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["repo_id"] == repo and s["revision"] == "v1" and s["commit"] == v1.commit and s["models"] == 2
    assert main(["info", repo, "--endpoint", hub.endpoint]) == 0
    out = capsys.readouterr().out
    assert "pretrain: 3 models" in out and "revision main = commit" in out
    assert main(["info", repo, "--revision", "v9", "--endpoint", hub.endpoint]) == errors.EXIT_HUB
    assert "v9" in capsys.readouterr().err
    assert main(["info", "vitzoo-test/nothing-here", "--endpoint", hub.endpoint]) == errors.EXIT_HUB


def test_exit_status_of_a_bad_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  s:\n    model: micro\n    optimiser: adamw\n")
    assert main(["plan", str(bad)]) == errors.EXIT_USAGE == 2
    err = capsys.readouterr().err
    assert "vitzoo plan: error:" in err and "stages.s.optimiser: unknown key" in err and "Traceback" not in err
    assert main(["generate", str(bad), "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "z").exists()
    with pytest.raises(SystemExit) as info:  # argparse's own usage errors are 2 as well
        main(["plan"])
    assert info.value.code == 2


def test_exit_status_of_a_zoo_conflict(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("not a zoo")
    assert main(["generate", str(TINY), "--out", str(out)]) == errors.EXIT_CONFLICT == 4
    assert "is not a zoo; choose another --out" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], "nothing written"


def test_exit_status_of_data_errors(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nothing")]) == errors.EXIT_DATA == 3
    assert "no such zoo folder" in capsys.readouterr().err
    assert main(["info", str(tmp_path), "--revision", "v1"]) == errors.EXIT_USAGE  # a revision of a local folder


def test_quiet_and_verbose(make_zoo, capsys, tmp_path):
    zoo = make_zoo(n_models=1)
    assert main(["-q", "info", str(zoo)]) == 0
    captured = capsys.readouterr()
    assert "pretrain: 1 models" in captured.out and captured.err == ""
    log_file = tmp_path / "cli.log"
    assert main(["info", str(tmp_path / "nothing"), "-v", "--log-file", str(log_file)]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZooError" in err, "-v shows the traceback of a user error"
    assert "vitzoo info: error:" in log_file.read_text()


def test_unexpected_errors_keep_their_traceback(monkeypatch, capsys, make_zoo):
    import vitzoo.cli

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(vitzoo.cli, "_zoo_summary", boom)
    assert main(["info", str(make_zoo(n_models=1))]) == errors.EXIT_UNEXPECTED == 1
    err = capsys.readouterr().err
    assert "unexpected error" in err and "Traceback" in err and "ZeroDivisionError: a bug" in err


def test_interrupt_is_130(monkeypatch, make_zoo):
    import vitzoo.cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(vitzoo.cli, "_zoo_summary", interrupted)
    assert main(["info", str(make_zoo(n_models=1))]) == errors.EXIT_INTERRUPTED == 130


def test_exit_code_table_names_real_classes_and_matches_the_readme():
    from vitzoo.data.sources import DataError
    from vitzoo.hub import HubError, PushInProgressError, ZooFileNotFoundError, ZooIndexMismatchError
    from vitzoo.recipe import RecipeError
    from vitzoo.train.generate import ZooConflictError
    from vitzoo.zoo.legacy import LegacyZooError

    classes = [errors.UsageError, RecipeError, DataError, LegacyZooError, ZooIndexMismatchError, errors.ZooError,
               FileNotFoundError, ZooConflictError, PushInProgressError, HubError, errors.VitzooError]
    assert [c.__name__ for c in classes] == list(errors.EXIT_CODES), "every name in EXIT_CODES is a real class"
    for cls in classes:
        assert errors.exit_code(cls("x")) == errors.EXIT_CODES[cls.__name__]
    assert errors.exit_code(ZooFileNotFoundError("x")) == errors.EXIT_HUB, "a Hub error before FileNotFoundError"
    assert errors.exit_code(KeyboardInterrupt()) == 130 and errors.exit_code(ZeroDivisionError()) == 1

    readme = (REPO_ROOT / "README.md").read_text()
    table = dict(re.findall(r"^\| (\d+) \| (.+) \|$", readme, flags=re.M))
    assert sorted(map(int, table)) == sorted(errors.EXIT_MEANINGS), "the README's table lists every exit status"
    for code, meaning in errors.EXIT_MEANINGS.items():
        assert table[str(code)].split(" (")[0] == meaning.split(" (")[0]


def test_index_dataset_before_the_positionals_does_not_swallow_the_zoo(tmp_path, capsys):
    """`push --index-dataset zoos/x org/x` used to take the zoo folder as the dataset name; now refused, saying
    where the flag goes (the value stays optional after the positionals)."""
    from vitzoo.cli import main

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    with pytest.raises(SystemExit) as info:
        main(["push", "--index-dataset", str(zoo), "org/zoo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "it is a local path" in err and "after the zoo folder and repo id" in err
    import argparse

    from vitzoo.cli_hub import _IndexDatasetName

    ns = argparse.Namespace()
    _IndexDatasetName(["--index-dataset"], "index_dataset", nargs="?")(argparse.ArgumentParser(), ns, "org/zoo-index")
    assert ns.index_dataset == "org/zoo-index"
