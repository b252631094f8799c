"""Progressive LoRA, measured: what a continued run keeps of the earlier task (docs/multitask.md).

Two made-up fact tasks a random tiny model can only know from its adapters: A "What is the capital of <country>?"
and B "What sound does the <animal> make?" (16 facts each, names drawn from syllables with a fixed seed). Runs, all
on one from-config base (hidden 128, 2 layers) with LoRA r 16 on every linear layer, the same steps, seed and lr:

* ``first``: LoRA on A;
* ``second``: ``method.continue_from: first``, trained on B (A's adapter merged, frozen, under the new one);
* ``second_mix``: the same plus replay of A's records (``data.mix``, ``--mix`` share of training samples);
* ``b_only``: LoRA on B from the plain base (no earlier adapter);
* ``per_task``: ``method.per_task: true`` on A and B together: one adapter per task, each scored on its own task.

Each is scored by greedy exact match on both tasks' prompts (``evaluate.runner.evaluate_model``, what ``tuneforge
eval --metrics exact`` computes); ``second`` also with its new adapter disabled (base + frozen stack). The facts
are scored on the prompts they were taught with: this measures what is kept, not generalisation.

Usage: ``.venv/bin/python benchmarks/progressive.py [--out runs/bench-progressive] [--steps 200] [--mix 0.1]``;
prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "vo", "shi", "pa", "ne", "zu", "bo", "fi"]


def facts(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The records of task A (capitals) and task B (sounds)."""
    rng = random.Random(seed)

    def word(n: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()

    countries = sorted({word(3) for _ in range(40)})[:16]
    capitals = [word(2) for _ in countries]
    animals = sorted({word(2).lower() for _ in range(40)})[:16]
    sounds = [word(1).lower() + word(1).lower() for _ in animals]

    def chat(task: str, question: str, answer: str) -> dict:
        return {"task": task, "messages": [{"role": "user", "content": question},
                                           {"role": "assistant", "content": answer}]}

    a = [chat("capital", f"What is the capital of {c}?", k) for c, k in zip(countries, capitals, strict=True)]
    b = [chat("sound", f"What sound does the {x} make?", s) for x, s in zip(animals, sounds, strict=True)]
    return a, b


def config(out: Path, data: list[Path] | Path, steps: int, base: Path | None = None,
           continue_from: Path | None = None, mix: tuple[Path, float] | None = None, per_task: bool = False):
    from tuneforge.config import validate_config

    model = {"name_or_path": str(base)} if base else {
        "from_config": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 1024}}
    method = {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    if continue_from:
        method["continue_from"] = str(continue_from)
    if per_task:
        method["per_task"] = True
    data_section = {"train": [str(p) for p in (data if isinstance(data, list) else [data])], "max_length": 64,
                    "packing": False}
    if mix:
        data_section["mix"] = [{"path": str(mix[0]), "weight": mix[1]}]
    return validate_config({
        "run_name": out.name, "output_dir": str(out), "seed": 1, "stage": "sft", "model": model, "method": method,
        "data": data_section,
        "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-3, "logging_steps": 50, "report_to": ["none"],
                  "monitor": {"enabled": False}},
    })


def exact(model_or_spec, records: list[dict], settings) -> float:
    """Greedy exact match (%) of a run directory, or of a loaded ``(model, tokenizer, template)``."""
    from tuneforge.evaluate.runner import evaluate_model
    from tuneforge.models.generation import generate

    if isinstance(model_or_spec, str):
        return evaluate_model(model_or_spec, records, ["exact"], settings, device="cpu")["exact"]
    model, tokenizer, template = model_or_spec
    outputs = generate(model, tokenizer, template, [r["messages"][:1] for r in records], settings)
    hits = sum(o.strip() == r["messages"][1]["content"] for o, r in zip(outputs, records, strict=True))
    return 100.0 * hits / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-progressive")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--mix", type=float, default=0.1, help="replay share of A in second_mix (data.mix weight)")
    args = parser.parse_args()

    from tuneforge.models.generation import GenerationSettings
    from tuneforge.models.reference import load_for_inference
    from tuneforge.train.run import run_training

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a, b = facts()
    for name, rows in (("a", a), ("b", b)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    first, base = out / "first", out / "first" / "base"
    plan = {
        "first": config(first, out / "a.jsonl", args.steps),
        "second": config(out / "second", out / "b.jsonl", args.steps, base, first),
        "second_mix": config(out / "second_mix", out / "b.jsonl", args.steps, base, first, (out / "a.jsonl", args.mix)),
        "b_only": config(out / "b_only", out / "b.jsonl", args.steps, base),
        "per_task": config(out / "per_task", [out / "a.jsonl", out / "b.jsonl"], args.steps, base, per_task=True),
    }
    started = time.time()
    for name, cfg in plan.items():
        run_training(cfg, overwrite=(out / name).exists(), echo=lambda *_: None)
    train_s = time.time() - started
    settings = GenerationSettings(max_new_tokens=8, temperature=0.0)
    table = {name: {"A": exact(str(out / name), a, settings), "B": exact(str(out / name), b, settings)}
             for name in plan if name != "per_task"}
    tasks = out / "per_task" / "tasks"
    table["per_task (each task's adapter on its task)"] = {"A": exact(str(tasks / "capital"), a, settings),
                                                           "B": exact(str(tasks / "sound"), b, settings)}
    loaded = load_for_inference(str(out / "second"), device="cpu")
    with loaded.model.disable_adapter():  # base + the frozen stack: exactly the first run's model
        table["second, new adapter disabled"] = {"A": exact((loaded.model, loaded.tokenizer, loaded.template), a,
                                                            settings)}
    print(json.dumps({"steps": args.steps, "mix": args.mix, "train_s": round(train_s, 1), "exact": table}, indent=1))


if __name__ == "__main__":
    main()
