"""Preference tuning and GRPO on the quickstart's model: before/after figures, baseline measured in the same run.

1. The quickstart (pretrain + LoRA SFT on the 3-label "kind of documentation" task), reused when ``--out`` already
   holds it; its SFT adapter is merged into the base (``merge_lora``): that merged model is "before".
2. DPO (stage ``dpo``, LoRA) on pairs generated from the SFT training items: chosen = the right label, rejected =
   one of the two wrong labels. Held-out items (the quickstart's 150) give, before and after:
   preference accuracy (the model's own likelihood ranking of right vs wrong label — both single words, so the
   length bias of that ranking is negligible), DPO's implicit-reward accuracy (after only; 50% at the start by
   definition), and greedy exact match.
3. GRPO (stage ``grpo``, LoRA, exact-match reward against the item's label) from the same merged model: mean reward
   per step (first vs last tenth) and held-out exact match after.
4. A reward model (stage ``rm``, LoRA + a one-output score head on the merged model) on the DPO pairs: held-out
   reward accuracy (pairs ranked by its score) against the merged model's own-likelihood ranking of the same pairs
   (the "before" preference accuracy, measured in the same run), train accuracy first/last logged step, seconds.

Prints one JSON object (also written to ``<out>/preference_results.json``).

    .venv/bin/python benchmarks/preference.py [--out runs/bench-preference] [--small] [--dpo-steps 120]
                                              [--stages dpo,grpo,rm] [--rm-steps 120]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

LORA = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
        # no lm_head: TRL's preference/GRPO losses read lm_head.weight directly (train/stages/common.py)
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def pairs(items: list[dict], seed: int) -> list[dict]:
    """One pair per item: the right answer chosen, a random other answer of the task rejected."""
    rng = random.Random(seed)
    labels = sorted({item["messages"][-1]["content"] for item in items})
    out = []
    for item in items:
        right = item["messages"][-1]["content"]
        wrong = rng.choice([label for label in labels if label != right])
        out.append({"prompt": item["messages"][0]["content"], "chosen": right, "rejected": wrong})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ensure_quickstart(out: Path, small: bool) -> Path:
    """The quickstart's runs under ``out/quickstart`` (trained once), merged SFT model at ``out/sft-merged``."""
    from tuneforge.merge.lora import merge_lora
    from tuneforge.train.quickstart import run_quickstart

    quick = out / "quickstart"
    if not (quick / "sft" / "final").is_dir():
        run_quickstart(quick, small=small)
    merged = out / "sft-merged"
    if not (merged / "config.json").is_file():
        merge_lora(quick / "sft", merged)
    return merged


def accuracy(model_path: str, records: list[dict], reference: bool = False) -> dict:
    from tuneforge.evaluate.preference import preference_accuracy
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(model_path, device="cpu")
    result = preference_accuracy(loaded.model, loaded.tokenizer, loaded.template, records, reference=reference)
    return {"accuracy": round(result.accuracy, 2), "margin": round(result.margin, 4), "pairs": result.pairs}


def exact(model_path: str, items: list[dict]) -> float:
    """Greedy held-out exact match (%), answers compared case- and whitespace-insensitively."""
    from tuneforge.models.generation import GenerationSettings, generate
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(model_path, device="cpu")
    prompts = [item["messages"][:-1] for item in items]
    answers = generate(loaded.model, loaded.tokenizer, loaded.template, prompts, GenerationSettings(max_new_tokens=4),
                       batch_size=16)
    gold = [item["messages"][-1]["content"] for item in items]
    return round(100 * sum(a.strip().lower() == g.strip().lower() for a, g in zip(answers, gold, strict=True))
                 / len(items), 2)


def run_stage(out: Path, name: str, raw: dict) -> tuple[list[dict], float]:
    from tuneforge.config import validate_config
    from tuneforge.train.run import run_training

    started = time.time()
    run_training(validate_config(raw, name), overwrite=True, echo=lambda *_: None)
    lines = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == "log"], round(time.time() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-preference")
    parser.add_argument("--small", action="store_true", help="the quickstart's small variant (a smoke run)")
    parser.add_argument("--dpo-steps", type=int, default=120)
    parser.add_argument("--grpo-steps", type=int, default=60)
    parser.add_argument("--dpo-lr", type=float, default=5e-4)
    parser.add_argument("--grpo-lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    parser.add_argument("--tag", default="", help="suffix of the dpo/grpo run names and results file")
    parser.add_argument("--stages", default="dpo,grpo,rm", help="which stages to run (comma-separated)")
    parser.add_argument("--rm-steps", type=int, default=120)
    parser.add_argument("--rm-lr", type=float, default=5e-4)
    args = parser.parse_args()
    stages = set(args.stages.split(","))

    from tuneforge.data.readers import read_records

    out = Path(args.out).resolve()
    merged = ensure_quickstart(out, args.small)
    data = out / "quickstart" / "data"
    train_items, heldout = read_jsonl(data / "sft_train.jsonl"), read_jsonl(data / "heldout.jsonl")
    for item in [*train_items, *heldout]:
        item["label"] = item["messages"][-1]["content"]
    write_jsonl(out / "data" / "dpo_train.jsonl", pairs(train_items, seed=1))
    heldout_pairs_file = write_jsonl(out / "data" / "dpo_heldout.jsonl", pairs(heldout, seed=2))
    heldout_pairs = read_records(heldout_pairs_file)  # the readers the DPO stage uses

    result: dict = {"heldout_items": len(heldout), "model": str(merged)}
    result["before"] = {"preference": accuracy(str(merged), heldout_pairs)}
    if stages & {"dpo", "grpo"}:
        result["before"]["exact"] = exact(str(merged), heldout)
    if "rm" in stages:
        result["rm"] = reward_model(out, merged, heldout_pairs, args)
    if "dpo" in stages:
        dpo_stage(out, merged, heldout, heldout_pairs, args, result)
    if "grpo" in stages:
        grpo_stage(out, merged, train_items, heldout, args, result)
    majority = max(sum(1 for it in heldout if it["label"] == label) for label in {it["label"] for it in heldout})
    result["majority_class_exact"] = round(100 * majority / len(heldout), 2)
    (out / f"preference_results{args.tag}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def reward_model(out: Path, merged: Path, heldout_pairs: list[dict], args) -> dict:
    """Stage rm on the DPO pairs: held-out reward accuracy (its score ranks each pair), train accuracy, time."""
    rm = {
        "run_name": "rm" + args.tag, "output_dir": str(out / ("rm" + args.tag)), "seed": 42, "stage": "rm",
        "model": {"name_or_path": str(merged), "chat_template": "auto"},
        "method": LORA,
        "data": {"train": [str(out / "data" / "dpo_train.jsonl")], "max_length": 256},
        "train": {"max_steps": args.rm_steps, "batch_size": 8, "lr": args.rm_lr, "warmup_steps": 5,
                  "scheduler": "cosine", "logging_steps": 5, "report_to": ["none"]},
    }
    rm_dir = out / ("rm" + args.tag)
    logs, seconds = run_stage(out, rm_dir.name, rm)
    train_acc = [x["accuracy"] for x in logs if "accuracy" in x]
    return {"steps": args.rm_steps, "lr": args.rm_lr, "seconds": seconds,
            "train_accuracy_first_last": [train_acc[0], train_acc[-1]] if train_acc else None,
            "after": {"reward_accuracy": accuracy(str(rm_dir), heldout_pairs)}}


def dpo_stage(out: Path, merged: Path, heldout: list[dict], heldout_pairs: list[dict], args, result: dict) -> None:

    dpo = {
        "run_name": "dpo" + args.tag, "output_dir": str(out / ("dpo" + args.tag)), "seed": 42, "stage": "dpo",
        "model": {"name_or_path": str(merged), "chat_template": "auto"},
        "method": LORA,
        "data": {"train": [str(out / "data" / "dpo_train.jsonl")], "max_length": 256},
        "train": {"max_steps": args.dpo_steps, "batch_size": 8, "lr": args.dpo_lr, "warmup_steps": 5,
                  "scheduler": "cosine", "logging_steps": 5, "report_to": ["none"]},
        "preference": {"loss": "sigmoid", "beta": args.beta},
    }
    dpo_dir = out / ("dpo" + args.tag)
    logs, seconds = run_stage(out, dpo_dir.name, dpo)
    result["dpo"] = {
        "steps": args.dpo_steps, "lr": args.dpo_lr, "beta": args.beta, "seconds": seconds,
        "train_rewards_accuracies_first_last": [logs[0].get("rewards/accuracies"), logs[-1].get("rewards/accuracies")],
        "train_margin_first_last": [logs[0].get("rewards/margins"), logs[-1].get("rewards/margins")],
        "after": {"preference": accuracy(str(dpo_dir), heldout_pairs),
                  "implicit_reward": accuracy(str(dpo_dir), heldout_pairs, reference=True),
                  "exact": exact(str(dpo_dir), heldout)},
    }


def grpo_stage(out: Path, merged: Path, train_items: list[dict], heldout: list[dict], args, result: dict) -> None:
    prompts = [{"prompt": it["messages"][0]["content"], "answer": it["label"]} for it in train_items]
    write_jsonl(out / "data" / "grpo_prompts.jsonl", prompts)
    grpo = {
        "run_name": "grpo" + args.tag, "output_dir": str(out / ("grpo" + args.tag)), "seed": 42, "stage": "grpo",
        "model": {"name_or_path": str(merged), "chat_template": "auto"},
        "method": LORA,
        "data": {"train": [str(out / "data" / "grpo_prompts.jsonl")], "max_length": 256},
        "train": {"max_steps": args.grpo_steps, "batch_size": 16, "lr": args.grpo_lr, "scheduler": "constant",
                  "logging_steps": 1, "report_to": ["none"]},
        "grpo": {"rewards": [{"type": "exact", "field": "answer"}], "group_size": 8, "max_new_tokens": 4,
                 "temperature": 1.0, "beta": 0.0},
    }
    grpo_dir = out / ("grpo" + args.tag)
    logs, seconds = run_stage(out, grpo_dir.name, grpo)
    rewards = [x["reward"] for x in logs if "reward" in x]
    tenth = max(1, len(rewards) // 10)
    result["grpo"] = {
        "steps": args.grpo_steps, "lr": args.grpo_lr, "seconds": seconds,
        "mean_reward_per_step": [round(r, 3) for r in rewards],
        "mean_reward_first_tenth": round(sum(rewards[:tenth]) / tenth, 3),
        "mean_reward_last_tenth": round(sum(rewards[-tenth:]) / tenth, 3),
        "after_exact": exact(str(grpo_dir), heldout),
    }


if __name__ == "__main__":
    main()
