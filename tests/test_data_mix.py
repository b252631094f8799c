"""Replay mixing (data.mix / data.mix_ratio): shares, deterministic interleaving, per-source tokens, bad input."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.mix import draw, interleave, mix_counts, text_samples
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError


def chat_file(path, n=57):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def text_file(path, n=6):
    rows = [{"text": f"General document number {i}. " + "Python has lists, tuples and dicts. " * (3 + i)}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft(tmp_path, tok, seed=0, **data):
    cfg = DataConfig(train=[str(chat_file(tmp_path / "task.jsonl"))], max_length=64, packing=False, **data)
    return build_datasets(cfg, "sft", tok, get_template("chatml"), seed=seed)


def test_mix_counts_give_the_stated_share():
    assert mix_counts(95, [0.05]) == [5]
    assert mix_counts(90, [0.05, 0.05]) == [5, 5]
    assert mix_counts(3, [0.01]) == [1]  # at least one sample per source


def test_interleave_spreads_each_source_evenly_and_keeps_order():
    task = [{"id": f"t{i}"} for i in range(20)]
    extra = [{"id": f"m{k}"} for k in range(4)]
    out = interleave(task, [extra])
    ids = [s["id"] for s in out]
    assert [i for i in ids if i.startswith("t")] == [f"t{i}" for i in range(20)]
    positions = [ids.index(f"m{k}") for k in range(4)]
    assert positions == sorted(positions)
    gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced, not clumped at the end
    assert positions[0] >= 2 and positions[-1] <= len(ids) - 3


def test_draw_is_seeded_and_cycles_through_every_sample():
    samples = [{"i": i} for i in range(5)]
    assert draw(samples, 12, 3) == draw(samples, 12, 3)
    assert draw(samples, 12, 3) != draw(samples, 12, 4)
    first = [s["i"] for s in draw(samples, 10, 1)]
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5))


def test_text_samples_are_chunks_trained_on_every_token(tiny_tokenizer):
    record = {"text": "word " * 100}
    samples = text_samples([record], tiny_tokenizer, 32)
    ids = tiny_tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert [t for s in samples for t in s["input_ids"]] == ids[: sum(len(s["input_ids"]) for s in samples)]
    assert all(len(s["input_ids"]) <= 32 and s["labels"] == s["input_ids"] for s in samples)


def test_mix_share_tokens_per_source_and_determinism(tmp_path, tiny_tokenizer):
    general = text_file(tmp_path / "general.jsonl")
    plain = _sft(tmp_path, tiny_tokenizer)
    mixed = _sft(tmp_path, tiny_tokenizer, mix=[{"path": str(general), "weight": 0.05}])
    task_n = plain.stats["samples"]
    stats = mixed.stats["mix"]
    assert stats["task"]["samples"] == task_n == 57
    assert stats[str(general)]["samples"] == 3  # 5% of 60
    assert stats[str(general)]["samples_share"] == pytest.approx(0.05)
    assert mixed.stats["samples"] == len(mixed.train) == 60
    # every task sample is still there, in order; the general samples are trained on all their tokens
    task_rows = [r for r in mixed.train if r["labels"] != r["input_ids"]]
    general_rows = [r for r in mixed.train if r["labels"] == r["input_ids"]]
    assert task_rows == plain.train
    assert len(general_rows) == 3
    assert stats[str(general)]["tokens"] == sum(len(r["input_ids"]) for r in general_rows)
    assert stats["task"]["tokens"] + stats[str(general)]["tokens"] == mixed.stats["tokens"]
    # same config and seed, same sequence
    again = _sft(tmp_path, tiny_tokenizer, mix=[{"path": str(general), "weight": 0.05}])
    assert again.train == mixed.train


def test_mix_ratio_splits_between_sources_by_weight(tmp_path, tiny_tokenizer):
    general = text_file(tmp_path / "general.jsonl")
    bundle = _sft(tmp_path, tiny_tokenizer, mix_ratio=0.2,
                  mix=[{"path": str(general), "weight": 3}, {"name": "pydoc", "weight": 1}])
    stats = bundle.stats["mix"]
    total = len(bundle.train)
    assert stats[str(general)]["samples"] == round(0.15 * 57 / 0.8)
    assert stats["pydoc"]["samples"] == round(0.05 * 57 / 0.8)
    assert stats["task"]["samples"] + stats[str(general)]["samples"] + stats["pydoc"]["samples"] == total


def test_chat_mix_source_is_trained_on_answers_only(tmp_path, tiny_tokenizer):
    other = tmp_path / "other"
    other.mkdir()
    chat_file(other / "general_chat.jsonl", 10)
    bundle = _sft(tmp_path, tiny_tokenizer, mix=[{"path": str(other / "general_chat.jsonl"), "weight": 0.1}])
    assert bundle.stats["mix"][str(other / "general_chat.jsonl")]["supervised_tokens_share"] < 0.2
    assert all(r["labels"] != r["input_ids"] for r in bundle.train)


def test_missing_mix_source_names_the_key(tmp_path, tiny_tokenizer):
    with pytest.raises(UserError, match=r"data\.mix\[0\]\.path: .*nope\.jsonl does not exist"):
        _sft(tmp_path, tiny_tokenizer, mix=[{"path": str(tmp_path / "nope.jsonl"), "weight": 0.05}])
    with pytest.raises(UserError, match=r"data\.mix\[1\]\.name: 'wikipedia' does not exist.*pydoc"):
        _sft(tmp_path, tiny_tokenizer, mix=[{"name": "pydoc", "weight": 0.01}, {"name": "wikipedia", "weight": 0.01}])


@pytest.mark.parametrize("data, message", [
    ({"mix_ratio": 0.1}, "data.mix_ratio needs data.mix"),
    ({"mix": [{"name": "pydoc", "weight": 0.6}, {"name": "pydoc", "weight": 0.5}]}, "sum to less than 1"),
    ({"mix": [{"name": "pydoc", "path": "x.jsonl"}]}, "exactly one of path"),
])
def test_bad_mix_config_is_refused_at_the_door(data, message):
    from tuneforge.config import validate_config

    raw = {"model": {"name_or_path": "x"}, "data": {"train": ["t.jsonl"], **data}}
    with pytest.raises(UserError, match=message):
        validate_config(raw)


def test_mix_is_refused_outside_sft():
    from tuneforge.config import validate_config

    raw = {"stage": "pt", "model": {"name_or_path": "x"},
           "data": {"train": ["t.jsonl"], "mix": [{"name": "pydoc", "weight": 0.05}]}}
    with pytest.raises(UserError, match="data.mix is for stage 'sft'"):
        validate_config(raw)


def test_train_with_missing_mix_source_exits_2_and_writes_nothing(tmp_path):
    import yaml

    from tuneforge.cli import main

    out = tmp_path / "run"
    raw = {"run_name": "run", "output_dir": str(out), "stage": "sft",
           "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
           "data": {"train": [str(chat_file(tmp_path / "task.jsonl"))], "max_length": 64,
                    "mix": [{"path": str(tmp_path / "missing.jsonl"), "weight": 0.05}]},
           "train": {"max_steps": 1, "report_to": ["none"]}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    assert not out.exists()
