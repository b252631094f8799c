"""`tuneforge eval` and `tuneforge abtest A B` end to end on tiny saved models; bad input exits 2 with a message."""

from __future__ import annotations

import json

import pytest

from tuneforge.cli import main

CHAT = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
    {"instruction": "Name a loop statement.", "input": "", "output": "for"},
    {"messages": [{"role": "user", "content": "And a tuple?"},
                  {"role": "assistant", "content": "An immutable sequence of items."}]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def test_eval_two_models_json(tmp_path, tiny_llama_dir, capsys):
    data = _jsonl(tmp_path / "eval.jsonl", [CHAT[0], CHAT[2], CHAT[0]])
    code = main(["eval", str(tiny_llama_dir), str(tiny_llama_dir), "--data", str(data), "--metrics", "ppl,bleu,rouge,exact,contains",
                 "--json", "--limit", "2", "--max-new-tokens", "4", "--no-save"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(rows) == 2 and rows[0]["model"] == str(tiny_llama_dir)
    for key in ("ppl", "tokens", "bleu", "rouge1", "rouge2", "rougeL", "exact", "contains"):
        assert key in rows[0]
    assert rows[0]["n"] == 2
    # Same model, same data, same (greedy) settings → same numbers.
    assert rows[0]["ppl"] == pytest.approx(rows[1]["ppl"]) and rows[0]["bleu"] == rows[1]["bleu"]

    # ppl equals the library function on the same records (answers only: fewer tokens than the whole rendering).
    from tuneforge.evaluate.perplexity import perplexity
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(str(tiny_llama_dir), device="cpu")
    direct = perplexity(loaded.model, loaded.tokenizer, [CHAT[0], CHAT[2]], template=loaded.template)
    assert rows[0]["tokens"] == direct.tokens and rows[0]["ppl"] == pytest.approx(direct.ppl, rel=1e-5)


def test_eval_table_and_run_dir_results(tmp_path, tiny_llama_dir, capsys):
    data = _jsonl(tmp_path / "eval.jsonl", [CHAT[1], {"instruction": "Say hi", "output": "hi"}])  # alpaca
    run = tmp_path / "runs" / "demo"
    (run / "final").mkdir(parents=True)
    for f in tiny_llama_dir.iterdir():
        (run / "final" / f.name).write_bytes(f.read_bytes())
    (run / "config.yaml").write_text("run_name: demo\n")
    assert main(["eval", str(run), "--data", str(data), "--metrics", "ppl,exact", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "ppl" in out and "exact" in out
    saved = json.loads((run / "eval_results.json").read_text())
    assert saved[0]["model"] == str(run) and saved[0]["data"] == str(data) and "ppl" in saved[0]


@pytest.mark.parametrize(
    ("rows", "argv", "message"),
    [
        ([{"text": "just text"}], ["--metrics", "bleu"], "no reference answer"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], ["--metrics", "rougeL"], "no reference answer"),
        ([{"foo": 1}], ["--metrics", "ppl"], "eval.jsonl"),
        ([{"text": "x"}], ["--metrics", "ppl,blue"], "did you mean 'bleu'"),
        ([{"text": "x"}], ["--metrics", "ppl", "--limit", "0"], "--limit"),
    ],
)
def test_eval_bad_input(tmp_path, tiny_llama_dir, capsys, rows, argv, message):
    data = _jsonl(tmp_path / "eval.jsonl", rows)
    assert main(["eval", str(tiny_llama_dir), "--data", str(data), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_eval_missing_model_and_data(tmp_path, tiny_llama_dir, capsys):
    data = _jsonl(tmp_path / "eval.jsonl", [{"text": "x y z"}])
    assert main(["eval", str(tmp_path / "no_such_model"), "--data", str(data)]) == 2
    assert "no_such_model" in capsys.readouterr().err
    assert main(["eval", str(tiny_llama_dir), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_abtest_makes_a_sheet_from_two_models(tmp_path, tiny_llama_dir, capsys):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [CHAT[0], CHAT[2]])
    sheet = tmp_path / "sheet.html"
    assert main(["abtest", str(tiny_llama_dir), str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(sheet),
                 "--max-new-tokens", "4", "--shuffle-seed", "3"]) == 0
    key = json.loads((tmp_path / "sheet.key.json").read_text())
    assert len(key["items"]) == 2 and key["seed"] == 3 and key["generation"]["max_new_tokens"] == 4
    assert key["items"][0]["prompt"] == "What is a list?"
    assert str(tiny_llama_dir) not in sheet.read_text()
    votes = _jsonl(tmp_path / "votes.jsonl", [{"sheet_id": key["sheet_id"], "item": it["id"], "vote": "tie"}
                                               for it in key["items"]])
    capsys.readouterr()
    assert main(["abtest", "score", str(sheet), str(votes), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tie"] == 2 and result["votes"] == 2


def test_abtest_terminal_mode(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [CHAT[0], CHAT[2]])
    answers = iter(["l", "t"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(answers))
    out = tmp_path / "ab.html"
    assert main(["abtest", str(tiny_llama_dir), str(tiny_llama_dir), "--prompts", str(prompts), "--out", str(out),
                 "--terminal", "--max-new-tokens", "3", "--shuffle-seed", "0"]) == 0
    votes = [json.loads(x) for x in (tmp_path / "ab.votes.jsonl").read_text().splitlines()]
    assert [v["vote"] for v in votes] == ["left", "tie"]
    assert not out.exists() and (tmp_path / "ab.key.json").exists()
    assert "95% CI" in capsys.readouterr().out


def test_abtest_judge_cli(tmp_path, tiny_llama_dir, capsys):
    from tuneforge.evaluate import abtest

    items = abtest.make_items(["What is a list?", "Name a loop."], ["A sequence.", "for"], ["No idea.", "x"], 5)
    sheet, key = abtest.write_sheet(tmp_path / "s.html", items, "a", "b", 5, {})
    assert main(["abtest", "judge", str(key), "--judge", str(tiny_llama_dir), "--json"]) == 0
    votes = [json.loads(x) for x in (tmp_path / "s.judge.votes.jsonl").read_text().splitlines()]
    assert [v["item"] for v in votes] == [it["id"] for it in items]
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["votes"] == 2
    assert main(["abtest", "judge", str(key)]) == 2  # --judge missing
