"""Checkpoints that are never resumed half-written.

The HF Trainer writes a checkpoint directory file by file. We flush every file to disk (fsync) and then write a
``COMPLETE`` marker, rotate old checkpoints ourselves only after that, and resume only from a marked
checkpoint. A directory without a marker is what a killed process left behind: it is moved aside, never used.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """The global step encoded in a ``checkpoint-N`` directory name, or None."""
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Marked checkpoints under ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None and (p / MARKER).is_file()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(folder)
    return found[-1] if found else None


def mark_complete(checkpoint: str | Path) -> None:
    """Flush the checkpoint's files to disk, then write the marker (the last thing written into a checkpoint).

    Without the flush a power loss could keep the marker but lose file contents still in the page cache.
    """
    from tuneforge.utils import atomic_write_text, fsync_tree

    fsync_tree(checkpoint)
    atomic_write_text(Path(checkpoint) / MARKER, "ok\n")


def discard_incomplete(folder: str | Path) -> list[Path]:
    """Remove checkpoint directories that have no marker (left by a killed run); return what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and checkpoint_step(path) is not None and not (path / MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def rotate(folder: str | Path, keep: int | None, protect: str | Path | None = None) -> None:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain (the newest and ``protect`` stay)."""
    if not keep:
        return
    found = complete_checkpoints(folder)
    protected = {found[-1]} if found else set()
    if protect:
        protected.add(Path(protect))
    excess = len(found) - max(keep, len(protected))
    for path in found:
        if excess <= 0:
            break
        if path not in protected:
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1
