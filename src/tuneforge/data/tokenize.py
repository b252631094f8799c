"""Token ids and label masks: chat samples for SFT, fixed blocks for pretraining.

Labels are *not* shifted here: ``labels[t]`` is the target for position ``t`` exactly as transformers' causal-LM
loss expects (the model shifts once). ``-100`` marks a position with no loss.

SFT masking (docs/data.md, "Masks"): every assistant turn *i* is trained the way the template renders it at
inference — the history ``render(messages[:i], add_generation_prompt=True)`` (the *prompt*), then the answer and
the marker that ends it. The answer is found by one of three rules, cheapest first:

* ``prefix``: ``render(messages[:i+1])`` starts with the prompt; the answer is what follows, up to and including
  the first end-of-turn marker (stop string or EOS);
* ``markers``: the same, but the answer ends where the template's ``{% generation %}`` block ends;
* ``rebuilt``: the template renders the turn differently from what the model is asked to continue (DeepSeek-R1
  opens ``<think>`` in the prompt and strips reasoning from answers): the message's own content (reasoning kept)
  after the prompt, then what the template writes after an answer.

A template without an end-of-turn marker (GLM-4, Baichuan2) gets :attr:`ChatTemplate.turn_end` (EOS) appended to
the answer. A turn whose prompt + answer is a prefix of the whole rendered conversation is trained as a span of
that one sample; any other turn (templates that strip past reasoning, move the system prompt to the last user
turn, or tokenise the boundary differently) becomes its own sample ``prompt + answer``, whose extra cost is the
re-encoded prompt. Either way the prompt ids are exactly the ids generation builds for that history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tuneforge.data.templates import SENTINEL as SENTINEL_TEXT
from tuneforge.errors import UserError

#: THE label of a position that is not trained (torch's cross-entropy ``ignore_index``): prompts, padding, packing
#: boundaries. Every package that masks or scores labels imports it from here.
IGNORE = -100
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass
class Turn:
    """How one assistant turn is trained.

    Attributes:
        index: position of the assistant message in the conversation.
        prompt: the history as generation renders it (``add_generation_prompt=True``).
        answer: the supervised text: the answer and the marker that ends it.
        rule: ``prefix``, ``markers`` or ``rebuilt``.
        stop_appended: True when ``turn_end`` was appended (a template without an end-of-turn marker).
        shared: True when trained as a span of the whole-conversation sample, False for its own sample.
    """

    index: int
    prompt: str
    answer: str
    rule: str
    stop_appended: bool = False
    shared: bool = True


def plan_turns(messages: list[dict], template: Any, tokenizer: Any = None,
               tools: list[dict] | None = None) -> tuple[str, list[Turn]]:
    """The whole rendered conversation and how each assistant turn is trained (see the module docstring)."""
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in template.jinja:
        raise UserError(
            f"chat template {template.name!r} does not render tool_calls (they would be silently lost); write the "
            "call into the assistant message's content in the model's own format, or use a template that renders "
            "tool calls"
        )
    full = template.render(messages, tokenizer=tokenizer, tools=tools)
    ends = template.end_markers(tokenizer)
    turns = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tokenizer=tokenizer, tools=tools)
        answer, rule = _rendered_answer(messages, i, prompt, template, tokenizer, tools, ends, full)
        if answer is None:
            answer, rule = _rebuilt_answer(messages, i, prompt, template, tokenizer, tools, ends), "rebuilt"
        appended = False
        if template.turn_end and not any(answer.endswith(end) for end in ends):
            answer, appended = answer + template.turn_end, True
        turns.append(Turn(i, prompt, answer, rule, appended, full.startswith(prompt + answer)))
    if turns and turns[-1].stop_appended and not turns[-1].shared:
        last = turns[-1]
        # The conversation ends with this answer: the appended stop token changes no history, so it stays shared.
        if full.rstrip() == (last.prompt + last.answer[: -len(template.turn_end)]).rstrip():
            full, last.shared = last.prompt + last.answer, True
    return full, turns


def _rendered_answer(messages, i, prompt, template, tokenizer, tools, ends, full=None) -> tuple[str | None, str]:
    if template.has_generation_markers:
        upto, spans = template.render_with_spans(messages[: i + 1], tokenizer=tokenizer, tools=tools)
        rule = "markers"
    elif full is not None and i == len(messages) - 1:  # the last turn: the whole conversation, rendered already
        upto, spans, rule = full, [], "prefix"
    else:
        upto, spans, rule = template.render(messages[: i + 1], tokenizer=tokenizer, tools=tools), [], "prefix"
    if not upto.startswith(prompt):
        return None, rule
    stop = spans[-1][1] if spans and spans[-1][1] > len(prompt) else len(upto)
    answer = _cut_after_end(upto[len(prompt):stop], ends)
    reasoning = _reasoning(messages[i].get("content") or "")
    if reasoning and reasoning not in answer:  # the template dropped the reasoning of the trained turn
        return None, rule
    return answer, rule


def _rebuilt_answer(messages, i, prompt, template, tokenizer, tools, ends) -> str:
    """The turn as the template writes it, with the message's own content, continuing the prompt.

    The turn is rendered with a placeholder content (so that the template cannot strip reasoning from it). When
    the history renders the same with and without the turn, the turn's text is what the turn adds, minus what the
    generation prompt already holds (DeepSeek-R1's ``<｜Assistant｜><think>\n``). Otherwise (Mistral v0.3 moves
    the system prompt to the last user turn) the answer is the text between the end of the prompt's last words
    and the content, the content, and what the template writes after it.
    """
    content = messages[i].get("content") or ""
    probe = template.render([*messages[:i], {**messages[i], "content": SENTINEL_TEXT}], tokenizer=tokenizer,
                            tools=tools)
    history = template.render(messages[:i], tokenizer=tokenizer, tools=tools)
    index = probe.find(SENTINEL_TEXT)
    if index < 0:  # the template does not write this message's content at all (e.g. a pure tool call)
        index = len(probe)
    if probe.startswith(history) and prompt.startswith(history) and index >= len(history):
        turn = probe[len(history):].replace(SENTINEL_TEXT, content)
        opened = prompt[len(history):]
        common = _common_prefix(opened, turn)
        answer = turn[common:]
        if opened.strip() and common < len(opened.rstrip()) and turn.lstrip().startswith(opened.strip()):
            # Same header, other whitespace around it (Vicuna's "ASSISTANT:"): the answer follows the header.
            common, answer = len(opened), turn.lstrip()[len(opened.strip()):]
        rest = opened[common:]  # text the prompt opens that the turn rendering lacks: the content may repeat it
        if rest and answer.startswith(rest):
            answer = answer[len(rest):]
        return _cut_after_end(answer, ends)
    before, after = probe[:index], probe[index + len(SENTINEL_TEXT):]
    return _lead(before, prompt) + _cut_after_end(content + after, ends)


def _lead(before: str, prompt: str, longest: int = 8) -> str:
    """The few characters the template writes between the prompt's last words and the content (a space after
    Mistral's ``[/INST]``): the shortest tail of ``before`` after which ``before`` ends like the prompt."""
    for size in (16, 8, 4):
        tail = prompt[-size:]
        for length in range(min(longest, len(before)) + 1):
            if before[: len(before) - length].endswith(tail):
                return before[len(before) - length:]
    return ""


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _cut_after_end(text: str, ends: list[str]) -> str:
    """``text`` up to and including its first end-of-turn marker; without one, trailing whitespace removed."""
    found = [(text.find(end), end) for end in ends if end and text.find(end) >= 0]
    if not found:
        return text.rstrip()
    index, end = min(found, key=lambda item: (item[0], -len(item[1])))
    return text[: index + len(end)]


def _reasoning(content: str) -> str:
    match = _THINK_RE.search(content)
    return match.group(1).strip() if match else ""


def encode_chat_samples(record: dict, tokenizer: Any, template: Any, max_length: int,
                        train_on_prompt: bool = False) -> list[dict]:
    """Training samples for one chat record (see the module docstring for the rules).

    Args:
        record: a canonical chat record (``messages``, optional ``tools`` and ``source``).
        tokenizer: a fast tokenizer (offset mapping needed).
        template: a :class:`tuneforge.data.templates.ChatTemplate`.
        max_length: keep at most this many tokens per sample (right truncation).
        train_on_prompt: one sample of the whole conversation with every token supervised.

    Returns:
        Samples (possibly none supervised), each ``{"input_ids", "labels", "offsets", "text", "truncated",
        "supervised", "rule", "turns", "stop_appended", "extra_tokens"}``: ``rule`` is ``prefix``/``markers``/
        ``rebuilt`` (joined with ``+`` when turns differ) for the whole-conversation sample and
        ``per-turn/<rule>`` for a turn trained alone; ``extra_tokens`` counts the re-encoded prompt.

    Raises:
        UserError: naming the record: a template that fails on it, a system message it refuses
            (``template.system_message: error``), a slow tokenizer.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "SFT masks need a fast tokenizer (offset mapping); this tokenizer is a slow one. "
            "Use a model whose tokenizer has a tokenizer.json"
        )
    source = record.get("source", "?")
    try:
        full, turns = plan_turns(record["messages"], template, tokenizer, record.get("tools"))
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    if train_on_prompt:
        ids, offsets = _encode(tokenizer, full)
        return [_sample(full, ids, offsets, list(ids), max_length, "all", [t.index for t in turns], 0, False)]
    samples = []
    ids, offsets = _encode(tokenizer, full)
    shared = [t for t in turns if t.shared and _same_prefix(tokenizer, t.prompt, ids, offsets)]
    if not turns:  # nothing to supervise: one unsupervised sample, which the caller counts as dropped
        return [_sample(full, ids, offsets, [IGNORE] * len(ids), max_length, "none", [], 0, False)]
    if shared:
        spans = [(len(t.prompt), len(t.prompt) + len(t.answer)) for t in shared]
        labels = _span_labels(ids, offsets, spans)
        rule = "+".join(dict.fromkeys(t.rule for t in shared))
        samples.append(_sample(full, ids, offsets, labels, max_length, rule, [t.index for t in shared], 0,
                               any(t.stop_appended for t in shared)))
    for turn in turns:
        if turn in shared:
            continue
        p_ids, p_off = _encode(tokenizer, turn.prompt)
        a_ids, a_off = _encode_continuation(tokenizer, turn.prompt, turn.answer, p_ids)
        text = turn.prompt + turn.answer
        samples.append(_sample(text, p_ids + a_ids, p_off + a_off, [IGNORE] * len(p_ids) + list(a_ids),
                               max_length, f"per-turn/{turn.rule}", [turn.index], len(p_ids), turn.stop_appended))
    return samples


def _sample(text, ids, offsets, labels, max_length, rule, turns, extra, stop_appended) -> dict:
    truncated = len(ids) > max_length
    ids, labels, offsets = list(ids[:max_length]), list(labels[:max_length]), list(offsets[:max_length])
    return {"text": text, "input_ids": ids, "labels": labels, "offsets": offsets, "truncated": truncated,
            "supervised": sum(label != IGNORE for label in labels), "rule": rule, "turns": turns,
            "extra_tokens": extra, "stop_appended": stop_appended}


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    backend = _backend(tokenizer)
    if backend is not None:
        encoding = backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _ids(tokenizer: Any, text: str) -> list[int]:
    backend = _backend(tokenizer)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _backend(tokenizer: Any):
    """The ``tokenizers`` object under a fast tokenizer when calling it directly gives exactly the ids and offsets
    ``tokenizer(text, add_special_tokens=False)`` gives (no truncation/padding configured on it, special tokens
    not split), else None. Calling it directly skips ~0.5 ms of transformers' wrapping per call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "split_special_tokens", False):
        return None
    try:
        if backend.truncation is not None or backend.padding is not None or backend.encode_special_tokens:
            return None
    except AttributeError:
        return None
    return backend


def _same_prefix(tokenizer: Any, prompt: str, ids: list[int], offsets: list[tuple[int, int]]) -> bool:
    """True when the whole conversation's ids start with exactly the ids generation builds for ``prompt``."""
    prompt_ids = _ids(tokenizer, prompt)
    n = len(prompt_ids)
    return ids[:n] == list(prompt_ids) and (n == len(ids) or offsets[n][0] >= len(prompt))


def _encode_continuation(tokenizer, prompt: str, answer: str, prompt_ids: list[int]):
    """Ids and offsets (shifted past the prompt) of ``answer`` as it continues ``prompt``."""
    ids, offsets = _encode(tokenizer, prompt + answer)
    n = len(prompt_ids)
    if ids[:n] == prompt_ids and (n == len(ids) or offsets[n][0] >= len(prompt)):
        return ids[n:], offsets[n:]
    # The boundary tokenises differently in context: encode the answer alone (after a newline, so that a
    # SentencePiece tokenizer adds no word-start space), keeping the prompt's ids exactly as generation sees them.
    newline = _ids(tokenizer, "\n")
    ids, offsets = _encode(tokenizer, "\n" + answer)
    if ids[: len(newline)] == list(newline):
        ids, offsets = ids[len(newline):], offsets[len(newline):]
        return ids, [(s - 1 + len(prompt), e - 1 + len(prompt)) for s, e in offsets]
    ids, offsets = _encode(tokenizer, answer)
    return ids, [(s + len(prompt), e + len(prompt)) for s, e in offsets]


def encode_chat_detailed(record: dict, tokenizer: Any, template: Any, max_length: int,
                         train_on_prompt: bool = False) -> dict:
    """The single sample of a record that needs only one (with ``text`` and ``offsets``, for previews).

    Raises:
        UserError: when the record needs several samples (use :func:`encode_chat_samples`).
    """
    samples = encode_chat_samples(record, tokenizer, template, max_length, train_on_prompt)
    if len(samples) != 1:
        raise UserError(
            f"{record.get('source', '?')}: chat template {template.name!r} trains this conversation as "
            f"{len(samples)} samples (its turns render differently as history); use encode_chat_samples"
        )
    return samples[0]


def encode_chat(record: dict, tokenizer: Any, template: Any, max_length: int,
                train_on_prompt: bool = False) -> dict | None:
    """Token ids and labels of a record trained as one sample; None when nothing is supervised.

    Returns:
        ``{"input_ids", "labels", "truncated"}`` (unshifted labels, -100 where unsupervised).

    Raises:
        UserError: when the record needs several samples (use :func:`encode_chat_samples`).
    """
    sample = encode_chat_detailed(record, tokenizer, template, max_length, train_on_prompt)
    if not sample["supervised"]:
        return None
    return {"input_ids": sample["input_ids"], "labels": sample["labels"], "truncated": sample["truncated"]}


def supervised_spans(messages: list[dict], template: Any, tokenizer: Any = None) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendered conversation and the character spans of the turns trained inside it."""
    full, turns = plan_turns(messages, template, tokenizer)
    return full, [(len(t.prompt), len(t.prompt) + len(t.answer)) for t in turns if t.shared]


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """``ids`` where the token overlaps a span (:func:`_overlaps`, vectorised), -100 elsewhere."""
    import numpy as np

    if not ids:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = off[:, 0], off[:, 1]
    wide = end > start
    hit = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        hit |= np.where(wide, (start < e) & (end > s), (s <= start) & (start < e))
    return np.where(hit, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    start, end = offset
    if end <= start:  # zero-width tokens carry no text of their own
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def pretrain_blocks(texts: list[str], tokenizer: Any, block_size: int) -> list[dict]:
    """Causal-LM blocks: documents joined with EOS, cut into ``block_size`` tokens, the remainder dropped.

    Every block is full (no padding); ``labels == input_ids`` (the model shifts them).

    Raises:
        UserError: when the tokenizer has no EOS token.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("pretraining joins documents with the EOS token, but this tokenizer has no eos_token")
    stream: list[int] = []
    batch = 1000
    for i in range(0, len(texts), batch):
        for ids in tokenizer(list(texts[i : i + batch]), add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(eos)
    blocks = []
    for start in range(0, len(stream) - block_size + 1, block_size):
        ids = stream[start : start + block_size]
        blocks.append({"input_ids": ids, "labels": list(ids)})
    return blocks


def pad_id(tokenizer: Any) -> int:
    """THE padding id of ``tokenizer``: its pad token, else its EOS (padding is masked with :data:`IGNORE` and
    excluded by the attention mask, so it never hides a trained EOS), else 0."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return int(pad)
