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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds ``max_queue`` items already; ``retry_after`` is a rough wait in seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} generations are waiting")
        self.waiting, self.retry_after = waiting, retry_after


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
    def key(self) -> tuple:
        return ("generate" if self.row is not None else "score", id(self.served.model), self.served.adapter_name)


class Scheduler:
    """The bounded queue and its worker thread (started on first use).

    Args:
        max_batch_size: most items run together.
        max_queue: most items waiting (running ones not counted); more raise :class:`QueueFull`.
    """

    def __init__(self, max_batch_size: int = 16, max_queue: int = 64):
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
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
            QueueFull: they do not fit below ``max_queue``.
        """
        with self._cond:
            self._drop_cancelled()
            if len(self._waiting) + len(items) > self.max_queue:
                raise QueueFull(len(self._waiting), self.retry_after())
            self._waiting.extend(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True, name="tuneforge-generate")
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
            batch = _fitting(self._waiting, self.max_batch_size)
            chosen = set(map(id, batch))
            self._waiting = deque(item for item in self._waiting if id(item) not in chosen)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            started = time.perf_counter()
            try:
                results = _run(batch)
            except Exception as exc:  # every item of the batch gets the error (answered as a 500 or SSE error)
                log.exception("generation failed")
                results = [exc] * len(batch)
            finally:
                self.running = 0
            self.batches += 1
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * (time.perf_counter() - started)
            for item, result in zip(batch, results, strict=True):
                try:
                    item.done(result)
                except Exception:  # a broken callback must not stop the worker
                    log.exception("result callback failed")


def _fitting(waiting: Sequence[Work], max_batch_size: int) -> list[Work]:
    """The oldest item and the waiting items that can share its batch: same kind, model and adapter, and — for
    generation — the left-padded width plus the longest budget still inside the model's context (a long prompt and
    a long answer of two different requests must not add up beyond it)."""
    first = waiting[0]
    context = first.served.context_length if first.row is not None else None
    batch, width, budget = [], 0, 0
    for item in waiting:
        if item.key != first.key or len(batch) == max_batch_size:
            continue
        if item.row is not None:
            item_width = max(width, len(item.row.prompt_ids))
            item_budget = max(budget, item.row.settings.max_new_tokens)
            if context and batch and item_width + item_budget > context:
                continue
            width, budget = item_width, item_budget
        batch.append(item)
    return batch


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
