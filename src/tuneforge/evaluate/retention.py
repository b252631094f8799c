"""Forgetting, measured: perplexity on general data of the start model and of the tuned model, side by side.

``tuneforge eval RUN --data task.jsonl --metrics exact --retention general.jsonl`` adds to each model's row:

* ``retention_start_ppl``: the start model's perplexity on the general data — for an adapter, the same loaded
  model with its adapter disabled (the base it was trained on); for a full fine-tuning run, the model its config
  started from (``model.name_or_path``); for a model that is not a run, the model itself;
* ``retention_ppl``: the tuned model's perplexity on the same records, same tokenizer and template;
* ``retention_ppl_increase``: ``100 · (retention_ppl / retention_start_ppl − 1)`` in percent — how much the
  fine-tuning cost on general data (negative: it improved).

Perplexity is :func:`tuneforge.evaluate.perplexity.perplexity` (token-weighted; all tokens of text records,
answers of chat records).
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Any

from tuneforge.errors import UserError

#: the row keys this module adds (in display order) and their labels
RETENTION_KEYS = {"retention_start_ppl": "general ppl (start)", "retention_ppl": "general ppl (tuned)",
                  "retention_ppl_increase": "general ppl increase"}


def start_model_of(ref: Any) -> str | None:
    """Where a full fine-tuning run started from (its config's ``model.name_or_path``); ``None`` for adapters
    (the adapter is disabled instead) and for models that are not runs (they are their own start).

    Raises:
        UserError: a full fine-tuning run built from ``model.from_config`` (its random start was not saved).
    """
    from tuneforge.models.reference import read_run_config

    if ref.is_adapter or ref.run_dir is None:
        return None
    model = read_run_config(ref.run_dir).get("model") or {}
    if model.get("name_or_path"):
        return str(model["name_or_path"])
    raise UserError(f"{ref.given}: a full fine-tuning run from model.from_config keeps no start model, so "
                    "--retention has nothing to compare with")


def retention_row(spec: str, records: list[dict], *, device: str = "auto", batch_size: int = 4,
                  max_length: int | None = None, stride: int | None = None) -> dict:
    """``retention_start_ppl``, ``retention_ppl``, ``retention_ppl_increase`` and ``retention_tokens`` of one model.

    One model is in memory at a time: a full fine-tuning run's start model loads after the tuned one is released
    (what :func:`retention_preflight` bills).

    Raises:
        UserError: no start model to compare with, or no token to score in ``records``.
    """
    from tuneforge.models.reference import load_for_inference, resolve

    ref = resolve(spec)
    start_spec = start_model_of(ref)
    loaded = load_for_inference(ref, device=device)
    try:
        kwargs = dict(max_length=max_length, stride=stride, batch_size=batch_size)
        tuned = _ppl(loaded.model, loaded, records, **kwargs)
        if start_spec is None:
            context = loaded.model.disable_adapter() if ref.is_adapter else nullcontext()
            with context:
                start = _ppl(loaded.model, loaded, records, **kwargs)
        else:
            loaded.model = None  # the start model is scored with the tuned model's tokenizer and template only
            gc.collect()
            start_model = load_for_inference(start_spec, device=device).model
            start = _ppl(start_model, loaded, records, **kwargs)
            del start_model
    finally:
        del loaded
        gc.collect()
    return {"retention_start_ppl": start.ppl, "retention_ppl": tuned.ppl,
            "retention_ppl_increase": 100.0 * (tuned.ppl / start.ppl - 1.0), "retention_tokens": tuned.tokens,
            "retention_start": start_spec or ("adapter disabled" if ref.is_adapter else "itself")}


def retention_preflight(specs: list[str], records: list[dict], *, device: str = "auto", batch_size: int = 4,
                        max_length: int | None = None, stride: int | None = None,
                        max_memory: int | None = None) -> dict[str, int]:
    """The memory preflight of ``--retention``, run before any model loads: the scoring preflight of
    :mod:`tuneforge.evaluate.preflight` on the general records for every model that will load (each model of
    ``specs``, and a full fine-tuning run's start model). It prints each estimate on stderr.

    Returns:
        The batch size of each spec: ``batch_size``, or the largest smaller one that fits ``max_memory`` (default:
        the memory available now) for both of its models.

    Raises:
        UserError: even one window does not fit the budget (both numbers named), or a run has no start model.
    """
    from tuneforge.evaluate import preflight
    from tuneforge.models.reference import resolve

    batches = {}
    for spec in specs:
        ref = resolve(spec)
        start_spec = start_model_of(ref)
        rows = batch_size
        for model in (ref, start_spec) if start_spec else (ref,):
            width, count = preflight.scoring_windows(model, records, max_length, stride)
            plan = preflight.plan_rows(model, rows=min(rows, count), tokens=width, generation=False, device=device,
                                       max_memory=max_memory, what="eval --retention")
            rows = plan.rows if plan.rows < plan.asked else rows
        batches[spec] = rows
    return batches


def _ppl(model: Any, loaded: Any, records: list[dict], **kwargs):
    from tuneforge.evaluate.perplexity import perplexity

    try:
        return perplexity(model, loaded.tokenizer, records, template=loaded.template, **kwargs)
    except ValueError as exc:
        raise UserError(f"--retention: {exc}") from None


def load_general(spec: str, limit: int | None = None) -> list[dict]:
    """Records of ``--retention``: a data file (text, chat or alpaca), or a built-in corpus name (``pydoc``)."""
    from tuneforge.data.mix import BUILTIN_CORPORA, builtin_records
    from tuneforge.evaluate.runner import load_eval_records

    if spec in BUILTIN_CORPORA:
        records = builtin_records(spec)
        return records[:limit] if limit else records
    return load_eval_records(spec, "auto", limit)


def add_retention(rows: list[dict], data: str, records: list[dict], *, device: str = "auto", batch_size: int = 4,
                  max_length: int | None = None, stride: int | None = None, progress=None,
                  batch_sizes: dict[str, int] | None = None) -> list[dict]:
    """Add the retention columns to every row of ``tuneforge eval`` (``row["model"]`` names the model);
    ``records`` are the general data's records (read from ``data``); ``batch_sizes`` (from
    :func:`retention_preflight`) overrides ``batch_size`` per model."""
    for row in rows:
        if progress:
            progress(f"retention: {row['model']} vs its start model on {len(records)} general records ...")
        rows_per_batch = (batch_sizes or {}).get(row["model"], batch_size)
        row.update(retention_row(row["model"], records, device=device, batch_size=rows_per_batch,
                                 max_length=max_length, stride=stride))
        row["retention_data"] = str(data)
    return rows


def retention_format(format_value):
    """``format_value`` of the metric registry, extended to the retention keys (ppl with 3 decimals, the increase
    as a signed percentage)."""

    def fmt(key: str, value: Any) -> str:
        if key in RETENTION_KEYS and isinstance(value, (int, float)):
            return f"{value:+.1f}%" if key == "retention_ppl_increase" else f"{value:.3f}"
        return format_value(key, value)

    return fmt
