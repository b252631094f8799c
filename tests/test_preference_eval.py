"""Preference accuracy (evaluate/preference.py): batched scoring equals pair-by-pair scoring, errors."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.preference import encode_pair, preference_record
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError
from tuneforge.evaluate.preference import preference_accuracy

PAIRS = [("Which is a mutable sequence?", "list", "tuple is the answer"),
         ("2 + 2 =", "4", "five"), ("Say hi", "hi there, friend", "no"), ("Pick", "a", "b")]


def _records():
    return [preference_record({"prompt": p, "chosen": c, "rejected": r}, f"e:{i}") for i, (p, c, r) in enumerate(PAIRS)]


def _alone(model, tokenizer, template, record) -> float:
    row, _ = encode_pair(record, tokenizer, template, 256)
    scores = []
    for side in ("chosen", "rejected"):
        ids = torch.tensor([row[f"{side}_ids"]])
        mask = torch.tensor(row[f"{side}_mask"])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        scores.append((logp.gather(-1, ids[0, 1:, None]).squeeze(-1) * mask[1:]).sum().item())
    return scores[0] - scores[1]


def test_batched_accuracy_equals_pair_by_pair_scoring(tiny_llama, tiny_tokenizer):
    template = get_template("chatml")
    model = tiny_llama.eval()
    margins = [_alone(model, tiny_tokenizer, template, r) for r in _records()]
    result = preference_accuracy(model, tiny_tokenizer, template, _records(), batch_size=3)
    assert result.pairs == 4 and result.dropped == 0
    assert result.accuracy == pytest.approx(100 * sum(m > 0 for m in margins) / 4)
    assert result.margin == pytest.approx(sum(margins) / 4, abs=1e-4)


def test_reward_acc_needs_pairs(tiny_llama, tiny_tokenizer):
    with pytest.raises(UserError, match="e.jsonl:3: reward_acc needs preference pairs"):
        preference_accuracy(tiny_llama, tiny_tokenizer, get_template("plain"),
                            [{"messages": [], "source": "e.jsonl:3"}])


def test_a_model_at_its_reference_scores_half_and_without_adapter_reference_is_refused(tiny_llama, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    template = get_template("plain")
    with pytest.raises(UserError, match="needs an adapter model"):
        preference_accuracy(tiny_llama, tiny_tokenizer, template, _records(), reference=True)
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules=["q_proj"]))  # B = 0: the reference itself
    result = preference_accuracy(model, tiny_tokenizer, template, _records(), reference=True)
    assert result.accuracy == 50.0 and result.margin == pytest.approx(0.0, abs=1e-6)
