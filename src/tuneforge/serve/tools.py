"""Tool calls in generated text → OpenAI ``tool_calls``.

The request's ``tools`` are shown to the model by the run's own chat template (``ChatTemplate.render(...,
tools=...)``, the way it was trained). What the model writes back is read in the two formats those templates ask
for: Hermes/Qwen-style ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (any number, text around
them stays the message content), or an answer that is one JSON object ``{"name": ..., "arguments"|"parameters":
{...}}`` (Llama 3.1 style). Only names among the request's tools count; anything else stays text.
"""

from __future__ import annotations

import json
import re
import uuid

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """``(content, tool_calls)`` read from a generated answer.

    Args:
        text: the generated text.
        names: the function names the request offered.

    Returns:
        The remaining text (``None`` when nothing but tool calls was written) and OpenAI-shaped calls
        ``{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}``; no calls → ``(text, [])``.
    """
    calls = []
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            return text, []  # a malformed block: show the text as written rather than half of it
        calls.append(call)
    if calls:
        rest = _BLOCK.sub("", text).strip()
        return rest or None, calls
    whole = _call(text.strip(), names)
    return (None, [whole]) if whole is not None else (text, [])


def _call(raw: str, names: set[str]) -> dict | None:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    # a name that is not a string (``{"name": ["f"]}``, a number, null) is not a call: the answer stays text
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}
