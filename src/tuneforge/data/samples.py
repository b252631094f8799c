"""Encoded SFT samples and the bundle the trainer gets: shared by the in-memory builder (``data/build.py``), the
prepared Arrow pipeline (``data/prepared.py``), streaming (``data/stream.py``) and retention's reference data.

Its own module below all three so that they import it, not each other (no import cycle between files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneforge.data.packing import PackedCollator, PaddingCollator
from tuneforge.data.tokenize import IGNORE, encode_chat_samples, pad_id
from tuneforge.errors import UserError


@dataclass
class DataBundle:
    """What the trainer gets.

    Attributes:
        train: a map-style sequence of rows (dicts of int lists: ``input_ids``, ``labels`` and, when packed,
            ``position_ids`` and ``lengths``): a list (in memory) or Arrow-backed rows (``data/prepared.py``);
            with ``data.streaming`` an iterable dataset (``data/stream.py``: no ``len``).
        eval: rows in the same shape, or None.
        stats: counts and distributions for the report (see :func:`build_datasets`).
        packed: True when rows are packed (use :class:`PackedCollator` and run the model with use_cache=False).
        eval_by_task: multi-task data: the eval rows of each task (records with a ``task`` field), else None.
    """

    train: Sequence[dict] | Any
    eval: Sequence[dict] | None
    stats: dict[str, Any] = field(default_factory=dict)
    packed: bool = False
    eval_by_task: dict[str, Sequence[dict]] | None = None
    records: Sequence[dict] | None = None  # prepared data: the cleaned training records (what the preview shows)
    cache: str | None = None  # prepared data: the cache entry the rows come from

    def collator(self, tokenizer: Any):
        """The collator for these rows (packed or dynamic padding), padding with the tokenizer's pad id."""
        pad = pad_id(tokenizer)
        return PackedCollator(pad) if self.packed else PaddingCollator(pad)



def sft_messages(record: dict, data_cfg: Any) -> dict:
    """The record as training encodes it: ``data.system_prompt`` added when it has no system message."""
    messages = record["messages"]
    if data_cfg.system_prompt and messages[0]["role"] != "system":
        return {**record, "messages": [{"role": "system", "content": data_cfg.system_prompt}, *messages]}
    return record



def sft_samples(records: list[dict], tokenizer: Any, template: Any, data_cfg: Any, what: str):
    """Encoded SFT samples of chat ``records`` (only samples with a supervised token) and their statistics.

    Raises:
        UserError: a plain-text record, or no sample left (``what`` names the data: train, eval, reference...).
    """
    samples = []
    dropped = truncated = 0
    rules: dict[str, int] = {}
    extra = stop_appended = 0
    for record in records:
        if "messages" not in record:
            raise UserError(
                f"{record.get('source', '?')}: a plain-text record, but stage 'sft' needs conversations "
                "(chat or Alpaca records). For raw text use stage: pt"
            )
        encoded = encode_chat_samples(sft_messages(record, data_cfg), tokenizer, template, data_cfg.max_length,
                                      data_cfg.train_on_prompt)
        kept = [s for s in encoded if s["supervised"]]
        if not kept:
            dropped += 1
            continue
        for sample in kept:
            rules[sample["rule"]] = rules.get(sample["rule"], 0) + len(sample["turns"])
            extra += sample["extra_tokens"]
            stop_appended += sample["stop_appended"]
            truncated += sample["truncated"]
            samples.append({"input_ids": sample["input_ids"], "labels": sample["labels"]})
    if not samples:
        raise UserError(
            f"no {what} sample is left: all {len(records)} conversations lost every supervised token "
            f"({dropped} dropped after truncation to data.max_length={data_cfg.max_length}, or with no assistant "
            f"turn). Raise data.max_length, shorten the prompts, or check the chat template ({template.name!r}) "
            "with `tuneforge data preview`"
        )
    lengths = [len(s["input_ids"]) for s in samples]
    supervised = sum(sum(label != IGNORE for label in s["labels"]) for s in samples)
    stats = {
        "samples": len(samples),
        "dropped_no_supervised": dropped,
        "truncated": truncated,
        "length": distribution(lengths),
        "tokens": sum(lengths),
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / max(1, sum(lengths)), 4),
        "mask_rules": dict(sorted(rules.items())),
        "extra_tokens": extra,
        "stop_appended": stop_appended,
    }
    return samples, stats



def distribution(values: list[int]) -> dict[str, float]:
    """min / mean / p50 / p95 / max of ``values`` (the statistics the report and ``data preview`` show)."""
    ordered = sorted(values)
    if not ordered:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }



def held_out_positions(count: int, eval_split: float, seed: int) -> set[int]:
    """The positions of ``count`` records that ``data.eval_split`` holds out for evaluation, drawn with ``seed``.

    Records (not rows) are split, before any packing, so no sample is in both sets.

    Raises:
        UserError: the split leaves nothing to train on.
    """
    import random

    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(count * eval_split))
    if n_eval >= count:
        raise UserError(f"data.eval_split={eval_split} of {count} records leaves nothing to train on; lower it or "
                        "give more data")
    return set(order[:n_eval])
