"""`tuneforge eval --retention`: the start model's and the tuned model's perplexity on general data; the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_run, save_base, stdlib_texts
from tuneforge.cli import main


@pytest.fixture()
def setup(tmp_path, tiny_llama, tiny_tokenizer):
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    run = make_run(tmp_path / "run", base, scale=20.0)  # a LoRA far from zero: it changes general ppl
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_texts(30)[10:30]))
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}"},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(5)))
    return base, run, general, task


def _ppl(model_dir: str, general: Path) -> float:
    from tuneforge.evaluate.perplexity import perplexity
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(model_dir, device="cpu")
    records = [json.loads(line) for line in general.read_text().splitlines()]
    return perplexity(loaded.model, loaded.tokenizer, records, template=loaded.template).ppl


def test_adapter_run_compared_with_its_base(setup, capsys):
    base, run, general, task = setup
    assert main(["eval", str(run), "--data", str(task), "--metrics", "ppl", "--retention", str(general),
                 "--json", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    start, tuned = _ppl(str(base), general), _ppl(str(run), general)
    assert row["retention_start_ppl"] == pytest.approx(start, rel=1e-5)
    assert row["retention_ppl"] == pytest.approx(tuned, rel=1e-5)
    assert abs(tuned - start) > 1e-3  # the adapter does change it, so the two columns are really two models
    assert row["retention_ppl_increase"] == pytest.approx(100 * (tuned / start - 1), rel=1e-5)
    assert row["retention_start"] == "adapter disabled" and "ppl" in row  # beside the task metric
    saved = json.loads((run / "eval_results.json").read_text())[-1]
    assert saved["retention_ppl"] == row["retention_ppl"] and saved["retention_data"] == str(general)

    from tuneforge.evaluate.report import build_report

    page = build_report(run, samples=False).read_text()
    assert "general ppl (start)" in page and "general ppl (tuned)" in page
    assert f"{row['retention_start_ppl']:.3f}" in page and f"{row['retention_ppl_increase']:+.1f}%" in page


def test_table_shows_both_perplexities(setup, capsys):
    base, run, general, task = setup
    assert main(["eval", str(run), "--data", str(task), "--metrics", "ppl", "--retention", str(general),
                 "--no-save", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "general ppl" in out and "increase" in out and "%" in out


def _full_run(base: Path, run: Path) -> Path:
    """A full fine-tuning run started from ``base`` (its final/ is ``base`` with a changed norm)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    save_base(model, AutoTokenizer.from_pretrained(base), run / "final")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(base)},
                                                     "method": {"name": "full"}, "data": {"train": ["x"]}}))
    return run


def test_full_run_starts_from_its_config_model(setup, tmp_path, capsys):
    base, _, general, task = setup
    run = _full_run(base, tmp_path / "full")
    assert main(["eval", str(run), "--data", str(task), "--metrics", "ppl", "--retention", str(general),
                 "--json", "--no-save", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["retention_start"] == str(base)
    assert row["retention_start_ppl"] == pytest.approx(_ppl(str(base), general), rel=1e-5)
    assert row["retention_ppl"] == pytest.approx(_ppl(str(run), general), rel=1e-5)


def test_missing_general_data_exits_2_before_loading_and_writes_nothing(setup, capsys):
    _, run, _, task = setup
    assert main(["eval", str(run), "--data", str(task), "--metrics", "ppl", "--retention",
                 str(run.parent / "nope.jsonl"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "nope.jsonl" in err and "evaluating" not in err
    assert not (run / "eval_results.json").exists()


def test_retention_alone_needs_no_task_data(setup, capsys):
    """`tuneforge eval RUN --retention GENERAL` scores forgetting only (issue 22: it demanded --data)."""
    base, run, general, _ = setup
    assert main(["eval", str(run), "--retention", str(general), "--json", "--device", "cpu"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["retention_ppl"] == pytest.approx(_ppl(str(run), general), rel=1e-5)
    assert row["retention_start_ppl"] == pytest.approx(_ppl(str(base), general), rel=1e-5)
    assert "ppl" not in row and "n" not in row  # no task metric without task data
    saved = json.loads((run / "eval_results.json").read_text())[-1]
    assert saved["retention_ppl"] == row["retention_ppl"] and saved["metrics"] == []
    assert main(["eval", str(run), "--retention", str(general), "--no-save", "--device", "cpu"]) == 0
    assert "general ppl (tuned)" in capsys.readouterr().out  # the table too
    # a task metric without task data is a mistake, said before any model loads
    assert main(["eval", str(run), "--retention", str(general), "--metrics", "bleu", "--device", "cpu"]) == 2
    assert "give --data" in capsys.readouterr().err
    assert main(["eval", str(run), "--device", "cpu"]) == 2
    assert "--retention GENERAL_DATA alone" in capsys.readouterr().err


def test_retention_refuses_before_loading_with_the_estimate_and_the_budget(setup, monkeypatch, capsys):
    """Issue 28: --retention has its own memory preflight (the general data's widest window), run before any
    model loads — also before the task metrics of --data."""
    import tuneforge.models.reference as reference

    _, run, general, task = setup

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the preflight refused")

    monkeypatch.setattr(reference, "load_for_inference", refuse)
    code = main(["eval", str(run), "--data", str(task), "--metrics", "ppl", "--retention", str(general),
                 "--no-save", "--device", "cpu", "--max-memory", "64KiB"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert "eval --retention: " in line and "even one row at a time" in line and "budget of 0.1 MiB" in line


def test_retention_lowers_its_batch_to_fit_and_scores_the_same(setup, capsys):
    from tuneforge.evaluate.preflight import plan_rows, scoring_windows
    from tuneforge.evaluate.retention import load_general

    _, run, general, _ = setup
    width, count = scoring_windows(str(run), load_general(str(general)), None, None)
    assert count >= 3

    def bill(rows: int) -> int:
        return plan_rows(str(run), rows=rows, tokens=width, generation=False, max_memory=10 ** 12,
                         report=lambda _: None).total

    budget = bill(1) + 1024
    assert bill(2) > budget
    assert main(["eval", str(run), "--retention", str(general), "--json", "--no-save", "--device", "cpu",
                 "--batch-size", "4", "--max-memory", str(budget)]) == 0
    captured = capsys.readouterr()
    assert "eval --retention memory: " in captured.err and "--batch-size lowered from 4 to 1 to fit" in captured.err
    lowered = json.loads(captured.out.strip().splitlines()[-1])
    assert lowered["retention_ppl"] == pytest.approx(_ppl(str(run), general), rel=1e-5)


def test_a_full_runs_start_model_loads_after_the_tuned_one_is_released(setup, tmp_path, monkeypatch, capsys):
    """One model in memory at a time (what the preflight bills): the tuned model is gone before the start loads."""
    import gc
    import weakref

    import tuneforge.models.reference as reference

    base, _, general, _ = setup
    run = _full_run(base, tmp_path / "full")
    original, alive = reference.load_for_inference, []

    def tracked(*args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in tracked.models))
        loaded = original(*args, **kwargs)
        tracked.models.append(weakref.ref(loaded.model))
        return loaded

    tracked.models = []
    monkeypatch.setattr(reference, "load_for_inference", tracked)
    assert main(["eval", str(run), "--retention", str(general), "--json", "--no-save", "--device", "cpu"]) == 0
    assert alive == [0, 0]  # two loads (tuned, then start), none alive when the next one starts
