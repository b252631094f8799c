"""``tuneforge report RUN_DIR``: one self-contained ``report.html`` (viewable offline) for a run.

Contents: training curves (loss with eval loss, learning rate, grad norm; for preference and GRPO runs also their
rewards, preference accuracy and KL; matplotlib PNGs embedded as base64),
the final metrics from ``summary.json`` and any ``eval_results.json`` written by ``tuneforge eval``, the
stability warnings from ``metrics.jsonl``, a few sample generations of the final model (unless disabled or the
model cannot be loaded — the report says why), and the resolved ``config.yaml``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.evaluate.metrics import METRICS, columns, format_value
from tuneforge.evaluate.retention import RETENTION_KEYS, retention_format
from tuneforge.utils import read_jsonl


def read_metrics(path: str | Path) -> list[dict]:
    """Events of a ``metrics.jsonl``; unreadable lines (e.g. a line cut by a crash) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    return [row for _, row in read_jsonl(path, strict=False)]


def _series(events: list[dict], event: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, e in enumerate(events):
        if e.get("event") == event and isinstance(e.get(key), (int, float)):
            xs.append(e.get("step", i))
            ys.append(float(e[key]))
    return xs, ys


def plot_png(title: str, series: list[tuple[str, list[float], list[float]]], ylabel: str,
             log_y: bool = False) -> str | None:
    """A line plot as a base64 PNG, or None when every series is empty."""
    if not any(xs for _, xs, _ in series):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    try:
        for label, xs, ys in series:
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log_y and all(y > 0 for _, _, ys in series for y in ys):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len([s for s in series if s[1]]) > 1:
            ax.legend()
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


#: curves every run has; the report says when one was not logged
CORE_CURVES = ("loss", "lr", "grad_norm")
#: preference (DPO/KTO/ORPO/SimPO: implicit rewards β·log-ratio) and GRPO (mean verifiable reward) logs
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "reward")


def _logged_keys(events: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for e in events:
        if e.get("event") == "log":
            keys.update(dict.fromkeys(e))
    return list(keys)


def curves(events: list[dict]) -> dict[str, str | None]:
    """The report's plots → base64 PNG or None.

    Always ``loss``, ``lr`` and ``grad_norm``; plus, only when the run logged them, ``rewards`` (preference
    stages' ``rewards/chosen|rejected|margins``, GRPO's mean ``reward`` and each reward function's
    ``rewards/<name>/mean``), ``reward_accuracy`` (``rewards/accuracies``) and ``kl`` (GRPO/KTO's KL to the
    reference).
    """
    plots = {
        "loss": plot_png("loss", [("train loss", *_series(events, "log", "loss")),
                                  ("eval loss", *_series(events, "eval", "eval_loss"))], "loss"),
        "lr": plot_png("learning rate", [("lr", *_series(events, "log", "lr"))], "lr"),
        "grad_norm": plot_png("gradient norm", [("grad norm", *_series(events, "log", "grad_norm"))], "norm",
                              log_y=True),
    }
    logged = _logged_keys(events)
    per_function = [k for k in logged if k.startswith("rewards/") and k.endswith("/mean")]
    optional = {
        "rewards": ("rewards", [k for k in (*REWARD_KEYS, *per_function) if k in logged], "reward"),
        "reward_accuracy": ("preference accuracy (chosen reward > rejected)",
                            [k for k in ("rewards/accuracies",) if k in logged], "share of pairs"),
        "kl": ("KL to the reference model", [k for k in ("kl",) if k in logged], "KL"),
    }
    for name, (title, keys, ylabel) in optional.items():
        png = plot_png(title, [(k, *_series(events, "log", k)) for k in keys], ylabel) if keys else None
        if png:
            plots[name] = png
    return plots


def _load_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        out = []
        for k, v in data.items():
            out.extend(_flatten(v, f"{prefix}{k}."))
        return out
    return [(prefix.rstrip("."), data)]


def sample_prompts(run_dir: Path, n: int) -> list[Any]:
    """Up to ``n`` prompts from the run's eval data (else its training data), taken from its config."""
    from tuneforge.data.readers import read_records
    from tuneforge.evaluate.runner import prompt_and_reference
    from tuneforge.models.reference import read_run_config

    data = read_run_config(run_dir).get("data") or {}
    sources = [data.get("eval")] if isinstance(data.get("eval"), str) else list(data.get("eval") or [])
    sources += list(data.get("train") or [])
    for source in sources:
        try:
            records = read_records(source, data.get("format", "auto"))
        except UserError:
            continue
        prompts = []
        for record in records[:n]:
            prompt, _ = prompt_and_reference(record)
            if isinstance(prompt, str):  # a text record: its first words as a continuation prompt
                prompt = " ".join(prompt.split()[:12])
            prompts.append(prompt)
        return prompts
    return []


def generate_samples(run_dir: Path, n: int = 3, settings: Any = None) -> tuple[list[dict], str | None]:
    """``([{"prompt", "output"}], None)`` or ``([], reason)`` when the model or prompts are unavailable.

    ``settings``: a ``GenerationSettings`` (default: greedy, 64 new tokens).
    """
    from tuneforge.evaluate.abtest import prompt_text
    from tuneforge.evaluate.preflight import generation_preflight
    from tuneforge.models.generation import GenerationSettings, generate
    from tuneforge.models.reference import load_for_inference, load_tokenizer_of, resolve

    settings = settings or GenerationSettings(max_new_tokens=64)
    try:
        prompts = sample_prompts(run_dir, n)
        if not prompts:
            return [], "no prompts found in the run's data files"
        # The memory preflight first: a model that cannot fit costs the report its samples, not a crash.
        ref = resolve(str(run_dir))
        tokenizer = load_tokenizer_of(ref)  # one copy for the preflight and the model
        rows = generation_preflight(ref, prompts, settings, what="report samples", tokenizer=tokenizer)
        loaded = load_for_inference(ref, device="auto", tokenizer=tokenizer)
        outputs = generate(loaded.model, loaded.tokenizer, loaded.template, prompts, settings, batch_size=rows)
    except (UserError, OSError, ValueError) as exc:
        return [], f"samples unavailable: {exc}"
    # Surrounding whitespace is trimmed for display (an untrained model may emit pages of newlines).
    return [{"prompt": prompt_text(p), "output": o.strip() or "(empty answer)"}
            for p, o in zip(prompts, outputs, strict=True)], None


def build_report(run_dir: str | Path, samples: bool = True, n_samples: int = 3, settings: Any = None) -> Path:
    """Write ``RUN_DIR/report.html`` atomically and return its path.

    ``settings``: the ``GenerationSettings`` of the sample generations (default: greedy, 64 new tokens).

    Raises:
        UserError: ``run_dir`` is not a run directory (``tuneforge.models.reference.is_run_dir``).
    """
    from tuneforge.models import reference as ref
    from tuneforge.utils import atomic_write_text

    run_dir = Path(run_dir)
    if not ref.is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a run directory (expected {ref.RUN_CONFIG} and one of {ref.RUN_FINAL}/, "
                        f"{ref.RUN_CHECKPOINTS}/, {ref.RUN_METRICS}, {ref.RUN_SUMMARY} inside)")
    events = read_metrics(run_dir / ref.RUN_METRICS)
    summary = _load_json(run_dir / ref.RUN_SUMMARY)
    evals = _load_json(run_dir / ref.RUN_EVAL_RESULTS)
    config_text = (run_dir / ref.RUN_CONFIG).read_text(encoding="utf-8")
    sample_rows, sample_note = ([], "disabled (--no-samples)")
    if samples:
        sample_rows, sample_note = generate_samples(run_dir, n_samples, settings)
    page = render_report(run_dir.name, events, summary, evals if isinstance(evals, list) else None, config_text,
                         sample_rows, sample_note)
    out = run_dir / ref.RUN_REPORT
    atomic_write_text(out, page)
    return out


def render_report(name: str, events: list[dict], summary: Any, evals: list[dict] | None, config_text: str | None,
                  sample_rows: list[dict], sample_note: str | None) -> str:
    """The report page (pure function of its inputs)."""
    esc = html.escape
    parts = [f"<h1>Run report: {esc(name)}</h1>"]
    stop = next((e for e in reversed(events) if e.get("event") == "end"), None)
    reason = None
    if isinstance(summary, dict):
        reason = summary.get("stopped_reason") or (summary.get("reason") if summary.get("status") == "stopped"
                                                   else None)
    if reason is None and stop:
        reason = stop.get("stopped_reason")
    if reason:
        parts.append(f'<p class="bad">Training stopped early: {esc(str(reason))}</p>')

    parts.append("<h2>Training curves</h2>")
    plots = curves(events)
    for key, png in plots.items():
        if png:
            parts.append(f'<img alt="{key} curve" src="data:image/png;base64,{png}">')
        elif key in CORE_CURVES:
            parts.append(f"<p>no {key} values logged</p>")

    parts.append("<h2>Metrics</h2>")
    if isinstance(summary, dict):
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{esc(format_value(k, v))}</td></tr>" for k, v in _flatten(summary)
                       if not isinstance(v, list))
        parts.append(f"<h3>summary.json</h3><table>{rows}</table>")
    else:
        parts.append("<p>no summary.json</p>")
    if evals:
        keys = ["model", "data", *(k for k in columns(list(METRICS.values())) if any(k in e for e in evals)),
                *(k for k in RETENTION_KEYS if any(k in e for e in evals)), "time"]  # forgetting (--retention)
        head = "".join(f"<th>{esc(METRICS[k].label if k in METRICS else RETENTION_KEYS.get(k, k))}</th>" for k in keys)
        cell = retention_format(format_value)
        body = "".join("<tr>" + "".join(f"<td>{esc(cell(k, e.get(k)))}</td>" for k in keys) + "</tr>"
                       for e in evals)
        parts.append(f"<h3>tuneforge eval results</h3><table><tr>{head}</tr>{body}</table>")

    parts.append("<h2>Stability warnings</h2>")
    warnings = [e for e in events if e.get("event") == "warning"]
    if warnings:
        rows = "".join(
            f"<tr><td>{esc(format_value('step', w.get('step')))}</td><td>{esc(str(w.get('kind', '')))}</td>"
            f"<td>{esc(str(w.get('message', '')))}</td><td>{esc(str(w.get('advice', '')))}</td></tr>"
            for w in warnings
        )
        parts.append(f'<table class="warn"><tr><th>step</th><th>kind</th><th>message</th><th>advice</th></tr>'
                     f"{rows}</table>")
    else:
        parts.append("<p>none</p>")

    parts.append("<h2>Sample generations</h2>")
    if sample_rows:
        for s in sample_rows:
            parts.append(f'<div class="sample"><pre class="prompt">{esc(s["prompt"])}</pre>'
                         f'<pre class="out">{esc(s["output"])}</pre></div>')
    else:
        parts.append(f"<p>{esc(sample_note or 'none')}</p>")

    parts.append("<h2>Resolved config</h2>")
    parts.append(f"<pre>{esc(config_text)}</pre>" if config_text else "<p>no config.yaml</p>")
    return _PAGE.format(title=esc(name), body="\n".join(parts))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tuneforge report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; }}
img {{ max-width: 100%; display: block; margin: .5em 0; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #ddd; padding: .25em .6em; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: .6em; }} .bad {{ color: #b00; font-weight: bold; }}
.warn td {{ vertical-align: top; }} .sample {{ border-left: 3px solid #89a; padding-left: .6em; margin: 1em 0; }}
pre.out {{ background: #eef5ee; }}
</style></head><body>
{body}
</body></html>
"""
