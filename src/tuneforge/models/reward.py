"""Reward models as scorers: a ``stage: rm`` run (or any one-output sequence-classification model) scores answers.

A reward model is the base transformer with a linear head of one output (``*ForSequenceClassification`` with
``num_labels=1``) read at each row's last token. Training (``train/stages/rm.py``) encodes a pair's two sides as the
DPO stage does (``data.preference.encode_pair``: the run's template, the prompt rendered as ``tuneforge generate``
renders it, the answer ending at its end-of-turn token); :class:`RewardScorer` encodes what it scores the same way,
so a score means at inference what it meant in training. ``tuneforge eval RM --metrics reward_acc``, ``tuneforge
score`` and GRPO's ``{model: RUN}`` reward all score through here; loading goes through
:func:`tuneforge.models.reference.load_for_inference` (``ModelRef.head == "reward"`` picks
``AutoModelForSequenceClassification``), the one loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tuneforge.errors import UserError


def is_reward_model(model: Any) -> bool:
    """Whether ``model`` (also under a peft wrapper) is a one-output sequence-classification model."""
    config = getattr(model, "config", None)
    inner = getattr(getattr(model, "base_model", None), "model", model)
    name = type(inner).__name__
    return name.endswith("ForSequenceClassification") and getattr(config, "num_labels", None) == 1


def reward_scores(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """One reward per row of a right-padded batch (a float tensor of ``rows``)."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return output.logits[:, 0].float()


class RewardScorer:
    """Scores ``(prompt messages, answer messages)`` with a loaded reward model.

    Args:
        loaded: a :class:`tuneforge.models.reference.Loaded` whose model is a reward model.
        max_length: longest scored sequence (prompts are cut from the left, as in training; an answer that does not
            fit is not scored: ``None``).
        batch_size: rows per forward pass.
    """

    def __init__(self, loaded: Any, max_length: int = 2048, batch_size: int = 8):
        if not is_reward_model(loaded.model):
            raise UserError(f"{loaded.source}: not a reward model (a one-output score head): train one with "
                            "stage: rm (docs/preference.md)")
        if loaded.template is None:
            raise UserError(f"{loaded.source}: the reward model has no chat template to render what it scores")
        self.loaded = loaded
        self.max_length = max_length
        self.batch_size = batch_size

    def encode(self, prompt: list[dict], answer: list[dict], source: str = "?") -> list[int] | None:
        """Token ids of ``prompt + answer`` as training encoded a pair's side; ``None`` when the answer cannot fit."""
        from tuneforge.data.preference import encode_completion, fit

        tokenizer = self.loaded.tokenizer
        encoded = encode_completion(prompt, answer, tokenizer, self.loaded.template, source)
        fitted, _ = fit([encoded], self.max_length, tokenizer.bos_token_id)
        return None if fitted is None else fitted[0]["input_ids"]

    def score_ids(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """A reward per token-id row."""
        import torch

        tokenizer = self.loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model = self.loaded.model
        device = next(model.parameters()).device
        out: list[float] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(rows), self.batch_size):
                    chunk = [list(r) for r in rows[start:start + self.batch_size]]
                    width = max(len(r) for r in chunk)
                    ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
                    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
                    out.extend(reward_scores(model, ids, mask).tolist())
        finally:
            model.train(was_training)
        return out

    def score(self, items: Sequence[tuple[list[dict], list[dict]]], sources: Sequence[str] | None = None
              ) -> list[float | None]:
        """A reward per ``(prompt, answer)``; ``None`` for answers that do not fit ``max_length``."""
        encoded = [self.encode(p, a, sources[i] if sources else "?") for i, (p, a) in enumerate(items)]
        kept = [ids for ids in encoded if ids is not None]
        scores = iter(self.score_ids(kept)) if kept else iter(())
        return [next(scores) if ids is not None else None for ids in encoded]


def load_scorer(path_or_id: str, *, device: str = "auto", max_length: int = 2048, batch_size: int = 8,
                what: str | None = None) -> RewardScorer:
    """A :class:`RewardScorer` for a reward-model run, its ``final/`` or a model directory.

    Raises:
        UserError: the path holds no reward model (naming the stage that makes one).
    """
    from tuneforge.models.reference import load_for_inference, resolve

    ref = resolve(path_or_id, what)
    if ref.head != "reward":
        raise UserError(f"{what or path_or_id}: not a reward model (a run of stage rm, or a one-output "
                        "*ForSequenceClassification model); train one with stage: rm (docs/preference.md)")
    loaded = load_for_inference(ref, device=device)
    return RewardScorer(loaded, max_length=max_length, batch_size=batch_size)
