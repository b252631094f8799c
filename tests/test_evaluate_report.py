"""`tuneforge report`: report.html from a synthetic run directory, with plots, tables, warnings, config, samples."""

from __future__ import annotations

import base64
import json

import pytest

from tuneforge.cli import main
from tuneforge.evaluate.report import build_report, read_metrics


def _synthetic_run(run):
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 21):
        lines.append({"event": "log", "step": step, "epoch": step / 20, "loss": 3.0 - 0.1 * step,
                      "lr": 1e-4 * (1 - step / 20), "grad_norm": 1.0 + 0.01 * step})
        if step % 5 == 0:
            lines.append({"event": "eval", "step": step, "eval_loss": 3.1 - 0.09 * step})
    lines.append({"event": "warning", "step": 12, "kind": "loss_spike", "message": "loss spiked to 9.9 <b>",
                  "advice": "lower train.lr"})
    text = "".join(json.dumps(x) + "\n" for x in lines) + '{"event": "log", "step": 21, "lo'  # cut by a crash
    (run / "metrics.jsonl").write_text(text)
    (run / "summary.json").write_text(json.dumps({"train_loss": 1.234567, "params": {"trainable": 4096}}))
    (run / "config.yaml").write_text("run_name: demo\ntrain:\n  lr: 0.0001\n")
    (run / "eval_results.json").write_text(json.dumps([{"model": str(run), "data": "eval.jsonl", "ppl": 12.5,
                                                        "tokens": 321, "time": "now"}]))
    return run


def test_report_from_synthetic_run(tmp_path):
    run = _synthetic_run(tmp_path / "runs" / "demo")
    assert len(read_metrics(run / "metrics.jsonl")) == 25  # the cut line is skipped
    path = build_report(run, samples=False)
    assert path == run / "report.html"
    page = path.read_text()
    images = page.split('src="data:image/png;base64,')[1:]
    assert len(images) == 3  # loss (+ eval loss), lr, grad norm
    for img in images:
        assert base64.b64decode(img.split('"', 1)[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss spiked to 9.9 &lt;b&gt;" in page and "lower train.lr" in page  # warnings, escaped
    assert "run_name: demo" in page  # resolved config
    assert "1.23457" in page and "params.trainable" in page  # summary.json
    assert "12.5" in page and "321" in page  # eval results table
    assert "disabled (--no-samples)" in page
    assert not list(run.glob(".report.html.*"))  # atomic write left no temp file


def test_report_stopped_run_and_cli(tmp_path, capsys):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "log", "step": 1, "loss": "nan"}) + "\n")
    (run / "summary.json").write_text(json.dumps({"status": "stopped", "reason": "training loss is nan at step 1"}))
    (run / "config.yaml").write_text("run_name: stopped\n")
    assert main(["report", str(run), "--no-samples"]) == 0
    page = (run / "report.html").read_text()
    assert "Training stopped early: training loss is nan at step 1" in page
    assert "no loss values logged" in page  # a "nan" string is not plotted
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (run / "config.yaml").unlink()  # the one run-directory rule: config.yaml plus something only a run writes
    assert main(["report", str(run), "--no-samples"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def _run_with_final_model(tmp_path, model, tokenizer):
    """A synthetic run whose final/ is ``model`` and whose data has one chat record (the samples' prompt)."""
    run = _synthetic_run(tmp_path / "run")
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "What is a list?"},
                                             {"role": "assistant", "content": "A sequence."}]}) + "\n")
    (run / "config.yaml").write_text(f"run_name: demo\ndata:\n  train: [{data}]\n  eval: {data}\n")
    return run


def test_report_generates_samples_from_the_final_model(tmp_path, tiny_llama, tiny_tokenizer):
    run = _run_with_final_model(tmp_path, tiny_llama, tiny_tokenizer)
    from tuneforge.models.generation import GenerationSettings

    page = build_report(run, samples=True, n_samples=2, settings=GenerationSettings(max_new_tokens=5)).read_text()
    assert "What is a list?" in page and 'class="out"' in page


def test_report_samples_that_do_not_fit_memory_are_left_out_with_the_reason(tmp_path, tiny_llama, tiny_tokenizer,
                                                                            monkeypatch):
    """Issue 28: the samples run the generation preflight first; too little memory costs the samples, not the
    report, and no model is loaded."""
    import tuneforge.models.memory as memory
    import tuneforge.models.reference as reference

    run = _run_with_final_model(tmp_path, tiny_llama, tiny_tokenizer)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": 64 * 1024)

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the preflight refused")

    monkeypatch.setattr(reference, "load_for_inference", refuse)
    page = build_report(run, samples=True, n_samples=1).read_text()
    assert "samples unavailable: report samples: " in page and "above the budget of 0.1 MiB" in page


@pytest.mark.parametrize("missing", ["metrics.jsonl", "summary.json"])
def test_report_tolerates_missing_parts(tmp_path, missing):
    run = _synthetic_run(tmp_path / "r")
    (run / missing).unlink()
    page = build_report(run, samples=False).read_text()
    assert "<h2>Training curves</h2>" in page


def test_report_plots_preference_and_grpo_curves_only_when_logged(tmp_path):
    from tuneforge.evaluate.report import curves

    sft = [{"event": "log", "step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 1.0} for s in range(1, 6)]
    assert set(curves(sft)) == {"loss", "lr", "grad_norm"}  # an SFT run gets no empty reward plots
    dpo = [{**e, "rewards/chosen": 0.1 * e["step"], "rewards/rejected": -0.1 * e["step"],
            "rewards/margins": 0.2 * e["step"], "rewards/accuracies": 0.5 + 0.1 * e["step"]} for e in sft]
    assert set(curves(dpo)) == {"loss", "lr", "grad_norm", "rewards", "reward_accuracy"}
    grpo = [{**e, "reward": 0.2 * e["step"], "rewards/exact/mean": 0.2 * e["step"], "kl": 0.01} for e in sft]
    assert set(curves(grpo)) == {"loss", "lr", "grad_norm", "rewards", "kl"}
    run = _synthetic_run(tmp_path / "runs" / "dpo")
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in dpo))
    page = build_report(run, samples=False).read_text()
    assert page.count('src="data:image/png;base64,') == 5
    assert 'alt="rewards curve"' in page and 'alt="reward_accuracy curve"' in page
