"""THE console: one rich console for tables and progress, logging configured once by the CLI.

Commands print results (tables, answers) to ``out`` (stdout) and everything about the work in progress (logs,
warnings, progress bars) to ``err`` (stderr), so piping a command's output stays clean. ``-q`` / ``-v`` on the
command line set the log level of every tuneforge logger at once (:func:`configure_logging`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

# verbosity (-q = -1, default 0, -v = 1, -vv = 2) → level of the tuneforge loggers
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


@functools.lru_cache(maxsize=1)
def out() -> Any:
    """The rich console for results (stdout)."""
    from rich.console import Console

    return Console()


@functools.lru_cache(maxsize=1)
def err() -> Any:
    """The rich console for logs, warnings and progress (stderr)."""
    from rich.console import Console

    return Console(stderr=True)


_silenced = 0


def say(message: Any = "") -> None:
    """One plain line about the work (what ``echo=print`` parameters used to take): to stdout, without rich markup
    or wrapping, so a log file gets it verbatim. Nothing is printed inside :func:`silenced`."""
    if not _silenced:
        print(message, flush=True)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Drop :func:`say` lines while the block runs (e.g. the training lines of a search trial)."""
    global _silenced
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1


def configure_logging(verbosity: int = 0) -> None:
    """Route tuneforge's loggers through rich on stderr at the level ``verbosity`` asks for.

    Libraries stay at WARNING unless ``verbosity >= 2`` (then everything is at DEBUG).
    """
    from rich.logging import RichHandler

    level = _LEVELS[max(-1, min(1, verbosity))]
    handler = RichHandler(console=err(), show_time=False, show_path=verbosity >= 1, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    logging.getLogger("tuneforge").setLevel(level)


def warn(message: str, advice: str | None = None) -> None:
    """A highlighted warning on stderr (with optional advice on a second line)."""
    from rich.markup import escape

    text = f"[bold yellow]warning[/] {escape(message)}"
    if advice:
        text += f"\n  [dim]advice: {escape(advice)}[/]"
    err().print(text)
