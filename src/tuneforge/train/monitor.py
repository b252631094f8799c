"""Training-stability monitor: a Trainer callback that stops on NaN and warns early about instability.

What it watches (each check is a plain function below, testable without a Trainer):

* **non-finite loss** (NaN/inf train or eval loss or grad norm, or non-finite trainable weights when a checkpoint is
  about to be saved) → sets ``control.should_training_stop``, cancels that step's save and evaluation so no broken checkpoint
  is written, records ``stopped_reason`` and explains. The trainer then keeps the last good checkpoint and writes
  no final model. The Trainer's ``logging_nan_inf_filter`` (which logs a NaN step loss as the running average) is
  switched off at train begin so that a NaN loss is seen.
* **loss spikes**: a logged loss above ``loss_spike_ratio`` × the mean of the previous ``window`` logged losses.
* **grad-norm spikes**: a logged grad norm above ``grad_spike_ratio`` × the mean of the previous ``window``.
* **growing memory**: process RSS (CPU) or CUDA peak allocated memory rising over the last ``window`` logs.
* **preference and RL stages** (only when their keys are logged): ``chosen_falling`` — DPO-family implicit rewards
  of the chosen answers negative and falling over ``window`` logs while the margin grows (the rejected answers fall
  faster: the model is unlearning both, "likelihood displacement"); ``kl_spike`` — GRPO/KTO's ``kl`` to the
  reference above ``grad_spike_ratio`` × its moving average (and above ``KL_FLOOR``).
* **degenerate samples**: every ``sample_every`` steps the ``sampler`` callable generates a few answers; empty
  answers, heavy repetition, and never stopping (no EOS) are reported.

Advice follows the guide (004 §3.13): most instability comes from a learning rate that is too high; enable
gradient clipping (1.0); more warmup; a larger effective batch (gradient accumulation); bf16 rather than fp16.
Every warning is appended to ``run_dir/metrics.jsonl`` as ``{"event": "warning", "step", "kind", "message",
"advice"}`` and printed once; the same kind is not repeated within ``window`` logs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # the base class only; everything else works (and is tested) without transformers
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency of training
    TrainerCallback = object  # type: ignore[misc,assignment]

from tuneforge.models.reference import RUN_METRICS
from tuneforge.utils import append_jsonl

MIN_HISTORY = 3  # logs needed before a moving average is trusted
MEMORY_WARMUP_LOGS = 2  # first logs allocate optimizer states and caches: not a leak
MEMORY_MIN_GROWTH_BYTES = 256 * 2**20
MEMORY_MIN_GROWTH_FRAC = 0.10
REPETITION_LIMIT = 0.5
KL_FLOOR = 0.05  # a KL below this is noise around zero, whatever its ratio to the average


@dataclass
class StabilityWarning:
    """One finding: ``kind`` is a stable identifier (``loss_spike``, ``grad_spike``, ``nan_loss``...)."""

    step: int
    kind: str
    message: str
    advice: str

    def to_event(self) -> dict:
        return {"event": "warning", "step": self.step, "kind": self.kind, "message": self.message,
                "advice": self.advice}


# --------------------------------------------------------------------------- detection (pure functions)


def is_finite(value: Any) -> bool:
    """False for NaN, +/-inf (floats or their string forms such as ``"nan"``); True for other numbers."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None (absent, not a number, NaN/inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def moving_average(history: Sequence[float], window: int) -> float | None:
    """Mean of the last ``window`` finite values, or None with fewer than ``MIN_HISTORY`` of them."""
    recent = [v for v in history if is_finite(v)][-window:]
    if len(recent) < MIN_HISTORY:
        return None
    return sum(recent) / len(recent)


def spike(history: Sequence[float], value: float, ratio: float, window: int) -> float | None:
    """The moving average ``value`` spiked above (``value > ratio * average``), or None when it did not."""
    average = moving_average(history, window)
    if average is None or average <= 0 or not is_finite(value):
        return None
    return average if value > ratio * average else None


def memory_growing(samples: Sequence[float], window: int, min_growth_bytes: float = MEMORY_MIN_GROWTH_BYTES,
                   min_growth_frac: float = MEMORY_MIN_GROWTH_FRAC) -> float | None:
    """Bytes of growth when memory rose steadily over the last ``window`` samples, else None.

    Steady = at least 80% of consecutive differences are increases (none of the rest a large drop) and the total
    rise exceeds both ``min_growth_bytes`` and ``min_growth_frac`` of the starting value.
    """
    recent = list(samples)[-window:]
    if len(recent) < max(MIN_HISTORY + 1, window // 2):
        return None
    diffs = [b - a for a, b in zip(recent, recent[1:], strict=False)]
    rises = sum(d > 0 for d in diffs)
    growth = recent[-1] - recent[0]
    if rises < 0.8 * len(diffs) or growth < max(min_growth_bytes, min_growth_frac * recent[0]):
        return None
    return growth


_UNSEGMENTED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0e7f"
# one unsegmented character | a run of other letters/digits | one punctuation mark
_WORD_RE = re.compile(f"[{_UNSEGMENTED}]|[^\\W{_UNSEGMENTED}]+|[^\\w\\s]")


def chosen_falling(chosen: Sequence[float], margins: Sequence[float], window: int) -> tuple[float, float] | None:
    """``(first, last)`` chosen reward of the last ``window`` logs when they show likelihood displacement: every
    one of them negative, the last below the first and below their mean, and the margin larger at the end than at
    the start; else None (also with fewer than ``window`` logs)."""
    if len(chosen) < window or len(margins) < window:
        return None
    recent, recent_margins = list(chosen)[-window:], list(margins)[-window:]
    first, last = recent[0], recent[-1]
    if all(c < 0 for c in recent) and last < first and last < sum(recent) / window \
            and recent_margins[-1] > recent_margins[0]:
        return first, last
    return None


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of repeated word n-grams: ``1 - distinct / total`` (0 = no repetition, near 1 = a loop).

    Words are letter/digit runs, single punctuation marks, and single characters of unsegmented scripts (Chinese,
    Japanese, Thai). Texts shorter than ``2n`` words score 0.
    """
    words = _WORD_RE.findall(text.lower())
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def degeneration_issues(samples: Sequence[str | dict], repetition_limit: float = REPETITION_LIMIT) -> list[str]:
    """Problems in sampled answers. Each sample is a string or ``{"text": str, "finished": bool}`` where
    ``finished`` says whether generation ended with EOS / a stop token (unknown for plain strings)."""
    texts = [s["text"] if isinstance(s, dict) else s for s in samples]
    finished = [s.get("finished") for s in samples if isinstance(s, dict) and s.get("finished") is not None]
    issues = []
    empty = sum(1 for t in texts if not t.strip())
    if empty:
        issues.append(f"{empty} of {len(texts)} sampled answers are empty")
    ratios = [repetition_ratio(t) for t in texts]
    worst = max(ratios, default=0.0)
    if worst > repetition_limit:
        text = texts[ratios.index(worst)]
        issues.append(f"repetitive output ({100 * worst:.0f}% repeated 3-grams): {text[:80]!r}...")
    if finished and not any(finished):
        issues.append(f"none of {len(finished)} sampled answers ended with EOS (every one hit max_new_tokens)")
    return issues


# --------------------------------------------------------------------------- advice


def advice_for(kind: str, args: Any = None) -> str:
    """Concrete advice (guide 004 §3.13) for a warning kind, using the run's TrainingArguments when given."""
    lr = getattr(args, "learning_rate", None)
    clip = getattr(args, "max_grad_norm", None)
    warmup = getattr(args, "warmup_ratio", None) or 0
    fp16 = getattr(args, "fp16", False)
    lower_lr = (f"lower train.lr (now {lr:g}; try {lr / 3:.2g})" if lr else "lower train.lr (2-10x)") + \
        " — most instability comes from a learning rate that is too high"
    clipping = ("enable gradient clipping: train.max_grad_norm: 1.0" if not clip
                else f"keep clipping on (train.max_grad_norm {clip:g}; 1.0 is the usual value)")
    more_warmup = f"more warmup: train.warmup_ratio 0.05-0.1 (now {warmup:g})"
    if kind in ("nan_loss", "nan_weights"):
        parts = [lower_lr, clipping, more_warmup]
        if fp16:
            parts.append("fp16 overflows easily: use bf16 (model.precision: bf16) where the hardware has it")
        parts.append("check the data for empty or garbage samples (tuneforge data preview); then restart from the "
                     "last good checkpoint")
        return "; ".join(parts)
    if kind == "loss_spike":
        return "; ".join([lower_lr, clipping, more_warmup, "a larger effective batch (train.grad_accum) smooths "
                          "the loss; a cosine schedule decays more smoothly"])
    if kind == "grad_spike":
        return "; ".join([clipping, lower_lr, more_warmup])
    if kind == "chosen_falling":
        return ("the chosen answers' likelihood is falling too, only slower than the rejected ones': " + lower_lr
                + "; raise preference.beta (a stronger pull to the reference); check that chosen answers are "
                "really better and not near-duplicates of the rejected ones (tuneforge data preview); an SFT pass "
                "on the chosen answers before DPO helps")
    if kind == "kl_spike":
        return ("the policy is moving away from the reference quickly (reward hacking or collapse often follows): "
                + lower_lr + "; raise grpo.beta (KL weight) or preference.beta; look at the sampled completions")
    if kind == "memory_growth":
        return ("memory keeps growing: something may hold tensors across steps (a leak); if it stops at a "
                "plateau it is caching. Near the limit: lower train.batch_size, raise train.grad_accum, or set "
                "train.gradient_checkpointing: true")
    if kind == "degenerate_samples":
        return ("repetition or empty answers mean the model is degrading: " + lower_lr + "; raise method.dropout "
                "to 0.1 against overfitting; check that every answer ends with an end-of-turn token "
                "(tuneforge data preview)")
    return ""


# --------------------------------------------------------------------------- memory probes


def current_memory() -> float | None:
    """CUDA peak allocated bytes when CUDA is in use, else this process's RSS in bytes (None if unknown)."""
    import sys

    torch = sys.modules.get("torch")  # never import torch just for this
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.max_memory_allocated())
    try:
        import psutil

        return float(psutil.Process().memory_info().rss)
    except ImportError:
        try:
            with open("/proc/self/statm") as handle:
                import os

                return float(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, IndexError):
            return None


# --------------------------------------------------------------------------- the callback


class StabilityMonitor(TrainerCallback):
    """Trainer callback running the checks above.

    Args:
        run_dir: the run directory; warnings go to ``run_dir/metrics.jsonl``.
        monitor_cfg: a :class:`tuneforge.config.schema.MonitorConfig` (``enabled``, ``loss_spike_ratio``,
            ``grad_spike_ratio``, ``window``, ``sample_every``).
        sampler: optional callable with no arguments returning sampled answers (strings, or dicts
            ``{"text", "finished"}`` — see :func:`generation_sampler`), called every ``sample_every`` steps.
        echo: where warnings are printed (default: a rich console on stderr).

    Attributes callers may rely on: ``stopped_reason`` (None, or why training was stopped), ``warnings`` (every
    :class:`StabilityWarning` emitted, in order).
    """

    def __init__(self, run_dir: str | Path, monitor_cfg: Any, sampler: Callable[[], Sequence] | None = None,
                 echo: Callable[[StabilityWarning], None] | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = monitor_cfg
        self.sampler = sampler
        self.echo = echo or _print_warning
        self.stopped_reason: str | None = None
        self.warnings: list[StabilityWarning] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.memory: list[float] = []
        self.chosen_rewards: list[float] = []
        self.margins: list[float] = []
        self.kls: list[float] = []
        self._logs_seen = 0
        self._last_warned: dict[str, int] = {}  # kind -> log index of the last warning of that kind

    # ---- emitting

    def warn(self, step: int, kind: str, message: str, advice: str = "", force: bool = False) -> bool:
        """Record and print a warning unless the same kind was reported within the last ``window`` logs."""
        last = self._last_warned.get(kind)
        if not force and last is not None and self._logs_seen - last < self.cfg.window:
            return False
        self._last_warned[kind] = self._logs_seen
        warning = StabilityWarning(step, kind, message, advice)
        self.warnings.append(warning)
        if self.run_dir.is_dir():
            append_jsonl(self.run_dir / RUN_METRICS, warning.to_event())
        self.echo(warning)
        return True

    def stop(self, control: Any, step: int, kind: str, message: str, args: Any = None) -> None:
        """Stop training now, without saving or evaluating this step, and explain why."""
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
        if self.stopped_reason is None:
            self.stopped_reason = message
            self.warn(step, kind, message + "; training stopped, the last good checkpoint is kept and no final "
                      "model is written", advice_for(kind, args), force=True)

    # ---- checks on one log line (pure except for warn/stop)

    def check_log(self, step: int, logs: dict, control: Any, args: Any = None) -> None:
        """Run the NaN, spike and memory checks on one Trainer log dict."""
        if "eval_loss" in logs and not is_finite(logs["eval_loss"]):
            self.stop(control, step, "nan_loss", f"eval loss is {logs['eval_loss']} at step {step}", args)
            return
        if "loss" not in logs:
            return
        self._logs_seen += 1
        loss = logs["loss"]
        grad = logs.get("grad_norm")
        if not is_finite(loss):
            self.stop(control, step, "nan_loss", f"training loss is {loss} at step {step}", args)
            return
        if grad is not None and not is_finite(grad):
            # The optimizer step already applied these gradients: the weights are broken.
            self.stop(control, step, "nan_loss", f"gradient norm is {grad} at step {step}", args)
            return
        loss = float(loss)
        average = spike(self.losses, loss, self.cfg.loss_spike_ratio, self.cfg.window)
        if average is not None:
            self.warn(step, "loss_spike",
                      f"loss spiked to {loss:.4g} at step {step}, {loss / average:.2f}x its moving average "
                      f"{average:.4g} (threshold {self.cfg.loss_spike_ratio:g}x)", advice_for("loss_spike", args))
        self.losses.append(loss)
        if grad is not None:
            grad = float(grad)
            average = spike(self.grad_norms, grad, self.cfg.grad_spike_ratio, self.cfg.window)
            if average is not None:
                self.warn(step, "grad_spike",
                          f"gradient norm spiked to {grad:.4g} at step {step}, {grad / average:.1f}x its moving "
                          f"average {average:.4g}", advice_for("grad_spike", args))
            self.grad_norms.append(grad)
        self.check_stage_keys(step, logs, args)
        self.check_memory(step, current_memory(), args)

    def check_stage_keys(self, step: int, logs: dict, args: Any = None) -> None:
        """Preference (``rewards/chosen``, ``rewards/margins``) and KL (``kl``) checks, when those keys are logged."""
        chosen, margin = _number(logs.get("rewards/chosen")), _number(logs.get("rewards/margins"))
        if chosen is not None and margin is not None:
            self.chosen_rewards.append(chosen)
            self.margins.append(margin)
            falling = chosen_falling(self.chosen_rewards, self.margins, self.cfg.window)
            if falling is not None:
                self.warn(step, "chosen_falling",
                          f"the chosen answers' reward fell from {falling[0]:.3g} to {falling[1]:.3g} over the last "
                          f"{self.cfg.window} logs while the margin grew: both answers are becoming less likely",
                          advice_for("chosen_falling", args))
        kl = _number(logs.get("kl"))
        if kl is not None:
            average = spike(self.kls, kl, self.cfg.grad_spike_ratio, self.cfg.window)
            if average is not None and kl > KL_FLOOR:
                self.warn(step, "kl_spike", f"KL to the reference jumped to {kl:.3g} at step {step}, "
                          f"{kl / max(average, 1e-12):.1f}x its moving average {average:.3g}", advice_for("kl_spike", args))
            self.kls.append(kl)

    def check_memory(self, step: int, value: float | None, args: Any = None) -> None:
        """Add one memory sample (bytes) and warn when memory grows steadily."""
        if value is None:
            return
        if self._logs_seen <= MEMORY_WARMUP_LOGS:
            return
        self.memory.append(value)
        growth = memory_growing(self.memory, self.cfg.window)
        if growth is not None and self.warn(
            step, "memory_growth",
            f"memory grew steadily by {growth / 2**20:.0f} MiB over the last {min(len(self.memory), self.cfg.window)}"
            f" logs (now {value / 2**20:.0f} MiB)", advice_for("memory_growth", args),
        ):
            self.memory = self.memory[-1:]  # measure further growth from here

    def check_samples(self, step: int, samples: Sequence, args: Any = None) -> list[str]:
        """Check sampled answers for degeneration; warns and returns the issues found."""
        issues = degeneration_issues(samples)
        if issues:
            self.warn(step, "degenerate_samples", f"sample generations at step {step}: " + "; ".join(issues),
                      advice_for("degenerate_samples", args))
        return issues

    # ---- Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        # By default the Trainer replaces a NaN/inf step loss by the running average before logging
        # (logging_nan_inf_filter), which would hide exactly what this monitor must see.
        if getattr(args, "logging_nan_inf_filter", False):
            args.logging_nan_inf_filter = False
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.check_log(state.global_step, logs, control, args)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        # The save of this step happens after this callback: refuse to checkpoint broken weights, even when the
        # NaN appeared between two logging steps.
        if control.should_save and model is not None and not _trainable_finite(model):
            self.stop(control, step, "nan_weights", f"trainable weights contain NaN/inf at step {step}", args)
            return control
        every = getattr(self.cfg, "sample_every", None)
        if self.sampler is not None and every and step > 0 and step % every == 0:
            try:
                samples = list(self.sampler())
            except Exception as exc:  # noqa: BLE001 - a failing sampler must not kill the training run
                self.warn(step, "sampler_error", f"sample generation failed and is disabled: {exc!r}", force=True)
                self.sampler = None
            else:
                self.check_samples(step, samples, args)
        return control


def _trainable_finite(model: Any) -> bool:
    import torch

    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _print_warning(warning: StabilityWarning) -> None:
    from tuneforge.console import warn

    warn(f"step {warning.step} [{warning.kind}]: {warning.message}", warning.advice)


# --------------------------------------------------------------------------- a sampler for the degeneration check


def generation_sampler(model: Any, tokenizer: Any, template: Any, prompts: Sequence,
                       max_new_tokens: int = 48) -> Callable[[], list[dict]]:
    """A sampler for :class:`StabilityMonitor`: greedy answers to ``prompts`` as ``{"text", "finished"}``.

    ``finished`` is True when a stop token (EOS or the template's end-of-turn) or stop string ended the answer,
    which is what the "never emits EOS" check needs. Generation goes through the one generation path
    (``models.generation.complete``), which restores the model's train/eval mode.
    """

    def sample() -> list[dict]:
        from tuneforge.models.generation import GenerationSettings, complete

        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        return [{"text": c.text, "finished": c.finished}
                for c in complete(model, tokenizer, template, list(prompts), settings)]

    return sample
