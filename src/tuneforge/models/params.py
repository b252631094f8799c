"""Parameter counts, exactly as peft counts them."""

from __future__ import annotations

from typing import Any


def count_parameters(model: Any) -> tuple[int, int]:
    """``(trainable, total)`` parameters of ``model``.

    For a peft model this is ``model.get_nb_trainable_parameters()`` itself; for any other model the same rule is
    applied (shared tensors counted once; a bitsandbytes 4-bit parameter counts as the number of weights it
    packs), so the numbers printed for ``full`` and for adapters are comparable.
    """
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if param.__class__.__name__ == "Params4bit":
            # 4-bit weights are packed two per byte of the storage dtype (peft's rule).
            size = param.element_size() if hasattr(param, "element_size") else 1
            count = count * 2 * size
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def format_parameters(trainable: int, total: int) -> str:
    """``"trainable params: 1,234 || all params: 5,678 || trainable%: 21.7328"`` (peft's wording)."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
