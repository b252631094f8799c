"""PiSSA — Meng, Wang & Zhang, 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models" (NeurIPS 2024).

LoRA's architecture with a different start: from the SVD ``W0 = U S Vᵀ``, the adapter takes the principal part,
``A = S[:r]^½ Vᵀ[:r]``, ``B = U[:, :r] S[:r]^½``, and the frozen base keeps the residual ``W_res = W0 − B A``; so
the model is unchanged at step 0 while training moves the principal directions (faster convergence than LoRA's
zero-init ``B``). ``niter`` uses the fast randomised SVD (peft ``init_lora_weights="pissa_niter_<n>"``).

Because the base weights are changed to ``W_res``, the adapter as trained only fits that residual base. For the
final adapter use :meth:`PissaMethod.save_adapter`: it converts the trained adapter into an ordinary LoRA adapter
(rank 2r, ``ΔW = B A − B0 A0``) that applies to the *original* base, via peft's
``path_initial_model_for_weight_conversion``. Intermediate checkpoints stay in the residual form (resume needs it).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tuneforge.methods.base import register
from tuneforge.methods.lora import LoraMethod

#: attribute set on the peft model by :meth:`PissaMethod.apply`: directory of the initial (step 0) adapter
INIT_ATTR = "_tuneforge_pissa_init_dir"


@register("pissa")
class PissaMethod(LoraMethod):
    """LoRA initialised from the principal singular vectors; exported as a plain LoRA adapter."""

    reference = "Meng et al., 2024 — PiSSA: Principal Singular Values and Singular Vectors Adaptation"
    mergeable = True
    is_adapter = True

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """LoRA's options for ``cfg`` with ``init_lora_weights`` = ``pissa`` or ``pissa_niter_<niter>``."""
        init = "pissa" if getattr(cfg, "niter", None) is None else f"pissa_niter_{cfg.niter}"
        return {**super().lora_options(cfg, model), "init_lora_weights": init}

    def apply(self, model: Any, cfg: Any) -> Any:
        """LoRA with PiSSA initialisation; the step-0 adapter is saved aside for :meth:`save_adapter`."""
        peft_model = super().apply(model, cfg)
        init_dir = Path(tempfile.mkdtemp(prefix="tuneforge-pissa-")) / "pissa_init"
        peft_model.save_pretrained(str(init_dir))
        setattr(peft_model, INIT_ATTR, str(init_dir))
        return peft_model

    def save_adapter(self, model: Any, out_dir: str | Path) -> None:
        """Save ``model``'s adapter as a standard LoRA adapter for the original (unmodified) base model.

        Loading it with ``PeftModel.from_pretrained(original_base, out_dir)`` reproduces the trained model's
        logits. Raises ``ValueError`` when ``model`` did not come from :meth:`apply`.
        """
        init_dir = getattr(model, INIT_ATTR, None)
        if init_dir is None:
            raise ValueError("save_adapter needs the model returned by PissaMethod.apply (its step-0 adapter)")
        model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=init_dir)
