"""Forgetting, measured: the same LoRA SFT with no mitigation, replay mixing, EWC, L2-SP and KD, side by side.

One process, one machine, one base: a small Llama-style model is pretrained (as in the quickstart) on 90% of the
Python documentation topics plus the docstrings of the task's training objects; the other 10% of the topics are
held out as "general" text the model should keep predicting. Then the quickstart's task ("which standard-library
module defines X?", 8 modules, ``builtin.module_task``) is LoRA-fine-tuned (all linear layers and the output layer)
once per arm with the same seed, data and steps, and each arm is scored on

* task: greedy exact match and answer perplexity on the held-out objects (``evaluate.runner.evaluate_model``, what
  ``tuneforge eval --metrics exact,ppl`` computes);
* forgetting: perplexity on the held-out general text, start model (adapter disabled) vs tuned
  (``tuneforge.evaluate.retention.retention_row``, what ``tuneforge eval --retention`` reports), and the increase.

Arms: ``none``; ``mix`` (``data.mix``: 5% of samples from the pretraining text, the guide's 1-5%); ``ewc``
(Fisher from the pretraining text); ``l2sp``; ``kd`` (KL to the start model on the pretraining text). The
mitigations only see the pretraining text, never the held-out general text.

Usage: ``.venv/bin/python benchmarks/forgetting.py [--out runs/bench-forgetting] [--sft-steps 150]
[--arms none,mix,mix=0.01,ewc,l2sp,kd] [--json-out FILE]``; prints a table and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from tuneforge.data import builtin

PER_MODULE = dict(heldout_per_module=20, eval_per_module=5, train_per_module=150)  # as the quickstart


def write_data(out: Path) -> tuple[list[dict], Path, Path]:
    """pretrain.jsonl (90% of the pydoc topics + the training objects' docstrings), general_heldout.jsonl (the
    other 10% of the topics), SFT train/eval; returns the held-out task items."""
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    task = builtin.module_task(seed=0, **PER_MODULE)
    topics = [text.strip() for _, text in sorted(builtin.pydoc_topics().items()) if text.strip()]
    held = [d for i, d in enumerate(topics) if i % 10 == 5]
    seen = [d for i, d in enumerate(topics) if i % 10 != 5] + task.pretrain_docstrings
    (data / "pretrain.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in seen))
    (data / "general_heldout.jsonl").write_text("".join(json.dumps({"text": d[:2000]}) + "\n" for d in held))
    for name, items in (("sft_train", task.train), ("sft_eval", task.eval)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps({"messages": i["messages"]}) + "\n" for i in items))
    return task.test, data / "pretrain.jsonl", data / "general_heldout.jsonl"


def score_task(model: str, test: list[dict]) -> dict:
    """Greedy exact match (%) and answer perplexity on the held-out items, as `tuneforge eval` computes them."""
    from tuneforge.evaluate.runner import evaluate_model
    from tuneforge.models.generation import GenerationSettings

    row = evaluate_model(model, test, ["exact", "ppl"], GenerationSettings(max_new_tokens=8), device="cpu")
    return {"exact": row["exact"], "ppl": row["ppl"]}


def pretrain_config(out: Path, steps: int, hidden: int = 256, layers: int = 4) -> dict:
    return {
        "run_name": "forgetting-pretrain", "output_dir": str(out / "pretrain"), "seed": 42, "stage": "pt",
        "model": {"from_config": {"architecture": "llama", "hidden_size": hidden, "num_layers": layers, "num_heads": 4,
                                  "vocab_size": 2048, "max_position_embeddings": 512, "tie_word_embeddings": False},
                  "chat_template": "plain"},
        "method": {"name": "full"},
        "data": {"train": [str(out / "data" / "pretrain.jsonl")], "max_length": 256, "packing": False},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-3, "warmup_steps": 10, "weight_decay": 0.01,
                  "logging_steps": 20, "report_to": ["none"]},
    }


ARMS = {
    "none": {},
    "mix": {"data": {"mix": [{"path": "{pretrain}", "weight": 0.05}]}},
    "ewc": {"train": {"retention": {"method": "ewc", "lambda": 1e6, "reference": "{pretrain}", "samples": 64}}},
    "l2sp": {"train": {"retention": {"method": "l2sp", "lambda": 1.0}}},
    "kd": {"train": {"retention": {"method": "kd", "alpha": 1.0, "temperature": 2.0, "reference": "{pretrain}",
                                   "samples": 64, "batch_size": 4}}},
}


STRENGTH = {"mix": ("data", "mix", 0, "weight"), "ewc": ("train", "retention", None, "lambda"),
            "l2sp": ("train", "retention", None, "lambda"), "kd": ("train", "retention", None, "alpha")}


def arm_overrides(arm: str) -> dict:
    """The config overrides of ``name`` or ``name=strength`` (mix weight, ewc/l2sp lambda, kd alpha)."""
    name, _, strength = arm.partition("=")
    overrides = json.loads(json.dumps(ARMS[name]))
    if strength:
        section, key, index, field = STRENGTH[name]
        target = overrides[section][key]
        (target[index] if index is not None else target)[field] = float(strength)
    return overrides


def sft_config(out: Path, arm: str, steps: int, pretrain: Path, overrides: dict) -> dict:
    raw = {
        "run_name": f"forgetting-{arm.replace('=', '-')}", "output_dir": str(out / f"sft-{arm.replace('=', '-')}"), "seed": 42, "stage": "sft",
        "model": {"name_or_path": str(out / "pretrain" / "final"), "chat_template": "auto"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                      "lm_head"]},
        "data": {"train": [str(out / "data" / "sft_train.jsonl")], "max_length": 256, "packing": True},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 2e-3, "warmup_steps": 5, "logging_steps": 10,
                  "report_to": ["none"], "monitor": {"enabled": False}},
    }
    text = json.dumps(overrides).replace("{pretrain}", str(pretrain))
    for section, values in json.loads(text).items():
        raw[section] = {**raw[section], **values}
    return raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-forgetting")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--arms", default="none,mix,mix=0.01,ewc,l2sp,kd", help="arms, each NAME or NAME=STRENGTH (mix weight, "
                                                                   "ewc/l2sp lambda, kd alpha); 'none' first")
    parser.add_argument("--hidden", type=int, default=256, help="base model width")
    parser.add_argument("--layers", type=int, default=4, help="base model depth")
    parser.add_argument("--reuse-base", action="store_true", help="keep an existing <out>/pretrain run")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    from tuneforge.config import validate_config
    from tuneforge.evaluate.retention import retention_row
    from tuneforge.evaluate.runner import load_eval_records
    from tuneforge.train.run import run_training

    out = Path(args.out)
    started = time.time()
    test, pretrain, general = write_data(out)
    quiet = lambda *_: None  # noqa: E731
    print(f"pretraining the base ({args.pretrain_steps} steps) ...", file=sys.stderr)
    t0 = time.time()
    if not (args.reuse_base and (out / "pretrain" / "final" / "config.json").is_file()):
        run_training(validate_config(pretrain_config(out, args.pretrain_steps, args.hidden, args.layers)), overwrite=True, echo=quiet)
    pretrain_s = time.time() - t0
    general_records = load_eval_records(str(general))
    base_exact = score_task(str(out / "pretrain"), test)["exact"]

    results = []
    for arm in args.arms.split(","):
        print(f"arm {arm}: SFT {args.sft_steps} steps ...", file=sys.stderr)
        raw = sft_config(out, arm, args.sft_steps, pretrain, arm_overrides(arm))
        t0 = time.time()
        run_training(validate_config(raw), overwrite=True, echo=quiet)
        train_s = time.time() - t0
        task = score_task(raw["output_dir"], test)
        forgetting = retention_row(raw["output_dir"], general_records, device="cpu", max_length=256)
        results.append({"arm": arm, "exact": task["exact"], "answer_ppl": task["ppl"],
                        "general_ppl_start": forgetting["retention_start_ppl"],
                        "general_ppl": forgetting["retention_ppl"],
                        "general_ppl_increase_pct": forgetting["retention_ppl_increase"],
                        "general_nll_increase": math.log(forgetting["retention_ppl"] / forgetting["retention_start_ppl"]),
                        "train_seconds": round(train_s, 1)})
    none = next((r for r in results if r["arm"] == "none"), None)
    for r in results:
        if none is not None:
            # share of the unmitigated forgetting (nats per general token) that the mitigation removed
            r["forgetting_removed_pct"] = 100 * (1 - r["general_nll_increase"] / none["general_nll_increase"])
            r["exact_vs_none_pts"] = r["exact"] - none["exact"]
            r["answer_ppl_vs_none"] = r["answer_ppl"] / none["answer_ppl"]
            r["time_ratio_vs_none"] = r["train_seconds"] / none["train_seconds"]
    labels = [t["messages"][-1]["content"] for t in test]
    majority = max(labels.count(label) for label in set(labels))
    summary = {"base_exact": base_exact, "majority_exact": 100 * majority / len(test), "heldout_items": len(test),
               "general_tokens": forgetting["retention_tokens"], "pretrain_seconds": round(pretrain_s, 1),
               "sft_steps": args.sft_steps, "total_seconds": round(time.time() - started, 1), "arms": results}
    _print_table(summary)
    print(json.dumps(summary))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))
    return 0


def _print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"forgetting: same LoRA SFT ({summary['sft_steps']} steps), "
                        f"{summary['heldout_items']} held-out items, {summary['general_tokens']} general tokens")
    for col in ("arm", "exact match (Δ pts)", "answer ppl (×none)", "general ppl start → tuned", "Δ nats/token",
                "forgetting removed", "train s (×none)"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for r in summary["arms"]:
        table.add_row(r["arm"], f"{r['exact']:.1f}% ({r.get('exact_vs_none_pts', 0):+.1f})", f"{r['answer_ppl']:.3f} (×{r.get('answer_ppl_vs_none', 1):.3f})",
                      f"{r['general_ppl_start']:.1f} → {r['general_ppl']:,.1f}", f"{r['general_nll_increase']:+.3f}",
                      f"{r.get('forgetting_removed_pct', 0):.1f}%",
                      f"{r['train_seconds']:.0f} (×{r.get('time_ratio_vs_none', 1):.2f})")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"base exact {summary['base_exact']:.1f}%, majority class {summary['majority_exact']:.1f}%; "
                  f"total {summary['total_seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
