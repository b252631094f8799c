"""From a run's ``data`` config to trainable rows: read → clean → split → encode → pack, with statistics.

:func:`build_datasets` gives rows over cached, memory-mapped Arrow files (``data/prepared.py``) or, with
``data.streaming``, an iterable stream (``data/stream.py``). :func:`build_in_memory` is the original pipeline on
Python lists, kept as the reference the prepared one is tested against (same rows, masks and statistics).
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.clean import clean_records
from tuneforge.data.mix import eval_rows_by_task, mix_in, prepare_task_records, task_counts, weight_tasks
from tuneforge.data.packing import (
    length_grouped_order,
    pack_rows,
    padding_share,
)
from tuneforge.data.readers import read_records, record_text
from tuneforge.data.samples import DataBundle, distribution, held_out_positions, sft_samples
from tuneforge.data.tokenize import pretrain_blocks
from tuneforge.errors import UserError


def read_sources(sources: list[str], data_cfg: Any) -> tuple[list[dict], dict[str, int]]:
    """Read every file/dataset of ``sources``; returns the records and the count per source."""
    records: list[dict] = []
    per_file: dict[str, int] = {}
    for source in sources:
        got = read_records(source, data_cfg.format, data_cfg.text_separator)
        per_file[str(source)] = len(got)
        records.extend(got)
    return records, per_file


def tokenizer_texts(data_cfg: Any) -> list[str]:
    """The text a from-config model's tokenizer is trained on: the cleaned training records, in order.

    Text records give their text; chat records give each message's content. Train, ``data preview`` and ``data
    prepare`` call this, so each sees the tokenizer the others build. The records are those the prepared build
    uses (:func:`tuneforge.data.prepared.training_texts`: read and cleaned once, into the cache, deduplicated
    across files as training is); a streamed corpus (``data.streaming``) is read and cleaned here file by file.
    """
    if not getattr(data_cfg, "streaming", False):
        from tuneforge.data.prepared import training_texts

        return training_texts(data_cfg)
    texts: list[str] = []
    for path in data_cfg.train:
        records, _ = clean_records(read_records(path, data_cfg.format, data_cfg.text_separator), data_cfg.clean)
        for record in records:
            if "text" in record:
                texts.append(record["text"])
            else:
                texts.extend(message["content"] for message in record["messages"])
    return texts


def load_records(data_cfg: Any, seed: int) -> tuple[list[dict], list[dict] | None, dict[str, Any]]:
    """Read, clean, cap (``max_samples``) and split train/eval records.

    Returns:
        ``(train_records, eval_records or None, stats)`` with ``records_per_file`` and ``cleaning`` in stats.
    """
    records, per_file = read_sources(data_cfg.train, data_cfg)
    records, report = clean_records(records, data_cfg.clean)
    stats: dict[str, Any] = {"records_per_file": per_file, "cleaning": report.as_dict()}
    if data_cfg.max_samples:
        records = records[: data_cfg.max_samples]
    eval_records = None
    if data_cfg.eval:
        sources = [data_cfg.eval] if isinstance(data_cfg.eval, str) else list(data_cfg.eval)
        eval_records, eval_per_file = read_sources(sources, data_cfg)
        eval_records, eval_report = clean_records(eval_records, data_cfg.clean)
        stats["eval_records_per_file"] = eval_per_file
        stats["eval_cleaning"] = eval_report.as_dict()
    elif data_cfg.eval_split:
        held = held_out_positions(len(records), data_cfg.eval_split, seed)
        eval_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    stats["train_records"] = len(records)
    stats["eval_records"] = len(eval_records) if eval_records is not None else 0
    return records, eval_records, stats


def build_datasets(
    data_cfg: Any,
    stage: str,
    tokenizer: Any,
    template: Any,
    seed: int,
    packing: bool | None = None,
    batch_size: int = 4,
) -> DataBundle:
    """Build train (and eval) rows for stage ``pt`` or ``sft``: prepared (cached Arrow) or streamed.

    The rows, masks and statistics are those of :func:`build_in_memory` (see there for the arguments and the
    ``stats`` keys); ``train``/``eval`` are memory-mapped sequences from the cache entry ``data.cache_dir``
    (``data.cache: false`` builds into a temporary directory), built with ``data.num_proc`` workers. With
    ``data.streaming: true`` (stage ``pt``) ``train`` is a :class:`tuneforge.data.stream.StreamingBlocks`.
    """
    if getattr(data_cfg, "streaming", False):
        from tuneforge.data.stream import build_streaming

        return build_streaming(data_cfg, stage, tokenizer, template, seed, packing=packing, batch_size=batch_size)
    from tuneforge.data.prepared import prepare

    return prepare(data_cfg, stage, tokenizer, template, seed, packing=packing, batch_size=batch_size)


def build_in_memory(
    data_cfg: Any,
    stage: str,
    tokenizer: Any,
    template: Any,
    seed: int,
    packing: bool | None = None,
    batch_size: int = 4,
) -> DataBundle:
    """Build train (and eval) rows for stage ``pt`` or ``sft`` in memory (the reference pipeline).

    Args:
        data_cfg: a :class:`tuneforge.config.schema.DataConfig`.
        stage: ``pt`` (raw text → EOS-joined fixed blocks of ``max_length``, loss on every token) or ``sft``
            (chat records → rendered with ``template``, loss on assistant turns, packed when ``packing``).
        tokenizer: a fast tokenizer.
        template: the run's :class:`tuneforge.data.templates.ChatTemplate` (unused for ``pt``).
        seed: seeds the eval split and the length-grouped order.
        packing: overrides ``data_cfg.packing`` when not None (SFT only).
        batch_size: rows per batch, used only to compute ``stats["padding_share"]``.

    Returns:
        A :class:`DataBundle`. ``stats`` keys: records_per_file, cleaning, train_records, eval_records, samples,
        dropped_no_supervised, truncated, length (min/mean/p50/p95/max tokens per sample), tokens,
        supervised_tokens, supervised_share, rows, eval_rows, padding_share, packed; for SFT also mask_rules
        (assistant turns per masking rule, see ``data.tokenize``), extra_tokens (prompts re-encoded for turns
        trained as their own sample) and stop_appended (samples whose answer got the template's ``turn_end``).

    Raises:
        UserError: text records in SFT, no sample left (with counts and the fix), too little text for one block.
    """
    records, eval_records, stats = load_records(data_cfg, seed)
    by_task = None
    if stage == "pt":
        train, sample_stats = _pretrain(records, tokenizer, data_cfg.max_length, "training")
        stats.update(sample_stats)
        evaluation = _pretrain(eval_records, tokenizer, data_cfg.max_length, "eval")[0] if eval_records else None
        packed = False
    elif stage == "sft":
        packed = data_cfg.packing if packing is None else bool(packing)
        records, eval_records = _task_records(records, eval_records, data_cfg, seed, stats)
        samples, sample_stats = sft_samples(records, tokenizer, template, data_cfg, "training")
        stats.update(sample_stats)
        if data_cfg.mix:  # replay: general data interleaved at its share (data/mix.py)
            samples, stats["mix"] = mix_in(samples, data_cfg, tokenizer, lambda recs: sft_samples(
                recs, tokenizer, template, data_cfg, "mix")[0], seed)
            stats["samples"], stats["tokens"] = len(samples), sum(len(s["input_ids"]) for s in samples)
        eval_samples = None
        if eval_records:
            eval_samples, eval_stats = sft_samples(eval_records, tokenizer, template, data_cfg, "eval")
            stats["eval_dropped_no_supervised"] = eval_stats["dropped_no_supervised"]
        if packed:
            train = pack_rows(samples, data_cfg.max_length)
            evaluation = pack_rows(eval_samples, data_cfg.max_length) if eval_samples else None
        else:
            train, evaluation = samples, eval_samples
        by_task = eval_rows_by_task(eval_records, lambda recs: sft_samples(recs, tokenizer, template, data_cfg,
                                                                             "eval")[0],
                                    (lambda rows: pack_rows(rows, data_cfg.max_length)) if packed else None)
    else:
        raise UserError(f"stage {stage!r} is not known; expected 'pt' or 'sft'")
    stats["packed"] = packed
    stats["rows"] = len(train)
    stats["eval_rows"] = len(evaluation) if evaluation else 0
    order = None
    if stage == "sft" and not packed:
        order = length_grouped_order([len(r["input_ids"]) for r in train], batch_size, seed)
    stats["padding_share"] = round(padding_share(train, batch_size, order), 4)
    stats["padding_share_batch_size"] = batch_size
    return DataBundle(train=train, eval=evaluation, stats=stats, packed=packed,
                      eval_by_task=by_task)


def _task_records(records, eval_records, data_cfg, seed, stats):
    """Multi-task records (data/mix.py): ``[task]`` prefixes, per-task sampling weights, records per task."""
    records = weight_tasks(prepare_task_records(records, data_cfg), data_cfg.task_weights, seed)
    if task_counts(records):
        stats["tasks"] = {"train": task_counts(records), "eval": task_counts(eval_records)}
    return records, prepare_task_records(eval_records, data_cfg)


def _pretrain(records: list[dict], tokenizer: Any, block_size: int, what: str) -> tuple[list[dict], dict]:
    texts = [record_text(r) for r in records]
    blocks = pretrain_blocks(texts, tokenizer, block_size)
    if not blocks:
        raise UserError(
            f"the {what} text ({len(texts)} documents) is shorter than one block of data.max_length={block_size} "
            "tokens; give more text or lower data.max_length"
        )
    n_tokens = len(blocks) * block_size
    stats = {
        "samples": len(blocks),
        "dropped_no_supervised": 0,
        "truncated": 0,
        "length": distribution([block_size] * len(blocks)),
        "tokens": n_tokens,
        "supervised_tokens": n_tokens,
        "supervised_share": 1.0,
    }
    return blocks, stats


