"""What a training run ends with: its result, or the two ways it stops early (light module, no heavy imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError


class TrainingStopped(UserError):
    """Training was stopped by the stability monitor (e.g. NaN loss); the last good checkpoint is kept."""

    exit_code = 3


class TrainingInterrupted(UserError):
    """SIGTERM arrived during training: a complete checkpoint was saved and ``--resume`` continues from it.

    Exit code 75 (``EX_TEMPFAIL``: try again later), so a job script can tell "resume me" from a failure.
    """

    exit_code = 75


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_dir: Path
    final_dir: Path
    summary: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the trained model in memory (for callers in the same process)
