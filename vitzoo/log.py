"""Logging and progress for vitzoo: quiet as a library, readable from the CLI, no bar spam in log files.

* Every module logs to a child of the ``"vitzoo"`` logger (``logging.getLogger(__name__)``). The
  library attaches only a :class:`logging.NullHandler`: nothing is printed unless the application
  configures logging (``logging.basicConfig(level=logging.INFO)`` shows vitzoo's INFO lines).
* The CLI calls :func:`setup`: INFO and above on stderr by default, WARNING with ``-q``, DEBUG with
  ``-v``, and optionally everything (DEBUG) in a log file.
* :func:`progress` gives a tqdm bar when stderr is a terminal (or in a notebook) and otherwise an
  object with the same ``update/close/set_postfix`` methods that logs one plain line at most every
  ``interval`` seconds (counts, rate, time left), so ``vitzoo generate ... > log.txt 2>&1`` (a Slurm
  job) leaves a readable log instead of thousands of ``\\r``-separated bar redraws.
* :func:`write` prints one line above the active bars on a terminal and logs it otherwise.

This module imports only the standard library (tqdm when a bar is actually made).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

LOGGER_NAME = "vitzoo"
logger = logging.getLogger(LOGGER_NAME)
logger.addHandler(logging.NullHandler())  # a library is silent until the application says otherwise

PROGRESS_INTERVAL_S = 30.0
"""Default seconds between two plain progress lines off a terminal (``VITZOO_PROGRESS_INTERVAL`` overrides)."""

_FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def _interactive() -> bool:
    """stderr is a terminal, or we run in a Jupyter kernel (tqdm.auto draws widgets there)."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # a closed or odd stream
        return False
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001 - any failure means "not a notebook"
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


# ============================================================================ handlers
class _ConsoleFormatter(logging.Formatter):
    """INFO lines as they are; other levels prefixed; timestamps off a terminal (log files)."""

    def __init__(self, timestamps: bool) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if not getattr(record, "plain", False) and record.levelno != logging.INFO:
            msg = f"{record.levelname.lower()}: {msg}"
        if self.timestamps:
            msg = f"{self.formatTime(record, self.datefmt)} {msg}"
        return msg


class _ConsoleHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (pytest's capture, a redirected stream),
    through ``tqdm.write`` on a terminal so that active progress bars are redrawn below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            if stream is None:
                return
            if _interactive():
                from tqdm.auto import tqdm

                tqdm.write(msg, file=stream)
            else:
                stream.write(msg + "\n")
                stream.flush()
        except RecursionError:  # pragma: no cover - as logging.StreamHandler
            raise
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _level(verbosity: int) -> int:
    if verbosity >= 1:
        return logging.DEBUG
    if verbosity == 0:
        return logging.INFO
    if verbosity == -1:
        return logging.WARNING
    return logging.ERROR


def setup(verbosity: int = 0, log_file: str | os.PathLike[str] | None = None) -> logging.Logger:
    """Configure the ``vitzoo`` logger for a command-line run; returns it.

    ``verbosity`` 0 shows INFO and above on stderr, -1 (``-q``) WARNING, -2 (``-qq``) ERROR only,
    1 (``-v``) DEBUG. ``log_file`` additionally receives every record (DEBUG, with time, pid and
    logger name), appended. Calling it again replaces what an earlier call installed; :func:`teardown`
    removes it (the CLI's ``main`` does, so that tests calling it leave no handlers behind).
    Records still propagate to the root logger, which has no handlers in a CLI process.
    """
    teardown()
    console = _ConsoleHandler(level=_level(verbosity))
    console.setFormatter(_ConsoleFormatter(timestamps=not _interactive()))
    _installed.append(console)
    logger.addHandler(console)
    level = console.level
    if log_file is not None:
        _installed.append(add_log_file(log_file))
        level = logging.DEBUG
    logger.setLevel(level)
    return logger


def teardown() -> None:
    """Undo :func:`setup`: its handlers removed and closed, the logger's level reset."""
    while _installed:
        h = _installed.pop()
        logger.removeHandler(h)
        h.close()
    logger.setLevel(logging.NOTSET)


_installed: list[logging.Handler] = []


def add_log_file(path: str | os.PathLike[str], level: int = logging.DEBUG) -> logging.Handler:
    """Append the ``vitzoo`` records at ``level`` and above to ``path`` (parents created); returns the
    handler, for ``logger.removeHandler``. For a per-process log (e.g. ``<zoo>/.partial/logs/``) while
    generating. Lowers the logger's level if needed so the file gets its records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


def _has_output(lg: logging.Logger, level: int) -> bool:
    """Whether a record at ``level`` on ``lg`` reaches a handler that writes somewhere."""
    if not lg.isEnabledFor(level):
        return False
    current: logging.Logger | None = lg
    while current is not None:
        # Log files (the zoo's per-process log, --log-file) are not output the user sees.
        if any(not isinstance(h, (logging.NullHandler, logging.FileHandler)) and level >= h.level
               for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


def write(msg: str, level: int = logging.INFO, log: logging.Logger | None = None) -> None:
    """One line for the user, e.g. "model X finished": above the active bars on a terminal, logged otherwise.

    When logging is configured (the CLI, or an application's own handlers) the line goes through the
    logger, and so obeys ``-q`` and reaches the log file; the CLI's console handler itself writes
    through ``tqdm.write`` on a terminal. A library user without logging configured still sees the
    line on a terminal (``tqdm.write``); off a terminal it is logged, i.e. silent by default.
    """
    lg = log or logger
    lg.log(level, msg)  # whatever is configured: the CLI's console, an application's handlers, log files
    if _has_output(lg, level) or not _interactive():
        return
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


# ============================================================================ progress
def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, m = divmod(minutes, 60)
    return f"{hours} h {m:02d} min"


def _fmt_count(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{n:.4g}"


class LogProgress:
    """A stand-in for a tqdm bar off a terminal: the same ``update/close/set_postfix`` calls, but the
    output is one plain log line at most every ``interval`` seconds, e.g.::

        zoo:pretrain: 12/40 models (30%), 0.42 models/s, 28 s elapsed, ~1 min 07 s left, loss=0.31

    A final line is logged on ``close`` when ``leave`` is true (tqdm's default) or when a line was
    already logged for this bar; short-lived inner bars (``leave=False``) thus add nothing to the log.
    """

    def __init__(self, total: float | None = None, desc: str | None = None, *, interval: float | None = None,
                 unit: str = "it", initial: float = 0, leave: bool | None = True, disable: bool = False,
                 log: logging.Logger | None = None, level: int = logging.INFO, **_ignored: Any) -> None:
        self.total = total
        self.desc = desc or ""
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.leave = leave is None or bool(leave)
        self.disable = disable
        self.interval = float(interval if interval is not None else
                              os.environ.get("VITZOO_PROGRESS_INTERVAL", PROGRESS_INTERVAL_S))
        self.postfix = ""
        self._log = log or logging.getLogger(f"{LOGGER_NAME}.progress")
        self._level = level
        self._start = time.monotonic()
        self._last_emit = self._start
        self._emitted_n: float | None = None
        self._closed = False

    # -- tqdm's interface, as far as vitzoo uses it
    def update(self, n: float = 1) -> None:
        if self._closed or self.disable:
            return
        self.n += n
        now = time.monotonic()
        if now - self._last_emit >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={_fmt_value(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def reset(self, total: float | None = None) -> None:
        self.n = self.initial = 0
        if total is not None:
            self.total = total
        self._start = self._last_emit = time.monotonic()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.disable:
            return
        if (self.leave or self._emitted_n is not None) and self._emitted_n != self.n:
            self._emit(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # as tqdm: a bar dropped without close() still ends
        try:
            if not self._closed and self._emitted_n is not None:
                self.close()
        except Exception:  # noqa: BLE001 - never raise from __del__
            pass

    # -- the line
    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        done = self.n - self.initial
        rate = done / elapsed
        parts = [f"{_fmt_count(self.n)}/{_fmt_count(self.total)} {self.unit}" if self.total else
                 f"{_fmt_count(self.n)} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if done > 0:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
        parts.append(f"{_fmt_duration(elapsed)} elapsed")
        if self.total and done > 0 and self.n < self.total:
            parts.append(f"~{_fmt_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _emit(self, now: float) -> None:
        self._last_emit = now
        self._emitted_n = self.n
        self._log.log(self._level, "%s", self.line(now))


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def progress(total: float | None = None, desc: str | None = None, *, interval: float | None = None,
             **kw: Any) -> Any:
    """A progress bar: ``tqdm.auto.tqdm(total=total, desc=desc, **kw)`` when stderr is a terminal (or in a
    notebook), else a :class:`LogProgress` that logs a plain line at most every ``interval`` seconds
    (default :data:`PROGRESS_INTERVAL_S`, or ``VITZOO_PROGRESS_INTERVAL``). Both have ``update``,
    ``close``, ``set_postfix``, ``set_description``, ``n`` and ``total``, and are context managers.
    """
    if _interactive():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, **kw)
    return LogProgress(total, desc, interval=interval, **kw)


__all__ = ["LOGGER_NAME", "PROGRESS_INTERVAL_S", "LogProgress", "add_log_file", "logger", "progress", "setup",
           "teardown", "write"]
