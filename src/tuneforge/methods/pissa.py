"""PiSSA — Meng, Wang & Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (NeurIPS 2024).

LoRA's architecture with a different start: from the SVD ``W0 = U S Vᵀ``, the adapter takes the principal part,
``A = S[:r]^½ Vᵀ[:r]``, ``B = U[:, :r] S[:r]^½``, and the frozen base keeps the residual ``W_res = W0 − B A``; so
the model is unchanged at step 0 while training moves the principal directions (faster convergence than LoRA's
zero-init ``B``). ``niter`` uses the fast randomised SVD (peft ``init_lora_weights="pissa_niter_<n>"``).

Because the base weights are changed to ``W_res``, the adapter as trained only fits that residual base; the final
adapter is converted into an ordinary LoRA adapter for the *original* base by
:meth:`tuneforge.methods.lora.LoraMethod.save_adapter` (as for ``lora`` with ``init: pissa``).
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import PissaMethodConfig
from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod


class PissaMethod(LoraMethod):
    """LoRA initialised from the principal singular vectors; exported as a plain LoRA adapter."""

    reference = "Meng et al., 2024 — PiSSA: Principal Singular Values and Singular Vectors Adaptation"
    changes_base = True  # the principal components move from the base weights into the adapter
    shardable = False  # the final conversion for the original base needs the unsharded model

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """LoRA's options for ``cfg`` with ``init_lora_weights`` = ``pissa`` or ``pissa_niter_<niter>``."""
        init = "pissa" if cfg.niter is None else f"pissa_niter_{cfg.niter}"
        return {**super().lora_options(cfg, model), "init_lora_weights": init}


register(PissaMethodConfig, PissaMethod)
