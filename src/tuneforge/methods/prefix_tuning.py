"""Prefix tuning — Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021).

Every attention layer ``l`` attends over ``m`` trained virtual positions before the real ones:
``head = Attn(x W_q, [P_k^l ; x W_k], [P_v^l ; x W_v])`` with ``P_k^l, P_v^l ∈ R^{m×d}`` the only trained
parameters (``m`` = ``num_virtual_tokens``). With ``prefix_projection`` the prefixes are produced by a small MLP
over an ``m × d`` embedding (the paper's reparameterisation for stable training).

The prefixes are extra keys/values, not a weight delta: the adapter cannot be merged into the base model
(``mergeable = False``); serve it as a PEFT adapter.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import PrefixTuningMethodConfig
from tuneforge.methods.base import Method, register


class PrefixTuningMethod(Method):
    """Trained key/value prefixes in every layer (peft ``PrefixTuningConfig``)."""

    reference = "Li & Liang, 2021 — Prefix-Tuning: Optimizing Continuous Prompts for Generation"
    mergeable = False
    is_adapter = True

    def peft_config(self, cfg: Any, model: Any):
        """The ``peft.PrefixTuningConfig`` for ``cfg``."""
        from peft import PrefixTuningConfig

        kwargs = {}
        if cfg.prefix_projection:
            kwargs["encoder_hidden_size"] = model.config.hidden_size
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=cfg.num_virtual_tokens,
            prefix_projection=cfg.prefix_projection,
            **kwargs,
        )

    def apply(self, model: Any, cfg: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(cfg, model))


register(PrefixTuningMethodConfig, PrefixTuningMethod)
