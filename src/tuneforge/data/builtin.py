"""Built-in data for the offline quickstart: text every Python install carries.

* Pretraining corpus: the Python language reference shipped in ``pydoc_data`` (≈465K characters).
* Instruction set with checkable answers: "which kind of documentation is this sentence from —
  statement, expression or type?". The label is the kind of the topic the sentence was taken from, so every
  answer is known. Lexical cues make it learnable by a 5M-parameter model in about a minute of LoRA
  (ENVIRONMENT.md), and exact match scores it.
"""

from __future__ import annotations

import random
import re

LABELS = ("statement", "expression", "type")

# pydoc topic → kind of documentation it belongs to (topics not listed are not used for the task).
TOPIC_KIND = {
    **dict.fromkeys(
        ["assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "for",
         "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with"],
        "statement",
    ),
    **dict.fromkeys(
        ["atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
         "calls", "comparisons", "conversions", "exprlists", "lambda", "operator-summary", "power", "shifting",
         "slicings", "subscriptions", "unary", "yield"],
        "expression",
    ),
    **dict.fromkeys(
        ["bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
         "callable-types", "dict", "floating", "imaginary", "integers", "lists", "numbers", "numeric-types",
         "sequence-types", "string-methods", "strings", "types", "typesfunctions", "typesmapping", "typesmethods",
         "typesmodules", "typesseq", "typesseq-mutable"],
        "type",
    ),
}

QUESTION = "Which kind of Python documentation is this sentence from: statement, expression or type?"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def pydoc_topics() -> dict[str, str]:
    """The stdlib's documentation topics (name → text)."""
    from pydoc_data.topics import topics

    return dict(topics)


def pretrain_documents() -> list[str]:
    """One document per documentation topic, paragraphs kept, for continued pretraining."""
    return [text.strip() for _, text in sorted(pydoc_topics().items()) if text.strip()]


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in _SENTENCE_END.split(flat) if 40 <= len(s.strip()) <= 220 and "::" not in s]


def classification_items(seed: int = 0) -> list[dict]:
    """Every usable (sentence, kind) item as a chat record, shuffled with ``seed``.

    Returns:
        Records ``{"messages": [user, assistant], "label": kind, "topic": topic}``; the assistant answer is the
        single word ``statement``, ``expression`` or ``type``.
    """
    items = []
    seen = set()
    for topic, text in sorted(pydoc_topics().items()):
        kind = TOPIC_KIND.get(topic)
        if kind is None:
            continue
        for sentence in _sentences(text):
            if sentence in seen:
                continue
            seen.add(sentence)
            items.append({
                "messages": [
                    {"role": "user", "content": f"{QUESTION}\n\n{sentence}"},
                    {"role": "assistant", "content": kind},
                ],
                "label": kind,
                "topic": topic,
            })
    random.Random(seed).shuffle(items)
    return items


def split_items(items: list[dict], heldout: int, eval_size: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Split into (train, eval, held-out test) — disjoint, in the given (shuffled) order."""
    test = items[:heldout]
    evaluation = items[heldout : heldout + eval_size]
    train = items[heldout + eval_size :]
    return train, evaluation, test
