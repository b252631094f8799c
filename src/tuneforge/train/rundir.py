"""The life of a run directory: who may write it, when an old run may be replaced, and stopping on SIGTERM.

Rules (docs/architecture.md, "Run directory"):

* One process per run: :func:`run_lock` is an ``flock`` on ``<parent>/.<name>.lock`` (beside the run, so it stays
  put when an old run is moved aside). The kernel drops it when the process dies.
* A directory is written only when it is new, empty, or a tuneforge run (:func:`is_tuneforge_run`: the manifest
  ``tuneforge_run.json`` written first into every run, or the older ``config.yaml`` + run files).
* A fresh start never lands on an unfinished run (that is ``--resume`` or ``--overwrite``), nor on a finished one
  without ``--overwrite``.
* ``--overwrite`` moves the old run aside (a hidden sibling) only after the whole new setup was built, and
  deletes it only after the new ``final/`` exists; if the new run fails before training starts, the old one is
  put back.
* SIGTERM during training saves a complete checkpoint at the next step boundary and stops
  (:class:`SigtermStop`); elsewhere it raises :class:`tuneforge.utils.Terminated` so temporary files are removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tuneforge.console import say
from tuneforge.errors import UserError
from tuneforge.models.reference import (
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_FINAL,
    RUN_MANIFEST,
    is_run_dir,
    read_run_config,
)
from tuneforge.train import checkpoints
from tuneforge.utils import Terminated, atomic_write_json, exclusive_lock, signals_deferred

REPLACED_TAG = ".replaced-"  # hidden siblings holding runs that an --overwrite run is replacing

# The parts of a config that make a checkpoint what it is; changing one on --resume trains a different run.
SETUP_SECTIONS = ("stage", "model", "method", "data")
_SETUP_IGNORED = {"model.device"}  # where it runs, not what is trained


def lock_path(run_dir: Path) -> Path:
    """The lock file of a run: a hidden sibling, so that it does not move with the directory."""
    run_dir = Path(os.path.abspath(run_dir))
    return run_dir.with_name(f".{run_dir.name}.lock")


def run_lock(run_dir: Path):
    """Context manager: hold the run's lock, or raise :class:`UserError` if another process trains into it."""
    return exclusive_lock(lock_path(run_dir), f"run directory {run_dir}")


def is_tuneforge_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` was made by tuneforge (manifest, or the run files older versions wrote)."""
    return (Path(run_dir) / RUN_MANIFEST).is_file() or is_run_dir(run_dir)


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def check_output_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """The checks every kind of run makes first (runs and per-task parents); returns whether ``run_dir`` is a
    non-empty directory (then a tuneforge run).

    Raises:
        UserError: ``--resume`` and ``--overwrite`` together; an output directory that is a file, or non-empty and
            not a tuneforge run.
    """
    if resume and overwrite:
        raise UserError("--resume continues a run and --overwrite replaces it: pass only one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file; choose another run_name/output_dir")
    if not _non_empty(run_dir):
        return False
    if not is_tuneforge_run(run_dir):
        raise UserError(
            f"output_dir {run_dir} is a non-empty directory that is not a tuneforge run (no {RUN_MANIFEST} or "
            f"{RUN_CONFIG} with run files); tuneforge neither writes into nor replaces it. Choose another "
            "run_name/output_dir"
        )
    return True


def check_start(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a start that would lose work; writes nothing.

    Raises:
        UserError: :func:`check_output_dir`'s cases; ``--resume`` without a complete checkpoint; a finished run
            without ``--overwrite``; an unfinished run without ``--resume`` or ``--overwrite``.
    """
    exists = check_output_dir(run_dir, resume, overwrite)
    if resume:
        if not checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS):
            raise UserError(
                f"--resume: no complete checkpoint in {run_dir / RUN_CHECKPOINTS}; "
                "start the run without --resume (or set train.save_steps so checkpoints are written)"
            )
        return
    if not exists or overwrite:
        return
    if (run_dir / RUN_FINAL).exists():
        raise UserError(
            f"{run_dir} already holds a finished run; choose another run_name/output_dir, "
            "pass --overwrite, or --resume to continue its checkpoints"
        )
    latest = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
    if latest:
        raise UserError(
            f"{run_dir} holds an unfinished run (newest complete checkpoint: {latest.name}); pass --resume to "
            "continue it, or --overwrite to start again (the old run is deleted once the new one has finished)"
        )
    raise UserError(
        f"{run_dir} holds an unfinished run without a complete checkpoint; pass --overwrite to start again (the "
        "old run is deleted once the new one has finished), or choose another run_name/output_dir "
        "(--resume needs a checkpoint: train.save_steps)"
    )


def setup_changes(saved: dict, new: dict) -> list[str]:
    """``key: saved → new`` for every setup key (stage, model, method, data) that differs.

    Keys missing from ``saved`` (written by an older version) are not compared.
    """
    old_flat, new_flat = {}, {}
    for section in SETUP_SECTIONS:
        if section in saved:
            _flatten(saved[section], section, old_flat)
            _flatten(new.get(section), section, new_flat)
    changes = []
    for key in sorted(old_flat.keys() | new_flat.keys()):
        if key in _SETUP_IGNORED or not any(key == k or key.startswith(k + ".") for k in old_flat):
            continue
        if old_flat.get(key) != new_flat.get(key):
            changes.append(f"{key}: {old_flat.get(key)!r} → {new_flat.get(key)!r}")
    return changes


def _flatten(value, prefix: str, into: dict) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}", into)
    else:
        into[prefix] = value


def check_same_setup(new_config: dict, run_dir: Path, allow_change: bool) -> None:
    """On ``--resume``: the checkpoint was trained with this method, base and data, or the user said otherwise.

    Raises:
        UserError: listing every differing key, and naming ``--allow-config-change``.
    """
    saved = read_run_config(run_dir)
    changes = setup_changes(saved, new_config) if saved else []
    if not changes:
        return
    listed = "\n".join(f"  - {line}" for line in changes)
    if allow_change:
        say(f"resume: continuing with a changed setup (--allow-config-change):\n{listed}")
        return
    raise UserError(
        f"--resume: the config differs from the one {run_dir} was trained with ({run_dir / RUN_CONFIG}):\n{listed}\n"
        "resume with the same settings, or pass --allow-config-change to continue the checkpoint anyway"
    )


def stage_dir(run_dir: Path, label: str) -> Path:
    """A new hidden temporary directory beside ``run_dir`` (for parts built before the run directory is touched)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=run_dir.parent, prefix=f".{run_dir.name}.{label}-", suffix=".tmp"))


class RunStart:
    """What :func:`begin` did to the run directory, so that it can be undone or finished."""

    def __init__(self, run_dir: Path, existed: bool, aside: Path | None, replaces: list[str]):
        self.run_dir = run_dir
        self.existed = existed
        self.aside = aside
        self.replaces = replaces

    def undo(self) -> None:
        """Before training started: remove the new directory and put a replaced run back."""
        with signals_deferred():
            if self.aside is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                os.rename(self.aside, self.run_dir)
            elif not self.existed:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def finish(self) -> None:
        """After the new ``final/`` exists: delete the runs this one replaced, then forget them."""
        # ``replaces`` holds absolute paths; ``run_dir`` may be relative (``output_dir: runs/x``): compare both
        # resolved, or a relative run never deletes the run it replaced.
        siblings = Path(os.path.abspath(self.run_dir)).parent.resolve()
        for path in map(Path, self.replaces):
            if REPLACED_TAG in path.name and path.parent.resolve() == siblings and is_tuneforge_run(path):
                shutil.rmtree(path, ignore_errors=True)
                say(f"removed the replaced run {path}")
        if self.replaces:
            write_manifest(self.run_dir, [])


def begin(run_dir: Path, cfg_name: str, resume: bool, overwrite: bool) -> RunStart:
    """Make ``run_dir`` ready for a run's files and write its manifest; an ``--overwrite``'s old run goes aside."""
    existed = run_dir.exists()
    aside = None
    replaces = list(read_manifest(run_dir).get("replaces", [])) if existed else []
    with signals_deferred():  # a signal between the rename and the manifest must not leave the run half moved
        if overwrite and _non_empty(run_dir):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = run_dir.with_name(f".{run_dir.name}{REPLACED_TAG}{stamp}-{uuid.uuid4().hex[:6]}")
            os.rename(run_dir, aside)
            replaces.append(str(aside.resolve()))
        start = RunStart(run_dir, existed, aside, replaces)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume or not (run_dir / RUN_MANIFEST).is_file() or replaces:
                write_manifest(run_dir, replaces, run_name=cfg_name)
        except BaseException:
            start.undo()
            raise
    return start


def read_manifest(run_dir: Path) -> dict:
    import json

    path = Path(run_dir) / RUN_MANIFEST
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    return {}


def update_manifest(run_dir: Path, fields: dict) -> None:
    """Add ``fields`` to the run's manifest (e.g. a progressive run's ``continued_from`` and ``stack``)."""
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    atomic_write_json(Path(run_dir) / RUN_MANIFEST, manifest)


CAPABILITIES = "capabilities"  # the manifest key holding the method's declared capabilities (Method.capabilities)


def recorded_capabilities(run_dir: Path | str) -> dict | None:
    """The method capabilities recorded in the run's manifest at commit (``None`` for runs made before)."""
    caps = read_manifest(Path(run_dir)).get(CAPABILITIES)
    return caps if isinstance(caps, dict) else None


def write_manifest(run_dir: Path, replaces: list[str], run_name: str | None = None) -> None:
    """``tuneforge_run.json``: marks the directory as a tuneforge run; ``replaces`` lists runs to delete at the end."""
    from tuneforge import __version__

    manifest = read_manifest(run_dir)
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest.update({"tuneforge_run": 1, "tuneforge_version": __version__, "replaces": replaces})
    if run_name is not None:
        manifest["run_name"] = run_name
    atomic_write_json(Path(run_dir) / RUN_MANIFEST, manifest)


class SigtermStop:
    """SIGTERM handling for one training run.

    While :meth:`training` is active, the first SIGTERM asks the Trainer (through :meth:`callback`) to save a
    checkpoint at the next step boundary and stop; a second one, or one outside training, raises
    :class:`tuneforge.utils.Terminated` so that temporary directories are removed on the way out.
    """

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None  # the step whose checkpoint the stop saved
        self._training = False
        # Under torchrun a rank gets SIGTERM from SLURM and again from torchrun (which SIGKILLs after its shutdown
        # timeout): a repeat means the same stop, not "stop now".
        self._repeats_are_one = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1

    def _handle(self, signum, frame) -> None:
        if self._training and (not self.requested or self._repeats_are_one):
            self.requested = True
            return
        raise Terminated()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Install the handler for the block (main thread only; elsewhere signals cannot be handled)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The span in which SIGTERM means "checkpoint and stop" rather than "stop now"."""
        self._training = True
        try:
            yield
        finally:
            self._training = False

    def callback(self):
        """A ``TrainerCallback`` that turns a requested stop into ``should_save`` + ``should_training_stop``."""
        from transformers import TrainerCallback

        stop = self

        class SaveAndStopOnSigterm(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop.stopped_at is None and args.world_size > 1:
                    # Ranks may get the signal a step apart: all must save the same step, or they deadlock.
                    from tuneforge.train.distributed import any_rank

                    stop.requested = any_rank(stop.requested)
                if stop.requested and stop.stopped_at is None:
                    stop.stopped_at = state.global_step
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return SaveAndStopOnSigterm()
