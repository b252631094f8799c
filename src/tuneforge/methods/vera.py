"""VeRA — Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation" (ICLR 2024).

``h = W0 x + Λ_b B Λ_d A x``: one pair of frozen random matrices ``A`` (r × d_in) and ``B`` (d_out × r) is shared
by every adapted layer; only the per-layer scaling vectors ``d`` (length r, initialised to ``d_initial``) and
``b`` (length d_out, initialised to 0, so training starts from the base model) are trained.

Sharing one ``A``/``B`` means the adapted layers must have the same shape, as in the paper. By default
(``target_modules`` unset) the attention projections of the most common shape are adapted — all four on a Llama
without grouped-query attention, ``q_proj``/``o_proj`` with it, ``c_attn`` on GPT-2. peft 0.21 can also share
matrices of the largest shape and slice them per layer; for targets the user chose, we allow that only when asked
(``method.allow_unequal_shapes: true``), and otherwise say which target modules differ.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tuneforge.config.methods import VeraMethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import Method, register
from tuneforge.methods.optim import in_out_features, matching_modules


class VeraMethod(Method):
    """VeRA adapter: trained scaling vectors around shared frozen random projections."""

    reference = "Kopiczko et al., 2024 — VeRA: Vector-based Random Matrix Adaptation"
    mergeable = True
    is_adapter = True

    def target_modules(self, model: Any, cfg: Any) -> list[str]:
        """The explicit targets after the shape check, or by default the largest same-shape attention set.

        Raises:
            UserError: explicit targets of different shapes (unless ``allow_unequal_shapes``).
        """
        from tuneforge.models.targets import resolve_target_modules

        if cfg.target_modules is None:
            return largest_same_shape(model, resolve_target_modules(model, "attention"))
        targets = resolve_target_modules(model, cfg.target_modules)
        if not cfg.allow_unequal_shapes:
            check_equal_shapes(model, targets)
        return targets

    def peft_config(self, cfg: Any, model: Any):
        """The ``peft.VeraConfig`` for ``cfg`` on ``model``."""
        from peft import VeraConfig

        from tuneforge.models.targets import targets_conv1d

        targets = self.target_modules(model, cfg)
        return VeraConfig(
            task_type="CAUSAL_LM",
            r=cfg.r,
            target_modules=targets,
            vera_dropout=cfg.dropout,
            d_initial=cfg.d_initial,
            fan_in_fan_out=targets_conv1d(model, targets),  # GPT-2's Conv1D stores weights transposed
            save_projection=True,  # the adapter file then carries A and B: loading never depends on a PRNG
        )

    def apply(self, model: Any, cfg: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(cfg, model))


def largest_same_shape(model: Any, targets: list[str]) -> list[str]:
    """The targets whose layers share the most common ``(in, out)`` shape (ties: the shape met first)."""
    by_shape: dict[tuple[int, int], list[str]] = defaultdict(list)
    layers: dict[tuple[int, int], int] = defaultdict(int)
    for target in targets:
        shapes = [in_out_features(m) for m in matching_modules(model, [target]).values()]
        if len(set(shapes)) == 1:  # a name whose layers differ in shape cannot join any group
            by_shape[shapes[0]].append(target)
            layers[shapes[0]] += len(shapes)
    if not by_shape:
        raise UserError("method vera: no attention projection of a single shape; set method.target_modules")
    return by_shape[max(by_shape, key=lambda shape: layers[shape])]


def shape_groups(model: Any, targets: list[str]) -> dict[tuple[int, int], list[str]]:
    """Target module names grouped by ``(in_features, out_features)``; layer indices are folded (``layers.*``)."""
    groups: dict[tuple[int, int], set[str]] = defaultdict(set)
    for name, module in matching_modules(model, targets).items():
        folded = ".".join("*" if part.isdigit() else part for part in name.split("."))
        groups[in_out_features(module)].add(folded)
    return {shape: sorted(names) for shape, names in groups.items()}


def check_equal_shapes(model: Any, targets: list[str]) -> None:
    """Raise a :class:`UserError` naming the modules of each shape when the VeRA targets differ in shape."""
    groups = shape_groups(model, targets)
    if len(groups) <= 1:
        return
    parts = [f"{d_in}→{d_out}: {', '.join(names)}" for (d_in, d_out), names in sorted(groups.items())]
    biggest = max(groups.items(), key=lambda item: len(item[1]))[1]
    suggestion = sorted({name.rsplit("*.", 1)[-1] for name in biggest})
    raise UserError(
        "method vera: VeRA shares one frozen random pair A (r×d_in) and B (d_out×r) across all target modules, "
        "so they must have the same shape, but method.target_modules selects modules of "
        f"{len(groups)} shapes — " + "; ".join(parts) + ". "
        f"Choose modules of one shape (e.g. target_modules: {suggestion}) or set method.allow_unequal_shapes: "
        "true (peft then shares matrices of the largest shape and slices them per module)"
    )


register(VeraMethodConfig, VeraMethod)
