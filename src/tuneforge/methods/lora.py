"""LoRA — Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

A frozen weight ``W`` (d_out x d_in) is adapted as ``W + (alpha / r) * B @ A`` with ``A`` (r x d_in, random) and
``B`` (d_out x r, zero at start), so training starts from the base model exactly and only ``r * (d_in + d_out)``
numbers per layer train. rsLoRA (Kalajdzievski, 2023) scales by ``alpha / sqrt(r)`` instead; DoRA (Liu et al.,
2024) trains a magnitude vector and a LoRA-updated direction. Both are options here and the basis of their own
methods.

The layers are peft's; this module turns the run config into a ``peft.LoraConfig`` with ``target_modules``
resolved per architecture (:func:`tuneforge.models.targets.resolve_target_modules`). Subclasses (dora, rslora,
pissa, lora_plus...) override :meth:`LoraMethod.lora_options` or :meth:`LoraMethod.peft_config`.

``init: pissa`` and ``init: olora`` start from a decomposition of the base weights and change the base to the
residual ``W0 − B0 A0``, so the adapter as trained only fits that residual. :meth:`LoraMethod.save_adapter`
therefore converts it into an ordinary LoRA adapter (rank 2r, ``ΔW = B A − B0 A0``) for the *original* base, via
peft's ``path_initial_model_for_weight_conversion``; intermediate checkpoints stay in the residual form (resume
needs it).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneforge.config.methods import LoraMethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import Capabilities, Method, adapter_save_kwargs, register

# method.init → peft's init_lora_weights
INIT_WEIGHTS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
#: initialisations that change the base weights: the final adapter is converted for the original base
MUTATING_INITS = ("pissa", "olora")
#: attribute set on the peft model by :meth:`LoraMethod.apply`: directory of the initial (step 0) adapter
INIT_ATTR = "_tuneforge_init_adapter_dir"


class LoraMethod(Method):
    """LoRA adapters on the resolved target modules; everything else frozen."""

    reference = "Hu et al., 2021. LoRA: Low-Rank Adaptation of Large Language Models. arXiv:2106.09685"
    mergeable = True
    is_adapter = True
    priced_as = "lora"

    def capabilities(self, cfg: Any = None) -> Capabilities:
        """LoRA's declarations; ``init: pissa``/``olora`` change the base (and need the unsharded model to save)."""
        caps = super().capabilities(cfg)
        if getattr(cfg, "init", "default") in MUTATING_INITS:
            caps = replace(caps, changes_base=True, shardable=False)
        return caps

    def lora_options(self, cfg: Any, model: Any) -> dict:
        """Keyword arguments for ``peft.LoraConfig``; subclasses update this dict (e.g. ``use_dora=True``)."""
        from tuneforge.models.targets import targets_conv1d

        targets = self.target_modules(model, cfg)
        _refuse_tied_output_layer(model, targets)
        from tuneforge.models.vocab import new_token_ids

        return dict(
            task_type="SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM",
            trainable_token_indices=new_token_ids(model) or None,  # model.add_tokens: the new rows train
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
        """Wrap ``model`` in a ``peft.PeftModel``: only the LoRA matrices (and ``modules_to_save``) train.

        With a base-changing initialisation (PiSSA, OLoRA) the step-0 adapter is saved aside for
        :meth:`save_adapter`.

        Raises:
            UserError: a base-changing initialisation together with DoRA (peft cannot convert that adapter back
                to the original base); OLoRA on GPT-2's Conv1D layers (peft builds wrongly shaped adapters).
        """
        from peft import get_peft_model

        config = self.peft_config(cfg, model)
        init = str(config.init_lora_weights)
        mutating = init.startswith(MUTATING_INITS)
        if mutating and config.use_dora:
            raise UserError(
                f"method.init {init.split('_')[0]!r} with DoRA: the adapter is trained against a changed (residual) "
                "base and peft cannot convert a DoRA adapter back to the original base, so the result would not "
                "load onto your model; use init: default with DoRA, or method lora/pissa without DoRA"
            )
        if init == "olora" and config.fan_in_fan_out:
            raise UserError(
                "method.init 'olora' on GPT-2-style Conv1D layers: peft's OLoRA initialisation assumes nn.Linear "
                "weights and builds adapters of the wrong shape there; use init: pissa or init: default"
            )
        peft_model = get_peft_model(model, config)
        if mutating:
            root = tempfile.mkdtemp(prefix="tuneforge-init-adapter-")
            # removed with the model, or at interpreter exit, whichever comes first (save_adapter reads it last)
            weakref.finalize(peft_model, shutil.rmtree, root, ignore_errors=True)
            init_dir = Path(root) / "initial_adapter"
            peft_model.save_pretrained(str(init_dir))
            setattr(peft_model, INIT_ATTR, str(init_dir))
        return peft_model

    def save_adapter(self, model: Any, out_dir: str | Path) -> None:
        """Save ``model``'s adapter for the original (unmodified) base model.

        Stock peft loading of ``out_dir`` onto the original base reproduces the trained model's logits; a PiSSA/OLoRA
        adapter is converted on the way (see the module docstring).
        """
        init_dir = getattr(model, INIT_ATTR, None)
        extra = {"path_initial_model_for_weight_conversion": init_dir} if init_dir is not None else {}
        model.save_pretrained(str(out_dir), **adapter_save_kwargs(model), **extra)


def _refuse_tied_output_layer(model: Any, targets: list[str]) -> None:
    """An adapter on an output layer that shares its weight with the input embeddings cannot be merged: folding
    the delta into the shared tensor would change the input embeddings too (merged logits drift, seen here by 15)."""
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


register(LoraMethodConfig, LoraMethod)
