"""Trainer callbacks of our own: metrics.jsonl logging and a concise console summary."""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneforge.utils import append_jsonl


class MetricsFileCallback(TrainerCallback):
    """Append every Trainer log to ``run_dir/metrics.jsonl`` as ``{"event": "log"|"eval", "step": ..., ...}``.

    Keys are renamed to the names the report reads: ``learning_rate`` → ``lr``; non-finite values become strings
    (JSON has no NaN).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if any(key.startswith("eval_") for key in logs):
            event = "eval"
        elif "train_runtime" in logs:
            event = "train_end"
        else:
            event = "log"
        record = {"event": event, "step": state.global_step, "time": round(time.time() - self.started, 3)}
        for key, value in logs.items():
            name = "lr" if key == "learning_rate" else key
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            record[name] = value
        append_jsonl(self.path, record)
