"""Training stages beyond pt/sft: one small strategy module each, declared in :mod:`tuneforge.config.stages`.

A stage's declaration (``StageSpec``: config section, data kind, defaults) is pure and read by the schema; its
``trainer`` names the module here whose ``stage(name)`` returns the strategy (:class:`~.base.Stage`), which gives
the trainer three things (``tuneforge.train`` keeps everything else: run directory, model loading, method
application, checkpoints, final save, metrics and the stability monitor):

- ``tokenizer_texts(data_cfg)``: the text a from-config model's tokenizer is trained on;
- ``build_data(cfg, tokenizer, template)``: encoded rows and statistics (:class:`PreferenceBundle`);
- ``build_trainer(cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class)``: a
  trainer built from the run's ``TrainingArguments``, callbacks and optimizer; ``trainer_class(base)`` returns
  the checkpoint-marking subclass of ``base``.

Stages: ``dpo`` and ``kto`` (TRL's trainers), ``orpo`` and ``simpo`` (reference-free, losses as TRL's CPO/ORPO),
``grpo`` (TRL's GRPOTrainer with tuneforge rewards). See docs/preference.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from tuneforge.config.stages import STAGES


def get_stage(name: str) -> Any | None:
    """The stage object for ``name``, or None for stages the causal-LM trainer runs itself (``pt``/``sft``)."""
    spec = STAGES[name]
    if spec.trainer is None:
        return None
    return importlib.import_module(spec.trainer).stage(name)
