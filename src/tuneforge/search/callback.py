"""The Trainer callback of a search trial: every eval is reported, the last step is always evaluated, and a
pruned trial stops training (its run directory then holds fewer steps)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback


class TrialCallback(TrainerCallback):
    """Collect ``eval_loss`` per step, report it, and stop training when ``report`` says to prune.

    Args:
        report: ``report(step, eval_loss) -> prune?`` (None: collect only, never stop).
    """

    def __init__(self, report: Callable[[int, float], bool] | None = None):
        self.report = report
        self.evals: list[tuple[int, float]] = []
        self.pruned_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        # The objective is the eval at the end of training, whatever train.eval_steps divides.
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_loss")
        if value is None:
            return control
        self.evals.append((state.global_step, float(value)))
        if self.report is None:
            return control
        prune = self.report(state.global_step, float(value))
        if prune and state.global_step < state.max_steps:
            self.pruned_at = state.global_step
            control.should_training_stop = True
        return control
