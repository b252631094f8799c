"""Dynamic batching: one worker thread runs the waiting work of one model/adapter together.

Requests put :class:`Work` items (one per prompt × ``n``) into a bounded queue and return at once; the worker takes
the oldest item and every other waiting item of the same kind on the same model and adapter (up to
``max_batch_size``), runs them as one batch (``models.decoding.decode_rows`` or ``models.scoring.score_tokens``)
and hands each item its result through its ``done`` callback. The event loop never waits on the model, so
``/health`` and ``/v1/models`` answer at once under load; a cancelled item is dropped from the queue, or ends its
row at the next token when it is already running.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

BATCHING = ("continuous", "dynamic")  # serve --batching


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already; ``retry_after`` is a rough wait in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} generations are waiting")
        self.waiting, self.retry_after = waiting, retry_after


class TooLarge(Exception):
    """Work that no amount of waiting lets in (more items than the whole queue holds, or one row above the token
    budget of a batch): a client error (413), not a 429 the client would retry forever. The message says why."""


@dataclass(eq=False)
class Work:
    """One unit of work for the model.

    Attributes:
        served: the :class:`~tuneforge.serve.engine.Served` model it runs on.
        row: a ``DecodeRow`` to generate, or ``None`` for scoring.
        score_ids: token ids to score (``score_tokens``) when ``row`` is ``None``.
        top_logprobs: alternatives per scored position.
        done: called once, in the worker thread, with the result (``RowResult``, a list of ``TokenLogprob`` or the
            exception that ended the batch). Not called for an item cancelled while it waited.
        cancelled: set to drop the item (waiting) or end its row (running).
    """

    served: Any
    done: Callable[[Any], None]
    row: Any = None
    score_ids: Sequence[int] | None = None
    top_logprobs: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def tokens(self) -> int:
        """Tokens this item holds in a batch: prompt plus generation budget (scoring: its tokens)."""
        if self.row is not None:
            return len(self.row.prompt_ids) + self.row.settings.max_new_tokens
        return len(self.score_ids or ())

    @property
    def key(self) -> tuple:
        return ("generate" if self.row is not None else "score", id(self.served.model), self.served.adapter_name)


class Scheduler:
    """The bounded queue and its worker thread (started on first use).

    Args:
        max_batch_size: most items run together.
        max_queue: most items waiting (running ones not counted); more raise :class:`QueueFull`.
        token_budget: most tokens (rows x the longest prompt + max new tokens) all running batches hold.
        prefix_pools: how many running batches there can be at once (one per model, or per model and adapter when
            adapters cannot mix: :func:`pool_count`): their prefix-reuse stores share the one bound serve's bill
            prices beside ``token_budget`` (``models.memory.prefix_budget``), each holding at most its share.
    """

    def __init__(self, max_batch_size: int = 16, max_queue: int = 64, *, token_budget: int | None = None,
                 batching: str = "continuous", prefix_pools: int = 1):
        if batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {batching!r}")
        self.max_batch_size, self.max_queue, self.token_budget = max_batch_size, max_queue, token_budget
        self.prefix_tokens = None
        if token_budget:
            from tuneforge.models.memory import prefix_budget

            self.prefix_tokens = prefix_budget(token_budget) // max(1, prefix_pools)
        self.batching = batching
        self._waiting: deque[Work] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.running = 0
        self.batches = 0
        self._seconds_per_batch = 1.0  # moving average, for Retry-After

    def submit(self, items: Sequence[Work]) -> None:
        """Queue all ``items`` or none.

        Raises:
            TooLarge: more items than the queue can ever hold, or an item above the token budget of a batch.
            QueueFull: they do not fit below ``max_queue`` now.
        """
        if len(items) > self.max_queue:
            raise TooLarge(f"this request needs {len(items)} rows (prompts x n, plus one per scored prompt) but the "
                           f"server queues at most {self.max_queue} (--max-queue): send fewer prompts or a smaller n")
        for item in items:
            if self.token_budget and item.tokens > self.token_budget:
                raise TooLarge(f"one row needs {item.tokens} tokens (prompt + max_tokens) but a batch holds at most "
                               f"{self.token_budget} (the token budget sized from free memory, --token-budget): "
                               "shorten the prompt or lower max_tokens")
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) + len(items) > self.max_queue:
                raise QueueFull(len(self._waiting), self.retry_after())
            self._waiting.extend(items)
            if self._thread is None:
                loop = self._continuous_loop if self.batching == "continuous" else self._loop
                self._thread = threading.Thread(target=loop, daemon=True, name="tuneforge-generate")
                self._thread.start()
            self._cond.notify()

    def waiting(self) -> int:
        with self._cond:
            self._drop_cancelled()
            return len(self._waiting)

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained by one batch's worth (at least 1)."""
        batches = len(self._waiting) / self.max_batch_size + 1
        return max(1, min(60, math.ceil(self._seconds_per_batch * batches)))

    def close(self) -> None:
        """Stop the worker after the running batch; waiting items are cancelled."""
        with self._cond:
            self._closed = True
            for item in self._waiting:
                item.cancelled.set()
            self._waiting.clear()
            self._cond.notify_all()

    # ------------------------------------------------------------------ the worker

    def _drop_cancelled(self) -> None:
        if any(item.cancelled.is_set() for item in self._waiting):
            self._waiting = deque(item for item in self._waiting if not item.cancelled.is_set())

    def _next_batch(self) -> list[Work] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._closed:
                    return None
                if self._waiting:
                    break
                self._cond.wait()
            batch = _fitting(self._waiting, self.max_batch_size, self.token_budget)
            chosen = set(map(id, batch))
            self._waiting = deque(item for item in self._waiting if id(item) not in chosen)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                results = _run_isolated(batch)
            finally:
                self.running = 0
            self.batches += 1
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.perf_counter() - started)
            for item, result in zip(batch, results, strict=True):
                try:
                    item.done(result)
                except Exception:  # a broken callback must not stop the worker
                    log.exception("result callback failed")


    # ------------------------------------------------------------------ the continuous worker

    def _continuous_loop(self) -> None:
        """Continuous batching: at every decoding step, waiting rows join the running batch of their model (rows of
        LoRA adapters of one peft model share it) within ``max_batch_size`` rows per model and the token budget
        over all running rows; rows that end leave at once. Scoring work runs between steps."""
        pools: dict[tuple, Any] = {}
        started: dict[int, float] = {}
        while True:
            with self._cond:
                self._drop_cancelled()
                running = sum(len(pool) for pool in pools.values())
                if self._closed:
                    break
                if not self._waiting and not running:
                    self.running = 0
                    self._cond.wait()
                    continue
                scores = self._take_scores()
                joining = self._admit(pools)
                self.running = running + len(joining) + len(scores)
            if scores:
                self._deliver(list(zip(scores, _run_isolated(scores), strict=True)), started)
            groups: dict[tuple, list[Work]] = {}
            for key, item in joining:
                groups.setdefault(key, []).append(item)
                started[id(item)] = time.perf_counter()
            for key, items in groups.items():
                if key not in pools:
                    pools[key] = _pool_for(items[0].served, self.prefix_tokens)
                self._deliver(_add(pools[key], items), started)
            for key in list(pools):
                if len(pools[key]):
                    self._deliver(pools[key].step(), started)
                else:
                    del pools[key]  # an idle model keeps no cache
            self.running = sum(len(pool) for pool in pools.values())
        for pool in pools.values():
            self._deliver([(item, _cancelled_result()) for item, _ in pool.cancel_all(RuntimeError("closed"))],
                          started)
        self.running = 0

    def _take_scores(self) -> list[Work]:
        """The oldest waiting scoring item and those that can share its batch (taken out of the queue)."""
        first = next((item for item in self._waiting if item.row is None), None)
        if first is None:
            return []
        batch = _fitting([first, *(i for i in self._waiting if i.row is None and i is not first)],
                         self.max_batch_size, self.token_budget)
        chosen = set(map(id, batch))
        self._waiting = deque(item for item in self._waiting if id(item) not in chosen)
        return batch

    def _admit(self, pools: dict[tuple, Any]) -> list[tuple[tuple, Work]]:
        """Waiting generation rows that join now, oldest first; the first that does not fit stops admission (a
        large row is not overtaken for ever by small ones)."""
        admitted: list[tuple[tuple, Work]] = []
        extra: dict[tuple, list[int]] = {}
        for item in self._waiting:
            if item.row is None:
                continue
            key = _pool_key(item.served)
            pool = pools.get(key)
            rows = (len(pool) if pool is not None else 0) + len(extra.get(key, ()))
            if rows >= self.max_batch_size:
                break
            costs = {k: list(v) for k, v in extra.items()}
            costs.setdefault(key, []).append(item.tokens)
            total = sum(pool.cost(costs.get(k, ())) for k, pool in pools.items())
            total += sum(len(v) * max(v) for k, v in costs.items() if k not in pools)
            if self.token_budget and total > self.token_budget and (admitted or any(map(len, pools.values()))):
                break
            extra = costs
            admitted.append((key, item))
        chosen = {id(item) for _, item in admitted}
        self._waiting = deque(item for item in self._waiting if id(item) not in chosen)
        return admitted

    def _deliver(self, finished: list[tuple[Work, Any]], started: dict[int, float]) -> None:
        now = time.perf_counter()
        for item, result in finished:
            begun = started.pop(id(item), None)
            if begun is not None:  # a row's lifetime stands for a batch's in the Retry-After estimate
                self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (now - begun)
                self.batches += 1
            try:
                item.done(result)
            except Exception:  # a broken callback must not stop the worker
                log.exception("result callback failed")


def _mixed_adapters(model: Any) -> bool:
    """Whether rows of different adapters of ``model`` can share a forward pass (peft LoRA's ``adapter_names``)."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or not config:
        return False
    return all(getattr(c.peft_type, "value", c.peft_type) == "LORA" and not getattr(c, "use_dora", False)
               for c in config.values())


def _pool_key(served: Any) -> tuple:
    """Rows with one key decode together: one per model, or per model and adapter when adapters cannot mix."""
    return (id(served.model), None if _mixed_adapters(served.model) else served.adapter_name)


def pool_count(served: Iterable[Any]) -> int:
    """How many running batches the continuous worker can hold at once for these served models (one per
    :func:`_pool_key`)."""
    return len({_pool_key(s) for s in served})


def _pool_for(served: Any, prefix_tokens: int | None = None) -> Any:
    """A running batch for ``served``'s model; its prefix-reuse store holds at most ``prefix_tokens`` tokens."""
    from tuneforge.models.decoding import ContinuousBatch

    mixed = _mixed_adapters(served.model)
    return ContinuousBatch(served.model, mixed_adapters=mixed, activate=None if mixed else served.activate,
                           prefix_tokens=prefix_tokens)


def _add(pool: Any, items: list[Work]) -> list[tuple[Work, Any]]:
    from tuneforge.models.decoding import Joining

    return pool.add([Joining(item.row, item.served.tokenizer, item.served.template, item.served.adapter_name, item)
                     for item in items])


def _fitting(waiting: Sequence[Work], max_batch_size: int, token_budget: int | None = None) -> list[Work]:
    """The oldest item and the waiting items that can share its batch: same kind, model and adapter, and — for
    generation — the left-padded width plus the longest budget still inside the model's context (a long prompt and
    a long answer of two different requests must not add up beyond it) and rows x (width + budget) within
    ``token_budget`` (scoring: rows x the longest row)."""
    first = waiting[0]
    context = first.served.context_length if first.row is not None else None
    batch: list[Work] = []
    width = budget = 0
    for item in waiting:
        if item.key != first.key or len(batch) == max_batch_size:
            continue
        if item.row is not None:
            item_width = max(width, len(item.row.prompt_ids))
            item_budget = max(budget, item.row.settings.max_new_tokens)
        else:
            item_width, item_budget = max(width, len(item.score_ids or ())), 0
        if batch and context and item_width + item_budget > context:
            continue
        if batch and token_budget and (len(batch) + 1) * (item_width + item_budget) > token_budget:
            continue
        width, budget = item_width, item_budget
        batch.append(item)
    return batch


def _run_isolated(batch: list[Work]) -> list[Any]:
    """Run a batch; when it fails, run each of its items alone so that only the item that fails on its own gets the
    error (a bad row, or a batch too large for memory, no longer fails every request that shared it).

    A streaming row retried alone has already sent some of its events: the retry skips that many (greedy and seeded
    rows replay the same tokens)."""
    sent = [_count_events(item) for item in batch]
    try:
        return _run(batch)
    except Exception as exc:
        if len(batch) == 1:
            log.exception("generation failed")
            return [exc]
        log.warning("a batch of %d failed (%s: %s); retrying its rows one by one", len(batch), type(exc).__name__, exc)
    results: list[Any] = []
    for item, count in zip(batch, sent, strict=True):
        if item.cancelled.is_set():
            results.append(_cancelled_result())
            continue
        count.skip = count.seen
        try:
            results.append(_run([item])[0])
        except Exception as exc:
            log.exception("generation failed for one row (its batch was retried row by row)")
            results.append(exc)
    return results


class _EventCount:
    """Wraps a row's ``on_event``: counts events, and drops the first ``skip`` of a retry."""

    def __init__(self, on_event):
        self.on_event, self.seen, self.skip = on_event, 0, 0

    def __call__(self, event) -> None:
        if self.skip:
            self.skip -= 1
            return
        self.seen += 1
        self.on_event(event)


def _count_events(item: Work) -> _EventCount:
    if item.row is None or item.row.on_event is None:
        return _EventCount(None)
    if not isinstance(item.row.on_event, _EventCount):
        item.row.on_event = _EventCount(item.row.on_event)
    return item.row.on_event


def _cancelled_result():
    from tuneforge.models.decoding import RowResult

    return RowResult("", (), "cancelled")


def _run(batch: list[Work]) -> list[Any]:
    """Run one batch of same-key items on its model."""
    served = batch[0].served
    served.activate()
    if batch[0].row is not None:
        from tuneforge.models.decoding import decode_rows

        return decode_rows(served.model, served.tokenizer, served.template, [item.row for item in batch])
    from tuneforge.models.scoring import score_tokens

    top = max(item.top_logprobs for item in batch)
    scored = score_tokens(served.model, [item.score_ids for item in batch], top, pad_id=served.pad_id,
                          batch_size=len(batch))
    return [[_trim(token, item.top_logprobs) for token in tokens] for item, tokens in zip(batch, scored, strict=True)]


def _trim(token, k: int):
    import dataclasses

    return token if len(token.top) <= k else dataclasses.replace(token, top=token.top[:k])
