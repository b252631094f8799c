"""Checkpoints that are never resumed half-written.

The HF Trainer writes a checkpoint directory file by file. We flush every file to disk (fsync) and then write a
``COMPLETE`` marker, rotate old checkpoints ourselves only after that, and resume only from a marked
checkpoint. A directory without a marker is what a killed process left behind: it is moved aside, never used.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

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


def _saved_shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the weights saved in ``checkpoint`` (adapter or model safetensors, sharded or not),
    read from the file headers only."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("adapter_model.safetensors")) or sorted(checkpoint.glob("model*.safetensors"))
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _model_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of what the Trainer would save of ``model`` (the adapter of a peft model)."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def checkpoint_mismatch(model: Any, checkpoint: Path) -> str | None:
    """Why ``model`` cannot load ``checkpoint``'s weights (a tensor the model lacks, or of another shape), or None.

    Only names both sides use the same way are compared: a checkpoint with no safetensors weights (another
    format) gives None, and the load itself is left to the Trainer.
    """
    saved = _saved_shapes(Path(checkpoint))
    if not saved:
        return None
    mine = _model_shapes(model)
    for name, shape in saved.items():
        if name not in mine:
            return f"the checkpoint holds {name}, which this model does not have"
        if mine[name] != shape:
            return f"{name} has shape {list(shape)} in the checkpoint but {list(mine[name])} in this model"
    missing = sorted(set(mine) - set(saved))
    if missing and not (Path(checkpoint) / "adapter_model.safetensors").is_file():
        return None  # a full model's checkpoint may leave out tied weights: only adapters must match exactly
    if missing:
        return f"this model has {missing[0]}, which the checkpoint does not hold"
    return None
