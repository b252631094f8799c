"""The part every data-driven stage shares: which records it reads and how a from-config tokenizer sees them."""

from __future__ import annotations

from typing import Any


class Stage:
    """Base of the stage strategies (see :mod:`tuneforge.train.stages`)."""

    def __init__(self, name: str):
        from tuneforge.config.stages import STAGES

        self.name = name
        #: the record kind read (data/preference.py): paired | unpaired | prompt (the stage registry's ``data``)
        self.kind = STAGES[name].data

    def tokenizer_texts(self, data_cfg: Any) -> list[str]:
        """Every message content (and, for prompts, every string field) of the training records."""
        from tuneforge.data.preference import stage_tokenizer_texts

        return stage_tokenizer_texts(data_cfg, self.kind)

    def build_data(self, cfg: Any, tokenizer: Any, template: Any):
        """Encoded rows and statistics for this stage."""
        from tuneforge.data.preference import build_preference_data

        return build_preference_data(cfg.data, self.name, tokenizer, template, seed=cfg.seed)
