"""Preference readers (data/readers.py), masks and truncation (data/preference.py)."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.preference import (
    PairCollator,
    UnpairedCollator,
    encode_pair,
    encode_unpaired,
)
from tuneforge.data.readers import kto_record, preference_record, prompt_record, read_records
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError


def _completion_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])


def _prompt_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode(ids[: mask.index(1)])


@pytest.mark.parametrize("template_name", ["plain", "chatml", "llama3", "alpaca"])
def test_mask_covers_exactly_the_completion_and_its_end_marker(tiny_tokenizer, template_name):
    template = get_template(template_name)
    record = preference_record({"prompt": "What is 2+2?", "chosen": "four", "rejected": "five apples"}, "t:1")
    row, truncated = encode_pair(record, tiny_tokenizer, template, 256)
    assert not truncated
    end = template.stop[0] if template.stop else tiny_tokenizer.eos_token
    for side, answer in (("chosen", "four"), ("rejected", "five apples")):
        ids, mask = row[f"{side}_ids"], row[f"{side}_mask"]
        assert _completion_text(tiny_tokenizer, ids, mask).strip() == f"{answer}{end}"
        assert mask[-1] == 1  # the sequence ends with the end-of-turn marker
        # Every token before the first supervised one is the prompt rendered for generation.
        prompt = template.render(record["prompt"], add_generation_prompt=True, tokenizer=tiny_tokenizer)
        assert tiny_tokenizer.decode(ids[: mask.index(1)]).strip() == prompt.strip()
        assert set(mask[mask.index(1):]) == {1}  # one answer turn: contiguous


def test_earlier_assistant_turns_of_the_prompt_are_not_supervised(tiny_tokenizer):
    template = get_template("chatml")
    record = preference_record({
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
                   {"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris"}],
        "rejected": [{"role": "assistant", "content": "Rome"}],
    }, "t:1")
    row, _ = encode_pair(record, tiny_tokenizer, template, 256)
    assert _completion_text(tiny_tokenizer, row["chosen_ids"], row["chosen_mask"]) == "Paris<|im_end|>"
    assert "Hello there" in _prompt_text(tiny_tokenizer, row["chosen_ids"], row["chosen_mask"])


def test_chat_form_shared_prefix_becomes_the_prompt():
    convo = [{"role": "user", "content": "Q"}]
    record = preference_record({"chosen": [*convo, {"role": "assistant", "content": "good"}],
                                "rejected": [*convo, {"role": "assistant", "content": "bad"}]}, "t:1")
    assert record["prompt"] == convo
    assert record["chosen"] == [{"role": "assistant", "content": "good"}]
    assert record["rejected"] == [{"role": "assistant", "content": "bad"}]


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion(tiny_tokenizer):
    template = get_template("plain")
    long_prompt = " ".join(f"word{i}" for i in range(60))
    record = preference_record({"prompt": long_prompt, "chosen": "yes indeed", "rejected": "no"}, "t:1")
    full, _ = encode_pair(record, tiny_tokenizer, template, 10_000)
    limit = len(full["chosen_ids"]) - 20
    row, truncated = encode_pair(record, tiny_tokenizer, template, limit)
    assert truncated
    assert max(len(row["chosen_ids"]), len(row["rejected_ids"])) == limit
    for side in ("chosen", "rejected"):
        # The same completion tokens, and the kept prompt is the end of the full prompt.
        assert _completion_text(tiny_tokenizer, row[f"{side}_ids"], row[f"{side}_mask"]) == _completion_text(
            tiny_tokenizer, full[f"{side}_ids"], full[f"{side}_mask"])
        assert full[f"{side}_ids"][-len(row[f"{side}_ids"]):] == row[f"{side}_ids"]
    # Both sides keep the same prompt tokens.
    n = row["chosen_mask"].index(1)
    assert row["chosen_ids"][:n] == row["rejected_ids"][: row["rejected_mask"].index(1)]


def test_a_pair_whose_completion_cannot_fit_is_dropped_and_counted(tiny_tokenizer, tmp_path):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.preference import build_preference_data

    rows = [{"prompt": "Q", "chosen": "short", "rejected": "also short"},
            {"prompt": "Q", "chosen": " ".join(["long"] * 80), "rejected": "x"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bundle = build_preference_data(DataConfig(train=[str(path)], max_length=24), "dpo", tiny_tokenizer,
                                   get_template("plain"), seed=0)
    assert bundle.stats["samples"] == 1 and bundle.stats["dropped_too_long"] == 1
    assert all(len(r["chosen_ids"]) <= 24 and sum(r["chosen_mask"]) > 0 for r in bundle.train)
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(UserError, match="completions are never cut"):
        build_preference_data(DataConfig(train=[str(path)], max_length=24), "dpo", tiny_tokenizer,
                              get_template("plain"), seed=0)


def test_readers_detect_preference_kto_and_prompt_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    assert read_records(path)[0]["chosen"] == [{"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"prompt": "Q", "completion": "a", "label": "false"}) + "\n")
    assert read_records(path)[0]["label"] is False
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    assert read_records(path)[0]["fields"] == {"answer": "4"}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "a"}, r"bad\.jsonl:2: preference record has no 'rejected'"),
    ({"prompt": "Q", "rejected": "a"}, r"bad\.jsonl:2: preference record has no 'chosen'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, r"bad\.jsonl:2: 'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, r"bad\.jsonl:2: 'chosen' has an empty assistant answer"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"bad\.jsonl:2: the prompt is empty"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": "c"}, r"bad\.jsonl:2: 'chosen' must be one assistant answer after the prompt"),
    ({"prompt": "Q", "completion": "a", "label": "maybe"}, r"bad\.jsonl:2: 'label' must be true"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    first = {"prompt": "Q", "completion": "a", "label": True} if "label" in row else \
        {"prompt": "Q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        read_records(path)


def test_completion_empty_after_rendering_is_an_error(tiny_tokenizer):
    from tuneforge.data.templates import ChatTemplate

    # A template that drops assistant turns: the answer renders to nothing.
    silent = ChatTemplate("silent", "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                                    "{% endif %}{% endfor %}", [])
    record = preference_record({"prompt": "Q", "chosen": "a", "rejected": "b"}, "d.jsonl:7")
    with pytest.raises(UserError, match=r"d\.jsonl:7 \(chosen\): the completion is empty after rendering"):
        encode_pair(record, tiny_tokenizer, silent, 64)


def test_unpaired_encoding_and_collators(tiny_tokenizer):
    template = get_template("plain")
    record = kto_record({"prompt": "Q?", "completion": "answer", "label": True}, "k:1")
    row, _ = encode_unpaired(record, tiny_tokenizer, template, 64)
    assert tiny_tokenizer.decode(row["completion_ids"]).strip() == f"answer{tiny_tokenizer.eos_token}"
    assert set(row["completion_mask"]) == {1}
    kl_row = {**row, "KL_completion_ids": [5, 6], "KL_completion_mask": [1, 1]}
    batch = UnpairedCollator(0)([kl_row, {**kl_row, "label": False}])
    assert batch["label"].tolist() == [True, False]
    assert batch["completion_mask"].sum().item() == 2 * len(row["completion_ids"])
    assert batch["KL_completion_mask"].sum().item() == 4
    assert batch["KL_input_ids"].shape[1] == len(row["prompt_ids"]) + 2
    pair, _ = encode_pair(preference_record({"prompt": "Q?", "chosen": "a b c", "rejected": "d"}, "p:1"),
                          tiny_tokenizer, template, 64)
    collated = PairCollator(0)([pair])
    assert collated["input_ids"].shape[0] == 2
    assert collated["completion_mask"][0].sum().item() == sum(pair["chosen_mask"])
    assert collated["attention_mask"][1].sum().item() == len(pair["rejected_ids"])
    assert prompt_record({"prompt": "x", "answer": 3}, "g:1")["fields"] == {"answer": 3}


def test_a_stage_refuses_records_of_another_kind(tmp_path):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.preference import load_stage_records

    path = tmp_path / "k.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": "a", "label": True}) + "\n")
    with pytest.raises(UserError, match=r"k\.jsonl:1: a unpaired record, but this stage needs \{prompt, chosen"):
        load_stage_records(DataConfig(train=[str(path)]), "paired", seed=0)
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n")
    records, _, _ = load_stage_records(DataConfig(train=[str(pairs)]), "unpaired", seed=0)
    assert [r["label"] for r in records] == [True, False]  # a pair gives one desirable and one undesirable example


@pytest.mark.parametrize("stage, preference, message", [
    ("simpo", {"loss": "ipo"}, "preference.loss has no effect in stage 'simpo'"),
    ("orpo", {"precompute_ref": True}, "preference.precompute_ref has no effect in stage 'orpo'"),
    ("sft", {"beta": 0.1}, "preference: is for stages dpo, orpo, kto, simpo"),
    ("dpo", {"loss": "sigmod"}, "preference.loss: 'sigmod' is not allowed"),
])
def test_preference_config_keys_belong_to_their_stage(stage, preference, message):
    from tuneforge.config import validate_config

    raw = {"stage": stage, "model": {"from_config": {}}, "data": {"train": ["x.jsonl"]}, "preference": preference}
    with pytest.raises(UserError, match=message):
        validate_config(raw)
    ok = validate_config({**raw, "stage": "simpo", "preference": {"gamma": 1.0}})
    assert ok.preference.beta_for("simpo") == 2.0 and ok.preference.beta_for("dpo") == 0.1


def test_preview_marks_exactly_the_scored_tokens(tiny_tokenizer):
    from tuneforge.data.preference import preview_rows

    template = get_template("plain")
    pair, _ = encode_pair(preference_record({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "p:1"),
                          tiny_tokenizer, template, 64)
    (shown,) = preview_rows([pair], tiny_tokenizer)
    eos = tiny_tokenizer.eos_token
    assert shown["chosen"] == f"User: Q?\nAssistant:[[ yes{eos}]]"
    assert shown["rejected"] == f"User: Q?\nAssistant:[[ no{eos}]]"
    row, _ = encode_unpaired(kto_record({"prompt": "Q?", "completion": "yes", "label": False}, "k:1"),
                             tiny_tokenizer, template, 64)
    assert preview_rows([row], tiny_tokenizer) == [{"completion": f"User: Q?\nAssistant:[[ yes{eos}]]",
                                                    "label": False}]


@pytest.mark.parametrize("stage", ["dpo", "kto", "grpo"])
def test_data_preview_command_on_preference_and_grpo_configs(tmp_path, capsys, stage):
    import yaml

    from tuneforge.cli import main

    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 4
    if stage == "grpo":
        rows = [{"prompt": "Q?", "answer": "yes"}] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"stage": stage, "output_dir": str(tmp_path / "run"),
           "model": {"from_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 300},
                     "chat_template": "plain"},
           "method": {"name": "lora"}, "data": {"train": [str(tmp_path / "d.jsonl")], "max_length": 64}}
    if stage == "grpo":
        raw["grpo"] = {"rewards": [{"type": "exact", "field": "answer"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["data", "preview", str(tmp_path / "c.yaml"), "-n", "1", "--json"]) == 0
    (shown,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    if stage == "dpo":
        assert shown["chosen"].startswith("User: Q?\nAssistant:[[ yes") and shown["chosen"].endswith("]]")
        assert shown["rejected"].startswith("User: Q?\nAssistant:[[ no")
    elif stage == "kto":  # pairs give one desirable and one undesirable example
        assert shown["label"] is True and shown["completion"].startswith("User: Q?\nAssistant:[[ yes")
    else:
        assert shown["prompt"] == "User: Q?\nAssistant:" and shown["fields"] == {"answer": "yes"}
    assert main(["data", "preview", str(tmp_path / "c.yaml"), "-n", "1"]) == 0
    assert f"stage: {stage}" in capsys.readouterr().out
