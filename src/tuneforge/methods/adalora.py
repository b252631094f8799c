"""AdaLoRA — Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (ICLR 2023).

Each adapted weight is updated in SVD form, ``W = W0 + P Λ Q`` (``P``: d_out × r, ``Λ``: r diagonal, ``Q``: r × d_in),
with the orthogonality penalty ``R(P, Q) = ||PᵀP − I||²_F + ||QQᵀ − I||²_F`` added to the loss. Every triplet
``(P_i, λ_i, Q_i)`` gets an importance score ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)`` with
``s(w) = Ī(w) · Ū(w)`` — the smoothed sensitivity ``|w · ∂L/∂w|`` times its uncertainty — and the total rank
budget ``b(t)`` falls cubically from ``init_r`` per module to ``target_r`` per module between step ``tinit`` and
``T − tfinal`` (``T`` = total optimizer steps); the least important triplets are masked (``λ_i = 0``).

The schedule needs the real number of optimizer steps. peft reads it from ``AdaLoraConfig.total_step``; the HF
Trainer never calls ``update_and_allocate``, so :meth:`AdaLoraMethod.callbacks` returns a callback that sets the
total at the start of training and calls it after every optimizer step, before ``zero_grad`` (it needs the
gradients), as peft's docstring requires.
"""

from __future__ import annotations

from typing import Any

from tuneforge.config.methods import AdaLoraMethodConfig
from tuneforge.errors import UserError
from tuneforge.methods.base import Method, register


class AdaLoraMethod(Method):
    """AdaLoRA adapter with its rank-budget schedule tied to the run's optimizer steps."""

    reference = "Zhang et al., 2023 — AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"
    mergeable = True
    is_adapter = True
    shardable = False  # its budget callback reads every adapter's full weights and gradients

    def peft_config(self, cfg: Any, model: Any, total_steps: int | None = None):
        """The ``peft.AdaLoraConfig`` for ``cfg`` (a placeholder ``total_step`` until training sets the real one)."""
        from peft import AdaLoraConfig

        from tuneforge.models.targets import targets_conv1d

        total = total_steps or _placeholder_total(cfg)
        targets = self.target_modules(model, cfg)
        return AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=cfg.init_r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            deltaT=cfg.delta_t,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=total,
            target_modules=targets,
            fan_in_fan_out=targets_conv1d(model, targets),  # GPT-2's Conv1D stores weights transposed
        )

    def apply(self, model: Any, cfg: Any) -> Any:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(cfg, model))

    def callbacks(self, cfg: Any, total_steps: int) -> list:
        """One callback that drives the budget schedule over ``total_steps`` optimizer steps.

        Raises:
            UserError: when ``tinit + tfinal`` leaves no step for the budget phase.
        """
        check_schedule(cfg, total_steps)
        return [make_callback(total_steps)]


def check_schedule(cfg: Any, total_steps: int) -> None:
    """Raise a :class:`UserError` unless ``tinit + tfinal < total_steps`` (peft needs a budgeting phase)."""
    if total_steps is None or total_steps <= 0:
        raise UserError("method adalora needs the total number of optimizer steps (train.max_steps or epochs)")
    if cfg.tinit + cfg.tfinal >= total_steps:
        raise UserError(
            f"method.tinit ({cfg.tinit}) + method.tfinal ({cfg.tfinal}) must be less than the run's "
            f"{total_steps} optimizer steps, or AdaLoRA has no phase in which to reallocate ranks; "
            "lower method.tinit / method.tfinal or train for more steps (train.max_steps, train.epochs)"
        )


def set_total_steps(model: Any, total_steps: int) -> None:
    """Point the AdaLoRA schedule of ``model`` (a PeftModel) at ``total_steps`` optimizer steps."""
    tuner = _adalora_tuner(model)
    config = tuner.peft_config[tuner.trainable_adapter_name]
    # The rank allocator holds this same config object, so the budget schedule sees the new total.
    config.total_step = int(total_steps)


def update_and_allocate(model: Any, step: int) -> None:
    """Run one AdaLoRA budget update; call after ``backward`` and ``optimizer.step`` and before ``zero_grad``.

    ``step`` is the 0-based index of the optimizer step just taken.
    """
    _adalora_tuner(model).update_and_allocate(step)


def make_callback(total_steps: int):
    """A ``transformers.TrainerCallback`` that sets ``total_step`` and runs ``update_and_allocate`` each step."""
    from transformers import TrainerCallback

    class AdaLoraBudgetCallback(TrainerCallback):
        """Calls ``update_and_allocate`` right after each optimizer step (gradients still present)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            set_total_steps(model, total_steps)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            # global_step is incremented after this event, so it is the 0-based index of this step.
            update_and_allocate(model, state.global_step)

    return AdaLoraBudgetCallback()


def _placeholder_total(cfg: Any) -> int:
    # peft validates tinit < total_step - tfinal at construction; the callback sets the real total later.
    return cfg.tinit + cfg.tfinal + 1


def _adalora_tuner(model: Any) -> Any:
    candidate = getattr(model, "module", model)  # unwrap DDP-style wrappers
    tuner = getattr(candidate, "base_model", None)
    if tuner is None or not hasattr(tuner, "update_and_allocate"):
        raise TypeError("expected a peft model with an AdaLoRA adapter (from AdaLoraMethod.apply)")
    return tuner


register(AdaLoraMethodConfig, AdaLoraMethod)
