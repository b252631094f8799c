"""Prepared data: the run's rows as memory-mapped Arrow files, built in parallel and cached.

The pipeline is the in-memory one (``data.build.build_in_memory``, kept as the reference) cut into steps that
never hold the corpus in Python lists:

1. **scan** (parent): each source becomes rows of an Arrow file — a ``.jsonl`` file line by line (raw JSON text
   plus its ``file:line`` source), any other source through :func:`tuneforge.data.readers.read_records`;
2. **canonical + clean** (``datasets.map``, ``data.num_proc`` workers): JSON parsing, the record converters,
   HTML stripping, normalisation; each row gets its min-length verdict and a 128-bit hash of its dedup key;
3. **dedup, cap, split** (parent, vectorised on those columns): the same counts as ``clean_records``,
   ``data.max_samples``, ``data.eval_split`` with the run's seed, task weights;
4. **encode** (``datasets.map``, workers): chat template rendering, tokenizing and label masks
   (:func:`tuneforge.data.tokenize.encode_chat_samples`) or pretraining documents' token ids;
5. **pack** (parent): the first-fit-decreasing plan of :func:`tuneforge.data.packing.pack_plan` over the
   samples' lengths, stored as lists of sample indices; packed rows and pretraining blocks are assembled on access.

Every statistic comes from these columns. The result is a :class:`tuneforge.data.samples.DataBundle` whose
``train``/``eval`` are map-style sequences (:class:`SampleRows`, :class:`PackedRows`, :class:`BlockRows`) giving
the same row dicts as the in-memory pipeline; they pickle as file paths (a distributed handoff or a DataLoader
worker reopens the memory map). See docs/data.md, "Prepared data and the cache".
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

_BATCH = 1000  # rows per map batch
_SCAN_BATCH = 20000  # rows per Arrow record batch written by the scan
#: below this many records the default is one process (spawning workers costs more than it saves)
PARALLEL_MIN_RECORDS = 20000


# ----------------------------------------------------------------------------- public entry points


def prepare(data_cfg: Any, stage: str, tokenizer: Any, template: Any, seed: int, packing: bool | None = None,
            batch_size: int = 4, *, cache_dir: str | Path | None = None, use_cache: bool | None = None,
            num_proc: int | None = None, progress: bool = False, echo=None) -> Any:
    """The run's data as a :class:`DataBundle` over cached Arrow files (built when missing).

    Args:
        data_cfg: a :class:`tuneforge.config.schema.DataConfig`.
        stage: ``pt`` or ``sft``.
        tokenizer: a fast tokenizer (picklable: it is sent to the workers).
        template: the run's :class:`tuneforge.data.templates.ChatTemplate` (rendered inside the workers).
        seed: the run's seed (eval split, task weights, mixing, length-grouped order of the padding statistic).
        packing: overrides ``data_cfg.packing`` when not None (SFT only).
        batch_size: rows per batch for ``stats["padding_share"]``.
        cache_dir: overrides ``data.cache_dir`` (default ``$TUNEFORGE_CACHE/data``, ``~/.cache/tuneforge/data``).
        use_cache: False builds into a temporary directory removed at exit (``--no-cache``); default
            ``data.cache``.
        num_proc: worker processes (default ``data.num_proc``, else the usable CPUs for 20,000+ records).
        progress: progress bars (records/s, ETA) on stderr.
        echo: called with one line when this process waits for another builder of the same data.

    Distributed runs: call it on every rank. Rank 0 (``RANK`` 0 or unset) builds; other ranks wait on the
    entry's lock and open what rank 0 published (they never build the same key twice).

    Raises:
        UserError: as the in-memory pipeline (bad records, nothing left, ...), or an unusable cache directory.
    """
    from tuneforge.data.cache import Entry, default_cache_dir

    packed = _packed(data_cfg, stage, packing)
    use_cache = getattr(data_cfg, "cache", True) if use_cache is None else use_cache
    root = Path(cache_dir or getattr(data_cfg, "cache_dir", None) or default_cache_dir()).expanduser()
    num_proc = num_proc or getattr(data_cfg, "num_proc", None)
    if not use_cache:
        folder = _temp_dir()
        meta = _build(data_cfg, stage, tokenizer, template, seed, packed, folder, num_proc, progress,
                      _temp_records_root())
        return _open(folder, meta, data_cfg, stage, seed, batch_size)
    key = cache_key(data_cfg, stage, tokenizer, template, seed, packed)
    entry = Entry(root, key)
    say = echo or (lambda line: print(line, file=sys.stderr))
    if _rank() > 0:  # rank 0 builds; the others open what it publishes
        wait_for(entry, say)

    def build(folder: Path) -> dict:
        meta = _build(data_cfg, stage, tokenizer, template, seed, packed, folder, num_proc, progress, root)
        meta["fingerprint"] = _key_parts(data_cfg, stage, tokenizer, template, seed, packed)
        return meta

    _cached_build(entry, build, say)
    bundle = _open(entry.path, entry.meta(), data_cfg, stage, seed, batch_size)
    bundle.cache = str(entry.path)
    return bundle


def training_texts(data_cfg: Any, *, cache_dir: str | Path | None = None, use_cache: bool | None = None,
                   num_proc: int | None = None) -> list[str]:
    """The text a from-config model's tokenizer is trained on: the cleaned training records (text records give
    their text, chat records each message's content), in order.

    They come from the training files' *records entry* (read, canonicalised and cleaned once, independent of the
    tokenizer; see :func:`records_entry`), which the prepared build that follows reuses: a from-config run reads
    and cleans its training files once. Arguments as :func:`prepare`.
    """
    import numpy as np

    root = _records_root(data_cfg, cache_dir, use_cache)
    folder, meta = records_entry(data_cfg, data_cfg.train, "train", root, num_proc or getattr(data_cfg, "num_proc",
                                                                                              None))
    column = _open_table(folder, meta["files"], ["record"]).column("record")
    texts: list[str] = []
    for index in np.load(folder / meta["kept"]):
        record = json.loads(column[int(index)].as_py())
        if "text" in record:
            texts.append(record["text"])
        else:
            texts.extend(message["content"] for message in record["messages"])
    return texts


def records_entry(data_cfg: Any, sources: list[str], name: str, root: Path, num_proc: int | None = None,
                  progress: bool = False, say=None) -> tuple[Path, dict]:
    """The canonical, cleaned records of ``sources`` as a cache entry of their own: ``(folder, meta)``.

    Its key holds what decides the records and nothing else (the sources' digests, ``data.format``,
    ``data.text_separator``, the cleaning settings, the code): the tokenizer, template, stage and lengths do not
    change it, so the tokenizer of a from-config model trains on it and every prepared build of the same files
    reuses it (hard links into the build: an entry never depends on another). ``meta``: ``files`` (the canonical
    Arrow shards), ``kept`` (a ``.npy`` of the records left after min-length and dedup), ``per_file``, ``report``
    (``clean_records``' counts).
    """
    from tuneforge.data.cache import Entry, code_digest, data_fingerprint, source_digest

    parts = {"kind": "records", "name": name, "sources": [source_digest(s) for s in sources],
             "format": data_cfg.format, "text_separator": data_cfg.text_separator,
             "clean": _clean_settings(data_cfg.clean), "code": code_digest()}
    entry = Entry(root, data_fingerprint(parts))

    def build(folder: Path) -> dict:
        with _progress_bars(progress):  # quiet unless asked (a tokenizer's or an evaluation's read)
            part = _clean_part(data_cfg, sources, folder, name, num_proc, progress)
        np_kept = _save_indices(folder, f"kept-{name}", part.kept)
        return {"kind": "records", "files": part.files, "kept": np_kept, "per_file": part.per_file,
                "report": part.report, "fingerprint": parts}

    _cached_build(entry, build, say or (lambda line: print(line, file=sys.stderr)))
    return entry.path, entry.meta()


def _cached_build(entry: Any, build, say) -> None:
    """Publish ``build(folder)``'s files as ``entry`` unless it exists, under its lock (a second builder waits and
    reuses the first one's; a failed or killed build publishes nothing)."""
    if entry.ready():
        return
    with entry.lock(lambda: say(f"data: waiting for another process preparing the same data ({entry.path})")):
        if entry.ready():
            return
        folder = entry.new_build_dir()
        try:
            entry.publish(folder, build(folder))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise


def _records_root(data_cfg: Any, cache_dir=None, use_cache: bool | None = None) -> Path:
    from tuneforge.data.cache import default_cache_dir

    use_cache = getattr(data_cfg, "cache", True) if use_cache is None else use_cache
    if not use_cache:
        return _temp_records_root()
    return Path(cache_dir or getattr(data_cfg, "cache_dir", None) or default_cache_dir()).expanduser()


def _temp_dir() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tuneforge-data-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


@functools.lru_cache(maxsize=1)
def _temp_records_root() -> Path:
    """Where records entries go without a cache (``data.cache: false``, ``--no-cache``): one temporary directory
    per process, removed at exit, so the tokenizer's read of the training files still serves the build."""
    return _temp_dir()


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def wait_for(entry: Any, say, poll: float = 1.0, timeout: float | None = None) -> None:
    """Block until ``entry`` is published (another process — rank 0 — builds it); a line every 10 minutes.

    Raises:
        TimeoutError: ``timeout`` seconds passed first (default: no timeout; torchrun stops the ranks when rank 0
            fails).
    """
    started = last = time.time()
    while not entry.ready():
        now = time.time()
        if timeout is not None and now - started > timeout:
            raise TimeoutError(f"prepared data {entry.path} did not appear within {timeout:.0f} s")
        if now - last >= 600:
            say(f"rank {_rank()}: still waiting for rank 0 to prepare the data ({(now - started) / 60:.0f} min)")
            last = now
        time.sleep(poll)


def cache_key(data_cfg: Any, stage: str, tokenizer: Any, template: Any, seed: int, packed: bool) -> str:
    """The cache key of this data (see :mod:`tuneforge.data.cache`)."""
    from tuneforge.data.cache import data_fingerprint

    return data_fingerprint(_key_parts(data_cfg, stage, tokenizer, template, seed, packed))


def _key_parts(data_cfg, stage, tokenizer, template, seed, packed) -> dict:
    from tuneforge.data.cache import code_digest, source_digest, tokenizer_digest

    settings = _settings(data_cfg)
    sources = {"train": [source_digest(s) for s in data_cfg.train]}
    if data_cfg.eval:
        sources["eval"] = [source_digest(s) for s in _sources(data_cfg.eval)]
    for i, mix in enumerate(data_cfg.mix or ()):
        spec = mix.path if mix.path is not None else mix.name
        sources[f"mix{i}"] = source_digest(str(spec))
    # The seed decides rows through the eval split, task weights and mixing only.
    seeded = bool(data_cfg.eval_split or data_cfg.task_weights or data_cfg.mix)
    return {
        "stage": stage,
        "packed": packed,
        "settings": settings,
        "sources": sources,
        "seed": seed if seeded else None,
        "tokenizer": tokenizer_digest(tokenizer),
        "template": template.to_dict() if (template is not None and stage == "sft") else None,
        "code": code_digest(),
    }


def _settings(data_cfg: Any) -> dict:
    """The data settings that decide the rows (not where or how fast they are built)."""
    dump = data_cfg.model_dump(mode="json") if hasattr(data_cfg, "model_dump") else dict(vars(data_cfg))
    for key in ("train", "eval", "cache_dir", "cache", "num_proc", "streaming", "shuffle_buffer"):
        dump.pop(key, None)
    return dump


def _packed(data_cfg, stage, packing) -> bool:
    if stage != "sft":
        return False
    return bool(data_cfg.packing if packing is None else packing)


def _sources(spec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def default_num_proc(n_records: int) -> int:
    """Workers for ``n_records`` records: the usable CPUs (at most 8) from 20,000 records on, else 1."""
    if n_records < PARALLEL_MIN_RECORDS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# ----------------------------------------------------------------------------- build


def _build(data_cfg, stage, tokenizer, template, seed, packed, folder: Path, num_proc, progress,
           records_root: Path) -> dict:
    """Build every file of an entry into ``folder``; returns its ``meta.json`` content (stats and files).

    The canonical, cleaned records come from their records entries under ``records_root`` (built when missing).
    """
    from tuneforge.data.mix import task_counts, weight_tasks

    if stage not in ("pt", "sft"):
        raise UserError(f"stage {stage!r} is not known; expected 'pt' or 'sft'")
    started = time.time()
    with _progress_bars(progress):
        train = _records(data_cfg, data_cfg.train, folder, "train", num_proc, progress, records_root)
        stats: dict[str, Any] = {"records_per_file": train.per_file, "cleaning": train.report}
        indices = train.kept[: data_cfg.max_samples] if data_cfg.max_samples else train.kept
        eval_part = eval_indices = None
        if data_cfg.eval:
            eval_part = _records(data_cfg, _sources(data_cfg.eval), folder, "eval", num_proc, progress,
                                 records_root)
            eval_indices = eval_part.kept
            stats["eval_records_per_file"] = eval_part.per_file
            stats["eval_cleaning"] = eval_part.report
        elif data_cfg.eval_split:
            from tuneforge.data.samples import held_out_positions

            held = held_out_positions(len(indices), data_cfg.eval_split, seed)
            eval_part = train
            eval_indices = [r for i, r in enumerate(indices) if i in held]
            indices = [r for i, r in enumerate(indices) if i not in held]
        stats["train_records"] = len(indices)
        stats["eval_records"] = len(eval_indices) if eval_indices is not None else 0
        meta: dict[str, Any] = {"stage": stage, "packed": packed, "files": {},
                                "records": {"files": train.files, "indices": _save_indices(folder, "train_records",
                                                                                          indices)}}
        if stage == "sft":
            tasks = train.tasks
            if tasks is not None or data_cfg.task_weights:  # multi-task data: weights repeat records
                tasks = tasks or [None] * (max(indices) + 1 if indices else 0)
                proxies = weight_tasks([{"task": tasks[i], "i": i} for i in indices], data_cfg.task_weights, seed)
                indices = [p["i"] for p in proxies]
                if task_counts(proxies):
                    eval_tasks = [{"task": eval_part.tasks[i]} for i in eval_indices or ()] \
                        if eval_part is not None and eval_part.tasks is not None else []
                    stats["tasks"] = {"train": task_counts(proxies), "eval": task_counts(eval_tasks)}
            _build_sft(data_cfg, tokenizer, template, seed, packed, folder, train, indices, eval_part,
                       eval_indices, stats, meta, num_proc, progress)
        else:
            _build_pt(data_cfg, tokenizer, folder, train, indices, eval_part, eval_indices, stats, meta, num_proc,
                      progress)
    stats["packed"] = packed
    meta["stats"] = stats
    meta["build_seconds"] = round(time.time() - started, 2)
    return meta


class _Part:
    """The canonical, cleaned records of one split's sources (an Arrow file) and their verdicts."""

    file: str
    kept: list[int]
    per_file: dict[str, int]
    report: dict
    tasks: list | None


def _records(data_cfg, sources: list[str], folder: Path, name: str, num_proc, progress, root: Path) -> _Part:
    """The records of ``sources`` (their records entry under ``root``) linked into ``folder``, as a :class:`_Part`."""
    import numpy as np

    source, meta = records_entry(data_cfg, sources, name, root, num_proc, progress)
    for file in meta["files"]:
        _link(source / file, folder / file)
    part = _Part()
    part.file, part.files, part.per_file, part.report = f"canon-{name}", meta["files"], meta["per_file"], meta["report"]
    part.kept = [int(i) for i in np.load(source / meta["kept"])]
    task_col = _open_table(folder, part.files, columns=["task"]).column("task")
    part.tasks = task_col.to_pylist() if task_col.null_count < len(task_col) else None
    return part


def _link(source: Path, target: Path) -> None:
    """``target`` as a hard link of ``source`` (no copy; each entry stays whole if the other is removed)."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, target)


def _clean_part(data_cfg, sources: list[str], folder: Path, name: str, num_proc, progress) -> _Part:
    """Scan ``sources``, canonicalise and clean them in workers, then dedup and count (``clean_records``)."""
    import numpy as np

    raw_path = folder / f"raw-{name}.arrow"
    per_file = _scan(sources, data_cfg, raw_path, progress)
    n = sum(per_file.values())
    procs = _procs(num_proc, n)
    dataset = _from_file(raw_path)
    clean = _clean_settings(data_cfg.clean)
    fn = functools.partial(_canon_batch, fmt=data_cfg.format, clean=clean)
    canon = dataset.map(fn, batched=True, batch_size=_BATCH, num_proc=procs, remove_columns=dataset.column_names,
                        cache_file_name=str(folder / f"canon-{name}.arrow"), new_fingerprint=f"canon-{name}-{n}",
                        desc=f"records ({name})", features=_canon_features())
    files = _shard_files(canon, folder)
    del dataset
    raw_path.unlink(missing_ok=True)
    table = _open_table(folder, files, columns=["source", "short", "html", "norm", "k1", "k2", "task"])
    short = _np(table.column("short")).astype(bool)
    html = _np(table.column("html")).astype(bool)
    norm = _np(table.column("norm")).astype(bool)
    candidates = np.flatnonzero(~short)
    report = {"records_in": n, "records_out": 0, "html_changed": int(html.sum()),
              "normalize_changed": int(norm.sum()), "dropped_min_length": int(short.sum()),
              "dropped_duplicate": 0, "examples": {}}
    firsts: list[tuple[int, str, int]] = []
    if short.any():
        firsts.append((int(np.flatnonzero(short)[0]), "min_length", 0))
    if clean["dedup"] and len(candidates):
        keys = np.stack([_np(table.column("k1"))[candidates], _np(table.column("k2"))[candidates]], axis=1)
        _, first = np.unique(keys, axis=0, return_index=True)
        is_first = np.zeros(len(candidates), dtype=bool)
        is_first[first] = True
        dropped = candidates[~is_first]
        report["dropped_duplicate"] = int(len(dropped))
        if len(dropped):
            firsts.append((int(dropped[0]), "dedup", 0))
        candidates = candidates[is_first]
    sources_col = table.column("source")
    for index, rule, _ in sorted(firsts):  # setdefault order: the rule that dropped a record first comes first
        report["examples"][rule] = sources_col[index].as_py()
    kept = [int(i) for i in candidates]
    report["records_out"] = len(kept)
    if n and not kept:
        raise UserError(
            f"nothing left after cleaning {n} records: min_length (< {clean['min_length']} characters) "
            f"dropped {report['dropped_min_length']}, dedup dropped {report['dropped_duplicate']} "
            f"(HTML stripping changed {report['html_changed']}, normalisation changed {report['normalize_changed']}). "
            "Check the data, or relax data.clean.min_length / data.clean.dedup"
        )
    task_col = table.column("task")
    part = _Part()
    part.file, part.kept, part.per_file, part.report = f"canon-{name}", kept, per_file, report
    part.tasks = task_col.to_pylist() if task_col.null_count < len(task_col) else None
    part.files = files
    return part


def _scan(sources: list[str], data_cfg, out: Path, progress: bool) -> dict[str, int]:
    """Write every record of ``sources`` into ``out`` (Arrow stream): ``payload``, ``source``, ``fmt``.

    JSON-lines files are copied line by line (``fmt`` names the format to convert them with, detected on the
    file's first row as the reader does); other sources are read by the reader and stored canonical (``fmt`` "").
    """
    import pyarrow as pa

    from tuneforge.data.readers import FILE_SUFFIXES, read_records

    schema = pa.schema([("payload", pa.large_string()), ("source", pa.string()), ("fmt", pa.string())])
    per_file: dict[str, int] = {}
    bar = _bar(progress, "reading", "B")
    with pa.OSFile(str(out), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buffer: dict[str, list] = {"payload": [], "source": [], "fmt": []}

        def flush(force=False):
            if buffer["payload"] and (force or len(buffer["payload"]) >= _SCAN_BATCH):
                writer.write_batch(pa.record_batch([pa.array(buffer[k], type=schema.field(k).type)
                                                    for k in ("payload", "source", "fmt")], schema=schema))
                for values in buffer.values():
                    values.clear()

        for source in sources:
            p = Path(source)
            files = [p]
            if p.is_dir():
                files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
                if not files:
                    raise UserError(f"{p}: directory has no data files ({', '.join(FILE_SUFFIXES)})")
            count = 0
            for f in files:
                if f.is_file() and f.suffix.lower() == ".jsonl":
                    for payload, where, fmt in _jsonl_lines(f, data_cfg.format, bar):
                        buffer["payload"].append(payload)
                        buffer["source"].append(where)
                        buffer["fmt"].append(fmt)
                        count += 1
                        flush()
                else:
                    records = read_records(f if f.exists() else source, data_cfg.format, data_cfg.text_separator)
                    for record in records:
                        buffer["payload"].append(json.dumps(record, ensure_ascii=False))
                        buffer["source"].append(record.get("source", "?"))
                        buffer["fmt"].append("")
                        count += 1
                        flush()
                    del records
            per_file[str(source)] = count
        flush(force=True)
    if bar is not None:
        bar.close()
    return per_file


def _jsonl_lines(path: Path, fmt: str, bar):
    """``(line, "path:number", format)`` for each non-blank line of a JSON-lines file, split and decoded by the
    reader's own :func:`tuneforge.data.readers.jsonl_lines`; the format is detected on the file's first row, as
    the reader does (``!`` marks that row, ``=`` a format given by ``data.format``)."""
    from tuneforge.data.readers import detect_format, jsonl_lines, parse_json_line

    detected = None if fmt == "auto" else fmt
    for number, line in jsonl_lines(path, on_bytes=bar.update if bar is not None else None):
        where = f"{path}:{number}"
        if detected is None:
            detected = detect_format(parse_json_line(line, where), where)
            tag = f"{detected}!"
        else:
            tag = detected if fmt == "auto" else f"{detected}="
        yield line, where, tag


def _canon_features():
    from datasets import Features, Value

    return Features({"record": Value("large_string"), "source": Value("string"), "short": Value("int8"),
                     "html": Value("int8"), "norm": Value("int8"), "k1": Value("int64"), "k2": Value("int64"),
                     "task": Value("string")})


def _clean_settings(clean_cfg) -> dict:
    from tuneforge.data.clean import clean_settings

    return clean_settings(clean_cfg)


def _canon_batch(batch: dict, fmt: str, clean: dict) -> dict:
    """Worker: JSON rows → canonical records → cleaned (HTML, normalisation), with verdicts and dedup hashes."""
    from tuneforge.data.clean import clean_record, dedup_key, too_short
    from tuneforge.data.readers import parse_json_line, row_to_record

    out: dict[str, list] = {k: [] for k in ("record", "source", "short", "html", "norm", "k1", "k2", "task")}
    for payload, source, tag in zip(batch["payload"], batch["source"], batch["fmt"], strict=True):
        if tag:  # a raw JSON line, converted as the reader converts it
            record = row_to_record(parse_json_line(payload, source), source, tag.rstrip("!="),
                                   detected_from_first=fmt == "auto" and not tag.endswith("!"))
        else:
            record = json.loads(payload)
        if "text" not in record and "messages" not in record:
            # preference / KTO / prompt records have their own readers (the stages' own builds; eval reads them
            # directly): say so instead of failing on a missing key in the cleaning rules
            raise UserError(f"{record.get('source', source)}: prepared data holds text and chat records, not "
                            f"this record's kind (keys {sorted(record)[:6]})")
        record, html, norm = clean_record(record, clean)
        short = too_short(record, clean["min_length"])
        k1 = k2 = 0
        if clean["dedup"] and not short:
            digest = hashlib.blake2b(dedup_key(record).encode("utf-8"), digest_size=16).digest()
            k1, k2 = int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True)
        out["record"].append(json.dumps(record, ensure_ascii=False))
        out["source"].append(record.get("source", source))
        out["short"].append(short)
        out["html"].append(html)
        out["norm"].append(norm)
        out["k1"].append(k1)
        out["k2"].append(k2)
        task = record.get("task")
        out["task"].append(str(task) if task is not None else None)
    return out


# ----------------------------------------------------------------------------- SFT


def _sft_settings(data_cfg) -> dict:
    return {"system_prompt": data_cfg.system_prompt, "max_length": data_cfg.max_length,
            "train_on_prompt": data_cfg.train_on_prompt, "task_prefix": bool(getattr(data_cfg, "task_prefix", False))}


def _encode_sft_batch(batch: dict, indices: list[int], tokenizer, template, settings: dict) -> dict:
    """Worker: canonical records → SFT samples (the in-memory ``_sft_samples``, one record at a time)."""
    from tuneforge.data.mix import add_task_prefix
    from tuneforge.data.tokenize import encode_chat_samples

    out: dict[str, list] = {k: [] for k in ("input_ids", "labels", "rec", "rule", "turns", "extra", "stop",
                                            "trunc", "sup")}
    for payload, position in zip(batch["record"], indices, strict=True):
        record = json.loads(payload)
        if "messages" not in record:
            raise UserError(
                f"{record.get('source', '?')}: a plain-text record, but stage 'sft' needs conversations "
                "(chat or Alpaca records). For raw text use stage: pt"
            )
        if settings["task_prefix"]:
            record = add_task_prefix(record)
        messages = record["messages"]
        if settings["system_prompt"] and messages[0]["role"] != "system":
            record = {**record, "messages": [{"role": "system", "content": settings["system_prompt"]}, *messages]}
        encoded = encode_chat_samples(record, tokenizer, template, settings["max_length"],
                                      settings["train_on_prompt"])
        for sample in encoded:
            if not sample["supervised"]:
                continue
            out["input_ids"].append(sample["input_ids"])
            out["labels"].append(sample["labels"])
            out["rec"].append(position)
            out["rule"].append(sample["rule"])
            out["turns"].append(len(sample["turns"]))
            out["extra"].append(sample["extra_tokens"])
            out["stop"].append(int(sample["stop_appended"]))
            out["trunc"].append(int(sample["truncated"]))
            out["sup"].append(sample["supervised"])
    return out


def _sample_features():
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "rec": Value("int64"), "rule": Value("string"), "turns": Value("int32"),
                     "extra": Value("int32"), "stop": Value("int8"), "trunc": Value("int8"), "sup": Value("int32")})


def _encode_split(part: _Part, indices: list[int], folder: Path, name: str, fn, features, num_proc, desc: str):
    """Run ``fn`` over the canonical records ``indices`` of ``part`` (in order); returns the shard file names."""
    dataset = _from_files(folder, part.files).select(indices) if indices else None
    if dataset is None:
        return []
    procs = _procs(num_proc, len(indices))
    result = dataset.map(fn, batched=True, batch_size=_BATCH, with_indices=True, num_proc=procs,
                         remove_columns=dataset.column_names, cache_file_name=str(folder / f"{name}.arrow"),
                         new_fingerprint=f"{name}-{len(indices)}", desc=desc, features=features)
    return _shard_files(result, folder)


def _build_sft(data_cfg, tokenizer, template, seed, packed, folder, train, indices, eval_part, eval_indices,
               stats, meta, num_proc, progress) -> None:
    from tuneforge.data.packing import pack_plan

    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "SFT masks need a fast tokenizer (offset mapping); this tokenizer is a slow one. "
            "Use a model whose tokenizer has a tokenizer.json"
        )
    settings = _sft_settings(data_cfg)
    fn = functools.partial(_encode_sft_batch, tokenizer=tokenizer, template=template, settings=settings)
    files = _encode_split(train, indices, folder, "samples-train", fn, _sample_features(), num_proc,
                          "render, tokenize, mask (train)")
    table = _open_table(folder, files) if files else None
    stats.update(_sft_stats(table, len(indices), data_cfg, template, "training"))
    if data_cfg.mix:  # replay (data/mix.py): in memory, as the reference does; the result is stored as Arrow
        files = _mix(data_cfg, tokenizer, template, seed, folder, table, stats)
        table = _open_table(folder, files)
    eval_files: list[str] = []
    if eval_indices:
        eval_files = _encode_split(eval_part, eval_indices, folder, "samples-eval", fn, _sample_features(), num_proc,
                                   "render, tokenize, mask (eval)")
        eval_table = _open_table(folder, eval_files) if eval_files else None
        eval_stats = _sft_stats(eval_table, len(eval_indices), data_cfg, template, "eval")
        stats["eval_dropped_no_supervised"] = eval_stats["dropped_no_supervised"]
        if eval_part.tasks is not None and any(eval_part.tasks[i] is not None for i in eval_indices):
            meta["by_task"] = _by_task(data_cfg, tokenizer, template, packed, folder, eval_part, eval_indices)
    meta["files"]["train"] = files
    meta["files"]["eval"] = eval_files
    if packed:
        meta["files"]["train_plan"] = _save_plan(folder, "plan-train", pack_plan(_lengths(table), data_cfg.max_length))
        if eval_files:
            meta["files"]["eval_plan"] = _save_plan(folder, "plan-eval",
                                                    pack_plan(_lengths(_open_table(folder, eval_files)),
                                                              data_cfg.max_length))


def _sft_stats(table, n_records: int, data_cfg, template, what: str) -> dict:
    """The in-memory ``_sft_samples`` statistics, from the sample columns."""
    import pyarrow.compute as pc

    from tuneforge.data.samples import distribution as _distribution

    rows = table.num_rows if table is not None else 0
    if not rows:
        raise UserError(
            f"no {what} sample is left: all {n_records} conversations lost every supervised token "
            f"({n_records} dropped after truncation to data.max_length={data_cfg.max_length}, or with no assistant "
            f"turn). Raise data.max_length, shorten the prompts, or check the chat template ({template.name!r}) "
            "with `tuneforge data preview`"
        )
    lengths = _lengths(table)
    tokens = int(lengths.sum())
    supervised = int(pc.sum(table.column("sup")).as_py())
    distinct = len(pc.unique(table.column("rec")))
    rules = table.select(["rule", "turns"]).group_by("rule").aggregate([("turns", "sum")])
    mask_rules = {r: int(t) for r, t in zip(rules.column("rule").to_pylist(), rules.column("turns_sum").to_pylist(),
                                            strict=True)}
    return {
        "samples": rows,
        "dropped_no_supervised": n_records - distinct,
        "truncated": int(pc.sum(table.column("trunc")).as_py()),
        "length": _distribution_np(lengths) if len(lengths) else _distribution([]),
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / max(1, tokens), 4),
        "mask_rules": dict(sorted(mask_rules.items())),
        "extra_tokens": int(pc.sum(table.column("extra")).as_py()),
        "stop_appended": int(pc.sum(table.column("stop")).as_py()),
    }


def _distribution_np(values) -> dict[str, float]:
    """``build._distribution`` on a numpy array (same rounding and percentile rule)."""
    import numpy as np

    ordered = np.sort(np.asarray(values, dtype=np.int64))
    n = len(ordered)

    def pct(q: float) -> int:
        return int(ordered[min(n - 1, int(q * (n - 1) + 0.5))])

    return {"min": int(ordered[0]), "mean": round(int(ordered.sum()) / n, 1), "p50": pct(0.5), "p95": pct(0.95),
            "max": int(ordered[-1])}


def _mix(data_cfg, tokenizer, template, seed, folder, table, stats) -> list[str]:
    from tuneforge.data.mix import mix_in
    from tuneforge.data.samples import sft_samples as _sft_samples

    samples = [{"input_ids": i, "labels": lab} for i, lab in zip(table.column("input_ids").to_pylist(),
                                                                 table.column("labels").to_pylist(), strict=True)]
    samples, stats["mix"] = mix_in(samples, data_cfg, tokenizer, lambda recs: _sft_samples(
        recs, tokenizer, template, data_cfg, "mix")[0], seed)
    stats["samples"], stats["tokens"] = len(samples), sum(len(s["input_ids"]) for s in samples)
    return [_write_rows(folder, "samples-train-mixed", samples)]


def _by_task(data_cfg, tokenizer, template, packed, folder, part, indices) -> dict[str, dict]:
    """Multi-task eval rows per task (the in-memory ``eval_rows_by_task``), stored one Arrow file per task."""
    from tuneforge.data.mix import eval_rows_by_task, prepare_task_records
    from tuneforge.data.packing import pack_rows
    from tuneforge.data.samples import sft_samples as _sft_samples

    canon = _open_table(folder, part.files, columns=["record"]).column("record")
    records = prepare_task_records([json.loads(canon[i].as_py()) for i in indices], data_cfg)
    rows = eval_rows_by_task(records, lambda recs: _sft_samples(recs, tokenizer, template, data_cfg, "eval")[0],
                             (lambda r: pack_rows(r, data_cfg.max_length)) if packed else None)
    return {task: _write_rows(folder, f"by-task-{k}", task_rows) for k, (task, task_rows) in enumerate(rows.items())}


# ----------------------------------------------------------------------------- pretraining


def _encode_pt_batch(batch: dict, indices: list[int], tokenizer, eos: int) -> dict:
    """Worker: records → each document's token ids followed by EOS (``pretrain_blocks``' stream)."""
    from tuneforge.data.readers import record_text

    texts = [record_text(json.loads(payload)) for payload in batch["record"]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return {"ids": [list(doc) + [eos] for doc in ids]}


def _build_pt(data_cfg, tokenizer, folder, train, indices, eval_part, eval_indices, stats, meta, num_proc,
              progress) -> None:
    from datasets import Features, Sequence, Value

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("pretraining joins documents with the EOS token, but this tokenizer has no eos_token")
    fn = functools.partial(_encode_pt_batch, tokenizer=tokenizer, eos=eos)  # (batch, indices) like the SFT one
    features = Features({"ids": Sequence(Value("int32"))})
    block = data_cfg.max_length

    def one(part, idx, name, what):
        files = _encode_split(part, idx, folder, f"docs-{name}", fn, features, num_proc,
                              f"tokenize ({name})")
        table = _open_table(folder, files)
        blocks = int(_lengths(table, "ids").sum()) // block
        if not blocks:
            raise UserError(
                f"the {what} text ({len(idx)} documents) is shorter than one block of data.max_length={block} "
                "tokens; give more text or lower data.max_length"
            )
        return files, blocks

    files, blocks = one(train, indices, "train", "training")
    n_tokens = blocks * block
    stats.update({
        "samples": blocks,
        "dropped_no_supervised": 0,
        "truncated": 0,
        "length": {"min": block, "mean": round(float(block), 1), "p50": block, "p95": block, "max": block},
        "tokens": n_tokens,
        "supervised_tokens": n_tokens,
        "supervised_share": 1.0,
    })
    meta["files"]["train"] = files
    meta["files"]["eval"] = one(eval_part, eval_indices, "eval", "eval")[0] if eval_indices else []


# ----------------------------------------------------------------------------- files


def _procs(num_proc, n: int) -> int | None:
    procs = int(num_proc) if num_proc else default_num_proc(n)
    procs = max(1, min(procs, max(1, n // _BATCH) if n >= _BATCH else 1))
    return procs if procs > 1 else None


def _from_file(path: Path):
    from datasets import Dataset

    return Dataset.from_file(str(path))


def _from_files(folder: Path, files: list[str]):
    from datasets import concatenate_datasets

    parts = [_from_file(folder / f) for f in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _shard_files(dataset, folder: Path) -> list[str]:
    """The Arrow files holding ``dataset`` (one per worker), in order, relative to ``folder``."""
    names = [Path(c["filename"]).name for c in dataset.cache_files]
    for name in names:
        if not (folder / name).is_file():
            raise RuntimeError(f"datasets wrote {name} outside the build directory")
    return names


def _open_table(folder: Path, files: list[str], columns: list[str] | None = None):
    """The memory-mapped Arrow table of ``files`` (zero-copy: pages are read on access)."""
    import pyarrow as pa

    tables = []
    for name in files:
        # The map stays open as long as the table's buffers live (closing it would unmap them).
        table = pa.ipc.open_stream(pa.memory_map(str(Path(folder) / name))).read_all()
        tables.append(table.select(columns) if columns else table)
    if not tables:
        return None
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def _lengths(table, column: str = "input_ids"):
    import numpy as np
    import pyarrow.compute as pc

    if table is None:
        return np.zeros(0, dtype=np.int64)
    return _np(pc.list_value_length(table.column(column))).astype(np.int64)


def _np(values):
    """A numpy view of an Arrow integer column without nulls (``to_numpy`` would import pandas: ~2 s)."""
    import numpy as np
    import pyarrow as pa

    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if isinstance(array, pa.ChunkedArray):  # no chunks at all
        return np.zeros(0, dtype=np.int64)
    dtype = np.dtype(array.type.to_pandas_dtype())
    return np.frombuffer(array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _write_rows(folder: Path, name: str, rows: list[dict]) -> str:
    """Rows (dicts of int lists) as one Arrow stream file; returns its name."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows) if rows else pa.table({"input_ids": pa.array([], pa.list_(pa.int32())),
                                                               "labels": pa.array([], pa.list_(pa.int32()))})
    with pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return f"{name}.arrow"


def _save_plan(folder: Path, name: str, plan: list[list[int]]) -> str:
    import pyarrow as pa

    table = pa.table({"members": pa.array(plan, type=pa.list_(pa.int64()))})
    with pa.OSFile(str(folder / f"{name}.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=65536)
    return f"{name}.arrow"


def _save_indices(folder: Path, name: str, indices: list[int]) -> str:
    import numpy as np

    np.save(folder / f"{name}.npy", np.asarray(indices, dtype=np.int64))
    return f"{name}.npy"


@contextlib.contextmanager
def _progress_bars(on: bool):
    import datasets

    was = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if on else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was else datasets.disable_progress_bars)()


def _bar(on: bool, desc: str, unit: str):
    if not on:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit=unit, unit_scale=True, unit_divisor=1024, file=sys.stderr)


# ----------------------------------------------------------------------------- opening an entry


def _open(folder: Path, meta: dict, data_cfg, stage: str, seed: int, batch_size: int):
    """The :class:`DataBundle` of a built entry (statistics of the rows computed on the Arrow columns)."""
    from tuneforge.data.packing import length_grouped_order, padding_share_of_lengths
    from tuneforge.data.samples import DataBundle

    folder = Path(folder)
    files = meta["files"]
    stats = json.loads(json.dumps(meta["stats"]))
    packed = bool(meta["packed"])
    if stage == "pt":
        train = BlockRows(folder, files["train"], data_cfg.max_length)
        evaluation = BlockRows(folder, files["eval"], data_cfg.max_length) if files.get("eval") else None
    elif packed:
        train = PackedRows(folder, files["train"], files["train_plan"])
        evaluation = PackedRows(folder, files["eval"], files["eval_plan"]) if files.get("eval") else None
    else:
        train = SampleRows(folder, files["train"])
        evaluation = SampleRows(folder, files["eval"]) if files.get("eval") else None
    by_task = None
    if meta.get("by_task"):
        by_task = {task: RowFile(folder, name) for task, name in meta["by_task"].items()}
    stats["packed"] = packed
    stats["rows"] = len(train)
    stats["eval_rows"] = len(evaluation) if evaluation else 0
    lengths = [int(n) for n in train.lengths()]
    order = length_grouped_order(lengths, batch_size, seed) if stage == "sft" and not packed else None
    stats["padding_share"] = round(padding_share_of_lengths(lengths, batch_size, order), 4)
    stats["padding_share_batch_size"] = batch_size
    bundle = DataBundle(train=train, eval=evaluation, stats=stats, packed=packed, eval_by_task=by_task)
    bundle.records = CanonRecords(folder, meta["records"]["files"], meta["records"]["indices"])
    bundle.cache = None
    return bundle


class _ArrowRows(Sequence):
    """A map-style sequence of row dicts over memory-mapped Arrow files (pickled as their paths)."""

    def __init__(self, folder: Path, *names):
        self.folder = Path(folder)
        self.names = names
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def __getstate__(self):
        return {"folder": str(self.folder), "names": self.names, "extra": self._extra()}

    def __setstate__(self, state):
        self.folder = Path(state["folder"])
        if not self.folder.is_dir():
            raise UserError(f"prepared data {self.folder} is not on this machine: with several nodes, set "
                            "data.cache_dir to a directory every node sees (shared storage)")
        self.names = tuple(state["names"])
        self.__dict__.update(state["extra"])
        self._open()

    def _extra(self) -> dict:
        return {}

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(index)
        return self._row(index)

    def _row(self, index: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        for i in range(len(self)):
            yield self._row(i)

    def __eq__(self, other):
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} rows in {self.folder})"

    def lengths(self):
        """Tokens per row (a numpy array)."""
        raise NotImplementedError


class SampleRows(_ArrowRows):
    """Unpacked samples: ``{"input_ids", "labels"}`` per row."""

    def __init__(self, folder: Path, files: list[str]):
        super().__init__(folder, tuple(files))

    def _open(self) -> None:
        self.table = _open_table(self.folder, list(self.names[0]), ["input_ids", "labels"])
        self._ids, self._labels = self.table.column("input_ids"), self.table.column("labels")

    def __len__(self) -> int:
        return self.table.num_rows

    def _row(self, index: int) -> dict:
        return {"input_ids": self._ids[index].as_py(), "labels": self._labels[index].as_py()}

    def rows(self, indices) -> list[dict]:
        """Several rows at once, each read where it lies. (Not ``Table.take``: on a column of many chunks — a
        ``datasets`` shard holds one per 1,000 rows — it concatenated the whole column first, copying every sample
        into memory on each call: ~65 ms per packed row and +300 MB resident at 100k records.)"""
        return [self._row(int(i)) for i in indices]

    def lengths(self):
        return _lengths(self.table)


class PackedRows(_ArrowRows):
    """Packed rows assembled on access from the samples and the stored first-fit-decreasing plan."""

    def __init__(self, folder: Path, files: list[str], plan: str):
        super().__init__(folder, tuple(files), plan)

    def _open(self) -> None:
        self.samples = SampleRows(self.folder, list(self.names[0]))
        self.plan = _open_table(self.folder, [self.names[1]]).column("members")

    def __len__(self) -> int:
        return len(self.plan)

    def _row(self, index: int) -> dict:
        from tuneforge.data.packing import build_row

        return build_row(self.samples.rows(self.plan[index].as_py()))

    def lengths(self):
        import numpy as np

        if not len(self.plan):
            return np.zeros(0, dtype=np.int64)
        plan = self.plan.combine_chunks()
        offsets = _np(plan.offsets)
        members = _np(plan.flatten())
        return np.add.reduceat(self.samples.lengths()[members], offsets[:-1]).astype(np.int64)


class BlockRows(_ArrowRows):
    """Pretraining blocks: the documents' ids (each + EOS) as one stream cut into ``block`` tokens."""

    def __init__(self, folder: Path, files: list[str], block: int):
        self.block = int(block)
        super().__init__(folder, tuple(files))

    def _extra(self) -> dict:
        return {"block": self.block}

    def _open(self) -> None:
        import numpy as np

        self.table = _open_table(self.folder, list(self.names[0]), ["ids"])
        self._docs = self.table.column("ids")
        self._ends = np.cumsum(_lengths(self.table, "ids"))
        self._n = int(self._ends[-1]) // self.block if len(self._ends) else 0

    def __len__(self) -> int:
        return self._n

    def _row(self, index: int) -> dict:
        import numpy as np

        start, stop = index * self.block, (index + 1) * self.block
        doc = int(np.searchsorted(self._ends, start, side="right"))
        ids: list[int] = []
        while len(ids) < self.block:
            begin = int(self._ends[doc - 1]) if doc else 0
            values = self._docs[doc].as_py()
            ids.extend(values[max(0, start - begin): stop - begin])
            doc += 1
        return {"input_ids": ids, "labels": list(ids)}

    def lengths(self):
        import numpy as np

        return np.full(self._n, self.block, dtype=np.int64)


class RowFile(_ArrowRows):
    """Rows stored whole (multi-task eval rows, mixed samples): the dicts as written."""

    def __init__(self, folder: Path, name: str):
        super().__init__(folder, name)

    def _open(self) -> None:
        self.table = _open_table(self.folder, [self.names[0]])

    def __len__(self) -> int:
        return self.table.num_rows

    def _row(self, index: int) -> dict:
        return self.table.slice(index, 1).to_pylist()[0]

    def lengths(self):
        return _lengths(self.table)


class CanonRecords(Sequence):
    """The cleaned training records (before task weighting) as canonical dicts, read on access."""

    def __init__(self, folder: Path, files: list[str], indices_file: str):
        import numpy as np

        self.folder, self.files, self.indices_file = Path(folder), list(files), indices_file
        self._column = None
        self._indices = np.load(self.folder / indices_file, mmap_mode="r")

    def __getstate__(self):
        return {"folder": str(self.folder), "files": self.files, "indices_file": self.indices_file}

    def __setstate__(self, state):
        self.__init__(Path(state["folder"]), state["files"], state["indices_file"])

    def _records(self):
        if self._column is None:
            self._column = _open_table(self.folder, self.files, ["record"]).column("record")
        return self._column

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return json.loads(self._records()[int(self._indices[index])].as_py())
