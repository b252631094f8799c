"""THE data-format declarations: every format a data row may have, and which of them ``data.format`` may name.

Pure (no torch). Each format is implemented in :mod:`tuneforge.data.readers` by one ``register_format(name,
convert, detect)`` call under the same name (a converter from a row to a canonical record and a detector for
``data.format: auto``); ``register_format`` refuses a name not declared here and tests/test_registries.py checks
that both sides, the schema, the CLI and docs/data.md agree. See docs/architecture.md, "How to add a data format".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormatSpec:
    """One data format.

    Attributes:
        name: the format's name (``data.format``, ``data augment --format``).
        record: the canonical record a row becomes: ``text``, ``chat`` (``messages``), ``paired``, ``unpaired`` or
            ``prompt`` (the data kinds of :mod:`tuneforge.config.stages`).
        selectable: ``data.format`` may name it (otherwise it is only detected from a row's keys).
        help: one line for the CLI and the docs.
    """

    name: str
    record: str
    selectable: bool
    help: str


#: every data format, in detection order (the first whose detector accepts a row's keys wins)
DATA_FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in (
    FormatSpec("preference", "paired", False, "{prompt, chosen, rejected}, or chosen/rejected whole conversations"),
    FormatSpec("kto", "unpaired", False, "{prompt, completion, label} (label true = desirable)"),
    FormatSpec("prompt", "prompt", False, "{prompt, <fields rewards check>} (GRPO)"),
    FormatSpec("chat", "chat", True, "{messages|conversations: [...]}: role/content or ShareGPT from/value turns"),
    FormatSpec("alpaca", "chat", True, "{instruction, input?, output, system?, history?}"),
    FormatSpec("text", "text", True, "{text} rows, or .txt documents split on data.text_separator"),
)}

#: the values of ``data.format``: ``auto`` (detected from the first row) and every selectable format
FORMAT_CHOICES = ("auto", *(name for name, spec in DATA_FORMATS.items() if spec.selectable))
