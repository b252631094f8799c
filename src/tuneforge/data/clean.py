"""Cleaning rules applied to canonical records, each one counted.

Rules, in order: HTML-tag stripping, whitespace/unicode (NFKC) normalisation, minimum length, exact
de-duplication. Text records are cleaned as a whole; chat records message by message. The minimum length
applies to a text record's text and to every assistant answer of a chat record (a conversation with a too-short
answer is dropped whole, since its answer would teach nothing or teach a truncation).
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any

from tuneforge.errors import UserError

# Known HTML element names only, so that code such as `a<b` or chat markers like `<|im_end|>` survive.
_TAGS = (
    "a|abbr|address|article|aside|b|big|blockquote|body|br|caption|center|cite|code|col|colgroup|dd|del|details|"
    "div|dl|dt|em|figcaption|figure|font|footer|h[1-6]|head|header|hr|html|i|iframe|img|input|ins|kbd|label|li|"
    "link|main|mark|meta|nav|ol|option|p|pre|q|s|samp|section|select|small|span|strike|strong|sub|summary|sup|"
    "table|tbody|td|textarea|tfoot|th|thead|title|tr|tt|u|ul|var|wbr"
)
# Attributes must look like attributes (name=value), so that `a<b and c>d` in code is not taken for a tag.
_ATTRS = r"""(?:\s+[\w:.-]+\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>]+))*"""
_TAG_RE = re.compile(rf"</?({_TAGS}){_ATTRS}\s*/?>", re.IGNORECASE)
# Block-level tags become a line break so that words on both sides do not run together.
_BLOCK_TAGS = re.compile(r"p|br|div|li|tr|h[1-6]|ul|ol|table|blockquote|pre|hr|section|article", re.IGNORECASE)
# Openers of the blocks dropped whole; each is closed by a plain search (str.find), never a backtracking regex,
# so cleaning stays linear in the document size even when a block is never closed.
_DROP_OPEN_RE = re.compile(r"<(script|style)\b[^<>]*>|<!--", re.IGNORECASE)
_DROP_CLOSE_RE = {tag: re.compile(f"</{tag}", re.IGNORECASE | re.ASCII) for tag in ("script", "style")}
_ENTITY_RE = re.compile(r"&(?:[a-zA-Z]{2,8}|#\d{1,6}|#x[0-9a-fA-F]{1,6});")
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_WS_RE = re.compile(r"[ \t]+\n")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


@dataclass
class CleanReport:
    """What each rule did. ``changed`` counts are records modified; ``dropped`` counts are records removed."""

    records_in: int = 0
    records_out: int = 0
    html_changed: int = 0
    normalize_changed: int = 0
    dropped_min_length: int = 0
    dropped_duplicate: int = 0
    examples: dict[str, str] = field(default_factory=dict)  # rule → source of the first record it dropped

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for summary.json and the preview)."""
        return asdict(self)


def strip_html(text: str) -> str:
    """Remove HTML tags (script/style blocks and comments whole) and unescape entities; keep the text."""
    if "<" not in text and "&" not in text:
        return text
    out = _drop_blocks(text)
    out = _TAG_RE.sub(lambda m: "\n" if _BLOCK_TAGS.fullmatch(m.group(1)) else "", out)
    if out != text or _ENTITY_RE.search(out):
        out = html.unescape(out)
    return out


def _drop_blocks(text: str) -> str:
    """``text`` without script/style blocks and comments; an unclosed one runs to the end (as in a browser)."""
    parts, position = [], 0
    while True:
        match = _DROP_OPEN_RE.search(text, position)
        if match is None:
            parts.append(text[position:])
            return "".join(parts)
        parts.append(text[position:match.start()])
        if match.group(1):
            # Searched in ``text`` itself: offsets of ``text.lower()`` differ wherever lowering changes a length
            # ('İ' becomes two characters), which cut the wrong span.
            closing = _DROP_CLOSE_RE[match.group(1).lower()].search(text, match.end())
            end = -1 if closing is None else text.find(">", closing.start())
        else:
            close = text.find("-->", match.end())
            end = -1 if close < 0 else close + 2
        if end < 0:
            return "".join(parts)
        position = end + 1


def normalize_text(text: str) -> str:
    """NFKC, no invisible/control characters, ``\\n`` line ends, no trailing spaces, at most one blank line.

    Leading indentation is kept (code relies on it).
    """
    out = unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\r", "\n")
    out = out.translate(_INVISIBLE)
    out = _CONTROL_RE.sub("", out)
    out = _TRAILING_WS_RE.sub("\n", out)
    out = _BLANK_LINES_RE.sub("\n\n", out)
    return out.strip()


def clean_records(records: list[dict], clean_cfg: Any = None) -> tuple[list[dict], CleanReport]:
    """Apply the cleaning rules of ``clean_cfg`` (a :class:`tuneforge.config.schema.CleanConfig`, a dict or None).

    Returns:
        The kept records (new dicts; the input is not modified) in their original order, and the report.

    Raises:
        UserError: when no record is left, naming how many each rule dropped and which setting to relax.
    """
    cfg = clean_settings(clean_cfg)
    report = CleanReport(records_in=len(records))
    seen: set[str] = set()
    kept = []
    for record in records:
        record, html_changed, normalize_changed = clean_record(record, cfg)
        report.html_changed += html_changed
        report.normalize_changed += normalize_changed
        if too_short(record, cfg["min_length"]):
            report.dropped_min_length += 1
            report.examples.setdefault("min_length", record.get("source", "?"))
            continue
        if cfg["dedup"]:
            key = dedup_key(record)
            if key in seen:
                report.dropped_duplicate += 1
                report.examples.setdefault("dedup", record.get("source", "?"))
                continue
            seen.add(key)
        kept.append(record)
    report.records_out = len(kept)
    if records and not kept:
        raise UserError(
            f"nothing left after cleaning {len(records)} records: min_length (< {cfg['min_length']} characters) "
            f"dropped {report.dropped_min_length}, dedup dropped {report.dropped_duplicate} "
            f"(HTML stripping changed {report.html_changed}, normalisation changed {report.normalize_changed}). "
            "Check the data, or relax data.clean.min_length / data.clean.dedup"
        )
    return kept, report


# The rules one record at a time: clean_records above, the prepared pipeline's workers (data/prepared.py) and the
# stream (data/stream.py) all call these, so the three cannot drift apart.


def clean_settings(clean_cfg: Any) -> dict:
    """The cleaning settings as a plain dict (``strip_html``, ``normalize``, ``min_length``, ``dedup``) from a
    :class:`tuneforge.config.schema.CleanConfig`, a partial dict, or None (the defaults)."""
    defaults = {"strip_html": True, "normalize": True, "min_length": 1, "dedup": True}
    if clean_cfg is None:
        return defaults
    if isinstance(clean_cfg, dict):
        return {**defaults, **clean_cfg}
    return {key: getattr(clean_cfg, key, value) for key, value in defaults.items()}


def clean_record(record: dict, settings: dict) -> tuple[dict, bool, bool]:
    """HTML stripping and normalisation of one record, as ``settings`` (:func:`clean_settings`) say.

    Returns:
        ``(cleaned copy, HTML stripping changed it, normalisation changed it)``; the input is not modified. The
        record-level rules are :func:`too_short` and :func:`dedup_key`.
    """
    record = map_texts(record, lambda t: t)  # a copy
    html_changed = normalize_changed = False
    if settings["strip_html"]:
        new = map_texts(record, strip_html)
        html_changed, record = new != record, new
    if settings["normalize"]:
        new = map_texts(record, normalize_text)
        normalize_changed, record = new != record, new
    return record, html_changed, normalize_changed


def map_texts(record: dict, fn) -> dict:
    """A copy of ``record`` with ``fn`` applied to its text, or to every message's content."""
    out = dict(record)
    if "text" in record:
        out["text"] = fn(record["text"])
    if "messages" in record:
        out["messages"] = [{**m, "content": fn(m["content"])} for m in record["messages"]]
    return out


def too_short(record: dict, min_length: int) -> bool:
    """The min-length rule: a text record's text, or any assistant answer, under ``min_length`` characters."""
    if "text" in record:
        return len(record["text"]) < min_length
    # A tool call is an answer too, however short its text (often empty).
    answers = [m["content"] for m in record["messages"] if m["role"] == "assistant" and not m.get("tool_calls")]
    return any(len(a) < min_length for a in answers)


def dedup_key(record: dict) -> str:
    """What exact de-duplication compares: the text, or the turns (role, content, tool calls) and tools."""
    if "text" in record:
        return "t:" + record["text"]
    turns = [[m["role"], m["content"], m.get("tool_calls")] for m in record["messages"]]
    return "m:" + json.dumps([turns, record.get("tools")], ensure_ascii=False, sort_keys=True, default=str)
