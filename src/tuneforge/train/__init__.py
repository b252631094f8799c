"""Training: the front door :func:`train` over the named phases (prepare → commit → fit → finish, train/phases.py),
the run directory, checkpoints, callbacks, per-task and progressive runs, the distributed launcher, quickstart."""

from tuneforge.train.front import train

__all__ = ["train"]
