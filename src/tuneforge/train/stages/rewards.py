"""Verifiable rewards for ``stage: grpo``: exact match, regex, numeric answer, format, and user functions.

Every reward scores one completion (the generated text cut at the template's stop strings, as ``tuneforge
generate`` shows it) and returns a float; TRL sums them with ``grpo.rewards[*].weight``.

- ``exact``: 1.0 when the completion equals the record's ``field`` after normalisation (case, surrounding
  punctuation and whitespace), else 0.0;
- ``regex``: 1.0 when ``pattern`` is found anywhere in the completion;
- ``numeric``: 1.0 when the last number in the completion is within ``tolerance`` of the record's ``field``;
- ``format``: 1.0 when the whole (stripped) completion matches ``pattern``;
- ``function``: ``package.module:name`` called as ``name(completion=..., prompt=..., **fields) -> float``, where
  ``fields`` are the record's other keys (strings);
- ``model``: a trained reward model (``{model: runs/rm}``, a ``stage: rm`` run) scores the record's prompt messages
  plus the completion as an assistant turn, rendered by the reward model's own template
  (:class:`tuneforge.models.reward.RewardScorer`); an answer too long for it scores ``None`` (TRL skips it).
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable
from typing import Any

from tuneforge.errors import UserError

RESERVED_FIELDS = ("prompt", "completion", "completion_ids", "trainer_state", "log_extra", "log_metric",
                   "environments")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


def normalize(text: str) -> str:
    """Lower case, collapsed whitespace, surrounding punctuation removed."""
    return " ".join(str(text).lower().split()).strip(string.punctuation + " ")


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands separators allowed), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _where(index: int) -> str:
    return f"grpo.rewards[{index}]"


def load_function(path: str, where: str) -> Callable:
    """Import ``package.module:name`` (or ``package.module.name``); UserError naming ``where`` when it fails."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{where}.function: {path!r} is not 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's to fix
        raise UserError(f"{where}.function: cannot import module {module_name!r} ({type(exc).__name__}: {exc}); "
                        "make it importable (on PYTHONPATH or installed)") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UserError(f"{where}.function: module {module_name!r} has no function {attr!r}")
    return function


def as_reward(value: Any, where: str) -> float:
    """``value`` as a finite float, or UserError naming the reward (bool counts as 0/1)."""
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UserError(f"{where}: the reward function returned {value!r} ({type(value).__name__}); "
                        "it must return a finite number")
    return float(value)


def build_rewards(specs: list[Any], records: list[dict], cut: Callable[[str], str],
                  prompt_messages: Callable[[str], list[dict]] | None = None) -> list[Callable]:
    """TRL reward functions for ``specs`` (``grpo.rewards``), checked against the training ``records``.

    Args:
        specs: :class:`tuneforge.config.schema.RewardConfig` items.
        records: canonical prompt records (``{"prompt", "fields", "source"}``).
        cut: completion text → the text a user would see (cut at the stop strings).
        prompt_messages: rendered prompt text (what TRL passes) → the record's prompt messages (``model`` rewards
            render them with the reward model's template).

    Raises:
        UserError: a field some record lacks, a field value that is not a number (numeric), a bad regex, a function
            that does not import or returns a non-number on the first record.
    """
    functions = []
    for index, spec in enumerate(specs):
        where = _where(index)
        function = (_model_reward(spec, where, cut, records, prompt_messages) if spec.type == "model"
                    else _one(spec, where, cut, records))
        function.__name__ = f"{spec.type}_{index}" if len(specs) > 1 else spec.type
        functions.append(function)
    return functions


def _one(spec: Any, where: str, cut: Callable[[str], str], records: list[dict]) -> Callable:
    if spec.type in ("exact", "numeric"):
        _check_field(spec, where, records)
    if spec.type == "exact":
        return _per_completion(lambda c, fields: float(normalize(c) == normalize(fields[spec.field])), cut)
    if spec.type == "numeric":
        def numeric(c: str, fields: dict) -> float:
            got = last_number(c)
            expected = last_number(str(fields[spec.field]))
            return float(got is not None and abs(got - expected) <= spec.tolerance)

        return _per_completion(numeric, cut)
    if spec.type in ("regex", "format"):
        try:
            pattern = re.compile(spec.pattern, re.DOTALL)
        except re.error as exc:
            raise UserError(f"{where}.pattern: not a valid regular expression ({exc})") from None
        if spec.type == "regex":
            return _per_completion(lambda c, fields: float(pattern.search(c) is not None), cut)
        return _per_completion(lambda c, fields: float(pattern.fullmatch(c.strip()) is not None), cut)
    user = load_function(spec.function, where)
    name = f"{where} ({spec.function})"

    def call(c: str, fields: dict, prompt: str = "") -> float:
        return as_reward(user(completion=c, prompt=prompt, **fields), name)

    first = records[0]
    try:
        call("", dict(first.get("fields", {})))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's function failed on a plain call
        raise UserError(f"{name}: failed when called as f(completion='', prompt='', **fields of "
                        f"{first.get('source', 'the first record')}): {type(exc).__name__}: {exc}") from None
    return _per_completion(call, cut, pass_prompt=True)


def _model_reward(spec: Any, where: str, cut: Callable[[str], str], records: list[dict],
                  prompt_messages: Callable[[str], list[dict]] | None) -> Callable:
    """A reward model's score of (the record's prompt, the completion as the assistant's turn)."""
    from tuneforge.models.reward import load_scorer

    scorer = load_scorer(spec.model, what=f"{where}.model")
    first = records[0]
    scorer.score([(first["prompt"], [{"role": "assistant", "content": "ok"}])], [first.get("source", "?")])

    def as_messages(prompt: Any) -> list[dict]:
        if isinstance(prompt, list):
            return prompt
        found = prompt_messages(prompt) if prompt_messages is not None else None
        return found if found is not None else [{"role": "user", "content": str(prompt)}]

    def reward(prompts, completions, completion_ids=None, **kwargs):
        items = [(as_messages(p), [{"role": "assistant", "content": cut(c)}]) for p, c in zip(prompts, completions,
                                                                                             strict=True)]
        try:
            return scorer.score(items)
        except UserError:  # an answer the template renders to nothing: score the rest one by one
            out = []
            for item in items:
                try:
                    out.append(scorer.score([item])[0])
                except UserError:
                    out.append(None)
            return out

    return reward


def _check_field(spec: Any, where: str, records: list[dict]) -> None:
    for record in records:
        fields = record.get("fields", {})
        if spec.field not in fields:
            raise UserError(f"{record.get('source', '?')}: record has no {spec.field!r} field, which {where} "
                            f"({spec.type}) compares against; fields: {sorted(fields)}")
        if spec.type == "numeric" and last_number(str(fields[spec.field])) is None:
            raise UserError(f"{record.get('source', '?')}: {spec.field!r} = {fields[spec.field]!r} is not a "
                            f"number ({where} is numeric)")


def _per_completion(score: Callable, cut: Callable[[str], str], pass_prompt: bool = False) -> Callable:
    def reward(prompts, completions, completion_ids=None, **kwargs):
        columns = {k: v for k, v in kwargs.items() if k not in RESERVED_FIELDS and isinstance(v, list)}
        out = []
        for i, completion in enumerate(completions):
            fields = {k: v[i] for k, v in columns.items()}
            text = cut(completion)
            out.append(score(text, fields, prompts[i]) if pass_prompt else score(text, fields))
        return out

    return reward
