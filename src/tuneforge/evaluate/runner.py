"""``tuneforge eval``: several models scored on the same data with the same generation settings."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.evaluate.metrics import GENERATION, METRICS, Metric


def generation_settings(**values: Any) -> Any:
    """The settings :func:`evaluate_model` generates with: ``models.generation.GenerationSettings(**values)``
    (greedy unless ``temperature`` is given), for callers above evaluate (``search``) that use models only through
    evaluate."""
    from tuneforge.models.generation import GenerationSettings

    return GenerationSettings(**values)


def as_metrics(metrics: list[Metric | str]) -> list[Metric]:
    """Registered metrics by object or name (``tuneforge.evaluate.metrics.METRICS``)."""
    return [m if isinstance(m, Metric) else METRICS[m] for m in metrics]


def prompt_and_reference(record: dict) -> tuple[Any, str | None]:
    """The prompt (messages before the last assistant turn) and the reference (that turn's content).

    Text records have no reference: ``(text, None)``.
    """
    if "messages" not in record:
        return record["text"], None
    messages = record["messages"]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return messages, None
    return messages[:last], messages[last]["content"]


def load_eval_records(path: str, fmt: str = "auto", limit: int | None = None) -> list[dict]:
    """Canonical records of the eval file, first ``limit`` of them; a list that remembers its source, so their
    perplexity encoding comes from the prepared-data cache (:class:`tuneforge.data.evalset.EvalRecords`)."""
    from tuneforge.data.evalset import read_eval_records

    return read_eval_records(path, fmt, limit)


def check_records(records: list[dict], metrics: list[Metric | str], data: str) -> list[str] | None:
    """Check that every metric can score ``records`` before any model is loaded: the metrics' own ``check`` and,
    for generation metrics, a reference per record. Returns the references (None without generation metrics).

    Raises:
        UserError: naming the first record a metric cannot use.
    """
    metrics = as_metrics(metrics)
    for metric in metrics:
        if metric.check is not None:
            metric.check(records)
    return check_references(records, metrics, data) if any(m.needs == GENERATION for m in metrics) else None


def check_references(records: list[dict], metrics: list[Metric | str], data: str) -> list[str]:
    """References for the generation metrics; raises UserError naming the first record without one."""
    metrics = as_metrics(metrics)
    refs = []
    for record in records:
        _, ref = prompt_and_reference(record)
        if ref is None:
            wanted = ", ".join(m.name for m in metrics if m.needs == GENERATION)
            raise UserError(
                f"{record.get('source', data)}: no reference answer for {wanted} — records need a final assistant "
                "message (chat) or an 'output' (alpaca); plain text records only support --metrics ppl"
            )
        refs.append(ref)
    return refs


def evaluate_model(spec: str, records: list[dict], metrics: list[Metric | str], settings: Any, *,
                   device: str = "auto", batch_size: int = 4, max_length: int | None = None,
                   stride: int | None = None, references: list[str] | None = None,
                   keep_predictions: bool = False, memory_check: bool = False,
                   max_memory: int | None = None) -> dict:
    """Load ``spec`` and compute ``metrics`` on ``records``; ``settings`` is a ``GenerationSettings``.

    With ``memory_check`` (the ``eval`` command), the memory preflight (:func:`memory_preflight`) runs first: it
    prints the estimate, lowers the batch sizes when only smaller ones fit, and raises ``UserError`` when nothing
    fits ``max_memory`` (default: the memory available now).

    Returns:
        ``{"model": spec, "source": ..., "n": number of records, <each metric's result entries>}`` (e.g. ``ppl``
        with ``tokens`` and ``nll``; ``bleu`` with ``bleu_tokenize``), ``predictions`` when ``keep_predictions``.
    """
    from tuneforge.models.generation import generate
    from tuneforge.models.memory import GENERATION_ROWS
    from tuneforge.models.reference import load_for_inference, load_tokenizer_of, resolve

    metrics = as_metrics(metrics)
    generation_rows = GENERATION_ROWS
    tokenizer = None
    if memory_check:  # the preflight's tokenizer is the model's: loaded once
        ref = resolve(spec)
        tokenizer = load_tokenizer_of(ref)
        batch_size, generation_rows = memory_preflight(ref, records, metrics, settings, device=device,
                                                       batch_size=batch_size, max_length=max_length,
                                                       stride=stride, max_memory=max_memory, tokenizer=tokenizer)
    started = time.time()
    loaded = load_for_inference(spec, device=device, tokenizer=tokenizer)
    row: dict[str, Any] = {"model": spec, "source": loaded.source, "n": len(records)}
    try:
        for metric in (m for m in metrics if m.needs != GENERATION):
            row.update(metric.result(loaded, records, max_length=max_length, stride=stride, batch_size=batch_size))
        generation = [m for m in metrics if m.needs == GENERATION]
        if generation:
            prompts = [prompt_and_reference(r)[0] for r in records]
            predictions = generate(loaded.model, loaded.tokenizer, loaded.template, prompts, settings,
                                   batch_size=generation_rows)
            refs = references or [prompt_and_reference(r)[1] for r in records]
            for metric in generation:
                row.update(metric.result(predictions, refs))
            if keep_predictions:
                row["predictions"] = predictions
    finally:
        del loaded
        gc.collect()
    row["seconds"] = round(time.time() - started, 2)
    return row


def memory_preflight(spec: Any, records: list[dict], metrics: list[Metric], settings: Any, *, device: str,
                     batch_size: int, max_length: int | None, stride: int | None,
                     max_memory: int | None, tokenizer: Any = None) -> tuple[int, int]:
    """The memory preflight of one model's evaluation (:mod:`tuneforge.evaluate.preflight`): the scoring metrics'
    widest window x ``batch_size``, the generation metrics' longest prompt + ``max_new_tokens`` x the generation
    rows. Returns ``(batch_size, generation_rows)``, each lowered when only a smaller one fits. ``tokenizer``: the
    model's, already loaded (else loaded here).

    Raises:
        UserError: one row of either does not fit the budget (both numbers named).
    """
    from tuneforge.evaluate import preflight
    from tuneforge.models.memory import GENERATION_ROWS

    generation_rows = GENERATION_ROWS
    if any(m.needs != GENERATION for m in metrics):
        width, count = preflight.scoring_windows(spec, records, max_length, stride, tokenizer)
        plan = preflight.plan_rows(spec, rows=min(batch_size, count), tokens=width, generation=False,
                                   device=device, max_memory=max_memory)
        batch_size = plan.rows if plan.rows < plan.asked else batch_size
    if any(m.needs == GENERATION for m in metrics):
        prompts = [prompt_and_reference(r)[0] for r in records]
        tokens = preflight.longest_prompt(spec, prompts, tokenizer) + settings.max_new_tokens
        plan = preflight.plan_rows(spec, rows=min(GENERATION_ROWS, len(prompts)), tokens=tokens, generation=True,
                                   device=device, max_memory=max_memory, option="generation batch")
        generation_rows = plan.rows if plan.rows < plan.asked else GENERATION_ROWS
    return batch_size, generation_rows


def run_eval(specs: list[str], data: str, metrics: list[Metric], settings: Any, *, fmt: str = "auto",
             limit: int | None = None, device: str = "auto", batch_size: int = 4, max_length: int | None = None,
             stride: int | None = None, keep_predictions: bool = False, progress=None, memory_check: bool = False,
             max_memory: int | None = None) -> list[dict]:
    """Evaluate every model of ``specs`` on the same records with the same settings (one model in memory at a
    time). References are checked before any model is loaded; with ``memory_check`` each model's memory
    preflight runs before it loads (:func:`evaluate_model`)."""
    records = load_eval_records(data, fmt, limit)
    refs = check_records(records, metrics, data)
    rows = []
    for spec in specs:
        if progress:
            progress(f"evaluating {spec} on {len(records)} records ...")
        rows.append(evaluate_model(spec, records, metrics, settings, device=device, batch_size=batch_size,
                                   max_length=max_length, stride=stride, references=refs,
                                   keep_predictions=keep_predictions, memory_check=memory_check,
                                   max_memory=max_memory))
    return rows


def append_eval_result(run_dir: str | Path, entry: dict, data: str, metrics: list[Metric], settings: Any) -> Path:
    """Append ``entry`` (with the data, metrics, generation settings and time) to ``<run_dir>/eval_results.json``
    under an exclusive lock (two evaluations of one run both keep their result) and atomically. Returns the
    file's path.

    Raises:
        UserError: the file is not a JSON list (it is reported and left as it is, never started afresh), or
            another process held the lock for ``EVAL_LOCK_WAIT_S`` seconds.
    """
    from tuneforge.models.reference import RUN_EVAL_RESULTS
    from tuneforge.utils import atomic_write_json

    path = Path(run_dir) / RUN_EVAL_RESULTS
    with _results_lock(path):
        existing = read_eval_results(path)
        entry = {**entry, "data": str(data), "metrics": [m.name for m in metrics],
                 "generation": settings.to_dict(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_json(path, [*existing, entry])
    return path


EVAL_LOCK_WAIT_S = 60.0


def read_eval_results(path: str | Path) -> list:
    """The entries of an ``eval_results.json`` (``[]`` when there is none).

    Raises:
        UserError: the file is unreadable, not JSON or not a list (naming the file and the fix).
    """
    import json

    path = Path(path)
    if not path.exists():
        return []
    fix = ("tuneforge appends every evaluation to it and will not overwrite it: repair it, or move it aside to "
           "start a new one")
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{path} is not valid JSON{where}; {fix}") from None
    if not isinstance(existing, list):
        raise UserError(f"{path} holds a JSON {type(existing).__name__}, not the list of evaluations; {fix}")
    return existing


def _results_lock(path: Path):
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``path`` (waited for; the results file itself is replaced
    by each write, so it cannot carry the lock)."""
    import contextlib
    import os

    from tuneforge.utils import try_flock

    @contextlib.contextmanager
    def held():
        lock = path.with_name(f".{path.name}.lock")
        fd = os.open(str(lock), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            deadline = time.monotonic() + EVAL_LOCK_WAIT_S
            while not try_flock(fd):
                if time.monotonic() > deadline:
                    raise UserError(f"{path} has been locked by another tuneforge eval for {EVAL_LOCK_WAIT_S:.0f} s "
                                    f"(lock file {lock}); wait for it, or stop it")
                time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # releases the lock

    return held()


def check_saved_results(specs: list[str]) -> None:
    """Before any model loads: every run among ``specs`` has a readable ``eval_results.json`` (or none), so that a
    corrupt file stops the command now rather than after the evaluation.

    Raises:
        UserError: see :func:`read_eval_results`.
    """
    from tuneforge.models.reference import RUN_EVAL_RESULTS

    for spec in specs:
        local = Path(spec).expanduser()
        for folder in (local, local.parent) if local.is_dir() else ():  # a run, or its final/
            read_eval_results(folder / RUN_EVAL_RESULTS)


def save_to_run_dirs(rows: list[dict], data: str, metrics: list[Metric], settings: Any) -> list[Path]:
    """Append each row to ``<run dir>/eval_results.json`` when the model is a run (or its ``final/``)."""
    from tuneforge.models.reference import resolve

    written = []
    for row in rows:
        run_dir = resolve(row["model"]).run_dir
        if run_dir is not None:
            entry = {k: v for k, v in row.items() if k != "predictions"}
            written.append(append_eval_result(run_dir, entry, data, metrics, settings))
    return written
