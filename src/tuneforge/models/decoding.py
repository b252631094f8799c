"""The one decoding loop: batched generation where every row has its own settings, stops, seed, log-probs and
cancellation. ``models.generation.complete`` / ``generate`` / ``stream_generate`` run it over their prompts; serve
runs it over its dynamic batches.

:func:`decode_rows` runs one ``model.generate`` over left-padded prompt token ids (the KV cache, position ids and
peft adapters are transformers' own) and does the per-row work itself:

- **token choice** per row (a logits processor): greedy rows take the arg-max of the raw logits after the row's
  repetition penalty (over its own prompt and generated ids: padding is never penalised); sampling rows also apply
  their temperature, top-k and top-p and draw from their own ``torch.Generator`` (seeded from ``settings.seed``, or
  from the OS when it is ``None``), so a seeded row gives the same tokens whatever else shares its batch;
- **stopping** per row (a stopping criterion): a stop token (EOS, the template's end-of-turn), a stop string in the
  decoded text, the row's own ``max_new_tokens`` or its ``cancelled`` event end that row alone; the batch ends when
  every row has ended (a cancelled row therefore stops within one token);
- **incremental text** per row: ``on_event`` receives each token with the text it completes, text that may be the
  start of a stop string (or an incomplete UTF-8 character) held back until it is known not to be;
- **log-probs**: with ``top_logprobs`` set, the chosen token's log-probability under the model's distribution
  (before sampling settings are applied) and the ``top_logprobs`` most likely alternatives.

A row's greedy text does not depend on what shares its batch; ``token_ids`` are the tokens actually generated
(without the stop token; up to the token that completed a stop string), never more than ``max_new_tokens``.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneforge.models.sampling import (
    GenerationSettings,
    choose_token,
    cut_at_stop,
    held_back,
    stop_strings,
    stop_token_ids,
)


@dataclass(frozen=True)
class TokenLogprob:
    """One token and its log-probability, with the most likely alternatives at its position.

    Attributes:
        token_id: the token.
        logprob: its natural-log probability under the model (``None`` for the first prompt token, which nothing
            predicts).
        top: ``(token_id, logprob)`` of the most likely tokens at this position, most likely first.
    """

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """What :func:`decode_rows` reports for each generated token of a row.

    Attributes:
        token: the token with its log-probs (``logprob`` is ``None`` unless the row asked for log-probs);
            ``None`` for the last event of a row that ended on a stop token (which is not part of the output).
        text: text that became final with this token (may be empty: held back, or a partial character).
    """

    token: TokenLogprob | None
    text: str


@dataclass
class DecodeRow:
    """One prompt to continue.

    Attributes:
        prompt_ids: the prompt's token ids (already rendered and tokenised).
        settings: budget, sampling and extra stop strings of this row.
        top_logprobs: ``None``: no log-probs; ``k >= 0``: the chosen token's log-prob plus ``k`` alternatives.
        cancelled: set it (from any thread) to end the row at its next token (``finish_reason`` ``"cancelled"``).
        on_event: called in the generating thread with each :class:`TokenEvent` (keep it quick).
    """

    prompt_ids: Sequence[int]
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    top_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    on_event: Callable[[TokenEvent], None] | None = None


@dataclass(frozen=True)
class RowResult:
    """A finished row.

    Attributes:
        text: the generated text, cut before the first stop string.
        token_ids: the tokens generated (without the stop token; a stop string's own tokens included).
        finish_reason: ``"stop"``, ``"length"`` or ``"cancelled"``.
        logprobs: one :class:`TokenLogprob` per generated token when the row asked for them, else ``None``.
        stop_token: the stop token that ended the row with its log-probs, when the row asked for log-probs and a
            stop token (not a stop string or the budget) ended it. It is not part of ``text`` or ``token_ids``;
            an OpenAI completion lists it last among the log-probs (lm-evaluation-harness drops the last listed
            token of an ``echo`` + ``max_tokens: 1`` answer as the generated one: without it, it dropped a token
            of the prompt whenever the model's next token was EOS).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_token: TokenLogprob | None = None


def top_alternatives(logprobs_row: Any, k: int) -> tuple[tuple[int, float], ...]:
    """The ``k`` most likely ``(token_id, logprob)`` of one position's log-prob vector, most likely first."""
    if k <= 0:
        return ()
    values, indices = logprobs_row.topk(min(k, logprobs_row.shape[-1]))
    return tuple(zip(indices.tolist(), values.tolist(), strict=True))


def decode_rows(model: Any, tokenizer: Any, template: Any, rows: Sequence[DecodeRow]) -> list[RowResult]:
    """Generate a continuation for every row in one batch (see the module docstring).

    Args:
        model: a causal LM or peft model (already switched to the wanted adapter), in eval mode.
        tokenizer: its tokenizer (decodes text, gives EOS and pad).
        template: the chat template whose stop strings and stop tokens apply (``None``: EOS only).
        rows: the prompts; each needs ``max_new_tokens >= 1``.

    Returns:
        One :class:`RowResult` per row, in order.
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    if not rows:
        return []
    stop_ids = stop_token_ids(tokenizer, template, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    states = [_RowState(row, tokenizer, stop_strings(tokenizer, template, row.settings.stop), stop_ids)
              for row in rows]
    device = next(model.parameters()).device
    width = max(len(row.prompt_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.prompt_ids):] = torch.tensor(list(row.prompt_ids), dtype=torch.long)
        attention[i, width - len(row.prompt_ids):] = 1
    # Neutral settings: every choice is made by _Choose; the model's own generation_config must not add warpers.
    config = GenerationConfig(max_new_tokens=max(row.settings.max_new_tokens for row in rows), do_sample=False,
                              temperature=1.0, top_p=1.0, top_k=None, repetition_penalty=1.0,
                              eos_token_id=stop_ids or None, pad_token_id=pad_id, use_cache=True)
    with torch.no_grad():
        model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config,
                       logits_processor=LogitsProcessorList([_Choose(states)]),
                       stopping_criteria=StoppingCriteriaList([_Stop(states, width)]))
    return [state.result() for state in states]


class _RowState:
    """Per-row bookkeeping: generator, generated ids, text shown so far, log-probs, finish reason."""

    def __init__(self, row: DecodeRow, tokenizer: Any, stops: list[str], stop_ids: list[int]):
        import torch

        self.row, self.tokenizer, self.stops, self.stop_ids = row, tokenizer, stops, set(stop_ids)
        self.settings = row.settings
        self.sampling = self.settings.sampling
        self.generator = None
        if self.sampling:
            seed = self.settings.seed if self.settings.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(seed % 2**64)
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.pending: TokenLogprob | None = None  # the chosen token's log-probs, until the stop check takes it
        self.stop_token: TokenLogprob | None = None
        self.text = ""
        self.shown = 0
        self.finish: str | None = None

    def choose(self, logits: Any) -> int:
        """The next token from this row's raw logits (float32, one row)."""
        import torch

        if self.row.top_logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = choose_token(logits, self.settings, self.generator, self.row.prompt_ids, self.ids)
        if self.row.top_logprobs is not None:
            self.pending = TokenLogprob(token, float(logprobs[token]),
                                        top_alternatives(logprobs, self.row.top_logprobs))
        return token

    def advance(self, token: int) -> None:
        """Take the token the batch appended for this row: finish the row or report its new text."""
        if self.row.cancelled.is_set():
            self.finish = "cancelled"
            return
        logprob, self.pending = self.pending or TokenLogprob(token, None), None
        if token in self.stop_ids:
            self.finish = "stop"
            if self.row.top_logprobs is not None:
                self.stop_token = logprob
            if len(self.text) > self.shown:  # nothing more can follow: release the held-back text
                self._emit(None, self.text[self.shown:])
            return
        self.ids.append(token)
        if self.row.top_logprobs is not None:
            self.logprobs.append(logprob)
        decoded = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = cut_at_stop(decoded, self.stops)
        if len(cut) < len(decoded):
            self.text, self.finish = cut, "stop"
        else:
            self.text = decoded
            if len(self.ids) >= self.settings.max_new_tokens:
                self.finish = "length"
        end = len(self.text) if self.finish else len(self.text) - held_back(self.text, self.stops)
        self._emit(logprob, self.text[self.shown:max(end, self.shown)])

    def _emit(self, logprob: TokenLogprob | None, text: str) -> None:
        self.shown += len(text)
        if self.row.on_event is not None:
            self.row.on_event(TokenEvent(logprob, text))

    def result(self) -> RowResult:
        finish = self.finish or ("length" if len(self.ids) >= self.settings.max_new_tokens else "stop")
        return RowResult(self.text, tuple(self.ids), finish,
                         tuple(self.logprobs) if self.row.top_logprobs is not None else None, self.stop_token)


class _Choose:
    """Logits processor: each unfinished row picks its token; the row's scores become one-hot so the arg-max that
    ``generate`` takes returns it."""

    def __init__(self, states: list[_RowState]):
        self.states = states

    def __call__(self, input_ids, scores):

        chosen = scores.new_full(scores.shape, float("-inf"))
        for i, state in enumerate(self.states):
            token = 0 if state.finish else state.choose(scores[i])
            chosen[i, token] = 0.0
        return chosen


class _Stop:
    """Stopping criterion: hands each row the token just appended and reports which rows are done."""

    def __init__(self, states: list[_RowState], prompt_width: int):
        self.states, self.prompt_width = states, prompt_width

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        last = input_ids[:, -1].tolist()
        for i, state in enumerate(self.states):
            if state.finish is None:
                state.advance(last[i])
        return torch.tensor([state.finish is not None for state in self.states], device=input_ids.device)
