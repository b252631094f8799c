"""The training front door: ``tuneforge.train.train(cfg)`` picks a per-task parent run or one plain run.

A plain run is also a progressive one when ``method.continue_from`` is set (the earlier adapters are merged into
the base in the ``prepare`` phase, :mod:`tuneforge.train.phases`). The CLI (``tuneforge train``), ``tuneforge
search`` and the quickstart call this function; it sits above :mod:`tuneforge.train.per_task`, which trains its
task runs through :func:`tuneforge.train.phases.run`.
"""

from __future__ import annotations

from typing import Any


def train(cfg: Any, resume: bool = False, overwrite: bool = False, callbacks: list | None = None,
          allow_config_change: bool = False):
    """Train the run described by ``cfg`` and write its run directory.

    The whole setup (config, model, template, data, method, target modules) is built before the run directory is
    touched, so bad input never damages an existing run (docs/architecture.md, "Run directory"). Progress lines go
    through :func:`tuneforge.console.say` (silence them with :func:`tuneforge.console.silenced`).

    Args:
        cfg: a validated :class:`~tuneforge.config.RunConfig`.
        resume: continue from the newest complete checkpoint in ``<output_dir>/checkpoints``.
        overwrite: replace the tuneforge run (finished or not) in the output directory; the old run is moved aside
            once the new setup is built and deleted once the new ``final/`` exists.
        callbacks: extra ``transformers.TrainerCallback`` objects, appended after tuneforge's own
            (``tuneforge search`` reports intermediate evals and stops pruned trials through one).
        allow_config_change: with ``resume``, continue even though stage, model, method or data differ from the
            run's saved ``config.yaml``.

    Returns:
        a :class:`~tuneforge.train.results.TrainResult`.

    Raises:
        UserError: for anything the user can fix (data, paths, options), before a file is written; also a fresh
            start over an unfinished run, a directory that is not a tuneforge run, a run another process holds.
        TrainingStopped: when the stability monitor stopped training.
        TrainingInterrupted: SIGTERM during training (a complete checkpoint was saved first).
    """
    if getattr(cfg.method, "per_task", False):  # one adapter per task: a parent run of task runs
        from tuneforge.train.per_task import run_per_task

        return run_per_task(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks,
                            allow_config_change=allow_config_change)
    from tuneforge.train.phases import run

    return run(cfg, resume=resume, overwrite=overwrite, callbacks=callbacks, allow_config_change=allow_config_change)
