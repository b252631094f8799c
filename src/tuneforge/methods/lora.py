"""LoRA — Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

A frozen weight ``W`` (d_out x d_in) is adapted as ``W + (alpha / r) * B @ A`` with ``A`` (r x d_in, random) and
``B`` (d_out x r, zero at start), so training starts from the base model exactly and only ``r * (d_in + d_out)``
numbers per layer train. rsLoRA (Kalajdzievski, 2023) scales by ``alpha / sqrt(r)`` instead; DoRA (Liu et al.,
2024) trains a magnitude vector and a LoRA-updated direction. Both are options here and the basis of their own
methods.

The layers are peft's; this module turns the run config into a ``peft.LoraConfig`` with ``target_modules``
resolved per architecture (:func:`tuneforge.models.targets.resolve_target_modules`). Subclasses (dora, rslora,
pissa, lora_plus...) override :meth:`LoraMethod.lora_options` or :meth:`LoraMethod.peft_config`.
"""

from __future__ import annotations

from typing import Any

from tuneforge.methods.base import Method, register

# method.init → peft's init_lora_weights
INIT_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}


@register("lora")
class LoraMethod(Method):
    """LoRA adapters on the resolved target modules; everything else frozen."""

    reference = "Hu et al., 2021. LoRA: Low-Rank Adaptation of Large Language Models. arXiv:2106.09685"
    mergeable = True
    is_adapter = True

    def target_modules(self, model: Any, cfg: Any) -> list[str]:
        """``cfg.target_modules`` resolved for ``model`` (raises ``UserError`` when nothing matches)."""
        from tuneforge.models.targets import resolve_target_modules

        return resolve_target_modules(model, cfg.target_modules)

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """Keyword arguments for ``peft.LoraConfig``; subclasses update this dict (e.g. ``use_dora=True``)."""
        from tuneforge.models.targets import targets_conv1d

        targets = self.target_modules(model, cfg)
        _refuse_tied_output_layer(model, targets)
        return dict(
            task_type="CAUSAL_LM",
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            bias=cfg.bias,
            target_modules=targets,
            modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
            use_rslora=bool(getattr(cfg, "use_rslora", False)),
            use_dora=bool(getattr(cfg, "use_dora", False)),
            init_lora_weights=INIT_WEIGHTS[getattr(cfg, "init", "default")],
            # GPT-2's Conv1D stores weights transposed (in x out); peft must know to transpose.
            fan_in_fan_out=targets_conv1d(model, targets),
        )

    def peft_config(self, cfg: Any, model: Any):
        """The ``peft.LoraConfig`` for ``cfg`` on ``model``."""
        from peft import LoraConfig

        return LoraConfig(**self.lora_options(cfg, model))

    def apply(self, model: Any, cfg: Any) -> Any:
        """Wrap ``model`` in a ``peft.PeftModel``: only the LoRA matrices (and ``modules_to_save``) train."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(cfg, model))


def _refuse_tied_output_layer(model: Any, targets: list[str]) -> None:
    """An adapter on an output layer that shares its weight with the input embeddings cannot be merged: folding
    the delta into the shared tensor would change the input embeddings too (merged logits drift, seen here by 15)."""
    from tuneforge.errors import UserError

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if output is None or not tied:
        return
    names = {name for name, module in model.named_modules() if module is output}
    hit = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if hit:
        raise UserError(
            f"method.target_modules includes {hit[0]!r}, the output layer, which this model ties to its input "
            "embeddings (tie_word_embeddings): an adapter there could never be merged. Drop it from target_modules, "
            "or use a model with untied embeddings (from_config: tie_word_embeddings: false)"
        )
