"""IA3 — Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (NeurIPS 2022), the (IA)³ method.

Learned vectors rescale activations element-wise: keys and values become ``l_k ⊙ (W_k x)`` and ``l_v ⊙ (W_v x)``,
and the position-wise feed-forward becomes ``W_2 (l_ff ⊙ γ(W_1 x))``. The vectors start at 1 (the base model);
only ``l_k``, ``l_v``, ``l_ff`` train. In peft terms, a target module scales its *output*, unless it is also a
"feed-forward module", which scales its *input* — so ``l_ff`` sits on the MLP's down projection.

Targets: by default peft's per-architecture choice (Llama: ``k_proj, v_proj, down_proj``; GPT-2:
``c_attn, mlp.c_proj``); with ``method.target_modules`` set, the feed-forward modules are the MLP targets whose
input is the wide intermediate activation (in_features > out_features), unless ``feedforward_modules`` says.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import Ia3MethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import Method, register
from tuneforge.methods.optim import in_out_features, matching_modules


class Ia3Method(Method):
    """(IA)³ adapter: learned rescaling of keys, values and the feed-forward activation."""

    reference = "Liu et al., 2022 — Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than ICL ((IA)³)"
    mergeable = True
    is_adapter = True

    def peft_config(self, cfg: Any, model: Any):
        """The ``peft.IA3Config`` for ``cfg`` with targets and feed-forward modules resolved for ``model``.

        Raises:
            UserError: feed-forward modules that are not among the targets.
        """
        from peft import IA3Config

        targets, feedforward = resolve_ia3_targets(model, cfg)
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)

    def target_modules(self, model: Any, cfg: Any) -> list[str]:
        """The resolved IA3 targets (peft's per-architecture choice when ``target_modules`` is unset)."""
        return resolve_ia3_targets(model, cfg)[0]

    def apply(self, model: Any, cfg: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(cfg, model))


def resolve_ia3_targets(model: Any, cfg: Any) -> tuple[list[str], list[str]]:
    """``(target_modules, feedforward_modules)`` for IA3 on ``model`` (see the module docstring for the rule)."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FF_DEFAULTS,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGET_DEFAULTS,
    )

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if cfg.target_modules is None and model_type in TARGET_DEFAULTS and cfg.feedforward_modules is None:
        return list(TARGET_DEFAULTS[model_type]), list(FF_DEFAULTS[model_type])
    from tuneforge.models.targets import resolve_target_modules

    targets = resolve_target_modules(model, cfg.target_modules or "all-linear")
    if cfg.feedforward_modules is not None:
        feedforward = list(cfg.feedforward_modules)
        outside = [f for f in feedforward if not any(f == t or f.endswith(f".{t}") for t in targets)]
        if outside:
            raise UserError(
                f"method.feedforward_modules: {outside} are not among the target modules {targets}; "
                "IA3 feed-forward modules must be a subset of method.target_modules"
            )
        return targets, feedforward
    return targets, _down_projections(model, targets)


def _down_projections(model: Any, targets: list[str]) -> list[str]:
    """Targets that sit in an MLP and read its wide intermediate activation (in_features > out_features)."""
    mlp_names = set(_mlp_module_names(model))
    chosen = []
    for target in targets:
        modules = {n: m for n, m in matching_modules(model, [target]).items()}
        if modules and all(n in mlp_names and _wide_input(m) for n, m in modules.items()):
            chosen.append(target)
    return chosen


def _wide_input(module: Any) -> bool:
    d_in, d_out = in_out_features(module)
    return d_in > d_out


def _mlp_module_names(model: Any) -> list[str]:
    from tuneforge.models.targets import linear_module_paths

    return linear_module_paths(model)["mlp"]


register(Ia3MethodConfig, Ia3Method)
