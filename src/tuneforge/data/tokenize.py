"""Token ids and label masks: chat samples for SFT, fixed blocks for pretraining.

Labels are *not* shifted here: ``labels[t]`` is the target for position ``t`` exactly as transformers' causal-LM
loss expects (the model shifts once). ``-100`` marks a position with no loss.

SFT masking (docs/architecture.md, "Templates and masks"): the conversation is rendered once; the supervised span
of assistant turn *i* is the text between ``render(messages[:i], add_generation_prompt=True)`` and
``render(messages[:i+1])`` with trailing whitespace removed, so it holds the answer and its end-of-turn/EOS
marker. The full text is tokenized once (the same tokenization as at inference) and a token is supervised when
its character range overlaps a supervised span.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import UserError

IGNORE = -100


def supervised_spans(messages: list[dict], template: Any, tokenizer: Any = None) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` and return ``(text, [(start, end), ...])``: character spans of every assistant turn.

    Raises:
        UserError: when the template renders a conversation prefix that is not a prefix of the full rendering
            (the masks could not be located), naming the template.
    """
    full = template.render(messages, tokenizer=tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True, tokenizer=tokenizer)
        upto = template.render(messages[: i + 1], tokenizer=tokenizer).rstrip()
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise UserError(
                f"chat template {template.name!r} renders a conversation prefix that is not a prefix of the whole "
                f"conversation (at assistant turn {i}), so answer spans cannot be located; this template changes "
                "earlier turns depending on later ones. Set model.chat_template to a built-in "
                "(chatml, llama3, alpaca, plain)"
            )
        if len(upto) > len(prompt):
            spans.append((len(prompt), len(upto)))
    return full, spans


def encode_chat_detailed(
    record: dict, tokenizer: Any, template: Any, max_length: int, train_on_prompt: bool = False
) -> dict:
    """Like :func:`encode_chat` but always returns the sample, with ``text`` and ``offsets`` (for previews).

    ``input_ids``/``labels``/``offsets`` are already truncated to ``max_length``; ``supervised`` counts labels
    that are not -100.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "SFT masks need a fast tokenizer (offset mapping); this tokenizer is a slow one. "
            "Use a model whose tokenizer has a tokenizer.json"
        )
    text, spans = supervised_spans(record["messages"], template, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [tok if _overlaps(off, spans) else IGNORE for tok, off in zip(ids, offsets, strict=True)]
    truncated = len(ids) > max_length
    ids, labels, offsets = ids[:max_length], labels[:max_length], offsets[:max_length]
    return {
        "text": text,
        "input_ids": ids,
        "labels": labels,
        "offsets": offsets,
        "truncated": truncated,
        "supervised": sum(label != IGNORE for label in labels),
    }


def encode_chat(
    record: dict, tokenizer: Any, template: Any, max_length: int, train_on_prompt: bool = False
) -> dict | None:
    """Token ids and labels for one chat record.

    Args:
        record: a canonical chat record (``{"messages": [...]}``).
        tokenizer: a fast tokenizer (offset mapping needed).
        template: a :class:`tuneforge.data.templates.ChatTemplate`.
        max_length: keep at most this many tokens (right truncation).
        train_on_prompt: supervise every token, not only the assistant turns.

    Returns:
        ``{"input_ids", "labels", "truncated"}`` (lists of ints, unshifted labels, -100 where unsupervised), or
        None when no supervised token is left after truncation (the caller counts these).
    """
    sample = encode_chat_detailed(record, tokenizer, template, max_length, train_on_prompt)
    if not sample["supervised"]:
        return None
    return {"input_ids": sample["input_ids"], "labels": sample["labels"], "truncated": sample["truncated"]}


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
