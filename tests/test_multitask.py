"""Multi-task data: the task field, data.task_prefix, data.task_weights, per-task eval in the summary and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneforge.config.schema import DataConfig
from tuneforge.data.build import build_datasets
from tuneforge.data.mix import add_task_prefix, weight_tasks
from tuneforge.data.readers import read_records
from tuneforge.data.templates import get_template
from tuneforge.errors import UserError


def task_file(path: Path, n: int = 24, missing_at: int | None = None) -> Path:
    rows = []
    for i in range(n):
        if i % 2:
            row = {"task": "add", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                               {"role": "assistant", "content": f"{2 * i}"}]}
        else:
            row = {"task": "echo", "messages": [{"role": "user", "content": f"Repeat the word w{i}"},
                                                {"role": "assistant", "content": f"w{i}"}]}
        if i == missing_at:
            row.pop("task")
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_readers_keep_the_task_field(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"task": 7, "text": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    records = read_records(f)
    assert records[0]["task"] == "7" and "task" not in records[1]


def test_task_prefix_goes_on_the_first_user_turn():
    record = {"task": "add", "source": "a.jsonl:3", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]}
    out = add_task_prefix(record)
    assert [m["content"] for m in out["messages"]] == ["Be brief.", "[add] 1+1?", "2", "2+2?"]
    assert record["messages"][1]["content"] == "1+1?"  # the input is not modified


def test_missing_task_names_the_record(tmp_path, tiny_tokenizer):
    f = task_file(tmp_path / "t.jsonl", missing_at=5)
    cfg = DataConfig(train=[str(f)], max_length=64, task_prefix=True)
    with pytest.raises(UserError, match=rf"{f}:6: record has no 'task' field, but data.task_prefix is on"):
        build_datasets(cfg, "sft", tiny_tokenizer, get_template("chatml"), seed=0)


def test_prefixed_samples_train_and_eval(tmp_path, tiny_tokenizer):
    f = task_file(tmp_path / "t.jsonl")
    e = task_file(tmp_path / "e.jsonl", n=6)
    cfg = DataConfig(train=[str(f)], eval=str(e), max_length=64, task_prefix=True, packing=False)
    bundle = build_datasets(cfg, "sft", tiny_tokenizer, get_template("chatml"), seed=0)
    texts = [tiny_tokenizer.decode(r["input_ids"]) for r in bundle.train]
    assert sum("[add] What is" in t for t in texts) == 12 and sum("[echo] Repeat" in t for t in texts) == 12
    assert all("[echo]" in tiny_tokenizer.decode(r["input_ids"]) for r in bundle.eval_by_task["echo"])
    assert bundle.stats["tasks"] == {"train": {"echo": 12, "add": 12}, "eval": {"echo": 3, "add": 3}}
    assert sum(len(rows) for rows in bundle.eval_by_task.values()) == len(bundle.eval)


def test_task_weights_resample_deterministically():
    records = [{"task": "a", "i": i} for i in range(10)] + [{"task": "b", "i": i} for i in range(10)]
    out = weight_tasks(records, {"a": 2.0, "b": 0.5}, seed=1)
    a = [r["i"] for r in out if r["task"] == "a"]
    b = [r["i"] for r in out if r["task"] == "b"]
    assert sorted(a) == sorted(list(range(10)) * 2)
    assert len(b) == 5 and len(set(b)) == 5
    assert weight_tasks(records, {"a": 2.0, "b": 0.5}, seed=1) == out
    assert weight_tasks(records, {"b": 0.5}, seed=2) != weight_tasks(records, {"b": 0.5}, seed=1)
    with pytest.raises(UserError, match=r"data.task_weights names \['c'\], which no training record has"):
        weight_tasks(records, {"c": 1.0}, seed=0)


def test_multitask_run_reports_each_task(tmp_path):
    from tuneforge.config import validate_config
    from tuneforge.evaluate.report import build_report
    from tuneforge.train.run import run_training

    f = task_file(tmp_path / "t.jsonl", n=40)
    e = task_file(tmp_path / "e.jsonl", n=8)
    out = tmp_path / "run"
    raw = {"run_name": "run", "output_dir": str(out), "seed": 1, "stage": "sft",
           "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
           "method": {"name": "lora", "r": 4, "alpha": 8},
           "data": {"train": [str(f)], "eval": str(e), "max_length": 64, "task_prefix": True,
                    "task_weights": {"add": 2}},
           "train": {"max_steps": 3, "batch_size": 4, "report_to": ["none"], "monitor": {"enabled": False}}}
    result = run_training(validate_config(raw), echo=lambda *_: None)
    tasks = result.summary["tasks"]
    assert set(tasks) == {"add", "echo"}
    assert all(t["eval_loss"] > 0 and t["eval_rows"] > 0 for t in tasks.values())
    assert tasks["add"]["eval_loss"] != tasks["echo"]["eval_loss"]
    assert result.summary["data"]["tasks"]["train"] == {"echo": 20, "add": 40}
    page = build_report(out, samples=False).read_text()
    assert "tasks.add.eval_loss" in page and "tasks.echo.eval_loss" in page


def test_task_prefix_without_task_exits_2_and_writes_nothing(tmp_path):
    import yaml

    from tuneforge.cli import main

    out = tmp_path / "run"
    raw = {"run_name": "run", "output_dir": str(out), "stage": "sft",
           "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
           "data": {"train": [str(task_file(tmp_path / "t.jsonl", missing_at=0))], "max_length": 64,
                    "task_prefix": True},
           "train": {"max_steps": 1, "report_to": ["none"]}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    assert not out.exists()


def test_data_preview_shows_the_task_prefix(tmp_path):
    import io

    import yaml

    from tuneforge.commands.preview import run_preview

    raw = {"model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
           "data": {"train": [str(task_file(tmp_path / "t.jsonl"))], "max_length": 64, "task_prefix": True,
                    "mix": [{"name": "pydoc", "weight": 0.05}]}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = io.StringIO()
    assert run_preview(str(config), n=2, as_json=True, out=out) == 0
    texts = [json.loads(line)["text"] for line in out.getvalue().splitlines()]
    assert len(texts) == 2 and "[echo] Repeat the word w0" in texts[0] and "[add] What is 1" in texts[1]
