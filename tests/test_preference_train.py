"""Preference stages end to end on tiny from-config models: run directory, metrics, reference, resume, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import kill_at_step
from tuneforge.config import validate_config
from tuneforge.data import builtin
from tuneforge.data.templates import get_template


def preference_rows(items: list[dict]) -> list[dict]:
    """Pairs on the built-in task's prompts that a tiny random model can learn in a few steps: an answer naming
    the right label is chosen over a curt refusal."""
    return [{"prompt": item["messages"][0]["content"], "chosen": f"It is about {item['label']}.", "rejected": "No."}
            for item in items]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prefs")
    items = builtin.classification_items(seed=3)
    write_jsonl(folder / "train.jsonl", preference_rows(items[:48]))
    write_jsonl(folder / "eval.jsonl", preference_rows(items[48:56]))
    kto = []
    for row in preference_rows(items[:24]):
        kto.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        kto.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    write_jsonl(folder / "kto.jsonl", kto)
    return folder


def _cfg(out: Path, data_dir: Path, stage: str = "dpo", **sections) -> dict:
    raw = {
        "run_name": out.name,
        "output_dir": str(out),
        "seed": 5,
        "stage": stage,
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512},
                  "chat_template": "plain"},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "attention"},
        "data": {"train": [str(data_dir / "train.jsonl")], "eval": str(data_dir / "eval.jsonl"), "max_length": 96},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "eval_steps": 3,
                  "save_steps": 3, "report_to": ["none"], "scheduler": "constant"},
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "method"
        raw[key] = {**raw.get(key, {}), **value} if merge else value
    return raw


def _train(raw: dict, **kwargs):
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None, **kwargs)


def _logs(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("event") == "log" and "loss" in line]


def test_dpo_lora_run_logs_reward_metrics_and_saves_only_the_adapter(tmp_path, pref_data):
    out = tmp_path / "dpo"
    result = _train(_cfg(out, pref_data))
    logs = _logs(out)
    assert len(logs) == 6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(key in line for line in logs), key
    # The first step is at the reference: the policy equals it, so the loss is log 2 and every reward 0.
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert logs[-1]["rewards/margins"] > 0.0, [line["rewards/margins"] for line in logs]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stage"] == "dpo"
    assert summary["data"]["samples"] == 48 and summary["data"]["dropped_too_long"] == 0
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file()
    assert not (final / "ref").exists()  # no helper adapter in the saved run
    assert list(result.model.peft_config) == ["default"]
    assert any(json.loads(line).get("event") == "eval" for line in (out / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_dpo_raises_preference_accuracy_on_held_out_pairs(tmp_path):
    from transformers import AutoTokenizer

    from tuneforge.data.preference import load_stage_records
    from tuneforge.evaluate.preference import preference_accuracy

    rows = preference_rows(builtin.classification_items(seed=4)[:40])
    write_jsonl(tmp_path / "train.jsonl", rows[:32])
    write_jsonl(tmp_path / "eval.jsonl", rows[32:])
    out = tmp_path / "run"
    result = _train(_cfg(out, tmp_path, train={"max_steps": 8, "save_steps": None, "eval_steps": None}))
    cfg = validate_config(_cfg(out, tmp_path))
    held_out = load_stage_records(cfg.data, "paired", seed=0)[1]
    tokenizer, template = AutoTokenizer.from_pretrained(out / "final"), get_template("plain")
    tuned = preference_accuracy(result.model, tokenizer, template, held_out)
    with result.model.disable_adapter():  # the starting model
        base = preference_accuracy(result.model, tokenizer, template, held_out)
    # The model's own likelihood still prefers the short answer, but less so: the gap closed by > 1 nat per pair.
    assert tuned.pairs == base.pairs == 8 and tuned.margin > base.margin + 1.0, (base, tuned)
    # DPO's implicit reward (against the disabled adapter) ranks every held-out pair right.
    implicit = preference_accuracy(result.model, tokenizer, template, held_out, reference=True)
    assert implicit.accuracy == 100.0 and implicit.margin > 0, implicit


@pytest.mark.slow
def test_resume_mid_dpo_equals_uninterrupted(tmp_path, pref_data):
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    _train(_cfg(straight, pref_data, data={"eval": None}))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _train(_cfg(interrupted, pref_data, data={"eval": None}), callbacks=[kill_at_step(4)])
    assert not (interrupted / "final").exists()
    _train(_cfg(interrupted, pref_data, data={"eval": None}), resume=True)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(interrupted / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-6, key
    assert _logs(interrupted)[-1]["loss"] == pytest.approx(_logs(straight)[-1]["loss"], abs=1e-6)


@pytest.mark.slow
def test_full_fine_tuning_reference_copy_and_precomputed_reference_agree(tmp_path, pref_data):
    runs = {}
    for name, precompute in (("copy", False), ("precomputed", True)):
        out = tmp_path / name
        _train(_cfg(out, pref_data, method={"name": "full"}, data={"eval": None},
                    preference={"precompute_ref": precompute}, train={"max_steps": 3, "save_steps": None}))
        runs[name] = _logs(out)
    assert runs["copy"][0]["loss"] == pytest.approx(0.6931, abs=1e-3)
    for a, b in zip(runs["copy"], runs["precomputed"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-4)
    assert runs["copy"][-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "Q", "chosen": "a"}, "bad.jsonl:3: preference record has no 'rejected'"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "bad.jsonl:3: 'chosen' and 'rejected' are identical"),
    ({"prompt": "Q", "completion": "a", "label": True}, "bad.jsonl:3: preference record has no 'chosen'"),
])
def test_bad_preference_data_exits_2_naming_file_and_line(tmp_path, pref_data, capsys, row, expected):
    import yaml

    from tuneforge.cli import main

    good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    raw = _cfg(tmp_path / "run", pref_data, data={"train": [str(bad)], "eval": None})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["orpo", "simpo"])
def test_reference_free_stage_trains_and_logs_rewards(tmp_path, pref_data, stage):
    out = tmp_path / stage
    result = _train(_cfg(out, pref_data, stage=stage, train={"max_steps": 8, "eval_steps": 4, "save_steps": 4}))
    logs = _logs(out)
    assert len(logs) == 8 and all(math.isfinite(line["loss"]) for line in logs)
    # ORPO on a random base is dominated by its NLL term: its loss falls; SimPO's margin grows.
    watched = [line["loss"] for line in logs] if stage == "orpo" else [-line["rewards/margins"] for line in logs]
    assert sum(watched[-3:]) < sum(watched[:3]), watched
    if stage == "orpo":
        assert all("nll_loss" in line and "log_odds_ratio" in line for line in logs)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_rewards/accuracies" in x for x in evals if x.get("event") == "eval")
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["stage"] == stage
    assert list(result.model.peft_config) == ["default"]


@pytest.mark.slow
def test_kto_stage_on_pairs_trains_with_kl_and_disabled_adapter_reference(tmp_path, pref_data):
    out = tmp_path / "kto"
    _train(_cfg(out, pref_data, stage="kto", data={"eval": None}, train={"max_steps": 6, "save_steps": None}))
    logs = _logs(out)
    assert len(logs) == 6
    assert logs[0]["loss"] == pytest.approx(0.5, abs=1e-3)  # at the reference every reward and z0 are 0
    assert all("kl" in line for line in logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["desirable"] == summary["data"]["undesirable"] == 48
    assert not (out / "final" / "ref").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    {"name": "pissa", "r": 4, "target_modules": "attention"},  # changes the model at init: TRL's adapter copy
    {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 1},  # one trainable adapter only
])
def test_dpo_reference_for_adapters_that_are_not_plain_lora(tmp_path, pref_data, method):
    out = tmp_path / method["name"]
    result = _train(_cfg(out, pref_data, method=method, data={"eval": None},
                         train={"max_steps": 2, "save_steps": None, "eval_steps": None}))
    assert _logs(out)[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # the reference is the starting model
    assert list(result.model.peft_config) == ["default"]
    assert (out / "final" / "adapter_model.safetensors").is_file() and not (out / "final" / "ref").exists()
