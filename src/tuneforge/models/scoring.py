"""Log-probabilities of given token sequences: the model-side scoring every package shares.

- :func:`score_tokens`: every token's log-prob with top alternatives (what an OpenAI ``echo`` + ``logprobs`` request
  returns; the server's ``/v1/completions`` with ``echo``, which lm-evaluation-harness uses for loglikelihood and
  rolling perplexity tasks).
- :func:`sequence_logps`: summed completion log-probs of a batch with a completion mask (the reference-free
  preference losses in ``train/stages/pairwise.py`` and ``tuneforge eval --metrics reward_acc``).
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


def sequence_logps(model: Any, batch: dict) -> tuple[Any, Any, Any]:
    """Summed completion log-probs per row, completion token counts, and per-token log-probs (all float32).

    ``batch`` holds ``input_ids``, ``attention_mask`` and ``completion_mask`` (1 on completion tokens), as
    ``data.preference.PairCollator`` builds them. Token ``t`` is scored by the logits at ``t - 1`` (labels are shifted
    once, here); per-token values are 0 outside the completion. Gradients flow (training calls it); wrap the call in
    ``torch.no_grad()`` to score.

    Returns:
        ``(summed, counts, per_token)`` of shapes ``(rows,)``, ``(rows,)`` and ``(rows, length - 1)``.
    """
    import torch

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, -batch["input_ids"].size(1):]  # prompt-learning adapters prepend virtual tokens
    targets = batch["input_ids"][:, 1:]
    # float32 mask: counts stay exact beyond 256 tokens even when the model computes in bf16
    mask = batch["completion_mask"][:, 1:].to(torch.float32)
    per_token = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    per_token = per_token * mask
    return per_token.sum(-1), mask.sum(-1), per_token
