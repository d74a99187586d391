"""vitzoo.log: a silent library, a configurable CLI logger, and progress without bar spam off a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vitzoo.log as vlog


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.fixture
def stderr(monkeypatch):
    """Patches sys.stderr with a non-terminal stream (inside the test: pytest's capture replaces sys.stderr
    between fixture set-up and the test); the handlers :func:`vitzoo.log.setup` installs are removed after."""
    stream = _Stream(tty=False)

    def install() -> _Stream:
        monkeypatch.setattr(sys, "stderr", stream)
        return stream

    yield install
    vlog.teardown()


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_non_terminal_progress_is_a_few_readable_lines(stderr, monkeypatch):
    stderr = stderr()
    clock = _Clock()
    monkeypatch.setattr(vlog.time, "monotonic", clock)
    vlog.setup(0)
    bar = vlog.progress(total=600, desc="zoo:pretrain", unit="model", interval=30, position=0, dynamic_ncols=True)
    assert isinstance(bar, vlog.LogProgress)
    for i in range(600):  # one model a second for 10 minutes: a bar would redraw 600 times
        clock.t += 1.0
        bar.update()
        bar.set_postfix(loss=1.0 / (i + 1))
    bar.close()
    text = stderr.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert 15 <= len(lines) <= 22, lines  # one every 30 s (+ the final one)
    assert all("zoo:pretrain: " in ln and "/600 model" in ln for ln in lines)
    assert "30/600 model (5%)" in lines[0] and "1 model/s" in lines[0] and "~9 min 30 s left" in lines[0]
    assert "600/600 model (100%)" in lines[-1] and "10 min 00 s elapsed" in lines[-1] and "loss=0.00" in lines[-1]


def test_short_inner_bars_add_nothing_and_close_is_idempotent(stderr):
    stderr = stderr()
    vlog.setup(0)
    with vlog.progress(total=50, desc="steps", leave=False, interval=30) as bar:
        bar.update(50)
    bar.close()
    assert stderr.getvalue() == ""
    bar = vlog.progress(total=None, desc="scan", interval=30)  # leave=True: one final line, no total known
    bar.update(7)
    bar.close()
    bar.close()
    assert stderr.getvalue().count("scan: 7 it") == 1


def test_terminal_gets_a_tqdm_bar(monkeypatch):
    from tqdm.auto import tqdm

    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    bar = vlog.progress(total=3, desc="x")
    try:
        assert isinstance(bar, tqdm)
    finally:
        bar.close()


def test_write_logs_off_a_terminal_and_uses_tqdm_write_on_one(stderr, monkeypatch):
    stderr = stderr()
    vlog.setup(0)
    vlog.write("model pretrain-0 finished")
    assert "model pretrain-0 finished" in stderr.getvalue()
    vlog.setup(-1)  # -q: INFO lines are gone
    vlog.write("hidden")
    assert "hidden" not in stderr.getvalue()
    vlog.teardown()

    written = []
    import tqdm

    monkeypatch.setattr(tqdm.tqdm, "write", classmethod(lambda cls, s, file=None, **kw: written.append(s)))
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))  # a library user on a terminal, no logging set up
    vlog.write("above the bars")
    assert written == ["above the bars"]


def test_verbosity_levels_and_log_file(stderr, tmp_path: Path):
    stderr = stderr()
    lg = logging.getLogger("vitzoo.hub")
    log_file = tmp_path / "logs" / "run.log"
    vlog.setup(-1, log_file)
    lg.info("info line")
    lg.warning("warning line")
    lg.debug("debug line")
    out = stderr.getvalue()
    assert "warning: warning line" in out and "info line" not in out and "debug line" not in out
    vlog.teardown()
    text = log_file.read_text()
    assert "INFO vitzoo.hub: info line" in text and "DEBUG vitzoo.hub: debug line" in text
    vlog.setup(1)
    lg.debug("now shown")
    assert "debug: now shown" in stderr.getvalue()


def test_library_logger_is_silent_by_default():
    code = textwrap.dedent("""
        import logging
        import vitzoo, vitzoo.hub
        from vitzoo.log import progress, write
        logging.getLogger("vitzoo.hub").warning("a warning nobody configured")
        logging.getLogger("vitzoo").error("an error nobody configured")
        bar = progress(total=10, desc="quiet", interval=0)
        for _ in range(10):
            bar.update()
        bar.close()
        write("a line")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""


def test_redirected_cli_style_run_has_no_bar_spam(tmp_path: Path):
    """What ``vitzoo ... > log.txt 2>&1`` gets: plain timestamped lines, no carriage returns."""
    code = textwrap.dedent("""
        import time
        from vitzoo.log import progress, setup, write
        setup(0)
        bar = progress(total=40, desc="zoo:pretrain", unit="model", interval=0.25)
        for i in range(40):
            time.sleep(0.025)
            bar.update()
            if i % 10 == 9:
                write(f"model {i} finished")
        bar.close()
    """)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, "-c", code], stdout=f, stderr=subprocess.STDOUT, timeout=120)
    assert res.returncode == 0, log.read_text()
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text
    assert sum("model" in ln and "finished" in ln for ln in lines) == 4
    progress_lines = [ln for ln in lines if "zoo:pretrain:" in ln]
    assert 2 <= len(progress_lines) <= 8, lines
    assert "40/40 model (100%)" in progress_lines[-1]


def test_generate_into_a_file_leaves_a_readable_log(tmp_path):
    """`vitzoo generate ... > log.txt 2>&1` off a terminal: plain periodic lines, no bar redraws, one line
    per finished model."""
    recipe = Path(__file__).parent / "classic_micro.yaml"
    out = tmp_path / "zoo"
    with open(tmp_path / "log.txt", "w") as f:
        res = subprocess.run([sys.executable, "-m", "vitzoo", "generate", str(recipe), "--out", str(out)],
                             stdout=f, stderr=subprocess.STDOUT, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "VITZOO_PROGRESS_INTERVAL": "0.5"})
    text = (tmp_path / "log.txt").read_text()
    assert res.returncode == 0, text[-2000:]
    assert "\r" not in text and "\x1b[" not in text and "█" not in text, "no bar redraws in a file"
    lines = text.splitlines()
    finished = [ln for ln in lines if ": done epoch 2 test_acc" in ln]
    assert len(finished) == 16, lines[-20:]
    assert len(lines) < 120, f"{len(lines)} lines: progress is periodic, not per step"
    assert not (out / ".partial").exists(), "the per-process log is scratch of an unfinished zoo"


def test_an_interrupted_generation_keeps_its_log(tmp_path):
    from vitzoo.train.generate import generate

    recipe = Path(__file__).parent / "classic_micro.yaml"
    with pytest.raises(KeyboardInterrupt):
        generate(recipe, tmp_path / "zoo", progress=False, log=vlog.write, stop_after_epoch=1)
    kept = (tmp_path / "zoo" / ".partial" / "logs" / "process-0.log").read_text()
    assert "generating mnist-cnn-s-seed-micro" in kept, kept
    generate(recipe, tmp_path / "zoo", progress=False, log=vlog.write)
    assert not (tmp_path / "zoo" / ".partial").exists()
