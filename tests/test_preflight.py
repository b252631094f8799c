"""The memory preflight of eval, generate and abtest (evaluate/preflight.py): the estimate is printed before the
model loads, a batch that does not fit is lowered to one that does, and a model that cannot fit stops the command
with both numbers (a UserError: exit 2, one line, no traceback)."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import make_run, save_base


@pytest.fixture()
def run(tmp_path, tiny_llama, tiny_tokenizer):
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    return make_run(tmp_path / "run", base, r=4)


@pytest.fixture()
def texts(tmp_path, tiny_tokenizer):
    rows = [{"text": " ".join(["the quick brown fox jumps over the lazy dog"] * (8 + i))} for i in range(6)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def chats(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"say {word}"}, {"role": "assistant", "content": word}]}
            for word in ("one", "two", "three", "four", "five")]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_loading(monkeypatch):
    """Any model load fails the test: a refusal must come before it."""
    import tuneforge.models.reference as reference

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the preflight refused")

    monkeypatch.setattr(reference, "load_for_inference", refuse)


def _bill(spec, rows: int, tokens: int, generation: bool) -> int:
    from tuneforge.evaluate.preflight import plan_rows

    return plan_rows(str(spec), rows=rows, tokens=tokens, generation=generation, max_memory=10 ** 12,
                     report=lambda _: None).total


def _scoring_shape(spec, records_file) -> tuple[int, int]:
    from tuneforge.evaluate.preflight import scoring_windows
    from tuneforge.evaluate.runner import load_eval_records

    return scoring_windows(str(spec), load_eval_records(str(records_file)), None, None)


def test_eval_refuses_before_loading_with_the_estimate_and_the_budget(run, texts, monkeypatch, capsys):
    from tuneforge.cli import main

    _no_loading(monkeypatch)
    code = main(["eval", str(run), "--data", str(texts), "--metrics", "ppl", "--no-save", "--max-memory", "64KiB"])
    err = capsys.readouterr().err
    assert code == 2
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert re.search(r"needs about [0-9.]+ MiB even one row at a time .* above the budget of 0\.1 MiB", line), line
    assert "--max-memory" in line and "Traceback" not in err


def test_eval_lowers_the_batch_when_only_a_smaller_one_fits_and_scores_the_same(run, texts, capsys):
    from tuneforge.cli import main

    width, count = _scoring_shape(run, texts)
    assert count >= 4
    budget = _bill(run, 2, width, False) + 1024  # two rows fit, three do not
    assert _bill(run, 3, width, False) > budget
    assert main(["eval", str(run), "--data", str(texts), "--metrics", "ppl", "--no-save", "--json",
                 "--batch-size", "4", "--max-memory", str(budget)]) == 0
    captured = capsys.readouterr()
    assert "--batch-size lowered from 4 to 2 to fit" in captured.err
    lowered = json.loads(captured.out.splitlines()[-1])
    assert main(["eval", str(run), "--data", str(texts), "--metrics", "ppl", "--no-save", "--json",
                 "--batch-size", "4", "--max-memory", "64GB"]) == 0
    captured = capsys.readouterr()
    assert "lowered" not in captured.err
    assert re.search(r"eval memory: .* estimated peak [0-9.]+ MiB for 4 x \d+ tokens \(scoring; ", captured.err)
    full = json.loads(captured.out.splitlines()[-1])
    assert lowered["ppl"] == pytest.approx(full["ppl"], rel=1e-5)  # the batch size does not change the score


def test_eval_with_generation_bills_prompt_plus_new_tokens_and_lowers_the_generation_batch(run, chats, capsys):
    from tuneforge.cli import main
    from tuneforge.evaluate.preflight import longest_prompt
    from tuneforge.evaluate.runner import load_eval_records, prompt_and_reference

    prompts = [prompt_and_reference(r)[0] for r in load_eval_records(str(chats))]
    tokens = longest_prompt(str(run), prompts) + 8
    budget = _bill(run, 2, tokens, True) + 1024
    assert _bill(run, 3, tokens, True) > budget
    assert main(["eval", str(run), "--data", str(chats), "--metrics", "exact", "--no-save", "--json",
                 "--max-new-tokens", "8", "--max-memory", str(budget)]) == 0
    err = capsys.readouterr().err
    assert f"for 5 x {tokens} tokens (generating; " in err
    assert "generation batch lowered from 5 to 2 to fit" in err


def test_generate_refuses_and_a_budget_that_fits_runs(run, monkeypatch, capsys):
    from tuneforge.cli import main

    assert main(["generate", str(run), "--prompt", "hello", "--max-new-tokens", "4", "--max-memory", "64GB"]) == 0
    captured = capsys.readouterr()
    assert "generate memory: " in captured.err and "for 1 x " in captured.err
    assert "memory" not in captured.out  # the estimate goes to stderr: stdout keeps only the answer
    _no_loading(monkeypatch)
    assert main(["generate", str(run), "--prompt", "hello", "--max-memory", "32KiB"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: generate: .* needs about [0-9.]+ MiB even one row .* above the budget of 0\.0 MiB", err)


def test_abtest_refuses_before_loading(run, chats, tmp_path, monkeypatch, capsys):
    from tuneforge.cli import main

    _no_loading(monkeypatch)
    assert main(["abtest", str(run), str(run), "--prompts", str(chats), "--out", str(tmp_path / "s.html"),
                 "--max-memory", "64KiB"]) == 2
    err = capsys.readouterr().err
    assert "error: abtest: " in err and "above the budget of 0.1 MiB" in err
    assert not (tmp_path / "s.html").exists()


def test_a_bad_budget_is_refused_naming_the_option(run, texts, capsys):
    from tuneforge.cli import main

    assert main(["eval", str(run), "--data", str(texts), "--no-save", "--max-memory", "lots"]) == 2
    assert "--max-memory 'lots'" in capsys.readouterr().err


def test_largest_fitting_finds_the_largest_row_count_under_the_budget():
    from tuneforge.models.memory import largest_fitting

    assert largest_fitting(lambda n: 100 + 10 * n, 8, 165) == 6
    assert largest_fitting(lambda n: 100 + 10 * n, 8, 1000) == 8
    assert largest_fitting(lambda n: 100 + 10 * n, 8, 105) is None


def test_a_preference_pair_is_billed_as_its_two_conversations():
    from tuneforge.data.readers import preference_record
    from tuneforge.evaluate.preflight import scored_sequences

    pair = preference_record({"prompt": "Name a loop.", "chosen": "for", "rejected": "a spoon"}, "p.jsonl:1")
    text = {"text": "plain text", "source": "t.jsonl:1"}
    sequences = scored_sequences([pair, text])
    assert [s.get("messages", s.get("text")) for s in sequences] == [
        pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"], "plain text"]


def test_eval_and_generate_load_the_tokenizer_once(run, chats, monkeypatch, capsys):
    """The preflight measures prompts with the tokenizer the model then loads with: one copy, not two (a second
    load stayed ~15 MiB more resident than the first on a 49k vocabulary)."""
    import tuneforge.models.load as load
    from tuneforge.cli import main

    calls = []
    original = load.load_tokenizer

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(load, "load_tokenizer", counted)
    assert main(["eval", str(run), "--data", str(chats), "--metrics", "ppl,exact", "--max-new-tokens", "2",
                 "--no-save", "--json"]) == 0
    assert len(calls) == 1, calls
    calls.clear()
    assert main(["generate", str(run), "--prompt", "hello", "--max-new-tokens", "2"]) == 0
    assert len(calls) == 1, calls
