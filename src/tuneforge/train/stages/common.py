"""Pieces the stages share: TRL config from run.py's TrainingArguments, datasets, metrics.

Sequence log-probs are model-side scoring: ``tuneforge.models.scoring.sequence_logps``.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

from tuneforge.errors import UserError


def trl_args(args: Any, config_class: type, **overrides) -> Any:
    """``config_class`` (a TRL ``*Config``) with every TrainingArguments value of ``args``, then ``overrides``.

    Sampling is random (run.py's length grouping needs an ``input_ids`` column these rows do not have) unless
    overridden, and TRL's own defaults that differ from the Trainer's (gradient checkpointing on, bf16 on) are
    replaced by the run's values because every field is copied.
    """
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
    values["train_sampling_strategy"] = "random"
    values.update(overrides)
    return config_class(**values)


def to_dataset(rows: list[dict] | None):
    """A ``datasets.Dataset`` of encoded rows (TRL trainers require one), or None."""
    if not rows:
        return None
    from datasets import Dataset

    return Dataset.from_list(rows)


def check_no_lm_head_adapter(model: Any) -> None:
    """TRL computes log-probs from ``lm_head.weight`` directly: an adapter there would silently never train."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise UserError(
            "method.target_modules puts an adapter on the output layer (lm_head), which TRL's preference and GRPO "
            "losses never train (they read lm_head.weight directly); list the modules without lm_head "
            "(e.g. target_modules: all-linear)"
        )


class StepMetrics:
    """Per-step metric values averaged into the next ``log`` call (as TRL's trainers do)."""

    def __init__(self):
        self.values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def add(self, mode: str, **values: float) -> None:
        for key, value in values.items():
            self.values[mode][key].append(float(value))

    def pop(self, mode: str) -> dict[str, float]:
        prefix = "eval_" if mode == "eval" else ""
        out = {f"{prefix}{k}": sum(v) / len(v) for k, v in self.values[mode].items() if v}
        self.values[mode].clear()
        return out


def remove_adapter_callback(adapter_name: str):
    """A callback that deletes a helper adapter (TRL's frozen ``ref`` copy) when training ends, before final/ is saved."""
    from transformers import TrainerCallback

    class RemoveAdapter(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            if model is not None and adapter_name in getattr(model, "peft_config", {}):
                model.delete_adapter(adapter_name)

    return RemoveAdapter()
