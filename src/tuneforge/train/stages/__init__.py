"""Training stages beyond pt/sft: one small strategy module each, found by name here.

A stage gives ``run_training`` three things (train/run.py keeps everything else: run directory, model loading,
method application, checkpoints, final save, metrics and the stability monitor):

- ``tokenizer_texts(data_cfg)``: the text a from-config model's tokenizer is trained on;
- ``build_data(cfg, tokenizer, template)``: encoded rows and statistics (:class:`PreferenceBundle`);
- ``build_trainer(cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class)``: a
  trainer built from run.py's ``TrainingArguments``, callbacks and optimizer; ``trainer_class(base)`` returns
  run.py's checkpoint-marking subclass of ``base``.

Stages: ``dpo`` and ``kto`` (TRL's trainers), ``orpo`` and ``simpo`` (reference-free, losses as TRL's CPO/ORPO),
``grpo`` (TRL's GRPOTrainer with tuneforge rewards). See docs/preference.md.
"""

from __future__ import annotations

from typing import Any

STAGE_MODULES = {
    "dpo": "tuneforge.train.stages.dpo",
    "kto": "tuneforge.train.stages.kto",
    "orpo": "tuneforge.train.stages.pairwise",
    "simpo": "tuneforge.train.stages.pairwise",
    "grpo": "tuneforge.train.stages.grpo",
}


def get_stage(name: str) -> Any | None:
    """The stage object for ``name``, or None for ``pt``/``sft`` (built by train/run.py itself)."""
    if name not in STAGE_MODULES:
        return None
    import importlib

    return importlib.import_module(STAGE_MODULES[name]).stage(name)
