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

from tuneforge.models.decoding import TokenLogprob

# Positions whose log-probabilities are computed at once: a [rows, SCORE_CHUNK, vocab] float32 block at most
# (16 x 256 x 152k x 4 B = 2.5 GB for the largest vocabularies; 0.2 GB at 12k).
SCORE_CHUNK = 256


def score_tokens(model: Any, rows: Sequence[Sequence[int]], top_logprobs: int = 0, *, pad_id: int = 0,
                 batch_size: int = 8, chunk: int = SCORE_CHUNK) -> list[list[TokenLogprob]]:
    """The log-probability of every token of every row given the tokens before it.

    Rows are right-padded ``batch_size`` per forward pass with explicit position ids (``0..len-1`` per row) and an
    attention mask, so a row scores exactly as it does alone, whatever shares its batch (padding only ever follows
    a row's tokens, never precedes them). The decoder runs once per batch; the output head, the log-softmax
    (``gather`` of the target minus ``logsumexp``) and the top alternatives run ``chunk`` positions at a time, so
    no ``[rows, length, vocab]`` float32 tensor is ever held.

    Args:
        model: a causal LM or peft model in eval mode.
        rows: token id sequences (each non-empty); scored independently.
        top_logprobs: how many most likely alternatives to report per position (0: none).
        pad_id: id used for padding (masked out; never affects a score).
        batch_size: rows per forward pass.
        chunk: positions per log-softmax block.

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
            positions = torch.arange(width).expand(len(batch), width)
            input_ids, attention, positions = input_ids.to(device), attention.to(device), positions.to(device)
            hidden, head = _hidden_states(model, input_ids, attention, positions)
            targets = input_ids[:, 1:]
            logprob = torch.empty(targets.shape, dtype=torch.float32, device=device)
            top_values = top_ids = None
            if top_logprobs:
                k = min(top_logprobs, _vocab_size(model))
                top_values = torch.empty((*targets.shape, k), dtype=torch.float32, device=device)
                top_ids = torch.empty((*targets.shape, k), dtype=torch.long, device=device)
            for begin in range(0, width - 1, chunk):
                end = min(width - 1, begin + chunk)
                logits = head(hidden[:, begin:end]).float()  # [rows, chunk, vocab], one block at a time
                norm = torch.logsumexp(logits, dim=-1)
                logprob[:, begin:end] = logits.gather(-1, targets[:, begin:end, None]).squeeze(-1) - norm
                if top_values is not None:
                    values, indices = logits.topk(top_values.shape[-1], dim=-1)
                    top_values[:, begin:end] = values - norm[..., None]
                    top_ids[:, begin:end] = indices
                del logits
            logprob = logprob.cpu().tolist()
            tops = (top_ids.cpu().tolist(), top_values.cpu().tolist()) if top_values is not None else None
            for i, row in enumerate(batch):
                scored = [TokenLogprob(row[0], None)]
                for position in range(1, len(row)):
                    top = ()
                    if tops is not None:
                        top = tuple(zip(tops[0][i][position - 1], tops[1][i][position - 1], strict=True))
                    scored.append(TokenLogprob(row[position], logprob[i][position - 1], top))
                results.append(scored)
    return results


def _vocab_size(model: Any) -> int:
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.vocab_size


def _hidden_states(model: Any, input_ids: Any, attention: Any, positions: Any) -> tuple[Any, Any]:
    """The decoder's last hidden states and the function turning a slice of them into logits.

    The head (``get_output_embeddings``, peft layers on it included) is applied per chunk by the caller. Models
    whose logits are more than the head of the last hidden state (Gemma 2's soft-capping, Cohere's scale) and
    models without a separate decoder run whole and return their logits with an identity head.
    """
    lora = _is_lora_peft(model)
    base = model.get_base_model() if lora else model
    config = getattr(base, "config", None)
    plain = ((lora or not hasattr(model, "peft_config")) and hasattr(base, "get_decoder")
             and not getattr(config, "final_logit_softcapping", None)
             and getattr(config, "logit_scale", None) in (None, 1.0)
             and getattr(config, "logits_scaling", None) in (None, 1.0))
    if plain:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        if decoder is not None and decoder is not base and head is not None:
            out = decoder(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False)
            return out.last_hidden_state, head
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
    return logits[:, -input_ids.shape[1]:], lambda block: block


def _is_lora_peft(model: Any) -> bool:
    """A peft model whose adapters live inside the base model's modules (LoRA and its kin, not prompt learning)."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict) or not hasattr(model, "get_base_model"):
        return False
    return all(not getattr(c, "is_prompt_learning", False) for c in config.values())


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
