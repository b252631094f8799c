"""Helpers shared by the method modules: optimizer choice, module matching, the merge check.

Callers may rely on:

* :func:`optimizer_class` — the optimizer class and extra kwargs behind ``train.optim`` (``adamw_torch``,
  ``adamw_8bit``, ``paged_adamw_8bit``, ``sgd``, ``adafactor``), used by methods that build their own optimizer
  (LoRA+, GaLore) so that ``train.optim`` keeps its meaning there;
* :func:`matching_modules` — the modules of a model that a list of target names selects, with peft's own rule
  (full name, or a suffix after a dot);
* :func:`ensure_mergeable` — a :class:`~tuneforge.errors.UserError` for methods whose result cannot be merged.

Heavy imports (torch, bitsandbytes, transformers) happen inside the functions.
"""

from __future__ import annotations

from typing import Any

from tuneforge.errors import UserError
from tuneforge.methods.optimizers import optimizer_class  # noqa: F401 (lives there: methods.base imports it too)


def matching_modules(model: Any, targets: list[str]) -> dict[str, Any]:
    """``{full_name: module}`` for every module selected by ``targets`` (peft's rule: equal or ``.suffix``)."""
    found = {}
    for name, module in model.named_modules():
        if any(name == t or name.endswith(f".{t}") for t in targets) and hasattr(module, "weight"):
            found[name] = module
    return found


def in_out_features(module: Any) -> tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (weight is in × out)."""
    if hasattr(module, "in_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nf") and hasattr(module, "nx"):  # GPT-2's Conv1D
        return int(module.nx), int(module.nf)
    weight = module.weight
    return int(weight.shape[1]), int(weight.shape[0])


def ensure_mergeable(method_name: str) -> None:
    """Raise a :class:`UserError` unless the method's trained result can be folded into the base weights.

    For the merge/export code to call before merging a run's adapter.

    Raises:
        UserError: naming the method, why it cannot merge, and what to do instead.
    """
    from tuneforge.methods.base import get_method

    method = get_method(method_name)
    if method.mergeable:
        return
    if not method.is_adapter:
        raise UserError(
            f"method {method_name!r} trains the model's own weights: there is no adapter to merge — "
            "the run's final/ directory already is the full model"
        )
    raise UserError(
        f"method {method_name!r} cannot be merged into the base weights ({method.reference or 'its adapter'} "
        "adds virtual tokens or state that is not a weight delta); serve or evaluate the adapter on its base "
        "model instead (tuneforge serve / eval take the run directory)"
    )

