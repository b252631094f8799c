"""Replay mixing and multi-task records: general data interleaved into SFT data, task prefixes, task weights.

Replay (``data.mix``, docs/forgetting.md): the guide's first remedy for catastrophic forgetting is to mix 1-5% of
general data into the fine-tuning set. Each mix source becomes samples of its own — text documents are cut into
chunks of at most ``data.max_length`` tokens trained on every token (as in pretraining), chat/Alpaca records are
trained on their answers like the task data — and is drawn to a stated **share of training samples**:

* without ``data.mix_ratio``: each source's ``weight`` is its share (``0.05`` = 5% of all training samples);
* with ``data.mix_ratio``: the sources together make that share, split between them by ``weight``.

Samples are drawn from each source in a seeded order (cycling when a source is smaller than its share) and spread
evenly through the task samples (deterministic interleaving: the same config and seed give the same sequence).
``mix_stats`` reports samples, tokens and supervised tokens per source, since a 5% sample share of long text chunks
can be a much larger share of the supervised tokens.

Multi-task: a record may carry a ``task`` field (readers keep it). ``data.task_prefix`` prepends ``[task] `` to the
first user turn (the guide's task identifiers); ``data.task_weights`` scales how often each task's records are
sampled per epoch (``2`` = twice, ``0.5`` = a seeded half).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

#: built-in general corpora usable as ``data.mix[].name`` and ``train.retention.reference``
BUILTIN_CORPORA = ("pydoc",)


def read_general(spec: str, key: str, data_cfg: Any) -> list[dict]:
    """Records of a general-data reference: a local file/directory, a built-in corpus or ``hf:owner/name``.

    Args:
        spec: what the config names.
        key: the config key, for errors (``data.mix[0].path``, ``train.retention.reference``).
        data_cfg: the run's ``data`` section (format, text separator, cleaning rules).

    Raises:
        UserError: naming ``key`` when the path does not exist or the name is not a known corpus.
    """
    from tuneforge.data.clean import clean_records
    from tuneforge.data.readers import read_records

    if spec in BUILTIN_CORPORA:
        records = builtin_records(spec)
    elif spec.startswith("hf:") or Path(spec).exists():
        records = read_records(spec, "auto", data_cfg.text_separator)
    else:
        raise UserError(f"{key}: {spec!r} does not exist; give a data file or directory, a built-in corpus "
                        f"({', '.join(BUILTIN_CORPORA)}) or a hub dataset as hf:owner/name")
    records, _ = clean_records(records, data_cfg.clean)
    return records


def builtin_records(name: str) -> list[dict]:
    """The text records of a built-in general corpus (``pydoc``: the Python documentation, one record per topic)."""
    from tuneforge.data.builtin import pydoc_topics

    if name != "pydoc":
        raise UserError(f"{name!r} is not a built-in corpus; known: {', '.join(BUILTIN_CORPORA)}")
    docs = [text.strip() for _, text in sorted(pydoc_topics().items()) if text.strip()]
    return [{"text": doc, "source": f"pydoc#{i + 1}"} for i, doc in enumerate(docs)]


def mix_shares(data_cfg: Any) -> list[float]:
    """Each ``data.mix`` source's share of all training samples (see the module docstring)."""
    weights = [m.weight for m in data_cfg.mix]
    if data_cfg.mix_ratio is None:
        return weights
    total = sum(weights)
    return [data_cfg.mix_ratio * w / total for w in weights]


def read_mix_sources(data_cfg: Any) -> list[tuple[str, list[dict]]]:
    """``(label, records)`` for every ``data.mix`` source, read and cleaned; errors name ``data.mix[i]``."""
    sources = []
    for i, source in enumerate(data_cfg.mix):
        spec, field = (source.path, "path") if source.path is not None else (source.name, "name")
        if field == "path" and not Path(spec).exists():
            raise UserError(f"data.mix[{i}].path: {spec} does not exist (a general-data file or directory to mix in)")
        sources.append((spec, read_general(spec, f"data.mix[{i}].{field}", data_cfg)))
    return sources


def text_samples(records: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    """Text records as SFT samples trained on every token: each document (plus EOS) cut into chunks of at most
    ``max_length`` tokens; chunks shorter than two tokens are dropped (nothing to predict)."""
    eos = tokenizer.eos_token_id
    samples = []
    for record in records:
        ids = list(tokenizer(record["text"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        for start in range(0, len(ids), max_length):
            chunk = ids[start:start + max_length]
            if len(chunk) >= 2:
                samples.append({"input_ids": chunk, "labels": list(chunk)})
    return samples


def draw(samples: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` samples in a seeded order, cycling through a fresh permutation whenever the list runs out."""
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n and samples:
        order = list(range(len(samples)))
        rng.shuffle(order)
        out.extend(samples[i] for i in order[: n - len(out)])
    return out


def interleave(task: list[dict], extra: list[list[dict]]) -> list[dict]:
    """Task samples with the samples of each extra source spread evenly between them.

    Extra sample ``k`` of a source with ``m`` samples goes at the fraction ``(k + 0.5) / m`` of the sequence, so every
    stretch of the result holds about its share of each source; ties keep source order. Deterministic.
    """
    keyed = [((i + 0.5) / max(1, len(task)), 1, 0, s) for i, s in enumerate(task)]
    for j, samples in enumerate(extra):
        keyed += [((k + 0.5) / len(samples), 0, j, s) for k, s in enumerate(samples)]
    keyed.sort(key=lambda item: item[:3])
    return [item[3] for item in keyed]


def mix_counts(n_task: int, shares: list[float]) -> list[int]:
    """Samples per mix source so that source ``i`` is ``shares[i]`` of ``n_task + sum(counts)`` (rounded, at
    least one per source)."""
    total = n_task / (1 - sum(shares))
    return [max(1, round(share * total)) for share in shares]


def _token_counts(samples: list[dict]) -> dict[str, int]:
    from tuneforge.data.tokenize import IGNORE

    return {"samples": len(samples), "tokens": sum(len(s["input_ids"]) for s in samples),
            "supervised_tokens": sum(sum(v != IGNORE for v in s["labels"]) for s in samples)}


def mix_stats(task: list[dict], sources: list[tuple[str, list[dict]]]) -> dict[str, Any]:
    """Samples, tokens and supervised tokens per source (``task`` and each mix source) with their shares."""
    per = {"task": _token_counts(task), **{label: _token_counts(s) for label, s in sources}}
    totals = {key: sum(c[key] for c in per.values()) for key in ("samples", "tokens", "supervised_tokens")}
    for counts in per.values():
        for key in ("samples", "tokens", "supervised_tokens"):
            counts[f"{key}_share"] = round(counts[key] / max(1, totals[key]), 4)
    return per


def mix_in(task: list[dict], data_cfg: Any, tokenizer: Any, encode_chat, seed: int) -> tuple[list[dict], dict]:
    """Task samples with ``data.mix`` samples interleaved at their shares; returns ``(samples, stats)``.

    Args:
        task: the encoded task samples (``input_ids``, ``labels``).
        data_cfg: the run's ``data`` section.
        tokenizer: the run's tokenizer.
        encode_chat: encodes chat records into samples exactly as the task data is encoded.
        seed: the run's seed (each source is drawn with ``seed + index``).

    Raises:
        UserError: a source that does not exist, or one that yields no sample.
    """
    drawn = []
    for i, ((label, records), n) in enumerate(zip(read_mix_sources(data_cfg), mix_counts(len(task), mix_shares(data_cfg)),
                                                  strict=True)):
        text = [r for r in records if "text" in r]
        chat = [r for r in records if "messages" in r]
        samples = text_samples(text, tokenizer, data_cfg.max_length) + (encode_chat(chat) if chat else [])
        if not samples:
            raise UserError(f"data.mix[{i}]: {label} gave no trainable sample")
        drawn.append((label, draw(samples, n, seed + i)))
    return interleave(task, [s for _, s in drawn]), mix_stats(task, drawn)


# ----------------------------------------------------------------------------- multi-task


def task_of(record: dict) -> str | None:
    """The record's ``task`` field (``None`` when absent)."""
    task = record.get("task")
    return str(task) if task is not None else None


def task_prefix(task: str) -> str:
    """What ``data.task_prefix`` puts before the first user turn: ``[task] ``."""
    return f"[{task}] "


def prefix_task(text: str, tasks: Iterable[str]) -> str | None:
    """The task whose ``[task]`` prefix ``text`` starts with (the longest such name), else ``None`` — the inverse
    of :func:`task_prefix`, for routing (``serve --route prefix``).

    Task names are matched literally (a name may hold any character, ``]`` too), so ``[a b] hi`` is task ``a b``.
    """
    for task in sorted(tasks, key=len, reverse=True):
        if text.startswith(task_prefix(task).rstrip()):
            return task
    return None


def add_task_prefix(record: dict) -> dict:
    """The record with ``[task] `` prepended to its first user turn.

    Raises:
        UserError: naming the record when it has no ``task`` field or no user turn.
    """
    task = task_of(record)
    source = record.get("source", "?")
    if not task:
        raise UserError(f"{source}: record has no 'task' field, but data.task_prefix is on (give every record a "
                        "task name, or set data.task_prefix: false)")
    messages = record.get("messages")
    if messages is None:
        raise UserError(f"{source}: data.task_prefix needs chat/Alpaca records, this one is plain text")
    first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first is None:
        raise UserError(f"{source}: no user turn to put the task prefix [{task}] on")
    prefixed = [dict(m) for m in messages]
    prefixed[first]["content"] = task_prefix(task) + prefixed[first]["content"]
    return {**record, "messages": prefixed}


def weight_tasks(records: list[dict], weights: dict[str, float], seed: int) -> list[dict]:
    """Records repeated per their task's weight: ``floor(w)`` full copies plus a seeded ``frac(w)`` share.

    Records without a task, or whose task is not in ``weights``, keep weight 1.

    Raises:
        UserError: a task named in ``weights`` that no record has (a typo would silently do nothing).
    """
    if not weights:
        return records
    present = {task_of(r) for r in records}
    missing = sorted(set(weights) - present)
    if missing:
        known = ", ".join(sorted(t for t in present if t)) or "none"
        raise UserError(f"data.task_weights names {missing}, which no training record has (tasks: {known})")
    rng = random.Random(seed)
    out = []
    for task in dict.fromkeys(task_of(r) for r in records):
        group = [r for r in records if task_of(r) == task]
        weight = weights.get(task, 1.0) if task is not None else 1.0
        whole, part = int(math.floor(weight)), weight - math.floor(weight)
        chosen = sorted(rng.sample(range(len(group)), round(part * len(group)))) if part else []
        out.extend(group * whole + [group[i] for i in chosen])
    return out


def prepare_task_records(records: list[dict] | None, data_cfg: Any) -> list[dict] | None:
    """Records as training/eval sees them: task prefixes added when ``data.task_prefix`` is on."""
    if records is None or not getattr(data_cfg, "task_prefix", False):
        return records
    return [add_task_prefix(r) for r in records]


def task_counts(records: list[dict] | None) -> dict[str, int]:
    """Records per task (records without one are not counted); ``{}`` for single-task data."""
    counts: dict[str, int] = {}
    for record in records or ():
        task = task_of(record)
        if task is not None:
            counts[task] = counts.get(task, 0) + 1
    return counts


def eval_rows_by_task(records: list[dict] | None, encode, pack=None) -> dict[str, list[dict]] | None:
    """Eval rows of each task (``encode``: records → samples; ``pack``: samples → rows, or None to keep samples);
    None when no eval record carries a task."""
    if not task_counts(records):
        return None
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(task_of(record) or "(no task)", []).append(record)
    rows = {}
    for task, group in groups.items():
        samples = encode(group)
        rows[task] = pack(samples) if pack else samples
    return rows
