"""``tuneforge data prepare``: build (or find) a run's prepared data in the cache, with progress and figures.

Like ``data preview`` it loads only the run's tokenizer (never a model). ``train``, ``data preview``, ``eval``
and search trials then open the same cache entry instead of preparing the data again (data/prepared.py).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tuneforge.errors import UserError


def run_prepare(config_path: str, overrides: list[str] | None = None, *, no_cache: bool = False,
                cache_dir: str | None = None, num_proc: int | None = None, as_json: bool = False,
                progress: bool = True, out: Any = None) -> int:
    """Prepare the data a run config describes; print where it is and its statistics. Returns 0."""
    from tuneforge.commands.preview import _tokenizer_for_config
    from tuneforge.config import load_config
    from tuneforge.config.stages import STAGES
    from tuneforge.data.build import tokenizer_texts
    from tuneforge.data.cache import Entry, default_cache_dir
    from tuneforge.data.prepared import cache_key, prepare
    from tuneforge.data.templates import resolve_template

    out = out or sys.stdout
    cfg = load_config(config_path, overrides or [])
    if STAGES[cfg.stage].data not in ("text", "chat"):
        raise UserError(f"data prepare covers stages pt and sft; stage {cfg.stage!r} builds its pairs when training")
    if cfg.data.streaming:
        raise UserError("data.streaming: true reads, tokenizes and packs while training: there is nothing to "
                        "prepare (drop data.streaming to prepare the data into the cache instead)")
    root = cache_dir or cfg.data.cache_dir or default_cache_dir()
    cached = not no_cache and cfg.data.cache
    # a from-config tokenizer trains on the records the build then reuses: the same cache for both
    data_cfg = cfg.data.model_copy(update={"cache_dir": str(root), "cache": cached})
    tokenizer = _tokenizer_for_config(cfg, lambda: tokenizer_texts(data_cfg))
    template = resolve_template(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs,
                                cfg.data.system_message)
    packed = bool(cfg.data.packing and cfg.stage == "sft")
    reused = cached and Entry(root, cache_key(cfg.data, cfg.stage, tokenizer, template, cfg.seed, packed)).ready()
    started = time.time()
    bundle = prepare(data_cfg, cfg.stage, tokenizer, template, cfg.seed, packing=packed,
                     batch_size=cfg.train.batch_size, cache_dir=root, use_cache=cached, num_proc=num_proc,
                     progress=progress and not as_json)
    seconds = time.time() - started
    stats = bundle.stats
    records = stats.get("records_per_file", {})
    n_records = sum(records.values())
    report = {"cache": bundle.cache, "reused": bool(reused), "seconds": round(seconds, 2),
              "records": n_records, "records_per_second": round(n_records / seconds, 1) if seconds > 0 else None,
              "stats": stats}
    if as_json:
        out.write(json.dumps(report, ensure_ascii=False, default=str) + "\n")
        return 0
    from tuneforge.commands.preview import format_stats

    where = bundle.cache or "a temporary directory (--no-cache: removed at exit)"
    verb = "reused" if reused else "prepared"
    out.write(f"{verb} {n_records} records in {seconds:.1f} s"
              + ("" if reused else f" ({report['records_per_second']} records/s)") + f": {where}\n")
    for line in format_stats(stats):
        out.write(line + "\n")
    return 0
