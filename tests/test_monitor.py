"""Stability monitor: stops on NaN, warns on spikes / memory growth / degenerate samples, quiet on a healthy run."""

from __future__ import annotations

import json
import math

import pytest

from tuneforge.config.schema import MonitorConfig
from tuneforge.train import monitor as mon


class Control:
    should_training_stop = False
    should_save = False
    should_evaluate = False


class Args:
    learning_rate = 2e-4
    max_grad_norm = 0.0
    warmup_ratio = 0.0
    fp16 = False


@pytest.fixture()
def monitor(tmp_path, monkeypatch):
    monkeypatch.setattr(mon, "current_memory", lambda: 1e9)  # constant memory: only the checks under test fire
    printed = []
    m = mon.StabilityMonitor(tmp_path, MonitorConfig(window=5), echo=printed.append)
    m.printed = printed
    return m


def _feed(m, losses, grads=None, control=None):
    control = control or Control()
    for step, loss in enumerate(losses, 1):
        logs = {"loss": loss, "learning_rate": 1e-4}
        if grads is not None:
            logs["grad_norm"] = grads[step - 1]
        m.check_log(step, logs, control, Args())
    return control


def _warnings_in_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"warning"' in line]


def test_quiet_on_a_healthy_decreasing_run(monitor, tmp_path):
    losses = [4.0 * math.exp(-0.05 * i) + 0.05 * ((-1) ** i) for i in range(60)]
    grads = [1.0 + 0.2 * ((-1) ** i) for i in range(60)]
    control = _feed(monitor, losses, grads)
    assert monitor.warnings == [] and monitor.printed == []
    assert not control.should_training_stop and monitor.stopped_reason is None
    assert _warnings_in_file(tmp_path) == []


def test_nan_loss_stops_without_saving_and_explains(monitor, tmp_path):
    control = Control()
    control.should_save = True  # this step was due for a checkpoint
    _feed(monitor, [3.0, 2.9, 2.8, float("nan")], control=control)
    assert control.should_training_stop and not control.should_save and not control.should_evaluate
    assert "nan" in monitor.stopped_reason.lower() and "step 4" in monitor.stopped_reason
    events = _warnings_in_file(tmp_path)
    assert [e["kind"] for e in events] == ["nan_loss"]
    assert events[0]["step"] == 4 and "lr" in events[0]["advice"] and "max_grad_norm: 1.0" in events[0]["advice"]
    assert len(monitor.printed) == 1


def test_nan_eval_loss_and_string_nan_also_stop(monitor):
    control = Control()
    monitor.check_log(7, {"eval_loss": float("inf")}, control)
    assert control.should_training_stop and "eval loss" in monitor.stopped_reason
    assert not mon.is_finite("nan") and mon.is_finite(1.5)


def test_loss_spike_warns_once_per_window(monitor, tmp_path):
    losses = [2.0, 1.95, 1.9, 1.88, 1.85, 3.0, 3.1, 1.8]
    control = _feed(monitor, losses)
    assert not control.should_training_stop
    kinds = [w.kind for w in monitor.warnings]
    assert kinds == ["loss_spike"]  # the second spike (3.1) falls within the cool-down window
    assert monitor.warnings[0].step == 6 and "moving average" in monitor.warnings[0].message
    assert _warnings_in_file(tmp_path)[0]["kind"] == "loss_spike"


def test_spike_function_threshold():
    assert mon.spike([1.0, 1.0, 1.0], 1.19, ratio=1.2, window=20) is None
    assert mon.spike([1.0, 1.0, 1.0], 1.21, ratio=1.2, window=20) == pytest.approx(1.0)
    assert mon.spike([1.0, 1.0], 5.0, ratio=1.2, window=20) is None  # too little history
    assert mon.spike([10.0, 1.0, 1.0, 1.0], 1.5, ratio=1.2, window=3) == pytest.approx(1.0)  # only the window


def test_grad_norm_spike_warns(monitor):
    _feed(monitor, [2.0, 1.9, 1.8, 1.7, 1.6], grads=[1.0, 1.1, 0.9, 1.0, 12.0])
    assert [w.kind for w in monitor.warnings] == ["grad_spike"]
    assert "clipping" in monitor.warnings[0].advice


def test_memory_growth():
    mib = 2**20
    growing = [1000 * mib + i * 60 * mib for i in range(10)]
    assert mon.memory_growing(growing, window=10) == pytest.approx(540 * mib)
    plateau = [1000 * mib + min(i, 3) * 100 * mib for i in range(10)]
    assert mon.memory_growing(plateau, window=10) is None
    small = [1000 * mib + i * mib for i in range(10)]
    assert mon.memory_growing(small, window=10) is None


def test_memory_growth_warning_through_the_callback(tmp_path):
    m = mon.StabilityMonitor(tmp_path, MonitorConfig(window=6), echo=lambda w: None)
    for i in range(10):
        m._logs_seen = i + 1
        m.check_memory(i + 1, 1e9 + i * 200 * 2**20)
    assert [w.kind for w in m.warnings] == ["memory_growth"]  # once: the next one waits for the cool-down
    assert "MiB" in m.warnings[0].message


def test_degeneration_checks():
    healthy = ["A list is a mutable sequence of items.", "Tuples cannot be changed after creation."]
    assert mon.degeneration_issues(healthy) == []
    loop = "the the the the the the the the the the the the"
    issues = mon.degeneration_issues([loop, "fine answer here"])
    assert len(issues) == 1 and "repetitive" in issues[0]
    assert "empty" in mon.degeneration_issues(["", "ok"])[0]
    no_eos = [{"text": "a b c", "finished": False}, {"text": "d e f", "finished": False}]
    assert "EOS" in mon.degeneration_issues(no_eos)[0]
    assert mon.degeneration_issues([{"text": "a b c", "finished": True}, {"text": "x", "finished": False}]) == []
    assert mon.repetition_ratio("我我我我我我我我我我我我") > 0.8
    assert mon.repetition_ratio("我喜欢用Python写代码，因为它简单") == 0


def test_sampler_called_every_n_steps(tmp_path):
    calls = []

    def sampler():
        calls.append(1)
        return ["again again again again again again again again again again"]

    m = mon.StabilityMonitor(tmp_path, MonitorConfig(window=3, sample_every=2), sampler=sampler,
                             echo=lambda w: None)

    class State:
        global_step = 0

    state = State()
    for step in range(1, 5):
        state.global_step = step
        m.on_step_end(Args(), state, Control())
    assert len(calls) == 2
    assert [w.kind for w in m.warnings] == ["degenerate_samples"]


@pytest.mark.parametrize(
    ("poison_after", "save_steps", "kind", "stop_step", "kept"),
    [
        (3, 2, "nan_weights", 4, ["checkpoint-2"]),  # a save is due at the bad step: the weight check refuses it
        (4, 3, "nan_loss", 5, ["checkpoint-3"]),  # no save due: the logged NaN loss stops training
    ],
)
def test_injected_nan_stops_a_real_trainer(tmp_path, tiny_llama, tiny_tokenizer, poison_after, save_steps, kind,
                                           stop_step, kept):
    """End to end with the HF Trainer: weights poisoned after a step → stopped, no checkpoint of broken weights."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Poison(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == poison_after:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    ids = tiny_tokenizer("A list is a mutable sequence. " * 4)["input_ids"][:16]
    rows = [{"input_ids": ids, "labels": ids} for _ in range(16)]
    monitor = mon.StabilityMonitor(tmp_path, MonitorConfig(), echo=lambda w: None)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), max_steps=8, per_device_train_batch_size=2,
                             logging_steps=1, save_strategy="steps", save_steps=save_steps, report_to=[],
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=tiny_llama, args=args, train_dataset=rows, callbacks=[Poison(), monitor])
    trainer.train()
    assert trainer.state.global_step == stop_step
    assert monitor.stopped_reason and f"step {stop_step}" in monitor.stopped_reason
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == kept
    assert [e["kind"] for e in _warnings_in_file(tmp_path)] == [kind]


def test_grad_norm_nan_stops(monitor):
    control = _feed(monitor, [2.0, 1.9, 0.0], grads=[1.0, 1.0, float("nan")])
    assert control.should_training_stop and "gradient norm" in monitor.stopped_reason


def _feed_logs(m, rows):
    for step, extra in enumerate(rows, 1):
        m.check_log(step, {"loss": 0.5, "grad_norm": 1.0, **extra}, Control(), Args())
    return [w.kind for w in m.warnings]


def test_chosen_rewards_falling_while_margin_grows_warns(monitor):
    healthy = [{"rewards/chosen": 0.01 * s, "rewards/rejected": -0.05 * s, "rewards/margins": 0.06 * s}
               for s in range(10)]
    assert _feed_logs(monitor, healthy) == []
    assert mon.chosen_falling([-0.1, -0.2, -0.3], [0.1, 0.2, 0.3], 5) is None  # too few logs to judge
    displaced = [{"rewards/chosen": -0.05 * s, "rewards/rejected": -0.2 * s, "rewards/margins": 0.15 * s}
                 for s in range(1, 8)]
    assert _feed_logs(monitor, displaced) == ["chosen_falling"]
    warning = monitor.warnings[0]
    assert "fell from -0.05 to -0.25" in warning.message and "preference.beta" in warning.advice


def test_kl_spike_warns_above_floor_only(monitor):
    tiny = [{"kl": 0.001}] * 6 + [{"kl": 0.02}]  # 20x the average, but below the floor: noise
    assert _feed_logs(monitor, tiny) == []
    assert _feed_logs(monitor, [{"kl": 0.02}] * 5 + [{"kl": 0.5}]) == ["kl_spike"]
    assert "grpo.beta" in monitor.warnings[0].advice
