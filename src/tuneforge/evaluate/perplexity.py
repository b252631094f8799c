"""Perplexity, token-weighted over a whole data set.

PPL = exp(sum of per-token negative log-likelihoods / number of predicted tokens), summed over every sequence of
the set (never a mean of per-batch means, which would over-weight short batches). Which tokens count:

* chat / instruction records: only the assistant answers (labels from ``tuneforge.data.tokenize.encode_chat_samples``,
  the same mask training uses), including each answer's end-of-turn token;
* text records: every token after the first (the first has no context to be predicted from).

Sequences longer than the window are scored with the sliding-window recipe of the transformers docs
("Perplexity of fixed-length models"): windows of ``max_length`` tokens advance by ``stride``; in each window only
the tokens not already predicted by an earlier window are scored, so every predicted token counts exactly once and
all but the first window give it ``max_length - stride`` tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import UserError


@dataclass
class PerplexityResult:
    """``ppl`` = exp(``nll`` / ``tokens``); ``sequences`` scored, ``skipped`` records with no token to score."""

    ppl: float
    nll: float
    tokens: int
    sequences: int
    skipped: int

    def to_dict(self) -> dict:
        return asdict(self)


def encode_records(records: list[dict], tokenizer: Any, template: Any = None,
                   train_on_prompt: bool = False) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Token ids and labels of every record, untruncated.

    Returns:
        ``(pairs, skipped)``: ``pairs`` is a list of ``(input_ids, labels)``; ``skipped`` counts records that have
        nothing to score (an empty text, a conversation without an assistant answer).
    """
    from tuneforge.data.tokenize import encode_chat_samples

    # Records read by ``load_eval_records`` come with their source: the same samples from the prepared-data cache.
    prepared = getattr(records, "encode_prepared", None)
    cached = prepared(tokenizer, template, train_on_prompt) if prepared is not None else None
    if cached is not None:
        return cached
    pairs, skipped = [], 0
    if template is None and any("messages" in r for r in records):
        raise UserError("chat records need a chat template to find the answers, and this model has none; "
                        "set one when training (model.chat_template) or evaluate plain text records")
    for record in records:
        if "messages" in record:
            # A record may train as several samples (templates that render earlier turns differently as history).
            encoded = [s for s in encode_chat_samples(record, tokenizer, template, 10**9, train_on_prompt)
                       if s["supervised"]]
            if not encoded:
                skipped += 1
            pairs.extend((list(s["input_ids"]), list(s["labels"])) for s in encoded)
            continue
        else:
            ids = list(tokenizer(record["text"])["input_ids"])
            labels = list(ids)
        if sum(1 for v in labels[1:] if v != IGNORE) == 0:
            skipped += 1
            continue
        pairs.append((ids, labels))
    return pairs, skipped


def sliding_windows(input_ids: list[int], labels: list[int], max_length: int,
                    stride: int) -> list[tuple[list[int], list[int]]]:
    """Split one sequence into scoring windows; each label position is scored in exactly one window.

    Window ``k`` covers ``[k*stride, k*stride + max_length)``; its labels keep only the positions past the end of
    the previous window (the rest become -100), as in the transformers sliding-window recipe.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    n = len(input_ids)
    windows = []
    prev_end = 0
    for begin in range(0, max(n, 1), stride):
        end = min(begin + max_length, n)
        window_labels = list(labels[begin:end])
        for i in range(min(prev_end - begin, len(window_labels))):
            window_labels[i] = IGNORE
        windows.append((list(input_ids[begin:end]), window_labels))
        prev_end = end
        if end == n:
            break
    return windows


def sum_nll(model: Any, windows: list[tuple[list[int], list[int]]], pad_id: int = 0,
            batch_size: int = 4) -> tuple[float, int]:
    """Summed next-token NLL (natural log) and the number of scored tokens over ``windows``.

    Windows are right-padded into batches; padding and -100 labels never count.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    # Longest first, so similar lengths share a batch (less padding); the sum does not depend on order.
    order = sorted(windows, key=lambda w: -len(w[0]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        lab = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (i, labels) in enumerate(batch):
            ids[row, : len(i)] = torch.tensor(i)
            lab[row, : len(labels)] = torch.tensor(labels)
            mask[row, : len(i)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Position t predicts token t+1; the loss is computed in float32 whatever the model's dtype.
        shift_logits = logits[:, :-1, :].float()
        shift_labels = lab[:, 1:].to(device)
        losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                 ignore_index=IGNORE, reduction="sum")
        total += float(losses)
        count += int((shift_labels != IGNORE).sum())
    return total, count


def default_window(model: Any, tokenizer: Any = None) -> int:
    """The model's context length (``max_position_embeddings``), capped at 4096 to bound memory."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        n = getattr(tokenizer, "model_max_length", None) or 1024
    return int(min(n, 4096))


def perplexity(model: Any, tokenizer: Any, records: list[dict], *, template: Any = None,
               max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
               train_on_prompt: bool = False) -> PerplexityResult:
    """Token-weighted perplexity of ``model`` on canonical ``records``.

    Args:
        model: a causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        records: canonical records (``{"text"}`` or ``{"messages"}``).
        template: the ``ChatTemplate`` for chat records (the run's own, from ``load_for_inference``).
        max_length: window length in tokens (default: the model's context length, at most 4096).
        stride: window step (default ``max_length // 2``); a sequence that fits one window is scored whole.
        batch_size: windows per forward pass.
        train_on_prompt: score prompt tokens of chat records as well.

    Returns:
        A :class:`PerplexityResult`; ``tokens`` is the number of predicted tokens scored.

    Raises:
        ValueError: no record had a token to score.
        UserError: chat records but no chat template.
    """
    max_length = max_length or default_window(model, tokenizer)
    stride = stride or max(1, max_length // 2)
    pairs, skipped = encode_records(records, tokenizer, template, train_on_prompt)
    windows = [w for ids, labels in pairs for w in sliding_windows(ids, labels, max_length, stride)]
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll, tokens = sum_nll(model, windows, pad_id=pad, batch_size=batch_size)
    if tokens == 0:
        raise ValueError("no token to score: every record was empty or had no assistant answer")
    return PerplexityResult(ppl=math.exp(nll / tokens), nll=nll, tokens=tokens, sequences=len(pairs),
                            skipped=skipped)
