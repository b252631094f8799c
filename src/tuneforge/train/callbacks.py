"""Trainer callbacks of our own: metrics.jsonl logging and the progress display (live on a terminal, plain lines in a
log file)."""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from tuneforge.models.reference import RUN_METRICS
from tuneforge.utils import append_jsonl


class MetricsFileCallback(TrainerCallback):
    """Append every Trainer log to ``run_dir/metrics.jsonl`` as ``{"event": "log"|"eval", "step": ..., ...}``.

    Keys are renamed to the names the report reads: ``learning_rate`` → ``lr``; non-finite values become strings
    (JSON has no NaN).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RUN_METRICS
        self.started = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:  # every rank logs the same (gathered) values
            return
        if any(key.startswith("eval_") for key in logs):
            event = "eval"
        elif "train_loss" in logs:  # the Trainer's closing record (every log carries train_runtime)
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


class ProgressDisplay(TrainerCallback):
    """Training progress: step/total, loss, lr, tokens/s and ETA, on stderr.

    On a terminal, one live rich line per training stage; otherwise (a log file, nohup, a batch job) one plain line
    per logging step, e.g. ``sft step 20/100 · loss 1.234 · lr 2.00e-04 · 1,234 tok/s · ETA 0:01:05``, which a
    log reader can follow. Replaces the Trainer's own tqdm bar and its raw dict printing; evaluations are printed
    as one line each. Tokens/s counts the input tokens the Trainer saw (``include_num_input_tokens_seen``), padding
    excluded where the batch has an attention mask.

    Args:
        stage: the label of the line (the run's stage).
        live: the rich live line (``True``) or plain lines (``False``); ``None``: live only when stderr is a
            terminal.
    """

    def __init__(self, stage: str, live: bool | None = None):
        self.stage = stage
        self.live = live
        self.progress = None
        self.task = None
        self.plain = False
        self.started = 0.0
        self.steps_at_start = 0
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        from tuneforge.console import err

        if not state.is_world_process_zero:
            return
        self.started = time.time()
        self.steps_at_start = state.global_step
        self.tokens_at_start = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        live = err().is_terminal if self.live is None else self.live
        if not live:
            self.plain = True
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"), TextColumn("ETA"), TimeRemainingColumn(),
            # No refresh thread: it would wake 10x a second for the whole run to redraw a line that only changes at
            # a step or a log, taking the GIL from the training loop; those events redraw it instead.
            console=err(), transient=False, auto_refresh=False,
        )
        self.task = self.progress.add_task(self.stage, total=state.max_steps, completed=state.global_step,
                                           metrics="")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, refresh=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if (self.progress is None and not self.plain) or not logs:
            return
        if any(key.startswith("eval_") for key in logs):
            shown = ", ".join(f"{k[5:]} {_short(v)}" for k, v in logs.items()
                              if k.startswith("eval_") and not k.endswith(("_runtime", "per_second")))
            self._say(f"  eval @ step {state.global_step}: {shown}")
            return
        if "loss" not in logs:
            return
        metrics = " · ".join(self._metrics(state, logs))
        if self.progress is not None:
            self.progress.update(self.task, metrics=metrics, refresh=True)
        else:
            self._say(f"{self.stage} step {state.global_step}/{state.max_steps} · {metrics} · ETA {self._eta(state)}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
        self.plain = False

    def _metrics(self, state, logs: dict) -> list[str]:
        elapsed = max(time.time() - self.started, 1e-9)
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.tokens_at_start
        parts = [f"loss {_short(logs['loss'])}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.2e}")
        if tokens > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        return parts

    def _eta(self, state) -> str:
        done = state.global_step - self.steps_at_start
        if done <= 0 or not state.max_steps:
            return "?"
        left = (time.time() - self.started) / done * max(state.max_steps - state.global_step, 0)
        return str(datetime.timedelta(seconds=round(left)))

    def _say(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False)
        else:
            _plain_line(line)


def _plain_line(line: str) -> None:
    """One plain line on stderr, flushed at once (a log file shows it while the run goes on)."""
    from tuneforge.console import err

    console = err()
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.file.flush()


def install_progress(trainer, stage: str) -> None:
    """Replace the Trainer's tqdm bar and dict printer with one :class:`ProgressDisplay`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressDisplay(stage))


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
