"""``tuneforge eval``: several models scored on the same data with the same generation settings."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError, did_you_mean

# metric name on the command line → what it needs
PPL_METRICS = ("ppl",)
GEN_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exact", "contains")
ALIASES = {"rouge": ("rouge1", "rouge2", "rougeL"), "em": ("exact",), "perplexity": ("ppl",)}
ALL_METRICS = PPL_METRICS + GEN_METRICS


@dataclass
class GenerationOptions:
    """Settings shared by every model of one comparison. ``temperature`` 0 means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_metrics(spec: str) -> list[str]:
    """``"ppl,bleu,rouge"`` → ``["ppl", "bleu", "rouge1", "rouge2", "rougeL"]`` (order kept, no duplicates).

    Raises:
        UserError: an unknown metric name (with the closest known one).
    """
    names: list[str] = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        if raw in ALIASES:
            names.extend(ALIASES[raw])
        elif raw in ALL_METRICS:
            names.append(raw)
        else:
            known = [*ALL_METRICS, *ALIASES]
            raise UserError(f"--metrics: unknown metric {raw!r}{did_you_mean(raw, known)}; known: {', '.join(known)}")
    if not names:
        raise UserError("--metrics is empty; e.g. --metrics ppl,bleu,rougeL,exact")
    return list(dict.fromkeys(names))


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
    """Canonical records of the eval file, first ``limit`` of them."""
    from tuneforge.evaluate import _backend

    records = _backend.read_records(path, fmt)
    return records[:limit] if limit else records


def check_references(records: list[dict], metrics: list[str], data: str) -> list[str]:
    """References for the generation metrics; raises UserError naming the first record without one."""
    refs = []
    for record in records:
        _, ref = prompt_and_reference(record)
        if ref is None:
            wanted = ", ".join(m for m in metrics if m in GEN_METRICS)
            raise UserError(
                f"{record.get('source', data)}: no reference answer for {wanted} — records need a final assistant "
                "message (chat) or an 'output' (alpaca); plain text records only support --metrics ppl"
            )
        refs.append(ref)
    return refs


def evaluate_model(spec: str, records: list[dict], metrics: list[str], gen: GenerationOptions, *,
                   device: str = "auto", batch_size: int = 4, max_length: int | None = None,
                   stride: int | None = None, references: list[str] | None = None,
                   keep_predictions: bool = False) -> dict:
    """Load ``spec`` and compute ``metrics`` on ``records``.

    Returns:
        ``{"model": spec, "source": ..., "ppl", "tokens", "bleu", ...}`` (only the requested metrics, plus
        ``tokens`` with ``ppl`` and ``n`` the number of records), ``predictions`` when ``keep_predictions``.
    """
    from tuneforge.evaluate import _backend
    from tuneforge.evaluate import metrics as tm
    from tuneforge.evaluate.perplexity import perplexity

    started = time.time()
    loaded = _backend.load_model(spec, device=device)
    row: dict[str, Any] = {"model": spec, "source": str(getattr(loaded, "source", spec)), "n": len(records)}
    try:
        if "ppl" in metrics:
            try:
                result = perplexity(loaded.model, loaded.tokenizer, records, template=loaded.template,
                                    max_length=max_length, stride=stride, batch_size=batch_size)
            except ValueError as exc:
                raise UserError(f"perplexity: {exc}") from None
            row.update(ppl=result.ppl, tokens=result.tokens, nll=result.nll)
            if result.skipped:
                row["ppl_skipped"] = result.skipped
        gen_metrics = [m for m in metrics if m in GEN_METRICS]
        if gen_metrics:
            prompts = [prompt_and_reference(r)[0] for r in records]
            predictions = _backend.generate(loaded, prompts, **gen.to_dict())
            refs = references or [prompt_and_reference(r)[1] for r in records]
            if "bleu" in gen_metrics:
                row.update(tm.bleu(predictions, refs))
            rouge_types = tuple(m for m in gen_metrics if m.startswith("rouge"))
            if rouge_types:
                row.update(tm.rouge(predictions, refs, rouge_types))
            if "exact" in gen_metrics:
                row["exact"] = tm.exact_match(predictions, refs)
            if "contains" in gen_metrics:
                row["contains"] = tm.contains_match(predictions, refs)
            if keep_predictions:
                row["predictions"] = predictions
    finally:
        del loaded
        gc.collect()
    row["seconds"] = round(time.time() - started, 2)
    return row


def run_eval(specs: list[str], data: str, metrics: list[str], gen: GenerationOptions, *, fmt: str = "auto",
             limit: int | None = None, device: str = "auto", batch_size: int = 4, max_length: int | None = None,
             stride: int | None = None, keep_predictions: bool = False, progress=None) -> list[dict]:
    """Evaluate every model of ``specs`` on the same records with the same settings (one model in memory at a
    time). References are checked before any model is loaded."""
    records = load_eval_records(data, fmt, limit)
    refs = check_references(records, metrics, data) if any(m in GEN_METRICS for m in metrics) else None
    rows = []
    for spec in specs:
        if progress:
            progress(f"evaluating {spec} on {len(records)} records ...")
        rows.append(evaluate_model(spec, records, metrics, gen, device=device, batch_size=batch_size,
                                   max_length=max_length, stride=stride, references=refs,
                                   keep_predictions=keep_predictions))
    return rows


def save_to_run_dirs(rows: list[dict], data: str, metrics: list[str], gen: GenerationOptions) -> list[Path]:
    """Append each row to ``<run dir>/eval_results.json`` when the model is a run directory (for the report)."""
    import json

    from tuneforge.utils import atomic_write_json

    written = []
    for row in rows:
        run_dir = Path(row["model"])
        if not ((run_dir / "config.yaml").is_file() or (run_dir / "metrics.jsonl").is_file()):
            continue
        path = run_dir / "eval_results.json"
        try:
            existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
        except json.JSONDecodeError:
            existing = []
        entry = {k: v for k, v in row.items() if k != "predictions"}
        entry.update(data=str(data), metrics=metrics, generation=gen.to_dict(),
                     time=time.strftime("%Y-%m-%d %H:%M:%S"))
        atomic_write_json(path, [*(existing if isinstance(existing, list) else []), entry])
        written.append(path)
    return written


def format_value(key: str, value: Any) -> str:
    """Human formatting of one table cell."""
    if value is None:
        return "-"
    if key == "tokens" or isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}" if key == "ppl" else f"{value:.2f}"
    return str(value)


def table_columns(metrics: list[str]) -> list[str]:
    """Columns of the comparison table, in the order the metrics were asked for."""
    cols = []
    for m in metrics:
        cols.extend(["ppl", "tokens"] if m == "ppl" else [m])
    return cols
