"""rsLoRA — Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA".

``W = W0 + γ_r · B A`` with the rank-stabilised scale ``γ_r = α / √r`` instead of LoRA's ``α / r``: with ``α/r``
the update's magnitude (and its gradients) collapse as ``r`` grows, so higher ranks learn no better; ``α/√r``
keeps them stable, and larger ranks then help. Everything else is LoRA (peft ``use_rslora=True``); mergeable.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import RsLoraMethodConfig
from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod


class RsLoraMethod(LoraMethod):
    """LoRA with the rank-stabilised scaling ``alpha / sqrt(r)``."""

    reference = "Kalajdzievski, 2023 — A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """LoRA's options for ``cfg`` with ``use_rslora=True``."""
        return {**super().lora_options(cfg, model), "use_rslora": True}


register(RsLoraMethodConfig, RsLoraMethod)
