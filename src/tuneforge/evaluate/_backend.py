"""The few functions of other packages that evaluation uses, imported lazily in one place.

``evaluate`` depends on ``models`` (loading, generation) and ``data`` (readers, chat masks) only through these
wrappers, so the command modules stay light and tests can substitute them.
"""

from __future__ import annotations

from typing import Any


def load_model(spec: str, device: str = "auto") -> Any:
    """``tuneforge.models.reference.load_for_inference``: run dir, HF model dir, adapter dir or hub id.

    Returns an object with ``model``, ``tokenizer``, ``template`` and ``source``; raises UserError when the
    model cannot be found.
    """
    from tuneforge.models.reference import load_for_inference

    return load_for_inference(spec, device=device)


def generate(loaded: Any, prompts: list, **options) -> list[str]:
    """One answer per prompt (a message list or a raw string) with ``loaded``'s model and chat template.

    ``options``: max_new_tokens, temperature (0 = greedy), top_p, top_k, repetition_penalty, seed.
    """
    from tuneforge.models.generation import GenerationSettings
    from tuneforge.models.generation import generate as _generate

    return list(_generate(loaded.model, loaded.tokenizer, loaded.template, prompts, GenerationSettings(**options)))


def read_records(path: str, format: str = "auto") -> list[dict]:
    """Canonical records of an eval/prompt file (``tuneforge.data.readers.read_records``)."""
    from tuneforge.data.readers import read_records as _read

    return _read(path, format)


def encode_chat(record: dict, tokenizer: Any, template: Any, max_length: int, train_on_prompt: bool) -> dict | None:
    """``{"input_ids", "labels", ...}`` of a chat record, labels -100 outside the assistant answers (None if
    nothing is supervised) — the same mask training uses."""
    from tuneforge.data.tokenize import encode_chat as _encode

    return _encode(record, tokenizer, template, max_length, train_on_prompt)
