"""Preference accuracy (evaluate/preference.py): batched scoring equals pair-by-pair scoring, errors."""

from __future__ import annotations

import pytest
import torch

from tuneforge.data.preference import encode_pair
from tuneforge.data.readers import preference_record
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


def _write_pairs(path):
    import json

    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS),
                    encoding="utf-8")
    return path


def test_reward_acc_is_a_registered_metric_of_tuneforge_eval(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    """`tuneforge eval MODEL --metrics reward_acc` on a pairs file: the registry's metric equals
    preference_accuracy on the same records (own likelihood for a plain model, adapter disabled as reference for
    an adapter); a file of chat records is refused naming the record."""
    import json

    from tests.helpers import make_adapter, save_base
    from tuneforge.cli import main
    from tuneforge.data.readers import read_records
    from tuneforge.evaluate.metrics import METRICS, parse_metrics
    from tuneforge.models.reference import load_for_inference

    assert parse_metrics("reward_acc") == [METRICS["reward_acc"]] and METRICS["reward_acc"].higher_is_better
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    data = _write_pairs(tmp_path / "pairs.jsonl")
    records = read_records(str(data), "auto")
    for spec, reference in ((base, False), (adapter, True)):
        assert main(["eval", str(spec), "--data", str(data), "--metrics", "reward_acc", "--json",
                     "--batch-size", "3"]) == 0
        out = capsys.readouterr().out
        row = json.loads(out[out.index("\n{") + 1 if not out.startswith("{") else 0:])  # after any library warning
        loaded = load_for_inference(str(spec), device="cpu")
        want = preference_accuracy(loaded.model, loaded.tokenizer, loaded.template, records, batch_size=1,
                                   reference=reference)
        assert row["reward_acc"] == pytest.approx(want.accuracy)
        assert row["reward_margin"] == pytest.approx(want.margin, abs=1e-4) and row["pairs"] == 4
        assert row["reward_reference"] == ("adapter disabled" if reference else "none")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n", encoding="utf-8")
    assert main(["eval", str(base), "--data", str(chat), "--metrics", "reward_acc"]) == 2
    assert "chat.jsonl:1: reward_acc needs preference pairs" in capsys.readouterr().err
