"""Evaluation data through the prepared-data cache (``tuneforge eval --data``, search trials' eval records).

:func:`read_eval_records` reads the eval file's canonical records (generation metrics need prompts and references,
and the checks run before any model is loaded) through the file's *records entry* in the prepared-data cache (read
once; a second evaluation reads nothing but the file's hash) and returns them as :class:`EvalRecords`: a list that
remembers its source, so the perplexity of a model's chat answers takes its token ids and masks from
:func:`tuneforge.data.prepared.prepare` — the same rendering and masks training builds, stored as Arrow in the
prepared-data cache. The entry's key holds the file's content, the model's tokenizer and chat template, so a second
evaluation of the same file by a model with the same tokenizer and template (another checkpoint of the run, the
next search trial) opens the entry instead of re-encoding.

Evaluation's own rules are kept, so the scores equal the direct encoding's
(:func:`tuneforge.evaluate.perplexity.encode_records` on a plain list): no cleaning (a record is scored as written),
no truncation (long sequences are scored in sliding windows), no packing. Text records are scored document by
document, which the pretraining stage's blocks are not: they (and a model without a chat template) keep the direct
path.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

#: eval scores whole sequences (sliding windows over long ones), so the prepared samples are never truncated
UNTRUNCATED = 2**31 - 1


def read_eval_records(source: str, fmt: str = "auto", limit: int | None = None, *,
                      cache_dir: str | Path | None = None, echo=None) -> EvalRecords:
    """The canonical records of ``source`` (a file, directory or hub dataset), the first ``limit`` of them.

    Args:
        source: what :func:`tuneforge.data.readers.read_records` reads.
        fmt: ``auto`` or a data format.
        limit: keep the first ``limit`` records.
        cache_dir: the prepared-data cache (default ``$TUNEFORGE_DATA_CACHE`` / ``$TUNEFORGE_CACHE/data``).
        echo: called with one line saying whether the encoded records were prepared or reused (default: stderr).

    Raises:
        UserError: as the reader (file not found, malformed line naming ``file:line``, ...).
    """
    records = None
    try:
        records = _cached_records(source, fmt, cache_dir)
    except UserError:  # an unusable cache directory, or bad data: the reader reports the record, or reads it
        pass
    if records is None:
        from tuneforge.data.readers import read_records

        records = read_records(source, fmt)
    return EvalRecords(records[:limit] if limit else records, source, fmt, limit, cache_dir=cache_dir, echo=echo)


def _eval_config(source: str, fmt: str, limit: int | None = None, train_on_prompt: bool = False) -> Any:
    """The data settings of an evaluation: no cleaning, no truncation, no packing."""
    from tuneforge.config.schema import CleanConfig, DataConfig

    return DataConfig(train=[source], format=fmt, max_length=UNTRUNCATED, packing=False, max_samples=limit,
                      train_on_prompt=train_on_prompt,
                      clean=CleanConfig(strip_html=False, normalize=False, min_length=0, dedup=False))


def _cached_records(source: str, fmt: str, cache_dir) -> list[dict]:
    """The canonical records of ``source`` from its records entry (read once into the cache; the samples that
    :meth:`EvalRecords.encode_prepared` builds hard-link the same entry, so the file is read once in all)."""
    from tuneforge.data.cache import default_cache_dir
    from tuneforge.data.prepared import CanonRecords, records_entry

    cfg = _eval_config(str(source), fmt)
    root = Path(cache_dir or default_cache_dir()).expanduser()
    folder, meta = records_entry(cfg, cfg.train, "train", root)
    return list(CanonRecords(folder, meta["files"], meta["kept"]))


class EvalRecords(list):
    """Canonical eval records that know their source, so their encoding can come from the prepared-data cache.

    A slice or a filtered copy is a plain list (encoded directly): only the records as read are the cached entry's.
    ``last_entry`` is ``{"path", "hit"}`` of the entry the last :meth:`encode_prepared` used (``hit``: it existed).
    """

    def __init__(self, records: list[dict], source: str, fmt: str = "auto", limit: int | None = None, *,
                 cache_dir: str | Path | None = None, echo=None):
        super().__init__(records)
        self.source, self.fmt, self.limit = str(source), fmt, limit
        self.cache_dir = cache_dir
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.last_entry: dict[str, Any] | None = None

    def encode_prepared(self, tokenizer: Any, template: Any,
                        train_on_prompt: bool = False) -> tuple[list[tuple[list[int], list[int]]], int] | None:
        """``(pairs, skipped)`` as ``encode_records`` gives them, from the prepared (cached) samples.

        ``pairs`` are the ``(input_ids, labels)`` of every sample with a supervised token, in record order;
        ``skipped`` counts the records without one. None when these records take the direct path: text records,
        no chat template, no assistant answer at all, or any error preparing them (the direct encoding then
        scores them, or reports the record it cannot use).
        """
        if template is None or not self or not all("messages" in r for r in self):
            return None
        if not any(m["role"] == "assistant" for r in self for m in r["messages"]):
            return None
        from tuneforge.data.cache import Entry, default_cache_dir
        from tuneforge.data.prepared import cache_key, prepare

        cfg = _eval_config(self.source, self.fmt, self.limit, train_on_prompt)
        root = Path(self.cache_dir or default_cache_dir()).expanduser()
        try:
            entry = Entry(root, cache_key(cfg, "sft", tokenizer, template, 0, False))
            hit = entry.ready()
            self.echo(f"eval data: {'reusing' if hit else 'preparing'} the encoded records of {self.source} "
                      f"({entry.path})")
            bundle = prepare(cfg, "sft", tokenizer, template, 0, packing=False, cache_dir=root, echo=self.echo)
        except UserError:
            return None
        self.last_entry = {"path": bundle.cache, "hit": hit}
        if bundle.stats["train_records"] != len(self):  # a file changed between the read and the build
            return None
        table = bundle.train.table
        pairs = list(zip(table.column("input_ids").to_pylist(), table.column("labels").to_pylist(), strict=True))
        return pairs, int(bundle.stats["dropped_no_supervised"])
