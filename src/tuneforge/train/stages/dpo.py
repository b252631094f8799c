"""``stage: dpo`` — Direct Preference Optimization (Rafailov et al., 2023) on TRL's DPOTrainer.

Sigmoid loss per pair, with policy π, reference π_ref and β = ``preference.beta``::

    L = -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

(``preference.loss`` picks TRL's other losses: ipo, hinge, robust, ...). Log-probs are summed over the completion
tokens of data/preference.py's mask, the SFT mask of the answer turn(s).

Reference model:
- adapters: the same model with the adapter disabled (no second copy), when the freshly applied adapter leaves the
  model's output unchanged (LoRA, DoRA, VeRA, IA3, ...; checked on a training row). When it does not (PiSSA and
  OLoRA rewrite the base weights; prefix tuning adds prefixes) the disabled model is not the starting point, so the
  reference is TRL's frozen copy of the initial adapter (adapter-sized), removed before final/ is written;
- full fine-tuning: a frozen copy of the starting model, or ``preference.precompute_ref: true`` — reference
  log-probs computed once before training, no copy kept.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any

from tuneforge.train.stages.base import Stage
from tuneforge.train.stages.common import (
    check_no_lm_head_adapter,
    remove_adapter_callback,
    to_dataset,
    trl_args,
)


def adapter_is_identity(model: Any, input_ids: list[int]) -> bool:
    """True when ``model`` (a PeftModel) gives the same logits with its adapter enabled and disabled."""
    import torch

    training = model.training
    model.eval()
    try:
        ids = torch.tensor([input_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            enabled = model(input_ids=ids, use_cache=False).logits[:, -ids.size(1):]
            with model.disable_adapter():
                disabled = model(input_ids=ids, use_cache=False).logits
    finally:
        model.train(training)
    return bool(torch.allclose(enabled, disabled, atol=1e-5, rtol=0))


def frozen_copy(model: Any) -> Any:
    """A frozen, eval-mode deep copy of ``model`` (the full fine-tuning reference)."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


@contextmanager
def frozen_reference_adapters(model: Any):
    """While TRL builds its trainer, adapters it adds (its ``ref`` copy) are added in inference mode.

    TRL adds ``ref`` with the trained adapter's own config, so tuners that allow one trainable adapter only
    (AdaLoRA) refuse it; a frozen reference is what it is meant to be anyway.
    """
    if not hasattr(model, "peft_config"):
        yield
        return
    original = model.add_adapter

    def add_frozen(adapter_name, peft_config, *args, **kwargs):
        return original(adapter_name, dataclasses.replace(peft_config, inference_mode=True), *args, **kwargs)

    model.add_adapter = add_frozen
    try:
        yield
    finally:
        del model.add_adapter  # the class's own method again


def trainer_base():
    """TRL's DPOTrainer, fed rows that data/preference.py already encoded (no second renderer)."""
    from trl import DPOTrainer

    class TuneforgeDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # rendered, masked and truncated by data/preference.py

    return TuneforgeDPOTrainer


class DPOStage(Stage):
    """DPO on pairs; see the module docstring."""

    def build_trainer(self, cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class):
        from trl import DPOConfig

        from tuneforge.data.preference import PairCollator
        from tuneforge.data.tokenize import pad_id

        pref = cfg.preference
        ref_model, disable_for_reference = choose_reference(model, pref.precompute_ref, bundle.train[0]["chosen_ids"])
        dpo_args = trl_args(
            args, DPOConfig,
            beta=pref.beta_for("dpo"),
            loss_type=[pref.loss],
            label_smoothing=pref.label_smoothing,
            precompute_ref_log_probs=pref.precompute_ref,
            max_length=None,  # data/preference.py truncated the prompts; a completion is never cut
        )
        return build_reference_trainer(trainer_class(trainer_base()), model, ref_model, dpo_args,
                                       PairCollator(pad_id(tokenizer)), bundle, tokenizer, callbacks, optimizers,
                                       disable_for_reference)


def choose_reference(model: Any, no_copy: bool, probe_ids: list[int]) -> tuple[Any, bool]:
    """``(ref_model, disable_for_reference)`` of a reference-based stage (DPO, KTO, GRPO's KL term): an adapter
    model is its own reference with the adapter disabled (no copy; ``disable_for_reference`` when the fresh adapter
    is not the identity, checked on ``probe_ids``); full fine-tuning gets a frozen copy unless ``no_copy`` (the
    reference log-probs are precomputed, or there is no KL term).

    Raises:
        UserError: an adapter on the LM head (the reference would not be the base).
    """
    if hasattr(model, "peft_config"):
        check_no_lm_head_adapter(model)
        return None, adapter_is_identity(model, probe_ids)
    return (None if no_copy else frozen_copy(model)), False


def build_reference_trainer(cls: Any, model: Any, ref_model: Any, args: Any, collator: Any, bundle: Any,
                            tokenizer: Any, callbacks: list, optimizers: tuple, disable_for_reference: bool) -> Any:
    """A TRL trainer with a reference model (DPO, KTO): built with the adapters frozen for TRL's reference copy,
    then :func:`finish_peft_reference`."""
    with frozen_reference_adapters(model):
        trainer = cls(model=model, ref_model=ref_model, args=args, data_collator=collator,
                      train_dataset=to_dataset(bundle.train), eval_dataset=to_dataset(bundle.eval),
                      processing_class=tokenizer, callbacks=callbacks, optimizers=optimizers)
    finish_peft_reference(trainer, disable_for_reference)
    return trainer


def finish_peft_reference(trainer: Any, disable_for_reference: bool) -> None:
    """Drop TRL's ``ref`` adapter copy when disabling the adapter gives the same model; else remove it at the end."""
    model = trainer.model
    if "ref" not in getattr(model, "peft_config", {}):
        return
    if disable_for_reference:
        model.delete_adapter("ref")  # TRL then computes the reference with the adapter disabled
    else:
        trainer.add_callback(remove_adapter_callback("ref"))


def stage(name: str) -> DPOStage:
    return DPOStage(name)
