"""Random search vs TPE with median pruning, same trial budget, same model, data and seed, side by side.

Setup: a from-config Llama (hidden 64, 2 layers, 4 heads, BPE vocab 512 trained on the data) fine-tuned in full on
the built-in classification chat task (``tuneforge.data.builtin``: 240 training records, 60 held out), 30 steps of
batch 8 per trial, eval every 10 steps. The space is the one a user tunes first: learning rate (log-uniform over
four decades), warm-up share and gradient clipping. Both arms run ``tuneforge.search`` exactly as the command does
(one SQLite study each, in a temporary folder):

* ``random``: ``--sampler random --pruner none``;
* ``tpe+prune``: ``--sampler tpe --pruner median`` (pruning starts after 3 completed trials).

Figures per arm:

* ``best_eval_loss`` — the best completed trial's final eval loss (on the held-out records, never training data);
* ``trained_tokens`` — training tokens processed by all trials together (``summary.json``: data tokens x epochs
  done; a pruned trial stops early, so it counts fewer) — the compute the search spent;
* ``complete`` / ``pruned`` / ``failed`` trials, and ``seconds`` of wall time.

    .venv/bin/python benchmarks/search.py [--trials 12] [--steps 30] [--seed 0] [--json out.json]

Prints a table, then one JSON object (also written to ``--json`` if given). One run on one machine: compare the two
arms with each other, not with figures from another day.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

SPACE = {
    "train.lr": {"log_uniform": [1.0e-5, 1.0e-1]},
    "train.warmup_ratio": {"uniform": [0.0, 0.3]},
    "train.max_grad_norm": {"choice": [0.3, 1.0, 5.0]},
}
ARMS = {"random": {"sampler": "random", "pruner": "none"}, "tpe+prune": {"sampler": "tpe", "pruner": "median"}}


def write_inputs(folder: Path, steps: int, seed: int) -> tuple[Path, Path]:
    from tuneforge.data import builtin

    items = builtin.classification_items(seed=1)
    for name, part in (("train", items[:240]), ("eval", items[240:300])):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for item in part:
                handle.write(json.dumps({"messages": item["messages"]}) + "\n")
    run = {
        "run_name": "bench",
        "output_dir": str(folder / "runs" / "bench"),
        "seed": seed,
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
        "method": {"name": "full"},
        "data": {"train": [str(folder / "train.jsonl")], "eval": str(folder / "eval.jsonl"), "max_length": 128},
        "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "logging_steps": 10, "eval_steps": max(1, steps // 3),
                  "report_to": ["none"], "monitor": {"enabled": False}},
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(run))
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return folder / "run.yaml", folder / "space.yaml"


def run_arm(name: str, run: Path, space: Path, trials: int, folder: Path) -> dict:
    from tuneforge.search.results import counts, rows
    from tuneforge.search.study import SearchOptions, prepare, run_search

    arm = ARMS[name]
    options = SearchOptions(config=str(run), space=str(space), trials=trials, sampler=arm["sampler"],
                            pruner=arm["pruner"], pruner_startup=3, study=name.replace("+", "-"),
                            out=str(folder / name.replace("+", "-")))
    started = time.time()
    result = run_search(prepare(options), echo=lambda line: print(f"[{name}] {line}", file=sys.stderr))
    seconds = time.time() - started
    table = rows(result.study, "minimize")
    complete = [r for r in table if r.state == "complete"]
    best = min(complete, key=lambda r: r.value) if complete else None
    return {
        "arm": name,
        "best_eval_loss": round(best.value, 4) if best else None,
        "best_params": best.values if best else None,
        "trained_tokens": sum(r.tokens or 0 for r in table),
        "steps": sum(r.steps or 0 for r in table),
        **{state: counts(table).get(state, 0) for state in ("complete", "pruned", "failed")},
        "seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12, help="trials per arm (default 12)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per trial (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="tuneforge-search-bench-") as tmp:
        folder = Path(tmp)
        run, space = write_inputs(folder, args.steps, args.seed)
        arms = [run_arm(name, run, space, args.trials, folder) for name in ARMS]
    base, tpe = arms
    result = {
        "setup": {"trials": args.trials, "steps_per_trial": args.steps, "seed": args.seed, "space": SPACE,
                  "model": "llama from config, hidden 64, 2 layers, full fine-tuning, batch 8 x 128 tokens"},
        "arms": arms,
        "tokens_ratio_tpe_prune_vs_random": round(tpe["trained_tokens"] / base["trained_tokens"], 3)
        if base["trained_tokens"] else None,
    }
    print(f"{'arm':<10} {'best eval loss':>15} {'trained tokens':>15} {'complete':>9} {'pruned':>7} {'failed':>7} {'s':>7}")
    for arm in arms:
        print(f"{arm['arm']:<10} {arm['best_eval_loss']!s:>15} {arm['trained_tokens']:>15,} {arm['complete']:>9} "
              f"{arm['pruned']:>7} {arm['failed']:>7} {arm['seconds']:>7}")
    print(json.dumps(result, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
