"""Preference accuracy of a model on ``{prompt, chosen, rejected}`` pairs (``tuneforge eval --metrics reward_acc``).

Each completion is scored by r(y) = log π(y|x) - log π_ref(y|x), summed over the completion tokens exactly as the
DPO stage masks them (data/preference.py: the run's template, the SFT mask of the answer turn, its end-of-turn
marker; prompts cut from the left, pairs whose completion cannot fit dropped and counted). A pair is won when
r(y_w) > r(y_l); ties count half.

- With a reference (``reference=True``: the model is a PeftModel and the reference is its adapter disabled) this
  is DPO's implicit-reward accuracy, ``rewards/accuracies`` on held-out data; a model at its reference scores 50%.
- Without one, r = log π(y|x): which answer the model itself finds more likely. Comparable across any models, but
  it favours short answers (the reference term is what cancels length in DPO).
- A reward model (``stage: rm``; ``models.reward``) is scored by its own output r(x, y), read at the answer's
  end-of-turn token of the same encoding: the Bradley–Terry accuracy the rm stage logs as ``eval_accuracy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError


@dataclass(frozen=True)
class PreferenceAccuracy:
    """Result of :func:`preference_accuracy`.

    Attributes:
        accuracy: share of pairs won, 0-100.
        margin: mean log π(y_w|x) - log π(y_l|x) in nats.
        pairs: pairs scored.
        dropped: pairs whose completion could not fit ``max_length``.
    """

    accuracy: float
    margin: float
    pairs: int
    dropped: int


def preference_accuracy(model: Any, tokenizer: Any, template: Any, records: list[dict], *,
                        max_length: int = 2048, batch_size: int = 8, reference: bool = False) -> PreferenceAccuracy:
    """Score canonical pair records (``{"prompt", "chosen", "rejected"}``, see data/preference.py).

    Args:
        reference: subtract the log-probs of ``model`` with its adapter disabled (``model`` must be a PeftModel).

    Raises:
        UserError: a record that is not a pair (naming it), no pair left after truncation, ``reference`` without an
            adapter.
    """
    import torch

    from tuneforge.data.preference import PairCollator, encode_pair
    from tuneforge.data.tokenize import pad_id
    from tuneforge.models.reward import is_reward_model, reward_scores
    from tuneforge.models.scoring import sequence_logps

    rows, dropped = [], 0
    for record in records:
        if "chosen" not in record:
            raise UserError(f"{record.get('source', '?')}: reward_acc needs preference pairs "
                            "({prompt, chosen, rejected}); this record is not one")
        row, _ = encode_pair(record, tokenizer, template, max_length)
        if row is None:
            dropped += 1
        else:
            rows.append(row)
    if not rows:
        raise UserError(f"reward_acc: all {len(records)} pairs are longer than max_length={max_length}")
    scorer = is_reward_model(model)
    reference = reference and not scorer
    if reference and not hasattr(model, "disable_adapter"):
        raise UserError("reward_acc with a reference needs an adapter model (the reference is the adapter disabled)")
    collate = PairCollator(pad_id(tokenizer))
    device = next(model.parameters()).device
    wins, margins = 0.0, []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = {k: v.to(device) for k, v in collate(rows[start:start + batch_size]).items()}
                if scorer:
                    logps = reward_scores(model, batch["input_ids"], batch["attention_mask"])
                else:
                    logps = sequence_logps(model, batch)[0]
                if reference:
                    with model.disable_adapter():
                        logps = logps - sequence_logps(model, batch)[0]
                n = logps.size(0) // 2
                diff = (logps[:n] - logps[n:]).tolist()
                margins.extend(diff)
                wins += sum(1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diff)
    finally:
        model.train(was_training)
    return PreferenceAccuracy(accuracy=100.0 * wins / len(rows), margin=sum(margins) / len(margins),
                              pairs=len(rows), dropped=dropped)


def reward_acc_metric(loaded: Any, records: list[dict], *, max_length: int | None = None, batch_size: int = 4,
                      **_) -> dict:
    """The metric-registry form (``needs=MODEL``): ``{"reward_acc", "reward_margin", "pairs", "reward_reference"}``.

    A reward model by its score; an adapter model against its base (adapter disabled); any other model by its own
    log-probs.
    """
    from tuneforge.models.reward import is_reward_model

    scorer = is_reward_model(loaded.model)
    with_reference = hasattr(loaded.model, "disable_adapter") and not scorer
    result = preference_accuracy(loaded.model, loaded.tokenizer, loaded.template, records,
                                 max_length=max_length or 2048, batch_size=batch_size, reference=with_reference)
    row = {"reward_acc": result.accuracy, "reward_margin": result.margin, "pairs": result.pairs,
           "reward_reference": "reward model" if scorer else "adapter disabled" if with_reference else "none"}
    return {**row, "pairs_dropped": result.dropped} if result.dropped else row
