"""GRPO: verifiable rewards, bad reward configs, and mean reward rising on a toy task (tiny from-config model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tuneforge.config.schema import RewardConfig
from tuneforge.errors import UserError
from tuneforge.train.stages.rewards import build_rewards, last_number, normalize

RECORDS = [{"prompt": [{"role": "user", "content": "2+2?"}], "fields": {"answer": "4"}, "source": "g.jsonl:1"}]


def _score(spec: dict, completion: str, answer: str = "4") -> float:
    (reward,) = build_rewards([RewardConfig(**spec)], RECORDS, cut=lambda text: text.split("<stop>")[0])
    return reward(prompts=["p"], completions=[completion], completion_ids=[[1]], answer=[answer])[0]


def test_builtin_rewards():
    assert normalize("  The Answer. ") == "the answer" and last_number("x = 1,250.5 then 7") == 7.0
    assert _score({"type": "exact"}, " 4.") == 1.0 and _score({"type": "exact"}, "four") == 0.0
    assert _score({"type": "exact"}, "4<stop>junk") == 1.0  # scored on the text cut at the stop string
    assert _score({"type": "numeric"}, "so the result is 4.0") == 1.0
    assert _score({"type": "numeric"}, "4 or 5") == 0.0  # the last number counts
    assert _score({"type": "regex", "pattern": r"\bfour\b"}, "it is four") == 1.0
    assert _score({"type": "format", "pattern": r"<a>\d+</a>"}, " <a>12</a> ") == 1.0
    assert _score({"type": "format", "pattern": r"<a>\d+</a>"}, "<a>12</a> extra") == 0.0


def test_user_reward_function_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(completion, prompt, answer):\n    return -len(completion)\n"
        "def text(completion, prompt, answer):\n    return 'good'\n"
        "def broken(completion, prompt, answer):\n    raise KeyError('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _score({"type": "function", "function": "my_rewards:length"}, "abc") == -3.0
    with pytest.raises(UserError, match=r"grpo.rewards\[0\] \(my_rewards:text\): the reward function returned 'good'"):
        _score({"type": "function", "function": "my_rewards:text"}, "abc")
    with pytest.raises(UserError, match=r"grpo.rewards\[0\].function: cannot import module 'no_such_module'"):
        _score({"type": "function", "function": "no_such_module:f"}, "abc")
    with pytest.raises(UserError, match=r"has no function 'missing'"):
        _score({"type": "function", "function": "my_rewards:missing"}, "abc")
    with pytest.raises(UserError, match=r"failed when called .* KeyError"):
        _score({"type": "function", "function": "my_rewards:broken"}, "abc")
    sys.modules.pop("my_rewards", None)


def test_reward_field_and_pattern_errors():
    with pytest.raises(UserError, match=r"g.jsonl:1: record has no 'label' field"):
        build_rewards([RewardConfig(type="exact", field="label")], RECORDS, cut=str)
    with pytest.raises(UserError, match=r"grpo.rewards\[0\].pattern: not a valid regular expression"):
        build_rewards([RewardConfig(type="regex", pattern="(")], RECORDS, cut=str)
    bad = [{**RECORDS[0], "fields": {"answer": "many"}}]
    with pytest.raises(UserError, match="is not a number"):
        build_rewards([RewardConfig(type="numeric")], bad, cut=str)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("grpo")
    words = ["list", "tuple", "dict", "set", "string", "number", "class", "module"]
    rows = [{"prompt": f"Name something about {w}.", "answer": w} for w in words * 2]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _cfg(out: Path, data: Path, **grpo) -> dict:
    return {
        "run_name": out.name, "output_dir": str(out), "seed": 3, "stage": "grpo",
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512},
                  "chat_template": "plain"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [str(data / "prompts.jsonl")], "max_length": 64},
        "train": {"max_steps": 16, "batch_size": 8, "lr": 2e-2, "logging_steps": 1, "report_to": ["none"],
                  "scheduler": "constant"},
        # Toy task with a dense signal for a random model: completions containing the letter "e".
        "grpo": {"rewards": [{"type": "regex", "pattern": "e"}], "group_size": 4, "max_new_tokens": 3, **grpo},
    }


def _run(out: Path, raw: dict) -> tuple[list[dict], object]:
    from tuneforge.config import validate_config
    from tuneforge.train.run import run_training

    result = run_training(validate_config(raw), echo=lambda *_: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "log" and "reward" in x], result


@pytest.mark.slow
def test_grpo_mean_reward_rises_on_a_toy_task(tmp_path, prompts):
    # Full fine-tuning with a KL term: the reference is our frozen copy of the starting model.
    out = tmp_path / "grpo"
    raw = _cfg(out, prompts, beta=0.04)
    raw["method"] = {"name": "full"}
    raw["train"]["lr"] = 1e-2
    logs, _ = _run(out, raw)
    rewards = [x["reward"] for x in logs]
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.25, rewards
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl"] > 0.0
    assert (out / "final" / "model.safetensors").is_file()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e.get("kind") == "loss_spike"]  # a surrogate loss near 0: no spike alarms


@pytest.mark.slow
def test_grpo_lora_uses_the_disabled_adapter_as_reference(tmp_path, prompts):
    out = tmp_path / "lora"
    raw = _cfg(out, prompts, beta=0.04)
    raw["train"]["max_steps"] = 3
    logs, result = _run(out, raw)
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-6) and logs[-1]["kl"] > 0.0
    assert list(result.model.peft_config) == ["default"]
    assert (out / "final" / "adapter_model.safetensors").is_file()


def test_grpo_bad_reward_function_exits_2(tmp_path, prompts, capsys):
    import yaml

    from tuneforge.cli import main

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_cfg(tmp_path / "run", prompts,
                                          rewards=[{"type": "function", "function": "nowhere.at_all:f"}])))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "grpo.rewards[0].function: cannot import module 'nowhere.at_all'" in err and "Traceback" not in err
