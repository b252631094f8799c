"""``stage: kto`` — Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on TRL's KTOTrainer.

Unpaired examples ``{prompt, completion, label}`` (a pair counts as one desirable and one undesirable example).
With r(x, y) = log π(y|x) - log π_ref(y|x) and z₀ the batch's KL estimate from mismatched (prompt, completion)
pairs::

    L = w_d (1 - σ(β (r - z₀)))   for desirable y,      w_u (1 - σ(β (z₀ - r)))   for undesirable y

``preference.beta``, ``desirable_weight``, ``undesirable_weight``; the reference model follows DPO's rules
(disabled adapter, frozen copy, or ``precompute_ref``). The KL pairs are built by rotating the completions within
each batch, so batches are taken in order: the rows are shuffled once with the run's seed.
"""

from __future__ import annotations

import random

from tuneforge.errors import UserError
from tuneforge.train.stages.base import Stage
from tuneforge.train.stages.common import trl_args
from tuneforge.train.stages.dpo import build_reference_trainer, choose_reference


def trainer_base():
    """TRL's KTOTrainer on rows data/preference.py encoded; only the KL completions are added here."""
    from trl import KTOTrainer

    class TuneforgeKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if not self.calculate_KL:
                return dataset
            size = args.per_device_train_batch_size

            def rotate(batch):  # (x_i, y_i) -> (x_i, y_{i-1}) within each batch, as TRL does
                batch["KL_completion_ids"] = batch["completion_ids"][-1:] + batch["completion_ids"][:-1]
                batch["KL_completion_mask"] = batch["completion_mask"][-1:] + batch["completion_mask"][:-1]
                return batch

            return dataset.map(rotate, batched=True, batch_size=size)

    return TuneforgeKTOTrainer


class KTOStage(Stage):
    """KTO on unpaired examples; see the module docstring."""

    def build_data(self, cfg, tokenizer, template):
        if cfg.train.batch_size < 2:
            raise UserError("stage kto needs train.batch_size >= 2: its KL term pairs each prompt with another "
                            "example's completion from the same batch")
        bundle = super().build_data(cfg, tokenizer, template)
        random.Random(cfg.seed).shuffle(bundle.train)  # batches are taken in order (see the module docstring)
        return bundle

    def build_trainer(self, cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class):
        from trl import KTOConfig

        from tuneforge.data.preference import UnpairedCollator
        from tuneforge.data.tokenize import pad_id

        pref = cfg.preference
        first = bundle.train[0]
        ref_model, disable_for_reference = choose_reference(model, pref.precompute_ref,
                                                            first["prompt_ids"] + first["completion_ids"])
        kto_args = trl_args(
            args, KTOConfig,
            beta=pref.beta_for("kto"),
            desirable_weight=pref.desirable_weight,
            undesirable_weight=pref.undesirable_weight,
            precompute_ref_log_probs=pref.precompute_ref,
            max_length=None,
            train_sampling_strategy="sequential",
        )
        return build_reference_trainer(trainer_class(trainer_base()), model, ref_model, kto_args,
                                       UnpairedCollator(pad_id(tokenizer)), bundle, tokenizer, callbacks, optimizers,
                                       disable_for_reference)


def stage(name: str) -> KTOStage:
    return KTOStage(name)
