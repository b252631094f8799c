"""build_datasets (pt and sft, packing, eval, counts, errors) and the `tuneforge data preview` command."""

from __future__ import annotations

import json

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.packing import PackedCollator, PaddingCollator
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import UserError


def chat_file(path, n=40, long_every=0):
    rows = []
    for i in range(n):
        question = f"What is {i} plus {i}?"
        if long_every and i % long_every == 0:
            question += " Please think about it very carefully." * 20
        rows.append({"conversations": [{"from": "human", "value": question},
                                       {"from": "gpt", "value": f"The answer is {2 * i}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(**kw):
    return DataConfig(**kw)


def test_sft_packed_bundle_and_stats(tmp_path, tiny_tokenizer):
    f = chat_file(tmp_path / "c.jsonl", 40)
    bundle = build_datasets(cfg(train=[str(f)], max_length=128, eval_split=0.1), "sft", tiny_tokenizer,
                            get_template("chatml"), seed=0)
    s = bundle.stats
    assert bundle.packed and s["packed"]
    assert s["records_per_file"] == {str(f): 40} and s["train_records"] == 36 and s["eval_records"] == 4
    assert s["samples"] == 36 and s["dropped_no_supervised"] == 0 and s["truncated"] == 0
    assert sum(len(r["lengths"]) for r in bundle.train) == 36
    assert sum(len(r["lengths"]) for r in bundle.eval) == 4
    assert s["tokens"] == sum(len(r["input_ids"]) for r in bundle.train)
    supervised = sum(label != IGNORE for r in bundle.train for label in r["labels"])
    # packing masks the first label of each sample, which is never supervised in SFT (it is a prompt token)
    assert s["supervised_tokens"] == supervised
    assert s["supervised_share"] == pytest.approx(supervised / s["tokens"], abs=1e-4)
    assert s["length"]["min"] <= s["length"]["p50"] <= s["length"]["p95"] <= s["length"]["max"] <= 128
    assert s["rows"] == len(bundle.train) < 36
    assert isinstance(bundle.collator(tiny_tokenizer), PackedCollator)
    # the eval split is seeded and disjoint from train
    again = build_datasets(cfg(train=[str(f)], max_length=128, eval_split=0.1), "sft", tiny_tokenizer,
                           get_template("chatml"), seed=0)
    assert again.eval == bundle.eval
    train_ids = {tuple(r["input_ids"]) for r in bundle.train}
    assert not any(tuple(r["input_ids"]) in train_ids for r in bundle.eval)


def test_sft_unpacked_truncation_and_drop_counts(tmp_path, tiny_tokenizer):
    f = chat_file(tmp_path / "c.jsonl", 20, long_every=5)  # 4 samples with a prompt far over max_length
    bundle = build_datasets(cfg(train=[str(f)], max_length=48, packing=False), "sft", tiny_tokenizer,
                            get_template("chatml"), seed=0)
    assert bundle.stats["dropped_no_supervised"] == 4 and bundle.stats["samples"] == 16
    assert not bundle.packed and isinstance(bundle.collator(tiny_tokenizer), PaddingCollator)
    assert all("position_ids" not in r and "truncated" not in r for r in bundle.train)
    # a max_length that cuts into some answers: those are counted as truncated and kept
    from tuneforge.data.readers import read_records
    from tuneforge.data.tokenize import encode_chat

    full = [encode_chat(r, tiny_tokenizer, get_template("chatml"), 10_000) for r in read_records(f)]
    first_answer_token = [next(i for i, label in enumerate(s["labels"]) if label != IGNORE) for s in full]
    expect_cut = sum(1 for s, a in zip(full, first_answer_token, strict=True) if a < 26 < len(s["input_ids"]))
    short = build_datasets(cfg(train=[str(f)], max_length=26, packing=False, eval=str(f)), "sft",
                           tiny_tokenizer, get_template("chatml"), seed=0)
    assert short.stats["truncated"] == expect_cut > 0 and all(len(r["input_ids"]) <= 26 for r in short.train)
    assert short.stats["eval_dropped_no_supervised"] == 20 - len(short.eval)


def test_all_dropped_is_a_clear_error(tmp_path, tiny_tokenizer):
    f = chat_file(tmp_path / "c.jsonl", 5)
    with pytest.raises(UserError, match=r"all 5 conversations lost every supervised token .* Raise data.max_length"):
        build_datasets(cfg(train=[str(f)], max_length=9), "sft", tiny_tokenizer, get_template("chatml"), seed=0)


def test_sft_rejects_text_records(tmp_path, tiny_tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("some text", encoding="utf-8")
    with pytest.raises(UserError, match=r"t.txt#1: a plain-text record.*use stage: pt"):
        build_datasets(cfg(train=[str(f)]), "sft", tiny_tokenizer, get_template("chatml"), seed=0)


def test_system_prompt_and_max_samples(tmp_path, tiny_tokenizer):
    f = chat_file(tmp_path / "c.jsonl", 10)
    bundle = build_datasets(cfg(train=[str(f)], max_samples=3, packing=False, system_prompt="You add."), "sft",
                            tiny_tokenizer, get_template("chatml"), seed=0)
    assert bundle.stats["samples"] == 3
    text = tiny_tokenizer.decode(bundle.train[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\nWhat is 0 plus 0?")


def test_pretraining_blocks_from_text_and_chat(tmp_path, tiny_tokenizer):
    from tests.helpers import stdlib_texts

    f = tmp_path / "docs.txt"
    f.write_text("\n\n\n".join(stdlib_texts(40)), encoding="utf-8")
    chat = chat_file(tmp_path / "c.jsonl", 30)
    bundle = build_datasets(cfg(train=[str(f), str(chat)], max_length=64, eval_split=0.1), "pt", tiny_tokenizer,
                            None, seed=0)
    assert all(len(r["input_ids"]) == 64 and r["labels"] == r["input_ids"] for r in bundle.train + bundle.eval)
    assert bundle.stats["padding_share"] == 0.0 and bundle.stats["supervised_share"] == 1.0
    assert "The answer is" in "".join(tiny_tokenizer.decode(r["input_ids"]) for r in bundle.train + bundle.eval)
    with pytest.raises(UserError, match="shorter than one block"):
        build_datasets(cfg(train=[str(chat)], max_length=1000), "pt", tiny_tokenizer, None, seed=0)


# --------------------------------------------------------------------------- CLI


def write_config(tmp_path, train, **data):
    import yaml

    config = {
        "run_name": "p",
        "model": {"from_config": {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                                  "vocab_size": 400}},
        "data": {"train": [str(train)], "max_length": 64, **data},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_cli_preview_json_and_marked_text(tmp_path, capsys):
    from tuneforge.cli import main

    config = write_config(tmp_path, chat_file(tmp_path / "c.jsonl", 30))
    assert main(["data", "preview", str(config), "-n", "2", "--json", "data.packing=false"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    sample = json.loads(lines[0])
    assert sample["text"].startswith("<|im_start|>user\nWhat is 0 plus 0?")
    assert len(sample["labels"]) == len(sample["input_ids"])
    supervised = [t for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != IGNORE]
    assert supervised and supervised[-1] == 3  # the answer ends with <|im_end|> (id 3 in the local tokenizer)

    assert main(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[The answer is 0.<|im_end|>]]" in out
    assert "samples  30 (dropped with no supervised token: 0, truncated: 0)" in out
    assert "supervised" in out and "padding share" in out


def test_cli_preview_bad_data_exits_2(tmp_path, capsys):
    from tuneforge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}\n',
                   encoding="utf-8")
    assert main(["data", "preview", str(write_config(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "unknown role 'bot'" in err and "Traceback" not in err


def test_data_package_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, tuneforge.commands.data, tuneforge.data.build, tuneforge.commands.preview; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_preview_missing_model_path_exits_2(tmp_path, capsys):
    import yaml

    from tuneforge.cli import main

    config = write_config(tmp_path, chat_file(tmp_path / "c.jsonl", 3))
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["model"] = {"name_or_path": str(tmp_path / "no-such-model")}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["data", "preview", str(config)]) == 2
    assert "local model path does not exist" in capsys.readouterr().err


def test_cli_preview_local_model_directory_tokenizer(tmp_path, capsys, tiny_tokenizer, tiny_gpt2):
    import yaml

    from tuneforge.cli import main

    model_dir = tmp_path / "model"
    tiny_gpt2.config.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    config = write_config(tmp_path, chat_file(tmp_path / "c.jsonl", 3))
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    raw["model"] = {"name_or_path": str(model_dir), "chat_template": "plain"}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["data", "preview", str(config), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "User: What is 0 plus 0?\nAssistant:[[ The answer is 0.<|endoftext|>]]" in out


def test_cli_preview_names_each_samples_masking_rule_and_its_cost(tmp_path, capsys):
    import yaml

    from tests.fixtures.templates.families import family_tokenizer
    from tuneforge.cli import main

    for family, kwargs in (("qwen3", {}), ("glm4", {})):
        tok_dir = tmp_path / family
        family_tokenizer(family).save_pretrained(tok_dir)
        (tok_dir / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
        rows = [{"messages": [{"role": "user", "content": f"Q{i}"},
                              {"role": "assistant", "content": f"<think>\nr{i}\n</think>\n\nA{i}"},
                              {"role": "user", "content": "More?"}, {"role": "assistant", "content": "Done."}]}
                for i in range(4)]
        data = tmp_path / f"{family}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        config = write_config(tmp_path, data, max_length=256)
        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        raw["model"]["from_config"]["tokenizer"] = str(tok_dir)
        raw["model"]["chat_template_kwargs"] = kwargs
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        assert main(["data", "preview", str(config), "-n", "1", "data.packing=false"]) == 0
        out = capsys.readouterr().out
        if family == "qwen3":  # Qwen3 strips the first answer's reasoning once a later turn follows
            assert "rule: prefix-diff (the answer follows the history as rendered); turns 3 in one sample" in out
            assert "turn 1 trained alone (the template renders it differently as history), +" in out
            assert "[[<think>\nr0\n</think>\n\nA0<|im_end|>]]" in out
            assert "masks    per-turn/prefix: 4 turns, prefix: 4 turns (4 trained alone, +" in out
        else:  # GLM-4 ends no turn: EOS is appended and named
            assert "'<|endoftext|>' (EOS) is appended to the answer and generation stops on it" in out
            assert "[[\nDone.<|endoftext|>]]" in out
            assert "stop token appended in 8 samples" in out
