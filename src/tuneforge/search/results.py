"""What a study leaves: the leaderboard (terminal), ``best.yaml`` (runnable) and ``search.html`` (offline).

The HTML embeds matplotlib PNGs as base64 (no script, no CDN): optimisation history, parameter importances
(Optuna's fANOVA evaluator) and parallel coordinates.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneforge.models.reference import RUN_CONFIG
from tuneforge.search.study import (
    FAIL_REASON,
    PRUNE_REASON,
    RETRY_OF,
    RETRY_REASON,
    Search,
    accounting,
    describe_values,
)
from tuneforge.utils import atomic_write_text


@dataclass
class Row:
    """One trial of the leaderboard."""

    number: int
    state: str  # complete | pruned | failed | interrupted | running | waiting
    value: float | None
    values: dict[str, Any]
    steps: int | None
    tokens: int | None
    seconds: float | None
    note: str
    run_dir: str | None


def rows(study, direction: str) -> list[Row]:
    """Every trial except discarded ones, best first: complete (by objective), pruned, then the rest."""
    trials = study.get_trials(deepcopy=False)
    superseded, discarded = accounting(trials)
    retried_as = {t.user_attrs[RETRY_OF]: t for t in trials if RETRY_OF in t.user_attrs}
    out = []
    for t in trials:
        if t.number in discarded:
            continue
        state = t.state.name.lower().replace("fail", "failed")
        note = t.user_attrs.get(PRUNE_REASON) or t.user_attrs.get(FAIL_REASON) or ""
        if t.number in superseded:
            retry = retried_as[t.number]
            state, note = "interrupted", f"{retry.user_attrs.get(RETRY_REASON, '')}; retried as trial {retry.number}"
        elif RETRY_OF in t.user_attrs:
            note = (note + "; " if note else "") + f"retry of trial {t.user_attrs[RETRY_OF]}"
        value = t.value if t.value is not None else _last_intermediate(t)
        out.append(Row(number=t.number, state=state, value=value, values=describe_values(t),
                       steps=t.user_attrs.get("steps"), tokens=t.user_attrs.get("train_tokens"),
                       seconds=_seconds(t), note=note, run_dir=t.user_attrs.get("run_dir")))
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "failed": 4, "interrupted": 5}
    sign = 1 if direction == "minimize" else -1

    def key(row: Row):
        value = row.value if row.value is not None and math.isfinite(row.value) else math.inf * sign
        return order.get(row.state, 9), sign * value, row.number

    return sorted(out, key=key)


def _last_intermediate(trial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def _seconds(trial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def best_row(table: list[Row]) -> Row | None:
    return next((r for r in table if r.state == "complete" and r.value is not None), None)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_leaderboard(table: list[Row], objective: str, console=None, limit: int = 30) -> None:
    """A rich table of the trials, best first. Cells are plain text (no rich markup): a value or a failure reason
    with brackets (``[q_proj, v_proj]``, ``'[/x]'``) is shown as it is, never interpreted."""
    from rich.table import Table
    from rich.text import Text

    from tuneforge.console import out as console_out

    console = console or console_out()
    keys = list(dict.fromkeys(k for r in table for k in r.values))
    view = Table(title=Text(f"leaderboard ({objective})"))
    for name, justify in (("#", "right"), ("trial", "right"), ("state", "left"), (objective, "right")):
        view.add_column(name, justify=justify)
    for key in keys:
        view.add_column(key, justify="right")
    for name in ("steps", "tokens", "s", "note"):
        view.add_column(name, justify="left" if name == "note" else "right")
    colours = {"complete": "green", "pruned": "yellow", "failed": "red", "interrupted": "magenta"}
    for rank, row in enumerate(table[:limit], 1):
        state = Text(row.state, style=colours.get(row.state, "white"))
        cells = [_fmt(row.value), *(_fmt(row.values.get(k)) for k in keys), _fmt(row.steps), _fmt(row.tokens),
                 _fmt(round(row.seconds, 1) if row.seconds else None), row.note]
        view.add_row(str(rank), str(row.number), state, *map(Text, cells))
    console.print(view)
    if len(table) > limit:
        console.print(f"... and {len(table) - limit} more trials (all of them in search.html)", markup=False)


def counts(table: list[Row]) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in table:
        out[row.state] = out.get(row.state, 0) + 1
    return out


# --------------------------------------------------------------------------- best.yaml


def write_best(search: Search, row: Row) -> Path:
    """``<study_dir>/best.yaml``: the best trial's run config, renamed so that training it makes a new run."""
    source = Path(row.run_dir or search.study_dir / f"trial-{row.number}") / RUN_CONFIG
    raw = yaml.safe_load(source.read_text(encoding="utf-8")) if source.is_file() else None
    if raw is None:  # the trial ran on another machine: rebuild it from the study's parameters
        from tuneforge.search.study import trial_config

        sampled = {p.key: p.decode(row.values[p.key]) for p in search.space.sampled if p.key in row.values}
        values = search.space.resolve(sampled, search.base)
        raw = trial_config(search, row.number, values).model_dump(mode="json")
    raw["run_name"] = f"{search.study_name}-best"
    raw["output_dir"] = str(search.study_dir.parent / f"{search.study_name}-best")
    header = (f"# best of study '{search.study_name}': trial {row.number}, {search.objective} {row.value:.6g}\n"
              f"# searched: {', '.join(f'{k}={v}' for k, v in row.values.items())}\n"
              f"# train it: tuneforge train {search.study_dir / 'best.yaml'}\n")
    path = search.study_dir / "best.yaml"
    atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


# --------------------------------------------------------------------------- search.html


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def history_png(table: list[Row], objective: str, direction: str) -> str | None:
    """Objective per trial number and the best so far."""
    done = sorted((r for r in table if r.value is not None and math.isfinite(r.value)
                   and r.state in ("complete", "pruned")), key=lambda r: r.number)
    if not done:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    try:
        for state, marker in (("complete", "o"), ("pruned", "x")):
            pts = [(r.number, r.value) for r in done if r.state == state]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, label=state)
        best, xs, ys = None, [], []
        for r in done:
            if r.state != "complete":
                continue
            if best is None or (r.value < best if direction == "minimize" else r.value > best):
                best = r.value
            xs.append(r.number)
            ys.append(best)
        if xs:
            ax.step(xs, ys, where="post", color="black", label="best so far")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("trial")
        ax.set_ylabel(objective)
        ax.set_title("optimisation history")
        ax.grid(alpha=0.3)
        ax.legend()
        return _png(fig)
    finally:
        plt.close(fig)


def importances(study, params: list[str]) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) over the completed trials; empty when they cannot be computed."""
    import optuna
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    varied = [p for p in params if len({repr(t.params.get(p)) for t in complete if p in t.params}) > 1]
    if len(complete) < 2 or not varied:
        return {}
    try:
        return dict(optuna.importance.get_param_importances(study, params=varied))
    except (ValueError, RuntimeError):
        return {}


def importance_png(scores: dict[str, float]) -> str | None:
    if not scores:
        return None
    plt = _pyplot()
    names = list(scores)[::-1]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * len(names)), dpi=100)
    try:
        ax.barh(names, [scores[n] for n in names])
        ax.set_xlabel("importance (fANOVA, share of variance)")
        ax.set_title("parameter importances")
        return _png(fig)
    finally:
        plt.close(fig)


def parallel_png(table: list[Row], keys: list[str], objective: str) -> str | None:
    """One line per completed trial across every searched key (each axis scaled to its own range), coloured by
    the objective."""
    done = [r for r in table if r.state == "complete" and r.value is not None and math.isfinite(r.value)]
    if not done or not keys:
        return None
    axes = [*keys, objective]
    columns = [_axis([r.values.get(k) for r in done]) for k in keys] + [_axis([r.value for r in done])]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(axes), 3.6), dpi=100)
    try:
        values = [r.value for r in done]
        low, high = min(values), max(values)
        cmap = plt.get_cmap("viridis")
        for i, _ in enumerate(done):
            ys = [col[0][i] for col in columns]
            shade = 0.5 if high == low else (values[i] - low) / (high - low)
            ax.plot(range(len(axes)), ys, color=cmap(shade), alpha=0.8)
        ax.set_xticks(range(len(axes)))
        ax.set_xticklabels(axes, rotation=15)
        ax.set_yticks([])
        for j, (_, labels) in enumerate(columns):
            for y, text in labels:
                ax.annotate(text, (j, y), fontsize=7, xytext=(3, 0), textcoords="offset points", va="center")
            ax.axvline(j, color="grey", lw=0.8)
        ax.set_title("parallel coordinates (colour: objective, yellow = high)")
        return _png(fig)
    finally:
        plt.close(fig)


def _axis(raw: list[Any]) -> tuple[list[float], list[tuple[float, str]]]:
    """Positions in [0, 1] and a few tick labels for one axis (numbers by value — log when spread — text by
    order)."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    if not numeric:
        levels = list(dict.fromkeys(map(str, raw)))
        pos = {v: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, v in enumerate(levels)}
        return [pos[str(v)] for v in raw], [(pos[v], v) for v in levels]
    nums = [float(v) for v in raw]
    use_log = min(nums) > 0 and max(nums) / min(nums) > 20
    scale = [math.log10(v) for v in nums] if use_log else nums
    low, high = min(scale), max(scale)
    pos = [0.5 if high == low else (v - low) / (high - low) for v in scale]
    ends = {(pos[nums.index(min(nums))], f"{min(nums):.3g}"), (pos[nums.index(max(nums))], f"{max(nums):.3g}")}
    return pos, sorted(ends)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_html(search: Search, study, table: list[Row]) -> Path:
    """``<study_dir>/search.html``: summary, plots and every trial; no scripts, viewable offline."""
    keys = list(dict.fromkeys(k for r in table for k in r.values))
    scores = importances(study, [p.key for p in search.space.sampled])
    plots = [("optimisation history", history_png(table, search.objective, search.direction)),
             ("parameter importances", importance_png(scores)),
             ("parallel coordinates", parallel_png(table, keys, search.objective))]
    best = best_row(table)
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>search {e(search.study_name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.l,th.l{text-align:left}"
             ".complete{color:#070}.pruned{color:#a60}.failed,.interrupted{color:#b00}</style></head><body>",
             f"<h1>Study {e(search.study_name)}</h1>",
             f"<p>{e(search.options.sampler)} sampler, {e(search.direction)} <b>{e(search.objective)}</b> on the eval "
             f"split; {len(table)} trials: {e(', '.join(f'{v} {k}' for k, v in counts(table).items()))}. "
             f"Run config {e(str(search.options.config))}, space {e(str(search.options.space))}.</p>"]
    if best:
        parts.append(f"<p>Best: trial {best.number}, {e(search.objective)} {best.value:.6g} — "
                     f"{e(', '.join(f'{k}={_fmt(v)}' for k, v in best.values.items()))}. "
                     f"Runnable config: <code>best.yaml</code>.</p>")
    parts.append("<h2>Space</h2><ul>" + "".join(f"<li><code>{e(p.key)}</code>: {e(p.describe())}</li>"
                                                for p in search.space.params) + "</ul>")
    for title, png in plots:
        if png:
            parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{png}'>")
        else:
            parts.append(f"<h2>{e(title)}</h2><p>not enough completed trials with varying parameters</p>")
    if scores:
        parts.append("<table><tr><th class='l'>parameter</th><th>importance</th></tr>" + "".join(
            f"<tr><td class='l'>{e(k)}</td><td>{v:.3f}</td></tr>" for k, v in scores.items()) + "</table>")
    head = "".join(f"<th>{e(h)}</th>" for h in ["trial", "state", search.objective, *keys, "steps", "tokens", "s"])
    body = []
    for r in table:
        cells = [str(r.number), f"<span class='{r.state}'>{r.state}</span>", _fmt(r.value),
                 *(_fmt(r.values.get(k)) for k in keys), _fmt(r.steps), _fmt(r.tokens),
                 _fmt(round(r.seconds, 1) if r.seconds else None)]
        body.append("<tr>" + "".join(f"<td>{c if i == 1 else e(c)}</td>" for i, c in enumerate(cells))
                    + f"<td class='l'>{e(r.note)}</td></tr>")
    parts.append(f"<h2>Trials</h2><table><tr>{head}<th class='l'>note</th></tr>{''.join(body)}</table>")
    parts.append("</body></html>")
    path = search.study_dir / "search.html"
    atomic_write_text(path, "\n".join(parts))
    return path
