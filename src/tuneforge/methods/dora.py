"""DoRA — Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (ICML 2024).

The weight is split into a magnitude and a direction and LoRA adapts only the direction:
``W' = m · (W0 + (α/r)·B A) / ||W0 + (α/r)·B A||_c``, with ``||·||_c`` the column-wise (per output feature) norm,
``m`` a trained vector initialised to ``||W0||_c`` (so training starts from the base model), ``B`` initialised to 0.
Trained: ``A``, ``B`` and ``m``. peft's ``use_dora=True``; mergeable like LoRA.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import DoraMethodConfig
from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod


class DoraMethod(LoraMethod):
    """LoRA with weight decomposition (peft ``LoraConfig(use_dora=True)``)."""

    reference = "Liu et al., 2024 — DoRA: Weight-Decomposed Low-Rank Adaptation"
    priced_as = "dora"

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """LoRA's options for ``cfg`` with ``use_dora=True``."""
        return {**super().lora_options(cfg, model), "use_dora": True}


register(DoraMethodConfig, DoraMethod)
