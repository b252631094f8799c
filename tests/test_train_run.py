"""End-to-end training on tiny from-config models: run directory, adapters, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import kill_at_step
from tuneforge.cli import main
from tuneforge.config import validate_config
from tuneforge.data import builtin

pytestmark = pytest.mark.slow  # whole-pipeline runs (the fast tier: scripts/test.sh)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    items = builtin.classification_items(seed=1)
    for name, part in (("train", items[:160]), ("eval", items[160:184])):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for item in part:
                handle.write(json.dumps({"messages": item["messages"]}) + "\n")
    with open(folder / "text.jsonl", "w") as handle:
        for doc in builtin.pretrain_documents()[:12]:
            handle.write(json.dumps({"text": doc}) + "\n")
    return folder


def _cfg(out: Path, data: Path, **sections) -> dict:
    raw = {
        "run_name": out.name,
        "output_dir": str(out),
        "seed": 7,
        "stage": "sft",
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": [str(data / "train.jsonl")], "eval": str(data / "eval.jsonl"), "max_length": 128},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "logging_steps": 1, "eval_steps": 4, "save_steps": 4,
                  "report_to": ["none"]},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def _train(raw: dict, **kwargs):
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None, **kwargs)


def _logged(run_dir: Path, key: str) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line[key] for line in lines if line.get("event") == "log" and key in line]


def test_sft_lora_run_leaves_a_loadable_run_directory(tmp_path, chat_data):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.models.reference import load_for_inference

    out = tmp_path / "sft"
    result = _train(_cfg(out, chat_data, train={"max_steps": 16, "save_steps": 8}))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/adapter_config.json",
                 "final/adapter_model.safetensors", "final/tokenizer.json", "final/template.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 16
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["data"]["packed"] is True
    losses = _logged(out, "loss")
    assert losses[-1] < losses[0], losses
    assert (out / "checkpoints" / "checkpoint-8" / "COMPLETE").is_file()

    # Stock peft on the saved base gives the same logits as tuneforge's own loading.
    loaded = load_for_inference(str(out), device="cpu")
    base_dir = json.loads((out / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out / "final")).eval()
    ids = torch.tensor([loaded.tokenizer("The for statement is used to iterate.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, loaded.model(ids).logits)
    assert result.final_dir == out / "final"


def test_generate_command_uses_the_run(tmp_path, chat_data, capsys):
    out = tmp_path / "gen"
    _train(_cfg(out, chat_data, train={"max_steps": 2, "save_steps": None, "eval_steps": None}))
    assert main(["generate", str(out), "--prompt", "What is a list?", "--prompt", "And a dict?",
                 "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "### What is a list?" in printed and "### And a dict?" in printed


def _final_state(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_resume_equals_uninterrupted(tmp_path, chat_data, monkeypatch):
    import torch


    straight = tmp_path / "straight"
    _train(_cfg(straight, chat_data))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _train(_cfg(interrupted, chat_data), callbacks=[kill_at_step(6)])
    assert not (interrupted / "final").exists()
    # A checkpoint being written when the process died has no marker and must never be resumed from.
    half = interrupted / "checkpoints" / "checkpoint-6"
    half.mkdir()
    (half / "adapter_model.safetensors").write_bytes(b"truncated")

    _train(_cfg(interrupted, chat_data), resume=True)
    assert not half.exists()
    a, b = _final_state(straight), _final_state(interrupted)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_pretraining_stage_full_model_loss_falls(tmp_path, chat_data):
    out = tmp_path / "pt"
    raw = _cfg(out, chat_data)
    raw.update(stage="pt", method={"name": "full"})
    raw["data"] = {"train": [str(chat_data / "text.jsonl")], "max_length": 64}
    raw["train"] = {"max_steps": 20, "batch_size": 8, "lr": 3e-3, "logging_steps": 1, "report_to": ["none"]}
    _train(raw)
    assert (out / "final" / "model.safetensors").is_file()
    losses = _logged(out, "loss")
    assert losses[-1] < losses[0] - 0.5, losses


def test_existing_finished_run_is_not_overwritten(tmp_path, chat_data):
    from tuneforge.errors import UserError

    out = tmp_path / "once"
    raw = _cfg(out, chat_data, train={"max_steps": 1, "save_steps": None, "eval_steps": None})
    _train(raw)
    with pytest.raises(UserError, match="already holds a finished run"):
        _train(raw)


def _write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"data": {"train": ["missing.jsonl"]}}, "missing.jsonl"),
        ({"method": {"name": "lora", "target_modules": ["qkv_proj"]}}, "q_proj"),
        ({"model": {"from_config": None, "name_or_path": "./no/such/model"}}, "does not exist"),
    ],
    ids=["missing-data", "bad-target-modules", "missing-model-path"],
)
def test_bad_input_exits_2_without_traceback_or_half_written_run(tmp_path, chat_data, capsys, change, expected):
    out = tmp_path / "bad"
    raw = _cfg(out, chat_data)
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if key != "data" else {**raw[key], **value}
    raw["model"] = {k: v for k, v in raw["model"].items() if v is not None}
    config = _write_config(tmp_path / "bad.yaml", raw)
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (out / "final").exists() and not (out / "checkpoints").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, chat_data, capsys):
    config = _write_config(tmp_path / "r.yaml", _cfg(tmp_path / "none", chat_data))
    assert main(["train", str(config), "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("method", [
    {"name": "dora", "r": 4},
    {"name": "pissa", "r": 4},
    {"name": "adalora", "init_r": 6, "target_r": 4},
    {"name": "lora_plus", "r": 4, "lr_ratio": 8},
    {"name": "ia3"},
    {"name": "prefix_tuning", "num_virtual_tokens": 4},
    {"name": "galore", "rank": 8, "update_proj_gap": 2},
], ids=lambda m: m["name"])
def test_method_family_through_the_trainer_reloads_with_the_same_logits(tmp_path, chat_data, method):
    import torch

    from tuneforge.models.reference import load_for_inference

    out = tmp_path / method["name"]
    raw = _cfg(out, chat_data, train={"max_steps": 4, "save_steps": None, "eval_steps": None})
    raw["method"] = method
    result = _train(raw)
    loaded = load_for_inference(str(out), device="cpu")
    ids = torch.tensor([loaded.tokenizer("A class definition is an executable statement.")["input_ids"]])
    trained = result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, trained(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_auto_method_is_chosen_by_the_estimator_for_the_budget(tmp_path, chat_data):
    import yaml

    out = tmp_path / "auto"
    raw = _cfg(out, chat_data, train={"max_steps": 2, "save_steps": None, "eval_steps": None,
                                      "memory_budget_gb": 8})
    raw["method"] = {"name": "auto"}
    _train(raw)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # A tiny model fits easily in 8 GB: the guide's first choice, full fine-tuning, is what must be picked.
    assert saved["method"]["name"] == "full"
    assert (out / "final" / "model.safetensors").is_file()


def test_early_stopping_stops_when_eval_loss_stops_improving(tmp_path, chat_data):
    out = tmp_path / "early"
    # At a constant, high learning rate eval loss soon fails to improve: patience 1 must stop the run
    # long before max_steps, and the best checkpoint is the one restored into final/.
    raw = _cfg(out, chat_data, train={"max_steps": 60, "lr": 0.03, "eval_steps": 2, "save_steps": 2,
                                      "early_stopping_patience": 1, "scheduler": "constant"})
    result = _train(raw)
    evals = [json.loads(line)["eval_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("event") == "eval"]
    assert result.summary["global_step"] < 60
    assert result.summary["best_eval_loss"] == min(evals)


@pytest.mark.slow
def test_a_run_whose_output_is_a_log_file_prints_a_progress_line_per_logging_step(tmp_path, chat_data):
    """``tuneforge train x.yaml > log 2>&1``: not a terminal, so plain lines (step/total, loss, lr, tok/s, ETA)."""
    import re
    import subprocess
    import sys

    import yaml

    raw = _cfg(tmp_path / "runs" / "logged", chat_data,
               train={"max_steps": 6, "logging_steps": 2, "eval_steps": None, "save_steps": None})
    config = tmp_path / "logged.yaml"
    config.write_text(yaml.safe_dump(raw))
    log = tmp_path / "log"
    with open(log, "w") as handle:
        done = subprocess.run([str(Path(sys.executable).parent / "tuneforge"), "train", str(config)],
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    steps = [int(m.group(1)) for m in re.finditer(
        r"^sft step (\d+)/6 · loss [\d.]+ · lr [\d.]+e[-+]\d+ · [\d,]+ tok/s · ETA \d+:\d\d:\d\d$", text, re.M)]
    assert steps == [1, 2, 4, 6], text  # the first step and every logging step (train.logging_steps: 2)
    assert "\x1b[" not in text  # no terminal control codes in a log file
