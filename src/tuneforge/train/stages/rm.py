"""``stage: rm`` — a reward model trained on preference pairs (Bradley–Terry), through TRL's RewardTrainer.

The model is the base with a sequence-classification head of one output (``model_head = "reward"``: the trainer
loads ``AutoModelForSequenceClassification(num_labels=1)``; a causal LM's directory gets a new score head, which
LoRA trains beside its adapters — peft's SEQ_CLS task saves it with the adapter). For a pair ``(y_w, y_l)`` of
prompt ``x`` the loss is Bradley–Terry's negative log-likelihood (Ouyang et al., 2022, eq. 1):

    loss = -log σ(r(x, y_w) - r(x, y_l) - m)

with the margin ``m`` = 0, a constant (``rm.margin: 0.5``) or each pair's own ``margin`` field (``rm.margin:
record``; Llama 2's rating-gap margin, Touvron et al., 2023, eq. 2), plus ``rm.center_rewards × mean(r²)``
when set (Eisenstein et al., 2023). Pairs are encoded once, by ``data.preference.encode_pair`` (the run's template,
the DPO stage's encoding): the reward is read at the answer's end-of-turn token. TRL's trainer gets the encoded rows
(``chosen_ids``/``rejected_ids``/``margin``) and skips its own tokenisation; it logs ``accuracy``, ``margin``,
``min/mean/max_reward`` (``eval_*`` on the eval pairs).

The run directory loads back as a scorer (:func:`tuneforge.models.reward.load_scorer`): ``tuneforge eval RUN
--metrics reward_acc``, ``tuneforge score RUN --data ... --out ...`` and GRPO's ``rewards: [{model: RUN}]``.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import UserError
from tuneforge.train.stages.base import Stage
from tuneforge.train.stages.common import to_dataset, trl_args


def pair_margin(record: dict, spec: Any) -> float | None:
    """The Bradley–Terry margin of a pair under ``rm.margin`` (None: no margin).

    Raises:
        UserError: ``rm.margin: record`` and the record has no numeric ``margin`` field (naming the record).
    """
    if spec == "none":
        return None
    if spec != "record":
        return float(spec)
    value = record.get("margin")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{record.get('source', '?')}: rm.margin is 'record' but this pair has no numeric 'margin' "
                        f"field (got {value!r}); give every pair one, or set rm.margin to a number or none")
    return float(value)


class RewardModelStage(Stage):
    """The ``rm`` stage: see the module docstring."""

    #: what the trainer loads (models.load.load_model's ``head``)
    model_head = "reward"

    def build_data(self, cfg: Any, tokenizer: Any, template: Any):
        from tuneforge.data.preference import PreferenceBundle, encode_pair, load_stage_records

        records, eval_records, stats = load_stage_records(cfg.data, "paired", cfg.seed)

        def encode(items, what):
            rows, dropped, truncated = [], 0, 0
            for record in items:
                row, cut = encode_pair(record, tokenizer, template, cfg.data.max_length)
                if row is None:
                    dropped += 1
                    continue
                truncated += int(cut)
                out = {"chosen_ids": row["chosen_ids"], "rejected_ids": row["rejected_ids"]}
                margin = pair_margin(record, cfg.rm.margin)
                if margin is not None:
                    out["margin"] = margin
                rows.append(out)
            if not rows and items:
                raise UserError(f"no {what} pair is left: all {len(items)} have an answer longer than "
                                f"data.max_length={cfg.data.max_length} allows (answers are never cut); raise "
                                "data.max_length or shorten the answers")
            return rows, dropped, truncated

        train, dropped, truncated = encode(records, "training")
        evaluation, eval_dropped, _ = encode(eval_records or [], "eval")
        lengths = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train]
        stats.update(samples=len(train), rows=len(train), eval_rows=len(evaluation), dropped_too_long=dropped,
                     eval_dropped_too_long=eval_dropped, truncated=truncated, tokens=sum(lengths),
                     length={"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)})
        return PreferenceBundle(train=train, eval=evaluation or None, stats=stats)

    def build_trainer(self, cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class):
        from trl import RewardConfig, RewardTrainer

        rm_args = trl_args(
            args, RewardConfig,
            max_length=None,  # data.preference fitted every pair to data.max_length; an answer is never cut
            center_rewards_coefficient=cfg.rm.center_rewards,
            pad_token=tokenizer.pad_token,
        )
        return trainer_class(RewardTrainer)(
            model=model, args=rm_args, train_dataset=to_dataset(bundle.train), eval_dataset=to_dataset(bundle.eval),
            processing_class=tokenizer, callbacks=callbacks, optimizers=optimizers)


def stage(name: str) -> RewardModelStage:
    return RewardModelStage(name)
