"""Streaming pretraining data: corpora larger than memory, read, tokenized and cut into blocks while training.

``data.streaming: true`` (stage ``pt``; ``train.max_steps`` required) makes ``bundle.train`` a
:class:`StreamingBlocks`: an iterable dataset that reads the training files document by document (``.jsonl``
line by line, ``.txt`` split on ``data.text_separator`` in 1 MiB reads; other formats are read whole), cleans each
record (HTML, normalisation, min length — exact dedup needs the whole corpus and is not applied), tokenizes in
batches and cuts the EOS-joined token stream into blocks of ``data.max_length`` exactly as the prepared pipeline
does. Blocks are shuffled in windows of ``data.shuffle_buffer`` rows, each window permuted with
``Random(seed, window)``; at the end of the corpus the stream starts over (the next epoch, other permutations).
Memory holds one window, whatever the corpus size.

Exact resume: the order is a function of the row position alone. At every checkpoint
:class:`StreamStateCallback` writes ``data_state.json`` (rows consumed, and where the current window starts in the
files: file, byte offset, leftover tokens) into the checkpoint; on resume the stream seeks there, re-reads one
window and skips into it — the rows after the checkpoint are those of an uninterrupted run. Without the file (a
checkpoint written by something else) the stream replays from the start up to the position (exact, slower).
Evaluation data (``data.eval``) is prepared (cached) as usual.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

STATE_FILE = "data_state.json"
_READ = 2**20
_TOKENIZE_BATCH = 256


@dataclass
class Position:
    """Where a window starts: the file, the byte offset of its next document, tokens left over from the last
    block, and how many times the corpus was read before (the epoch)."""

    file: int = 0
    offset: int = 0
    carry: list[int] = field(default_factory=list)
    epoch: int = 0

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {"file": self.file, "offset": self.offset, "carry": list(self.carry), "epoch": self.epoch}

    @classmethod
    def from_dict(cls, data: dict) -> Position:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["file"]), int(data["offset"]), [int(t) for t in data["carry"]], int(data["epoch"]))


def build_streaming(data_cfg: Any, stage: str, tokenizer: Any, template: Any, seed: int, packing: bool | None = None,
                    batch_size: int = 4) -> Any:
    """The bundle of a streaming run: ``train`` a :class:`StreamingBlocks`, ``eval`` prepared blocks of ``data.eval``.

    Raises:
        UserError: a stage other than ``pt``, ``data.eval_split`` (a stream has no count to split), a tokenizer
            without EOS, a missing file.
    """
    from tuneforge.data.samples import DataBundle

    if stage != "pt":
        raise UserError(f"data.streaming is for stage pt, not {stage!r}; SFT data is prepared (cached, memory-mapped)"
                        " — drop data.streaming")
    if data_cfg.eval_split:
        raise UserError("data.eval_split needs the whole corpus counted; with data.streaming give data.eval "
                        "(a held-out file) instead")
    if tokenizer.eos_token_id is None:
        raise UserError("pretraining joins documents with the EOS token, but this tokenizer has no eos_token")
    files = stream_files(data_cfg.train)
    train = StreamingBlocks(files, tokenizer, data_cfg.max_length, data_cfg.shuffle_buffer, seed,
                            fmt=data_cfg.format, separator=data_cfg.text_separator,
                            clean=data_cfg.clean.model_dump() if hasattr(data_cfg.clean, "model_dump") else None)
    evaluation = None
    stats: dict[str, Any] = {"streaming": True, "shuffle_buffer": data_cfg.shuffle_buffer,
                             "block": data_cfg.max_length, "files": [str(f) for f in files], "packed": False}
    if data_cfg.eval:
        from tuneforge.data.prepared import prepare

        eval_cfg = data_cfg.model_copy(update={"train": _sources(data_cfg.eval), "eval": None, "streaming": False})
        prepared = prepare(eval_cfg, "pt", tokenizer, template, seed, batch_size=batch_size)
        evaluation = prepared.train
        stats["eval_rows"] = len(evaluation)
    bundle = DataBundle(train=train, eval=evaluation, stats=stats, packed=False)
    bundle.records = _Head(train)  # data preview: the first documents, never the whole corpus
    return bundle


class _Head:
    """``records[:n]``: the stream's first ``n`` documents."""

    def __init__(self, stream: StreamingBlocks):
        self.stream = stream

    def __getitem__(self, index):
        if not isinstance(index, slice) or index.stop is None:
            raise TypeError("only records[:n] is available for a stream")
        return self.stream.head_records(index.stop)[index]


def _sources(spec) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def stream_files(sources: list[str]) -> list[Path]:
    """The files a stream reads, in order (directories expanded, sorted)."""
    from tuneforge.data.readers import FILE_SUFFIXES

    files: list[Path] = []
    for source in sources:
        p = Path(source)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
            if not found:
                raise UserError(f"{p}: directory has no data files ({', '.join(FILE_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"data file not found: {source} (data.streaming reads local files)")
    return files


def _base():
    try:
        from torch.utils.data import IterableDataset
    except ImportError:  # pragma: no cover - torch is a dependency of training
        return object
    return IterableDataset


class StreamingBlocks(_base()):
    """An iterable of ``{"input_ids", "labels"}`` blocks read from files on the fly (see the module docstring).

    Attributes:
        rows_done: rows before the first one the next iteration yields (set by :meth:`resume`).
    """

    def __init__(self, files: list[Path], tokenizer: Any, block: int, buffer: int, seed: int, fmt: str = "auto",
                 separator: str = "\n\n\n", clean: dict | None = None):
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.block = int(block)
        self.buffer = int(buffer)
        self.seed = int(seed)
        self.fmt = fmt
        self.separator = separator
        self.clean = clean
        self.rows_done = 0
        self._start: Position | None = None  # the window start of rows_done, when known
        self.starts: dict[int, Position] = {}  # window index -> where it starts (recent windows)

    # ------------------------------------------------------------------ resume

    def resume(self, rows: int, start: Position | None = None) -> None:
        """Continue at row ``rows`` (the next iteration yields row ``rows`` first). ``start`` is where its window
        starts (from ``data_state.json``); without it the stream replays up to there."""
        self.rows_done = int(rows)
        self._start = start

    def state(self, rows: int) -> dict:
        """What a checkpoint taken after ``rows`` rows needs to continue exactly (``data_state.json``)."""
        window = rows // self.buffer
        start = self.starts.get(window)
        return {"rows": rows, "window": window, "buffer": self.buffer, "block": self.block, "seed": self.seed,
                "files": [str(f) for f in self.files], "start": start.to_dict() if start else None}

    # ------------------------------------------------------------------ iteration

    def __getitem__(self, index):
        """Only slices from the start (``data preview``: the first rows of the stream, in its shuffled order)."""
        if not isinstance(index, slice) or index.start not in (None, 0) or index.stop is None:
            raise TypeError("a stream is iterable only; stream[:n] gives its first n rows")
        import itertools

        fresh = StreamingBlocks(self.files, self.tokenizer, self.block, self.buffer, self.seed, self.fmt,
                                self.separator, self.clean)
        return list(itertools.islice(iter(fresh), index.stop))[index]

    def head_records(self, n: int) -> list[dict]:
        """The first ``n`` cleaned documents as text records (what ``data preview`` lists)."""
        out: list[dict] = []
        for f in self.files:
            for text, _ in self._documents(f, 0):
                out.append({"text": text, "source": str(f)})
                if len(out) >= n:
                    return out
        return out

    def __iter__(self):
        window, skip = divmod(self.rows_done, self.buffer)
        if self._start is not None:
            position, first = self._start, window
        else:  # replay from the beginning up to the window (exact; reads what came before once)
            position, first = Position(), 0
        for w, rows in self._windows(position, first):
            if w < window:
                continue
            order = list(range(len(rows)))
            random.Random(self.seed * 1_000_003 + w).shuffle(order)
            for k in order[skip if w == window else 0:]:
                ids = rows[k].tolist()
                yield {"input_ids": ids, "labels": list(ids)}

    def _windows(self, position: Position, window: int):
        """``(window index, blocks)`` from ``position`` on, forever: every window holds ``buffer`` blocks; at the end
        of the corpus the leftover tokens are dropped (as the prepared pipeline drops them) and reading starts over,
        the open window filling up with the next pass's blocks."""
        cut = _Cutter(self, position, window)
        file_index, offset = position.file, position.offset
        yield from cut.drain(file_index, offset)  # a resumed window may start with whole blocks left over
        while True:
            made = cut.made
            full_pass = file_index == 0 and offset == 0
            for f in range(file_index, len(self.files)):
                texts: list[str] = []
                ends: list[int] = []
                for text, end in self._documents(self.files[f], offset if f == file_index else 0):
                    texts.append(text)
                    ends.append(end)
                    if len(texts) == _TOKENIZE_BATCH:
                        yield from cut.feed(texts, ends, f)
                        texts, ends = [], []
                if texts:
                    yield from cut.feed(texts, ends, f)
            if full_pass and cut.made == made:
                raise UserError(f"the streamed text is shorter than one block of data.max_length={self.block} "
                                "tokens; give more text or lower data.max_length")
            cut.next_pass()
            file_index, offset = 0, 0

    def _remember(self, window: int, start: Position) -> None:
        self.starts[window] = start
        for old in [w for w in self.starts if w < window - 64]:
            del self.starts[old]

    def _documents(self, path: Path, offset: int):
        """``(text, end offset)`` of each cleaned document of ``path`` from byte ``offset`` on."""
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from self._jsonl(path, offset)
        elif suffix == ".txt":
            yield from self._txt(path, offset)
        else:  # read whole (csv, parquet, json): the offset counts records
            from tuneforge.data.readers import read_records

            records = read_records(path, self.fmt, self.separator)
            for k in range(offset, len(records)):
                text = self._cleaned(records[k])
                if text is not None:
                    yield text, k + 1

    def _jsonl(self, path: Path, offset: int):
        from tuneforge.data.readers import detect_format, rows_to_records

        detected = None if self.fmt == "auto" else self.fmt
        with open(path, "rb") as handle:
            if detected is None:  # the format comes from the file's first row, wherever the stream resumes
                for raw in handle:
                    if raw.strip():
                        detected = detect_format(_json_row(raw, path, 1), f"{path}")
                        break
            handle.seek(offset)
            position = offset
            for raw in handle:
                position += len(raw)
                if not raw.strip():
                    continue
                where = f"{path}@{position - len(raw)}"
                record = rows_to_records([(where, _json_row(raw, path, where))], detected)[0]
                text = self._cleaned(record)
                if text is not None:
                    yield text, position

    def _txt(self, path: Path, offset: int):
        separator = self.separator.encode("utf-8")
        with open(path, "rb") as handle:
            handle.seek(offset)
            pending, base = b"", offset
            while True:
                chunk = handle.read(_READ)
                pending += chunk
                parts = pending.split(separator) if separator else [pending]
                complete = parts[:-1] if chunk else parts
                for part in complete:
                    base += len(part) + len(separator)
                    text = part.decode("utf-8", errors="strict").removeprefix("\ufeff").strip()
                    if text:
                        cleaned = self._cleaned({"text": text})
                        if cleaned is not None:
                            yield cleaned, min(base, path.stat().st_size)
                if not chunk:
                    return
                pending = parts[-1]

    def _cleaned(self, record: dict) -> str | None:
        """The record's text after cleaning, or None when the min-length rule drops it."""
        from tuneforge.data.clean import clean_record, clean_settings, too_short
        from tuneforge.data.readers import record_text

        cfg = clean_settings(self.clean)
        record = clean_record(record, cfg)[0]
        if too_short(record, cfg["min_length"]):
            return None
        return record_text(record)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["starts"] = {}
        return state


class _Cutter:
    """The EOS-joined token stream cut into blocks, grouped into windows; remembers where each window starts."""

    def __init__(self, owner: StreamingBlocks, position: Position, window: int):
        self.owner = owner
        self.stream: list[int] = list(position.carry)
        self.blocks: list[Any] = []
        self.window = window
        self.epoch = position.epoch
        self.made = 0
        owner._remember(window, position)

    def feed(self, texts: list[str], ends: list[int], file: int):
        """Tokenize a batch of documents; yield every window completed on the way."""
        owner = self.owner
        eos = owner.tokenizer.eos_token_id
        for doc, end in zip(owner.tokenizer(texts, add_special_tokens=False)["input_ids"], ends, strict=True):
            self.stream.extend(doc)
            self.stream.append(eos)
            yield from self.drain(file, end)

    def drain(self, file: int, end: int):
        """Cut every full block of the stream (the document ending at byte ``end`` of ``file`` is in it)."""
        import numpy as np

        owner, block = self.owner, self.owner.block
        while len(self.stream) >= block:
            self.blocks.append(np.asarray(self.stream[:block], dtype=np.int32))
            del self.stream[:block]
            self.made += 1
            if len(self.blocks) == owner.buffer:
                done, self.blocks = self.blocks, []
                # The next window starts after this document, with the tokens it left over.
                owner._remember(self.window + 1, Position(file, end, list(self.stream), self.epoch))
                yield self.window, done
                self.window += 1

    def next_pass(self) -> None:
        """The end of the corpus: drop the tokens short of a block; the next pass starts from the first file."""
        self.stream = []
        self.epoch += 1
        if not self.blocks:  # the next window starts exactly at the new pass
            self.owner._remember(self.window, Position(0, 0, [], self.epoch))


def _json_row(raw: bytes, path: Path, where) -> dict:
    try:
        row = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} ({where}): malformed JSON line ({exc}); each line must be one complete JSON "
                        "object") from None
    if not isinstance(row, dict):
        raise UserError(f"{path} ({where}): expected a JSON object (key: value), got {type(row).__name__}")
    return row


# ----------------------------------------------------------------------------- checkpoints


def rows_per_step(args: Any) -> int:
    """Rows one optimizer step consumes across all ranks (per-device batch × accumulation × processes)."""
    return int(args.per_device_train_batch_size) * int(args.gradient_accumulation_steps) * int(args.world_size)


class _StreamState:
    """Saves the stream's position with every checkpoint and restores it when training resumes.

    Add it to the Trainer (``callbacks=[StreamStateCallback(bundle.train)]``). It sets
    ``args.ignore_data_skip`` (the Trainer would otherwise fast-forward by reading every consumed batch again).
    """

    def __init__(self, dataset: StreamingBlocks):
        self.dataset = dataset

    def on_init_end(self, args, state, control, **kwargs):
        args.ignore_data_skip = True  # the stream seeks itself (on_train_begin)

    def on_train_begin(self, args, state, control, **kwargs):
        args.ignore_data_skip = True
        if state.global_step:
            rows = state.global_step * rows_per_step(args)
            saved = read_state(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            start = None
            if saved is not None and saved.get("rows") == rows and saved.get("start") is not None \
                    and saved.get("buffer") == self.dataset.buffer and saved.get("block") == self.dataset.block:
                start = Position.from_dict(saved["start"])
            self.dataset.resume(rows, start)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            from tuneforge.utils import atomic_write_json

            atomic_write_json(folder / STATE_FILE, self.dataset.state(state.global_step * rows_per_step(args)))


_CALLBACK: list = []


def __getattr__(name: str):
    # StreamStateCallback subclasses transformers' TrainerCallback, built on first use (importing transformers
    # takes seconds; `import tuneforge.data.stream` stays light).
    if name == "StreamStateCallback":
        if not _CALLBACK:
            from transformers import TrainerCallback

            _CALLBACK.append(type("StreamStateCallback", (_StreamState, TrainerCallback),
                                  {"__doc__": _StreamState.__doc__, "__module__": __name__}))
        return _CALLBACK[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_state(checkpoint: Path) -> dict | None:
    """The ``data_state.json`` of a checkpoint, or None."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
