"""stage: rm — a reward model (one-output score head, Bradley–Terry loss) on preference pairs; eval, score, GRPO."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from tuneforge.config import validate_config
from tuneforge.errors import UserError

# A learnable rule: the chosen answer names a fruit, the rejected one a vehicle (same prompt, same tail).
FRUIT = ["apple", "pear", "plum", "grape", "melon", "lemon", "mango", "peach", "cherry", "kiwi", "lime", "fig"]
VEHICLE = ["truck", "bus", "train", "plane", "boat", "bike", "car", "tram", "ship", "van", "taxi", "jeep"]
QUESTIONS = ["What should I eat?", "Name something.", "Give me a word.", "What do you like?", "Pick one.",
             "Tell me a thing.", "Any idea?", "Suggest something.", "What is it?", "Say a word."]


def pairs(n: int, seed: int, margin: bool = False) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tail = rng.choice(["", " maybe", " I think", " for sure"])
        row = {"prompt": rng.choice(QUESTIONS), "chosen": rng.choice(FRUIT) + tail,
               "rejected": rng.choice(VEHICLE) + tail}
        out.append({**row, "margin": rng.choice([0.0, 0.5, 1.0])} if margin else row)
    return out


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _raw(out: Path, data: Path, method: str = "lora", **train) -> dict:
    return {"run_name": out.name, "output_dir": str(out), "seed": 3, "stage": "rm",
            "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
            "method": {"name": method, **({"r": 8, "alpha": 16, "dropout": 0.0} if method == "lora" else {})},
            "data": {"train": [str(data)], "max_length": 64},
            "train": {"report_to": ["none"], "batch_size": 8, "logging_steps": 1, **train}}


def test_config_sections_and_reward_entries():
    base = {"model": {"from_config": {}}, "data": {"train": ["x.jsonl"]}}
    cfg = validate_config({**base, "stage": "rm"})
    assert cfg.rm.margin == "none" and cfg.rm.center_rewards is None
    assert validate_config({**base, "stage": "rm", "rm": {"margin": 0.5}}).rm.margin == 0.5
    with pytest.raises(Exception, match="rm: is for stage rm"):
        validate_config({**base, "stage": "sft", "rm": {"margin": "record"}})
    grpo = {**base, "stage": "grpo", "grpo": {"rewards": [{"model": "runs/rm", "weight": 0.5}, {"type": "exact"}]}}
    rewards = validate_config(grpo).grpo.rewards
    assert (rewards[0].type, rewards[0].model, rewards[0].weight) == ("model", "runs/rm", 0.5)
    for bad, message in (({"weight": 1}, "needs 'type'"), ({"type": "exact", "model": "r"}, "type 'model' only"),
                         ({"type": "model"}, "type 'model' only")):
        with pytest.raises(Exception, match=message):
            validate_config({**base, "stage": "grpo", "grpo": {"rewards": [bad]}})


def test_margin_record_needs_a_number_on_every_pair():
    from tuneforge.train.stages.rm import pair_margin

    assert pair_margin({"margin": 2}, "record") == 2.0 and pair_margin({}, 0.5) == 0.5 and pair_margin({}, "none") is None
    with pytest.raises(UserError, match=r"p.jsonl:3: rm.margin is 'record' but this pair has no numeric 'margin'"):
        pair_margin({"source": "p.jsonl:3", "margin": "big"}, "record")


def test_a_causal_model_is_not_a_scorer(tmp_path):
    from tests.helpers import make_run, save_base, stdlib_texts, tiny_from_config
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.load import load_model
    from tuneforge.models.reward import load_scorer

    model, tokenizer = load_model(ModelConfig(from_config=tiny_from_config()), texts=stdlib_texts(100), device="cpu")
    run = make_run(tmp_path / "sft", save_base(model, tokenizer, tmp_path / "base"))
    with pytest.raises(UserError, match="not a reward model .*stage: rm"):
        load_scorer(str(run), what="grpo.rewards[0].model")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_step_zero_loss_is_the_hand_computed_bradley_terry_loss(tmp_path, method):
    """The first logged loss equals -mean(log σ(r_w - r_l - m)) computed from the starting model's own scores of
    each side alone (unpadded), with each pair's margin (rm.margin: record); the saved run loads back as a scorer
    giving the trained model's scores."""
    import torch
    from transformers import TrainerCallback

    from tuneforge.train.run import run_training

    class Capture(TrainerCallback):
        expected = loss = None

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            batch = next(iter(train_dataloader))  # batch_size = every pair: the whole first step
            ids, mask = batch["input_ids"], batch["attention_mask"]
            with torch.no_grad():
                scores = [model(input_ids=ids[i:i + 1, : int(mask[i].sum())]).logits[0, 0].item()
                          for i in range(ids.size(0))]
            n = len(scores) // 2
            margins = batch["margin"].tolist()
            assert len(margins) == n == 8 and len(set(margins)) > 1
            self.expected = sum(-math.log(1 / (1 + math.exp(-(scores[i] - scores[n + i] - margins[i]))))
                                for i in range(n)) / n

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 1 and "loss" in (logs or {}):
                self.loss = logs["loss"]

    data = _jsonl(tmp_path / "pairs.jsonl", pairs(8, 5, margin=True))
    raw = _raw(tmp_path / "rm", data, method, max_steps=1, lr=1e-3)
    raw["rm"] = {"margin": "record"}
    capture = Capture()
    result = run_training(validate_config(raw), callbacks=[capture])
    assert capture.expected is not None and capture.loss == pytest.approx(capture.expected, abs=1e-4)

    from tuneforge.data.readers import read_records
    from tuneforge.models.reward import load_scorer

    scorer = load_scorer(str(result.run_dir), device="cpu")
    record = read_records(data)[0]
    ids = scorer.encode(record["prompt"], record["chosen"])
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert scorer.score([(record["prompt"], record["chosen"])])[0] == pytest.approx(trained, abs=1e-5)


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory) -> Path:
    from tuneforge.train.run import run_training

    folder = tmp_path_factory.mktemp("rm")
    data = _jsonl(folder / "train.jsonl", pairs(160, 1))
    result = run_training(validate_config(_raw(folder / "rm", data, max_steps=40, lr=2e-3, logging_steps=10)))
    return result.run_dir


@pytest.mark.slow
def test_rm_learns_a_toy_preference_and_scores_held_out_data(rm_run, tmp_path, capsys):
    """LoRA + a score head on a random tiny Llama: held-out reward accuracy >= 90% (`tuneforge eval --metrics
    reward_acc`), and `tuneforge score` writes a reward per record (chosen above rejected)."""
    from tuneforge.cli import main

    held_out = _jsonl(tmp_path / "held_out.jsonl", pairs(60, 2))
    assert main(["eval", str(rm_run), "--data", str(held_out), "--metrics", "reward_acc", "--json"]) == 0
    row = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    acc = row["reward_acc"] if "reward_acc" in row else _find(row, "reward_acc")
    assert acc >= 90.0, row
    assert "reward model" in json.dumps(row)  # scored by the score head, not by log-probs

    scored = tmp_path / "scored.jsonl"
    assert main(["score", str(rm_run), "--data", str(held_out), "--out", str(scored)]) == 0
    lines = [json.loads(x) for x in scored.read_text().splitlines()]
    assert len(lines) == 60 and all(isinstance(x["reward_chosen"], float) for x in lines)
    assert sum(x["reward_chosen"] > x["reward_rejected"] for x in lines) >= 54
    chats = _jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "Pick one."},
                                                             {"role": "assistant", "content": w}]}
                                              for w in ("mango", "truck")])
    assert main(["score", str(rm_run), "--data", str(chats), "--out", str(tmp_path / "c.jsonl")]) == 0
    fruit, vehicle = [json.loads(x)["reward"] for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert fruit > vehicle
    assert main(["score", str(rm_run), "--data", str(chats), "--out", str(tmp_path / "c.jsonl")]) == 2  # no --force


def _find(row: dict, key: str):
    for value in row.values():
        if isinstance(value, dict) and key in value:
            return value[key]
    raise AssertionError(f"{key} not in {row}")


@pytest.mark.slow
def test_grpo_takes_a_reward_model_as_a_reward(rm_run, tmp_path):
    from tuneforge.train.run import run_training

    rows = [{"prompt": q, "answer": "x"} for q in QUESTIONS]
    data = _jsonl(tmp_path / "prompts.jsonl", rows)
    raw = {"run_name": "grpo", "output_dir": str(tmp_path / "grpo"), "seed": 3, "stage": "grpo",
           "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
           "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
           "data": {"train": [str(data)], "max_length": 64},
           "train": {"max_steps": 2, "batch_size": 8, "lr": 1e-3, "logging_steps": 1, "report_to": ["none"]},
           "grpo": {"rewards": [{"model": str(rm_run), "weight": 1.0}, {"type": "regex", "pattern": "e", "weight": 0.1}],
                    "group_size": 4, "max_new_tokens": 4}}
    run_training(validate_config(raw))
    logs = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if x.get("event") == "log" and "reward" in x]
    assert len(steps) == 2
    per_reward = [k for k in steps[0] if k.startswith("rewards/model_0")]
    assert per_reward and all(math.isfinite(x[per_reward[0]]) for x in steps)
