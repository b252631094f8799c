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

import logging
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneforge.models.memory import kv_store_columns
from tuneforge.models.sampling import (
    GenerationSettings,
    choose_token,
    cut_at_stop,
    held_back,
    stop_strings,
    stop_token_ids,
)

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- continuous batching


@dataclass(eq=False)
class Joining:
    """A row joining a :class:`ContinuousBatch`.

    Attributes:
        row: the prompt and its settings, stops, log-probs, cancellation and events.
        tokenizer: decodes this row's text.
        template: whose stop strings and stop tokens apply (``None``: EOS only).
        adapter: the peft adapter this row runs with (``None``: the model as it is).
        handle: returned with the row's result (the caller's own object).
    """

    row: DecodeRow
    tokenizer: Any
    template: Any = None
    adapter: str | None = None
    handle: Any = None


class _Slot:
    """A running row: its state, adapter, real tokens in the cache, and the token to feed next."""

    def __init__(self, joining: Joining, state: _RowState):
        self.joining, self.state = joining, state
        self.length = 0
        self.next_token: int | None = None

    def context(self) -> list[int]:
        """Every token the cache holds for this row once the pending token is fed: prompt + generated so far."""
        return [*self.joining.row.prompt_ids, *self.state.ids]

    @property
    def cost(self) -> int:
        return len(self.joining.row.prompt_ids) + self.joining.row.settings.max_new_tokens


class ContinuousBatch:
    """Continuous batching on one model: rows join (:meth:`add`) and leave at every step (:meth:`step`).

    The batch holds one KV cache for all running rows (:class:`_KVStore`: buffers sized at admission for the rows'
    prompt + max new tokens, as serve's bill prices them),
    left-padded so that every row's newest token sits in the last column of its window; a decoding step writes one
    column in place (no copy of the cache), a joining row is prefilled (with the other rows joining at the same step,
    left-padded, or alone after a cached prefix) and only its own rows are copied in; a finished row's place is
    taken by the last row (one row's cache moves) and the columns no row uses any more are dropped by moving the
    window's start. Each row keeps its own position ids and attention mask, so its tokens are the ones it gets alone
    (greedy: the same text; seeded sampling: the same draw).

    Rows of different LoRA adapters of one peft model decode in the same forward pass (peft's ``adapter_names``)
    when ``mixed_adapters`` is set; otherwise ``activate`` (called before every forward) chooses the adapter.

    Prefix reuse: the keys and values of the last ``prefix_entries`` prompts of at least ``min_prefix`` tokens are
    kept, at most ``prefix_tokens`` tokens in all (``None``: no bound; the oldest entries go first, a longer prompt
    is not kept); a joining prompt that shares at least ``min_prefix`` leading tokens with one (a shared system prompt,
    few-shot examples) starts from that cache and computes only the rest.

    Failure isolation: a failing prefill of several joining rows is retried row by row; a failing step re-prefills
    every running row alone from its prompt plus what it generated (its state, generator and text shown so far are
    kept); a row that fails alone, or whose own token choice or event callback raises, finishes with the exception.
    """

    def __init__(self, model: Any, *, mixed_adapters: bool = False, activate: Callable[[], None] | None = None,
                 prefix_entries: int = 8, min_prefix: int = 16, prefix_tokens: int | None = None):
        import inspect

        self.model, self.mixed_adapters, self.activate = model, mixed_adapters, activate
        self.prefix_entries, self.min_prefix, self.prefix_tokens = prefix_entries, min_prefix, prefix_tokens
        self.slots: list[_Slot] = []
        self.cache: Any = None  # a DynamicCache whose layers read and write self.store
        self.store: _KVStore | None = None
        self.mask: Any = None
        self.device = next(model.parameters()).device
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._keep_last = "logits_to_keep" in inspect.signature(base.forward).parameters
        self._prefixes: dict[tuple, list[tuple[Any, Any]]] = {}  # (adapter, tokens) -> per-layer (keys, values)
        self._stops: dict[tuple[int, int], list[int]] = {}
        self.prefix_hits = 0

    def __len__(self) -> int:
        return len(self.slots)

    def cost(self, extra: Sequence[int] = ()) -> int:
        """Tokens the batch may come to hold, ``extra`` rows (their prompt + max new tokens) added: rows x the
        longest row, or the KV store's own size when they fit in it (it is not reallocated smaller when rows
        leave)."""
        costs = [slot.cost for slot in self.slots] + list(extra)
        need = len(costs) * max(costs, default=0)
        if self.store is not None and self.store.fits(len(costs), max(costs, default=0)):
            return max(need, self.store.rows * self.store.longest)
        return need

    @property
    def prefix_held(self) -> int:
        """Tokens the prefix-reuse store holds."""
        return sum(len(tokens) for _, tokens in self._prefixes)

    # ------------------------------------------------------------------ joining

    def add(self, joining: Sequence[Joining]) -> list[tuple[Any, Any]]:
        """Prefill ``joining`` and make them part of the batch.

        Returns:
            ``(handle, RowResult | Exception)`` of the rows that already ended (a one-token budget, a stop token
            first, cancelled, or a failure).
        """
        finished: list[tuple[Any, Any]] = []
        slots = []
        for join in joining:
            try:
                stops = self._stop_ids(join)
                state = _RowState(join.row, join.tokenizer, stop_strings(join.tokenizer, join.template,
                                                                         join.row.settings.stop), stops)
                slots.append(_Slot(join, state))
            except Exception as exc:  # noqa: BLE001 - a row that cannot even start fails alone
                finished.append((join.handle, exc))
        return finished + self._prefill(slots)

    def _stop_ids(self, join: Joining) -> list[int]:
        key = (id(join.tokenizer), id(join.template))
        if key not in self._stops:
            self._stops[key] = stop_token_ids(join.tokenizer, join.template, self.model)
        return self._stops[key]

    def _prefill(self, slots: list[_Slot]) -> list[tuple[Any, Any]]:
        """Compute the caches of ``slots`` (fresh rows, or rows re-admitted after a failed step), choose their next
        token, merge the unfinished ones into the batch."""
        finished: list[tuple[Any, Any]] = []
        plain, prefixed = [], []
        for slot in slots:
            if slot.state.row.cancelled.is_set():
                slot.state.finish = "cancelled"
                finished.append((slot.joining.handle, slot.state.result()))
                continue
            hit = self._longest_prefix(slot)
            (prefixed if hit else plain).append((slot, hit))
        groups = ([[s for s, _ in plain]] if plain else []) + [[s] for s, _ in prefixed]
        hits = {id(s): hit for s, hit in prefixed}
        for group in groups:
            try:
                logits, cache, mask = self._prefill_group(group, hits.get(id(group[0])))
            except Exception as exc:  # noqa: BLE001 - isolate: each row alone
                if len(group) == 1:
                    log.exception("prefill failed for one row")
                    finished.append((group[0].joining.handle, exc))
                    continue
                log.warning("a prefill of %d rows failed (%s: %s); retrying them one by one", len(group),
                            type(exc).__name__, exc)
                for slot in group:
                    finished += self._prefill([slot])
                continue
            finished += self._take(group, logits, cache, mask)
        return finished

    def _prefill_group(self, group: list[_Slot], hit: tuple[int, list] | None):
        import torch
        from transformers import DynamicCache

        contexts = [slot.context() for slot in group]
        if hit is not None:  # one row, after a cached prefix
            common, layers = hit
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :common], v[:, :, :common]) for k, v in layers])
            ids = torch.tensor([contexts[0][common:]], dtype=torch.long)
            mask = torch.ones((1, len(contexts[0])), dtype=torch.long)
            positions = torch.arange(common, len(contexts[0])).unsqueeze(0)
            self.prefix_hits += 1
        else:
            width = max(len(c) for c in contexts)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, context in enumerate(contexts):
                ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long)
                mask[i, width - len(context):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, [slot.joining.adapter for slot in group])
        for slot, context in zip(group, contexts, strict=True):
            slot.length = len(context)
        self._remember(group, contexts, cache, mask)
        return logits, cache, mask

    def _forward(self, ids, mask, positions, cache, adapters: list[str | None]):
        """One forward pass; the float32 logits of each row's last position."""
        import torch

        kwargs: dict[str, Any] = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                                  "position_ids": positions.to(self.device), "past_key_values": cache,
                                  "use_cache": True}
        if self.mixed_adapters:
            kwargs["adapter_names"] = [a if a is not None else "__base__" for a in adapters]
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        if self.activate is not None:
            self.activate()
        with torch.no_grad():
            out = self.model(**kwargs)
        return out.logits[:, -1].float()

    def _take(self, group: list[_Slot], logits, cache, mask) -> list[tuple[Any, Any]]:
        """Choose each row's next token from ``logits``; merge the rows that go on (with their cache) into the
        batch; return the ones that ended."""
        finished, keep = [], []
        for i, slot in enumerate(group):
            outcome = self._advance(slot, logits[i])
            if outcome is None:
                keep.append(i)
            else:
                finished.append(outcome)
        if keep:
            if len(keep) < len(group):
                index = torch_index(keep, mask.device)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[index], layer.values[index]
                mask = mask[index]
            self._merge(cache, mask, [group[i] for i in keep])
        return finished

    def _advance(self, slot: _Slot, logits, token: int | None = None) -> tuple[Any, Any] | None:
        """Choose (unless ``token`` was chosen already) and take the row's next token: ``None`` while it goes on,
        else ``(handle, result)``."""
        state = slot.state
        try:
            if token is None:
                token = state.choose(logits)
            state.advance(token)
        except Exception as exc:  # noqa: BLE001 - this row's own failure (its callback, its choice)
            log.exception("a row failed while choosing or reporting its token")
            return slot.joining.handle, exc
        if state.finish is not None:
            return slot.joining.handle, state.result()
        slot.next_token = token
        return None

    def _merge(self, cache, mask, slots: list[_Slot]) -> None:
        """Copy a prefilled group's cache rows into the batch's store (only theirs are copied), both left-padded to
        the wider."""
        import torch

        mask = mask.to(self.device)
        # the prefill cache's layers handed over: the store frees each as it copies it in
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        cache.layers.clear()
        longest = max(slot.cost for slot in [*self.slots, *slots])
        if self.store is None:
            self.store = _KVStore(layers, mask.shape[1], longest)
            self.cache, self.mask, self.slots = self.store.cache(), mask, list(slots)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        self.store.insert(layers, width, longest)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)], 0)
        self.slots += slots

    # ------------------------------------------------------------------ prefix reuse

    def _longest_prefix(self, slot: _Slot) -> tuple[int, list] | None:
        if not self.prefix_entries:
            return None
        context = slot.context()
        best: tuple[int, list] | None = None
        for (adapter, tokens), layers in self._prefixes.items():
            if adapter != slot.joining.adapter:
                continue
            common = _common_prefix(tokens, context)
            common = min(common, len(context) - 1)  # at least one token to compute: it gives the next logits
            if common >= self.min_prefix and (best is None or common > best[0]):
                best = (common, layers)
        return best

    def _remember(self, group: list[_Slot], contexts: list[list[int]], cache, mask) -> None:
        if not self.prefix_entries:
            return
        width = mask.shape[1]
        for i, (slot, context) in enumerate(zip(group, contexts, strict=True)):
            if len(context) < self.min_prefix or (self.prefix_tokens is not None
                                                  and len(context) > self.prefix_tokens):
                continue
            key = (slot.joining.adapter, tuple(context))
            self._prefixes.pop(key, None)
            # the oldest entries leave first, before the new one is copied (the bound holds throughout)
            while self._prefixes and (len(self._prefixes) >= self.prefix_entries or (
                    self.prefix_tokens is not None and self.prefix_held + len(context) > self.prefix_tokens)):
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[key] = [(layer.keys[i:i + 1, :, width - len(context):].clone(),
                                    layer.values[i:i + 1, :, width - len(context):].clone())
                                   for layer in cache.layers]

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[tuple[Any, Any]]:
        """One decoding step for every running row; returns ``(handle, RowResult | Exception)`` of the rows that
        ended (they have left the batch)."""
        import torch

        finished: list[tuple[Any, Any]] = []
        gone = [i for i, slot in enumerate(self.slots) if slot.state.row.cancelled.is_set()]
        for i in gone:
            self.slots[i].state.finish = "cancelled"
            finished.append((self.slots[i].joining.handle, self.slots[i].state.result()))
        self._retire(gone)
        if not self.slots:
            return finished
        ids = torch.tensor([[slot.next_token] for slot in self.slots], dtype=torch.long)
        positions = torch.tensor([[slot.length] for slot in self.slots], dtype=torch.long)
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.slots), 1))], 1)
        try:
            self.store.reserve(1)
            logits = self._forward(ids, mask, positions, self.cache, [s.joining.adapter for s in self.slots])
            self.store.commit(1)
        except Exception as exc:  # noqa: BLE001 - re-admit every row alone; only rows failing alone fail
            log.warning("a decoding step of %d rows failed (%s: %s); re-prefilling them one by one",
                        len(self.slots), type(exc).__name__, exc)
            slots, self.slots, self.cache, self.mask, self.store = self.slots, [], None, None, None
            for slot in slots:
                finished += self._prefill([slot])
            return finished
        self.mask = mask
        ended = []
        for i, (slot, token) in enumerate(zip(self.slots, _plain_greedy(self.slots, logits), strict=True)):
            slot.length += 1
            outcome = self._advance(slot, logits[i], token)
            if outcome is not None:
                finished.append(outcome)
                ended.append(i)
        self._retire(ended)
        return finished

    def _retire(self, indices: list[int]) -> None:
        """Drop rows from the batch and the cache columns no remaining row uses."""
        if not indices:
            return
        drop = set(indices)
        remaining = len(self.slots) - len(drop)
        if not remaining:
            self.slots, self.cache, self.mask, self.store = [], None, None, None
            return
        # The rows left past the end take the places of the rows gone before it: only their caches move.
        holes = [i for i in range(remaining) if i in drop]
        movers = [i for i in range(remaining, len(self.slots)) if i not in drop]
        order = list(range(remaining))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self.store.move(movers, holes, remaining)
        self.slots = [self.slots[i] for i in order]
        mask = self.mask[torch_index(order, self.mask.device)]
        used = mask.any(0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        self.store.trim(start)
        self.mask = mask[:, start:]

    def cancel_all(self, reason: BaseException) -> list[tuple[Any, Any]]:
        """End every running row with ``reason`` (server shutting down)."""
        finished = [(slot.joining.handle, reason) for slot in self.slots]
        self.slots, self.cache, self.mask, self.store = [], None, None, None
        return finished


def _plain_greedy(slots: list[_Slot], logits) -> list[int | None]:
    """The arg-max token of every greedy row without penalties or log-probs, in one tensor operation (``None`` for
    the other rows: they choose their own token). The same token ``choose_token`` gives: the first maximum, NaN
    counted as the lowest score."""
    import torch

    plain = [not s.state.sampling and s.state.row.top_logprobs is None and s.state.settings.repetition_penalty == 1.0
             and not s.state.settings.presence_penalty and not s.state.settings.frequency_penalty for s in slots]
    if not any(plain):
        return [None] * len(slots)
    tokens = torch.argmax(torch.nan_to_num(logits, nan=float("-inf")), dim=-1).tolist()
    return [token if is_plain else None for token, is_plain in zip(tokens, plain, strict=True)]


class _KVStore:
    """The running rows' keys and values in preallocated buffers ``[rows, heads, columns, head_dim]`` per layer.

    Rows ``0..n-1`` are the running rows; columns ``start..end-1`` are the window every row is left-padded to (its
    newest token in column ``end - 1``). A step :meth:`reserve` s room for its new column(s), the model's attention
    layers write them in place through :meth:`cache` (a ``DynamicCache`` whose layers are views of the buffers), and
    :meth:`commit` moves ``end`` (a step never copies the whole cache, unlike ``DynamicCache``'s ``torch.cat`` per
    layer per step).

    Sized at admission, as serve's bill prices it (``models.memory.serve_components``): as many rows as run and
    ``models.memory.kv_store_columns(longest)`` columns, ``longest`` being the longest running row's prompt + max new
    tokens (a row's window never grows past it). When a joining row needs more rows or a longer ``longest``, the
    buffers are reallocated at exactly that size, one layer's keys or values at a time (each old tensor is freed
    before the next new one is allocated: no second copy of the store); when the window reaches the buffers' end it
    is moved back within them (the spare columns make that once per quarter-row of steps at most).
    """

    def __init__(self, layers: list[tuple[Any, Any]], width: int, longest: int):
        self.n, self.start, self.end = 0, 0, 0
        self.longest = 0  # the row length the columns are sized for
        # per layer: (heads, head_dim, dtype, device) of its keys and of its values
        self.layout = [tuple((t.shape[1], t.shape[3], t.dtype, t.device) for t in pair) for pair in layers]
        self.buffers: list[list[Any]] = []
        self.insert(layers, width, longest)

    @property
    def rows(self) -> int:
        return self.buffers[0][0].shape[0] if self.buffers else 0

    @property
    def columns(self) -> int:
        return self.buffers[0][0].shape[2] if self.buffers else 0

    def fits(self, rows: int, longest: int) -> bool:
        """Whether ``rows`` rows of at most ``longest`` tokens fit without reallocating."""
        return rows <= self.rows and longest <= self.longest

    def _allocate(self, rows: int, columns: int, left: int) -> None:
        """New buffers of ``rows`` x ``columns``, the current window copied in starting at column ``left``; one
        layer's keys or values at a time, the old tensor dropped before the next new one is allocated."""
        import torch

        width = self.end - self.start
        if not self.buffers:
            self.buffers = [[None, None] for _ in self.layout]
        for layer, shapes in zip(self.buffers, self.layout, strict=True):
            for which, (heads, head_dim, dtype, device) in enumerate(shapes):
                # zeros, not empty: masked columns are multiplied by a zero weight, and 0 x NaN would be NaN
                tensor = torch.zeros((rows, heads, columns, head_dim), dtype=dtype, device=device)
                old, layer[which] = layer[which], tensor
                if old is not None and self.n and width:
                    tensor[:self.n, :, left:left + width] = old[:self.n, :, self.start:self.end]
                del old
        self.start, self.end = left, left + width

    def _ensure(self, rows: int, left: int, right: int, longest: int) -> None:
        """Room for ``rows`` rows, ``left`` more columns before the window and ``right`` after it, rows of at most
        ``longest`` tokens: the window is moved within the buffers when they are large enough (only the running
        rows' window is copied), else they are reallocated at the size the rows need."""
        width = self.end - self.start + left + right
        if self.fits(rows, longest) and width <= self.columns:
            if left > self.start or self.end + right > self.columns:
                self._shift(left + (self.columns - width) // 4)
            return
        self.longest = max(longest, width)
        columns = kv_store_columns(self.longest)
        # a quarter of the free columns before the window: joining rows wider than it need not move it at once
        self._allocate(rows, columns, left=left + (columns - width) // 4)

    def _shift(self, start: int) -> None:
        """Move the window to begin at column ``start`` of the same buffers."""
        width = self.end - self.start
        if self.n and width:
            for buf_k, buf_v in self.buffers:
                buf_k[:self.n, :, start:start + width] = buf_k[:self.n, :, self.start:self.end].clone()
                buf_v[:self.n, :, start:start + width] = buf_v[:self.n, :, self.start:self.end].clone()
        self.start, self.end = start, start + width

    def insert(self, layers: list[tuple[Any, Any] | None], width: int, longest: int) -> None:
        """Append rows (their left-padded keys and values) to the batch, the window widened to ``width`` columns;
        ``longest``: the longest (prompt + max new tokens) of every row once they are in. Each entry of ``layers``
        is set to ``None`` once copied (a prefill cache whose caller holds no other reference is freed layer by
        layer)."""
        rows, _, their_width, _ = layers[0][0].shape
        wider = max(0, width - (self.end - self.start))
        self._ensure(self.n + rows, wider, 0, longest)
        self.start -= wider
        for i, (buf_k, buf_v) in enumerate(self.buffers):
            keys, values = layers[i]
            layers[i] = None
            buf_k[self.n:self.n + rows, :, self.end - their_width:self.end] = keys
            buf_v[self.n:self.n + rows, :, self.end - their_width:self.end] = values
            del keys, values
        self.n += rows

    def move(self, sources: list[int], targets: list[int], remaining: int) -> None:
        """Copy the window of rows ``sources`` to rows ``targets``; keep ``remaining`` rows."""
        if sources:
            src, dst = torch_index(sources, self.buffers[0][0].device), torch_index(targets, self.buffers[0][0].device)
            for buf_k, buf_v in self.buffers:
                buf_k[dst, :, self.start:self.end] = buf_k[src, :, self.start:self.end]
                buf_v[dst, :, self.start:self.end] = buf_v[src, :, self.start:self.end]
        self.n = remaining

    def trim(self, columns: int) -> None:
        """Drop the first ``columns`` columns of the window (no row uses them)."""
        self.start += columns

    def reserve(self, columns: int) -> None:
        self._ensure(self.n, 0, columns, self.longest)

    def commit(self, columns: int) -> None:
        self.end += columns

    def cache(self) -> Any:
        """A ``DynamicCache`` over the store: each layer writes its new keys and values after the window and returns
        the window with them (views, no copy)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.layers = [_store_layer(self, i) for i in range(len(self.buffers))]
        return cache


_STORE_LAYER: list[type] = []


def _store_layer(store: _KVStore, index: int) -> Any:
    """Layer ``index`` of ``store`` as a transformers cache layer (the class is made once: transformers is heavy)."""
    if not _STORE_LAYER:
        from transformers.cache_utils import DynamicLayer

        class StoreLayer(DynamicLayer):
            def __init__(self, store: _KVStore, index: int):
                self.store, self.index = store, index
                super().__init__()
                self.is_initialized = True

            # keys / values: always the store's current window (views of its buffers)
            keys = property(lambda self: self._window(0), lambda self, value: None)
            values = property(lambda self: self._window(1), lambda self, value: None)

            def _window(self, which: int):
                store = self.store
                return store.buffers[self.index][which][:store.n, :, store.start:store.end]

            def update(self, key_states, value_states, *args, **kwargs):
                store, width = self.store, key_states.shape[-2]
                buf_k, buf_v = store.buffers[self.index]
                buf_k[:store.n, :, store.end:store.end + width] = key_states
                buf_v[:store.n, :, store.end:store.end + width] = value_states
                return (buf_k[:store.n, :, store.start:store.end + width],
                        buf_v[:store.n, :, store.start:store.end + width])

            def get_seq_length(self) -> int:
                return self.store.end - self.store.start

        _STORE_LAYER.append(StoreLayer)
    return _STORE_LAYER[0](store, index)

def torch_index(indices: list[int], device: Any):
    import torch

    return torch.tensor(indices, dtype=torch.long, device=device)


def _left_pad(tensor: Any, width: int, dim: int = 2):
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    import torch

    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
