"""Readers: every supported data format becomes one canonical record shape.

Canonical records (see docs/architecture.md)::

    {"text": "...", "source": "data/a.txt#3"}
    {"messages": [{"role": "user", "content": "..."}, ...], "source": "data/b.jsonl:12"}

``source`` is ``file:line`` for JSON lines and ``file#n`` (1-based record number) otherwise; every error names it.
Supported inputs: ``.txt`` (documents split on a separator), ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet``
rows in text, Alpaca or chat (``messages`` / ``conversations``, role/content or ShareGPT from/value) shape,
a directory of such files, and a hub dataset ``owner/name`` (through ``datasets``) when no local path of that
name can be meant (``hf:owner/name`` forces the hub). Chat turns may carry OpenAI ``tool_calls`` (assistant) and
the ``tool`` role, ShareGPT ``function_call``/``observation`` turns become the same, a record's ``tools`` list
travels with it, and a message's ``reasoning_content`` is folded into its content as ``<think>...</think>``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from tuneforge.config.formats import DATA_FORMATS, FORMAT_CHOICES
from tuneforge.errors import UserError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool": "tool",
    "observation": "tool",  # ShareGPT: a tool's result
    "function_call": "assistant",  # ShareGPT: an assistant tool call (value: {"name", "arguments"} JSON)
}
ALLOWED_ROLES = tuple(ROLE_MAP)
# Names datasets use for a message's reasoning; it is folded into the content as <think>...</think>.
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# A hub dataset id: "name" or "owner/name" (no deeper path, no file suffix).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_records(path: str | Path, format: str = "auto", text_separator: str = "\n\n\n") -> list[dict]:
    """Read one file, directory or hub dataset into canonical records.

    Args:
        path: a local file (``.txt``, ``.jsonl``, ``.json``, ``.csv``, ``.parquet``), a directory of such
            files (read in sorted order), or a hub dataset name (``owner/name``; split ``train``) when no local
            path of that name exists.
        format: ``auto`` (detected from the first record's keys) or a selectable format of
            :data:`tuneforge.config.formats.DATA_FORMATS` (``text``, ``alpaca``, ``chat``).
        text_separator: the document separator inside ``.txt`` files.

    Returns:
        A non-empty list of canonical records, each with a ``source``.

    Raises:
        UserError: file not found, empty file, non-UTF-8 bytes (byte offset and line), malformed JSON (file and
            line), a missing field (field name and record), an unknown role (role, record, allowed roles), an
            unreachable hub.
    """
    if format not in FORMAT_CHOICES:
        raise UserError(f"data.format {format!r} is not known; expected one of {', '.join(FORMAT_CHOICES)}")
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise UserError(f"{p}: directory has no data files ({', '.join(FILE_SUFFIXES)})")
        records: list[dict] = []
        for f in files:
            records.extend(read_records(f, format, text_separator))
        return records
    if p.is_file():
        return _read_file(p, format, text_separator)
    name = str(path)
    if name.startswith("hf:"):  # explicitly a hub dataset
        return _read_hub(name[3:], format)
    if not _looks_like_hub_id(name):
        raise UserError(f"data file not found: {path}")
    return _read_hub(name, format)


def _looks_like_hub_id(name: str) -> bool:
    """True for ``name`` / ``owner/name`` that cannot be a local path: a missing local directory (its parent
    exists here, or the name has a file suffix or path syntax) is reported as not found, never read from the hub."""
    if not _HUB_ID.match(name) or Path(name).suffix.lower() in FILE_SUFFIXES:
        return False
    owner = name.split("/")[0]
    return "/" in name and not Path(owner).exists()


# --------------------------------------------------------------------------- files


def _read_file(path: Path, fmt: str, text_separator: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        rows = _read_table(path)
        if not rows:
            raise UserError(f"{path}: file is empty (no rows)")
        return rows_to_records(((f"{path}#{i + 1}", row) for i, row in enumerate(rows)), fmt)
    if suffix == ".jsonl":  # streamed line by line (the prepared pipeline's scan reads it the same way)
        return rows_to_records(((f"{path}:{number}", parse_json_line(line, f"{path}:{number}"))
                                for number, line in jsonl_lines(path)), fmt)
    text = _read_utf8(path)
    if not text.strip():
        raise UserError(f"{path}: file is empty")
    if suffix == ".txt" or (suffix not in (".json", ".jsonl") and fmt == "text"):
        if fmt not in ("auto", "text"):
            raise UserError(f"{path}: a .txt file holds plain text; data.format {fmt!r} needs .jsonl/.json rows")
        return _text_documents(path, text, text_separator)
    if suffix == ".json":
        stripped = text.lstrip()
        if stripped.startswith("["):
            return rows_to_records(_json_array(path, text), fmt)
        if stripped.startswith("{") and "\n{" not in stripped:
            # A single JSON object: one record (a file holding one conversation).
            return rows_to_records(_json_array(path, f"[{text}]"), fmt)
        # Many ".json" files are really JSON lines.
    if suffix == ".json":
        return rows_to_records(((f"{path}:{number}", parse_json_line(line, f"{path}:{number}"))
                                for number, line in jsonl_lines(path)), fmt)
    raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not UTF-8 text: byte {exc.start} (line {line}) is {data[exc.start:exc.start + 1]!r}; "
            "re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content


def _text_documents(path: Path, text: str, separator: str) -> list[dict]:
    docs = [d.strip() for d in text.split(separator)] if separator else [text.strip()]
    records = [{"text": d, "source": f"{path}#{i + 1}"} for i, d in enumerate(d for d in docs if d)]
    if not records:
        raise UserError(f"{path}: file is empty")
    return records


def jsonl_lines(path: str | Path, on_bytes: Callable[[int], Any] | None = None) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of every non-blank line of a JSON-lines file, read as a stream.

    The rules of every JSON-lines reading (the readers here and the prepared pipeline's scan): UTF-8 (a failure
    names the byte offset in the file and the line), a leading byte-order mark dropped, lines split on ``\\n``
    only (``str.splitlines`` would also split inside JSON strings at U+2028/U+2029, which JSON allows unescaped),
    a trailing ``\\r`` stripped. ``on_bytes`` is called with each line's size in bytes (a progress bar).

    Raises:
        UserError: bytes that are not UTF-8, or no non-blank line ("file is empty").
    """
    offset = 0
    any_line = False
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if on_bytes is not None:
                on_bytes(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}: not UTF-8 text: byte {offset + exc.start} (line {number}) is "
                    f"{raw[exc.start:exc.start + 1]!r}; re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            offset += len(raw)
            if number == 1:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
            line = line.removesuffix("\n").removesuffix("\r")
            if line.strip():
                any_line = True
                yield number, line
    if not any_line:
        raise UserError(f"{path}: file is empty")


def parse_json_line(line: str, where: str) -> Any:
    """One JSON line parsed; a malformed one is a UserError naming ``where`` (``file:line``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{where}: malformed JSON line ({exc.msg} at column {exc.colno}); each line must be one complete JSON "
            "object"
        ) from None


def _json_array(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not data:
        raise UserError(f"{path}: file is empty (an empty JSON array)")
    return [(f"{path}#{i + 1}", row) for i, row in enumerate(data)]


def _read_table(path: Path) -> list[dict]:
    """CSV / parquet rows as dicts of strings (pandas, which ``datasets`` depends on)."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas comes with datasets
        raise UserError(f"{path}: reading {path.suffix} files needs pandas (pip install pandas)") from None
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); re-save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty") from None
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise UserError(f"{path}: cannot read {path.suffix} file ({exc})") from None
    return frame.to_dict(orient="records")


# --------------------------------------------------------------------------- hub


def _read_hub(name: str, fmt: str) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise UserError(f"data file not found: {name} (and `datasets` is not installed to read it from the hub)") from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a usable local file or hub dataset"
        raise UserError(
            f"{name}: no such local file, and loading it as a hub dataset failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "The hub may be unreachable (offline?): give a local .jsonl/.json/.txt/.csv/.parquet file instead"
        ) from None
    return rows_to_records(((f"{name}#{i + 1}", row) for i, row in enumerate(dataset)), fmt)


# --------------------------------------------------------------------------- rows → records


def rows_to_records(rows: Iterable[tuple[str, Any]], fmt: str = "auto") -> list[dict]:
    """Turn ``(source, row_dict)`` pairs into canonical records; the format is detected on the first row."""
    records = []
    detected = None if fmt == "auto" else fmt
    for source, row in rows:
        if detected is None:
            detected = detect_format(row, source)
        records.append(row_to_record(row, source, detected, detected_from_first=fmt == "auto" and bool(records)))
    if not records:
        raise UserError("no records found (the file holds no rows)")
    return records


def row_to_record(row: Any, source: str, fmt: str, *, detected_from_first: bool = False) -> dict:
    """One row (a dict) of format ``fmt`` as a canonical record; a ``task`` field travels with it.

    ``detected_from_first``: ``fmt`` was detected on an earlier row of the file, so an error says so (one file
    must hold one format).
    """
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected a JSON object (key: value), got {type(row).__name__}")
    try:
        record = _CONVERTERS[fmt][0](row, source)
        if row.get("task") is not None:  # multi-task data (data/mix.py): the task name travels with the record
            record["task"] = _string(row["task"], "task", source)
    except UserError as exc:
        if detected_from_first:
            raise UserError(f"{exc} (format '{fmt}' was detected from the first record; "
                            "one file must hold one format)") from None
        raise
    return record


def detect_format(row: dict, source: str) -> str:
    """The first registered format (detection order of :data:`tuneforge.config.formats.DATA_FORMATS`) whose detector
    accepts the row's keys: ``preference`` / ``kto`` / ``prompt`` / ``chat`` / ``alpaca`` / ``text``."""
    if not isinstance(row, dict):
        raise UserError(f"{source}: expected a JSON object (key: value), got {type(row).__name__}")
    for name, (_, detect) in _CONVERTERS.items():
        if detect(row):
            return name
    raise UserError(
        f"{source}: cannot tell the data format from the keys {sorted(row)}; expected 'text' (plain text), "
        "'instruction'/'input'/'output' (Alpaca) or 'messages'/'conversations' (chat). "
        "Rename the fields or set data.format"
    )


def _field(row: dict, key: str, source: str, fmt: str, expected: str) -> Any:
    if key not in row or row[key] is None:
        raise UserError(f"{source}: record has no {key!r} field ({fmt} records need {expected}); keys: {sorted(row)}")
    return row[key]


def _string(value: Any, key: str, source: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise UserError(f"{source}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _text_record(row: dict, source: str) -> dict:
    text = _field(row, "text", source, "text", "'text'")
    return {"text": _string(text, "text", source), "source": source}


def _alpaca_record(row: dict, source: str) -> dict:
    expected = "'instruction' and 'output' (optional 'input', 'system', 'history')"
    instruction = _string(_field(row, "instruction", source, "Alpaca", expected), "instruction", source)
    output = _string(_field(row, "output", source, "Alpaca", expected), "output", source)
    extra = _string(row.get("input") or "", "input", source)
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _string(row["system"], "system", source)})
    for turn, pair in enumerate(row.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise UserError(f"{source}: history[{turn}] must be a [user, assistant] pair")
        messages.append({"role": "user", "content": _string(pair[0], f"history[{turn}][0]", source)})
        messages.append({"role": "assistant", "content": _string(pair[1], f"history[{turn}][1]", source)})
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": output})
    return {"messages": messages, "source": source}


def _chat_record(row: dict, source: str) -> dict:
    key = "messages" if "messages" in row else "conversations"
    turns = _field(row, key, source, "chat", "'messages' or 'conversations' (a list of turns)")
    if hasattr(turns, "tolist"):  # parquet gives numpy arrays
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{source}: {key!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{source}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{where} must be an object with role/content (or ShareGPT from/value)")
        role_key = "role" if "role" in turn else "from" if "from" in turn else None
        content_key = "content" if "content" in turn else "value" if "value" in turn else None
        if role_key is None:
            raise UserError(f"{where} has no 'role' (or ShareGPT 'from') field; keys: {sorted(turn)}")
        if content_key is None:
            raise UserError(f"{where} has no 'content' (or ShareGPT 'value') field; keys: {sorted(turn)}")
        raw_role = turn[role_key]
        role = ROLE_MAP.get(str(raw_role).strip().lower())
        if role is None:
            raise UserError(f"{where}: unknown role {raw_role!r}; allowed roles: {', '.join(ALLOWED_ROLES)}")
        content = _string("" if turn[content_key] is None else turn[content_key], content_key, where)
        raw = str(raw_role).strip().lower()
        message = {"role": role, "content": content}
        if raw == "function_call":
            message = {"role": "assistant", "content": "", "tool_calls": [_sharegpt_call(content, where)]}
        elif turn.get("tool_calls"):
            message["tool_calls"] = _tool_calls(turn["tool_calls"], where)
        for extra in ("tool_call_id", "name"):
            if role == "tool" and turn.get(extra) is not None:
                message[extra] = _string(turn[extra], extra, where)
        reasoning = next((turn[k] for k in REASONING_KEYS if turn.get(k)), None)
        if reasoning and role == "assistant" and "</think>" not in content:
            message["content"] = f"<think>\n{_string(reasoning, 'reasoning', where).strip()}\n</think>\n\n{content}"
        messages.append(message)
    record = {"messages": messages, "source": source}
    tools = _tools(row.get("tools"), source)
    if tools:
        record["tools"] = tools
    return record


def _sharegpt_call(value: str, where: str) -> dict:
    """A ShareGPT ``function_call`` value (``{"name", "arguments"}`` JSON) as an OpenAI-style tool call."""
    try:
        call = json.loads(value)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: a function_call value must be JSON {{\"name\", \"arguments\"}} ({exc.msg})") from None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise UserError(f"{where}: a function_call value must be a JSON object with a 'name'")
    return {"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}}


def _tool_calls(calls: Any, where: str) -> list[dict]:
    """OpenAI ``tool_calls``: a list of ``{"type": "function", "function": {"name", "arguments"}}`` (``id`` kept)."""
    if hasattr(calls, "tolist"):
        calls = calls.tolist()
    if not isinstance(calls, list):
        raise UserError(f"{where}: 'tool_calls' must be a list of calls")
    out = []
    for n, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UserError(f"{where}: tool_calls[{n}] needs a 'function' with a 'name' (OpenAI format)")
        out.append({**call, "type": call.get("type", "function")})
    return out


def _tools(tools: Any, source: str) -> list[dict] | None:
    """A record's ``tools`` (a list of function schemas, or its JSON string as ShareGPT datasets store it)."""
    if tools is None or (isinstance(tools, str) and not tools.strip()):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: 'tools' is not valid JSON ({exc.msg})") from None
    if hasattr(tools, "tolist"):
        tools = tools.tolist()
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise UserError(f"{source}: 'tools' must be a list of function schemas (objects)")
    return tools or None


# --------------------------------------------------------------------------- preference and prompt records (data/preference.py encodes them)


def preference_record(row: dict, source: str) -> dict:
    """A ``{prompt, chosen, rejected}`` row (or the chat form) → canonical paired record.

    Raises:
        UserError: a missing ``chosen``/``rejected``, chosen identical to rejected, an empty completion, a completion
            without an assistant turn, or an empty prompt — each naming ``source``.
    """
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise UserError(f"{source}: preference record has no {key!r} field; a pair needs 'chosen' and "
                            f"'rejected' (and 'prompt' unless both are whole conversations); keys: {sorted(row)}")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "prompt", source, default_role="user")
        chosen = _messages(row["chosen"], "chosen", source, default_role="assistant")
        rejected = _messages(row["rejected"], "rejected", source, default_role="assistant")
    else:
        prompt, chosen, rejected = _split_shared_prefix(
            _messages(row["chosen"], "chosen", source, default_role="assistant"),
            _messages(row["rejected"], "rejected", source, default_role="assistant"),
            source,
        )
    prompt = _with_system(row, prompt, source)
    if chosen == rejected:
        raise UserError(f"{source}: 'chosen' and 'rejected' are identical; a preference pair needs two different "
                        "answers (remove the record or fix the rejected answer)")
    for key, completion in (("chosen", chosen), ("rejected", rejected)):
        _check_completion(completion, key, source)
    _check_prompt(prompt, source)
    margin = {"margin": row["margin"]} if row.get("margin") is not None else {}  # stage rm: rm.margin: record
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **margin, "source": source}


def kto_record(row: dict, source: str) -> dict:
    """A ``{prompt, completion, label}`` row → canonical unpaired record (``label``: true = desirable)."""
    for key in ("prompt", "completion", "label"):
        if row.get(key) is None:
            raise UserError(f"{source}: unpaired (KTO) record has no {key!r} field; it needs 'prompt', "
                            f"'completion' and a true/false 'label'; keys: {sorted(row)}")
    label = _label(row["label"], source)
    prompt = _with_system(row, _messages(row["prompt"], "prompt", source, default_role="user"), source)
    completion = _messages(row["completion"], "completion", source, default_role="assistant")
    _check_completion(completion, "completion", source)
    _check_prompt(prompt, source)
    return {"prompt": prompt, "completion": completion, "label": label, "source": source}


def prompt_record(row: dict, source: str) -> dict:
    """A ``{prompt, <fields>}`` row → ``{"prompt": msgs, "fields": {other keys}}`` (GRPO rewards read the fields)."""
    prompt = _with_system(row, _messages(row.get("prompt"), "prompt", source, default_role="user"), source)
    _check_prompt(prompt, source)
    fields = {k: v for k, v in row.items() if k not in ("prompt", "system")}
    return {"prompt": prompt, "fields": fields, "source": source}


def _messages(value: Any, key: str, source: str, default_role: str) -> list[dict]:
    # The chat reader's role/content rules: one implementation.
    if value is None:
        raise UserError(f"{source}: record has no {key!r} field")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if hasattr(value, "tolist"):  # parquet gives numpy arrays
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise UserError(f"{source}: {key!r} must be a string or a non-empty list of {{role, content}} messages")
    return _chat_record({"messages": value}, f"{source}: {key}")["messages"]


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], source: str):
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise UserError(f"{source}: 'chosen' and 'rejected' are identical; a preference pair needs two different "
                        "answers (remove the record or fix the rejected answer)")
    if shared == 0:
        raise UserError(f"{source}: no 'prompt' field and 'chosen'/'rejected' share no leading turn; give 'prompt' "
                        "or make both whole conversations that start with the same user turn(s)")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _with_system(row: dict, prompt: list[dict], source: str) -> list[dict]:
    system = row.get("system")
    if system and prompt[0]["role"] != "system":
        if not isinstance(system, str):
            raise UserError(f"{source}: 'system' must be a string")
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _check_completion(completion: list[dict], key: str, source: str) -> None:
    if not completion:
        raise UserError(f"{source}: {key!r} adds no turn after the shared prompt")
    if len(completion) != 1 or completion[0]["role"] != "assistant":
        raise UserError(f"{source}: {key!r} must be one assistant answer after the prompt (got roles "
                        f"{[m['role'] for m in completion]}); put earlier turns into 'prompt'")
    if not completion[0]["content"].strip():
        raise UserError(f"{source}: {key!r} has an empty assistant answer; drop the record or write the answer")


def _check_prompt(prompt: list[dict], source: str) -> None:
    if not any(m["content"].strip() for m in prompt):
        raise UserError(f"{source}: the prompt is empty")
    if prompt[-1]["role"] == "assistant":
        raise UserError(f"{source}: the prompt ends with an assistant turn; the completion must answer a user turn")


def _label(value: Any, source: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "desirable"):
        return True
    if text in ("false", "0", "no", "undesirable"):
        return False
    raise UserError(f"{source}: 'label' must be true (desirable) or false (undesirable), got {value!r}")


# --------------------------------------------------------------------------- the format registry

#: format name → (converter: row, source → canonical record; detector: row → bool), in detection order
_CONVERTERS: dict[str, tuple[Callable[[dict, str], dict], Callable[[dict], bool]]] = {}


def register_format(name: str, convert: Callable[[dict, str], dict], detect: Callable[[dict], bool]) -> None:
    """Make data format ``name`` readable: ``convert(row, source)`` gives its canonical record (raising
    :class:`UserError` naming ``source``), ``detect(row)`` says whether a row has its shape (``data.format:
    auto``). The name must be declared in :data:`tuneforge.config.formats.DATA_FORMATS`, whose order is the
    detection order."""
    if name not in DATA_FORMATS:
        raise ValueError(f"data format {name!r} is not declared in tuneforge.config.formats.DATA_FORMATS")
    _CONVERTERS[name] = (convert, detect)
    order = list(DATA_FORMATS)
    for key in sorted(_CONVERTERS, key=order.index):  # keep detection order whatever the registration order
        _CONVERTERS[key] = _CONVERTERS.pop(key)


register_format("preference", preference_record, lambda row: "chosen" in row or "rejected" in row)
register_format("kto", kto_record, lambda row: "completion" in row and "label" in row)
register_format("prompt", prompt_record, lambda row: "prompt" in row and "messages" not in row and "text" not in row)
register_format("chat", _chat_record, lambda row: "messages" in row or "conversations" in row)
register_format("alpaca", _alpaca_record, lambda row: "instruction" in row and "output" in row)
register_format("text", _text_record, lambda row: "text" in row)


def record_text(record: dict) -> str:
    """The plain text of a record (chat turns' contents joined by newlines), for pretraining and tokenizers."""
    if "text" in record:
        return record["text"]
    return "\n".join(m["content"] for m in record["messages"] if m["content"])
