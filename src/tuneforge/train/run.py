"""The former training entry, kept as an alias while callers move to :func:`tuneforge.train.train`.

The run itself is in :mod:`tuneforge.train.phases` (prepare → commit → fit → finish), the Trainer in
:mod:`tuneforge.train.trainer`, the end-of-run files in :mod:`tuneforge.train.outputs`.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any

from tuneforge.train.front import train
from tuneforge.train.results import TrainingInterrupted, TrainingStopped, TrainResult

__all__ = ["TrainResult", "TrainingInterrupted", "TrainingStopped", "run_training"]


def run_training(cfg: Any, resume: bool = False, overwrite: bool = False, echo: Callable | None = None,
                 callbacks: list | None = None, allow_config_change: bool = False) -> TrainResult:
    """:func:`tuneforge.train.train`; ``echo`` (deprecated) receives the run's lines instead of stdout."""
    kwargs = dict(resume=resume, overwrite=overwrite, callbacks=callbacks, allow_config_change=allow_config_change)
    if echo is None or echo is print:
        return train(cfg, **kwargs)
    with contextlib.redirect_stdout(_Lines(echo, sys.stdout)):
        return train(cfg, **kwargs)


class _Lines(io.TextIOBase):
    """A text stream that hands every complete line to ``echo``."""

    def __init__(self, echo: Callable, stdout: Any) -> None:
        self.echo = echo
        self.stdout = stdout  # what an echo that prints itself (console.say) writes to
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        with contextlib.redirect_stdout(self.stdout):
            for line in lines:
                self.echo(line)
        return len(text)
