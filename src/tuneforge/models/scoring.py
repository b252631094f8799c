"""Log-probabilities of given token sequences (what an OpenAI ``echo`` + ``logprobs`` request returns).

Used by the server for ``/v1/completions`` with ``echo`` (lm-evaluation-harness scores loglikelihood and rolling
perplexity tasks that way) and reusable by evaluation code that needs per-token scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneforge.models.decoding import TokenLogprob, top_alternatives


def score_tokens(model: Any, rows: Sequence[Sequence[int]], top_logprobs: int = 0, *, pad_id: int = 0,
                 batch_size: int = 8) -> list[list[TokenLogprob]]:
    """The log-probability of every token of every row given the tokens before it.

    Args:
        model: a causal LM or peft model in eval mode.
        rows: token id sequences (each non-empty); scored independently, ``batch_size`` per right-padded forward.
        top_logprobs: how many most likely alternatives to report per position (0: none).
        pad_id: id used for padding (masked out; never affects a score).
        batch_size: rows per forward pass.

    Returns:
        Per row, one :class:`TokenLogprob` per token; the first has ``logprob=None`` and no alternatives (nothing
        predicts it). Log-probs are computed in float32 from the model's logits.
    """
    import torch

    device = next(model.parameters()).device
    results: list[list[TokenLogprob]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = [list(row) for row in rows[start:start + batch_size]]
            width = max(len(row) for row in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):
                input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
                attention[i, :len(row)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for i, row in enumerate(batch):
                scored = [TokenLogprob(row[0], None)]
                for position in range(1, len(row)):
                    dist = logprobs[i, position - 1]
                    scored.append(TokenLogprob(row[position], float(dist[row[position]]),
                                               top_alternatives(dist, top_logprobs)))
                results.append(scored)
    return results
