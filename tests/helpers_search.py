"""Builders shared by the search tests: chat data, a tiny from-config run config, a space file."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.data import builtin


def write_data(folder: Path) -> Path:
    """``train.jsonl`` (120 records) and ``eval.jsonl`` (20) of the built-in classification task in ``folder``."""
    items = builtin.classification_items(seed=1)
    for name, part in (("train", items[:120]), ("eval", items[120:140])):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for item in part:
                handle.write(json.dumps({"messages": item["messages"]}) + "\n")
    return folder


def write_run(folder: Path, data: Path, *, max_steps: int = 4, eval_steps: int | None = 2, **train) -> Path:
    """`folder/run.yaml`: a LoRA run of a 2-layer, width-32 Llama built from config, scored on the eval file."""
    raw = {
        "run_name": "tiny",
        "output_dir": str(folder / "runs" / "tiny"),
        "seed": 3,
        "model": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "data": {"train": [str(data / "train.jsonl")], "eval": str(data / "eval.jsonl"), "max_length": 128},
        "train": {"max_steps": max_steps, "batch_size": 4, "lr": 3e-3, "logging_steps": 2, "eval_steps": eval_steps,
                  "report_to": ["none"], **train},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_space(folder: Path, spec: dict, name: str = "space.yaml") -> Path:
    """`folder/<name>`: the space `spec` as YAML."""
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path
