"""One adapter per task (method.per_task): a parent run of task runs on one base, each trained only on its task's
records; resume skips finished tasks and resumes the interrupted one; refused configurations; per-task eval."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import kill_at_step
from tuneforge.cli import main
from tuneforge.config import validate_config


def _task_file(path: Path, n: int = 40, missing_at: int | None = None, tasks=("add", "echo")) -> Path:
    rows = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        if task == "add":
            messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{2 * i}"}]
        else:
            messages = [{"role": "user", "content": f"Repeat the word w{i}"}, {"role": "assistant", "content": f"w{i}"}]
        row = {"task": task, "messages": messages}
        if i == missing_at:
            row.pop("task")
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(out: Path, train_file: Path, **train) -> dict:
    return {"run_name": out.name, "output_dir": str(out), "seed": 5, "stage": "sft",
            "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "per_task": True},
            "data": {"train": [str(train_file)], "eval_split": 0.2, "max_length": 64},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "save_steps": 2,
                      "report_to": ["none"], "monitor": {"enabled": False}, **train}}


def _train(raw: dict, **kwargs):
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None, **kwargs)


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("event") == "log" and "loss" in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("per_task")
    data = _task_file(folder / "t.jsonl")
    out = folder / "multi"
    result = _train(_cfg(out, data))
    return {"folder": folder, "data": data, "out": out, "result": result}


@pytest.mark.slow
def test_each_task_gets_its_own_run_on_its_own_records(trained):
    from tuneforge.data.build import load_records
    from tuneforge.models.reference import per_task_runs, resolve

    out = trained["out"]
    runs = per_task_runs(out)
    assert list(runs) == ["add", "echo"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["per_task"] is True
    # the split is the one a single multi-task run makes (same seed), then divided by task
    cfg = validate_config(_cfg(out, trained["data"]))
    train, evaluation, _ = load_records(cfg.data, cfg.seed)
    for task, run in runs.items():
        want_train = [r["messages"] for r in train if r["task"] == task]
        want_eval = [r["messages"] for r in evaluation if r["task"] == task]
        task_summary = json.loads((run / "summary.json").read_text())
        assert task_summary["status"] == "completed" and task_summary["global_step"] == 6
        assert task_summary["data"]["tasks"] == {"train": {task: len(want_train)}, "eval": {task: len(want_eval)}}
        task_cfg = yaml.safe_load((run / "config.yaml").read_text())
        seen = [json.loads(line) for line in Path(task_cfg["data"]["train"][0]).read_text().splitlines()]
        assert [r["messages"] for r in seen] == want_train and {r["task"] for r in seen} == {task}
        seen_eval = [json.loads(line) for line in Path(task_cfg["data"]["eval"]).read_text().splitlines()]
        assert [r["messages"] for r in seen_eval] == want_eval
        row = summary["tasks"][task]
        assert (row["run"], row["train_records"], row["eval_records"]) == (f"tasks/{task}", len(want_train),
                                                                             len(want_eval))
        assert row["eval_loss"] > 0 and row["supervised_tokens"] == task_summary["data"]["supervised_tokens"]
        losses = _losses(run)
        assert sum(losses[-2:]) < sum(losses[:2]), (task, losses)
        # every task adapter sits on the parent's one base
        assert resolve(run).base == str((out / "base").resolve())
    assert summary["tasks"]["add"]["supervised_tokens"] != summary["tasks"]["echo"]["supervised_tokens"]
    with pytest.raises(Exception, match="a per-task run"):
        resolve(out).adapter  # noqa: B018 - the parent is no single model: the error names the task runs


@pytest.mark.slow
def test_eval_of_a_parent_scores_each_task_on_its_own_eval_data(trained, capsys):
    out = trained["out"]
    assert main(["eval", str(out), "--metrics", "ppl", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "add" in printed and "echo" in printed
    saved = json.loads((out / "eval_results.json").read_text())[-1]
    assert set(saved["tasks"]) == {"add", "echo"}
    for task in ("add", "echo"):
        entry = json.loads((out / "tasks" / task / "eval_results.json").read_text())[-1]
        assert entry["data"].endswith(f"{task}.eval.jsonl") and entry["ppl"] == saved["tasks"][task]["ppl"]
        assert entry["n"] == trained["result"].summary["tasks"][task]["eval_records"]


@pytest.mark.slow
def test_eval_of_a_parent_with_data_takes_each_task_s_records(trained, capsys):
    out, data = trained["out"], trained["data"]
    assert main(["eval", str(out), "--data", str(data), "--metrics", "ppl", "--device", "cpu", "--no-save",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {r["task"]: r["n"] for r in rows} == {"add": 20, "echo": 20}
    assert [r["model"] for r in rows] == [str(out / "tasks" / "add"), str(out / "tasks" / "echo")]


@pytest.mark.slow
def test_resume_skips_finished_tasks_and_continues_the_interrupted_one(trained, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tuneforge.train import per_task

    out = tmp_path / "multi"
    raw = {**_cfg(out, trained["data"]), "run_name": "multi"}
    with pytest.raises(KeyboardInterrupt):
        _train(raw, callbacks=[kill_at_step(4, output_dir_contains="/echo/")])
    assert (out / "tasks" / "add" / "final").is_dir() and not (out / "tasks" / "echo" / "final").exists()
    code = main(["train", _write(tmp_path, raw)])  # a fresh start over the unfinished run is refused
    assert code == 2
    trained_now = []
    original = per_task.run_training_of

    def recording(task_cfg, **kwargs):
        trained_now.append((Path(task_cfg.output_dir).name, kwargs["resume"]))
        return original(task_cfg, **kwargs)

    per_task.run_training_of = recording
    try:
        _train(raw, resume=True)
        assert trained_now == [("echo", True)]  # add was finished: skipped; echo resumed from its checkpoint
        _train(raw, resume=True)
        assert trained_now == [("echo", True)]  # all finished: nothing trains again
    finally:
        per_task.run_training_of = original
    for task in ("add", "echo"):
        a = load_file(str(trained["out"] / "tasks" / task / "final" / "adapter_model.safetensors"))
        b = load_file(str(out / "tasks" / task / "final" / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{task} {key}")
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def _write(folder: Path, raw: dict) -> str:
    config = folder / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    return str(config)


@pytest.mark.parametrize("case", ["missing_task", "one_task", "full", "continue_from", "task_weights", "bad_name"])
def test_refused_configurations_exit_2_and_write_nothing(tmp_path, capsys, case):
    data = tmp_path / "t.jsonl"
    out = tmp_path / "run"
    raw = _cfg(out, data)
    if case == "missing_task":
        _task_file(data, missing_at=3)
        expect = rf"{re.escape(str(data))}:4: training record has no 'task' field, but method.per_task is on"
    elif case == "one_task":
        _task_file(data, tasks=("add",))
        expect = r"method.per_task: the training records hold 1 task \(add\)"
    elif case == "bad_name":
        _task_file(data, tasks=("add", "../x"))
        expect = r"task name '../x' cannot name a task run directory"
    else:
        _task_file(data)
        if case == "full":
            raw["method"] = {"name": "full", "per_task": True}
            expect = r"method.per_task"
        elif case == "continue_from":
            raw["method"]["continue_from"] = str(tmp_path)
            expect = r"method.per_task together with method.continue_from: not supported"
        else:
            raw["data"]["task_weights"] = {"add": 2}
            expect = r"data.task_weights with method.per_task"
    assert main(["train", _write(tmp_path, raw)]) == 2
    err = capsys.readouterr().err
    assert re.search(expect, " ".join(err.split())), err
    assert not out.exists()
