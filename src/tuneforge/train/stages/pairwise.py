"""Reference-free pairwise stages: ``stage: orpo`` and ``stage: simpo``.

Both score a completion by its *average* log-prob per completion token, ℓ(y|x) = log π(y|x) / |y|, over
data/preference.py's mask, and need no reference model (no copy, no disabled-adapter pass).

- ORPO (Hong et al., 2024), λ = ``preference.beta`` (default 0.1)::

      L = NLL(y_w) - λ · log σ( log(p_w / (1 - p_w)) - log(p_l / (1 - p_l)) ),   p = exp(ℓ)

  NLL(y_w) is the chosen completions' mean token cross-entropy (the SFT term).
- SimPO (Meng et al., 2024), β = ``preference.beta`` (default 2.0), γ = ``preference.gamma``, ε =
  ``preference.label_smoothing``::

      L = -(1 - ε) log σ(β (ℓ_w - ℓ_l) - γ) - ε log σ(-(β (ℓ_w - ℓ_l) - γ))

The formulas are TRL's (``trl.experimental`` ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss with
``loss_type="simpo"``); tests/test_preference_stages.py checks them against those functions. The trainer is our
own small ``Trainer`` subclass so that these stages share DPO's encoded rows and collator.
Logged per step: ``rewards/chosen`` and ``rewards/rejected`` (β·ℓ), ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``/``logps/rejected`` (ℓ), and for ORPO ``nll_loss`` and ``log_odds_ratio``.
"""

from __future__ import annotations

from typing import Any

from tuneforge.models.scoring import sequence_logps
from tuneforge.train.stages.base import Stage
from tuneforge.train.stages.common import StepMetrics, trl_args


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    import torch

    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen, rejected, beta: float):
    """Per-pair ``λ · log σ(log odds ratio)`` (to be subtracted from the NLL) and the log odds ratio."""
    import torch.nn.functional as F

    chosen, rejected = chosen.float(), rejected.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return beta * F.logsigmoid(log_odds), log_odds


def simpo_loss(chosen, rejected, beta: float, gamma: float, label_smoothing: float = 0.0):
    """Per-pair SimPO loss from average log-probs (see the module docstring)."""
    import torch.nn.functional as F

    logits = beta * (chosen - rejected) - gamma
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def trainer_base():
    """A Trainer computing the ORPO or SimPO loss on PairCollator batches (chosen rows, then rejected rows)."""
    import torch
    from transformers import Trainer

    class PairwiseTrainer(Trainer):
        loss_name = "simpo"
        beta = 2.0
        gamma = 0.5
        label_smoothing = 0.0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_metrics = StepMetrics()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            summed, counts, _ = sequence_logps(model, inputs)
            average = summed / counts.clamp(min=1)
            n = average.size(0) // 2
            chosen, rejected = average[:n], average[n:]
            metrics = {}
            if self.loss_name == "orpo":
                ratio, log_odds = orpo_loss(chosen, rejected, self.beta)
                nll = -summed[:n].sum() / counts[:n].sum().clamp(min=1)
                loss = nll - ratio.mean()
                metrics = {"nll_loss": nll.item(), "log_odds_ratio": log_odds.mean().item()}
            else:
                loss = simpo_loss(chosen, rejected, self.beta, self.gamma, self.label_smoothing).mean()
            with torch.no_grad():
                chosen_rewards, rejected_rewards = self.beta * chosen, self.beta * rejected
                self.step_metrics.add(
                    mode, **metrics,
                    **{"rewards/chosen": chosen_rewards.mean().item(),
                       "rewards/rejected": rejected_rewards.mean().item(),
                       "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                       "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
                       "logps/chosen": chosen.mean().item(), "logps/rejected": rejected.mean().item()},
                )
            return (loss, {}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            logs.update(self.step_metrics.pop("train" if self.model.training else "eval"))
            super().log(logs, start_time)

    return PairwiseTrainer


class PairwiseStage(Stage):
    """ORPO or SimPO; see the module docstring."""

    def build_trainer(self, cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class):
        from transformers import TrainingArguments

        from tuneforge.data.preference import PairCollator
        from tuneforge.data.tokenize import pad_id

        pref = cfg.preference
        trainer = trainer_class(trainer_base())(
            model=model,
            args=trl_args(args, TrainingArguments),
            data_collator=PairCollator(pad_id(tokenizer)),
            train_dataset=bundle.train,
            eval_dataset=bundle.eval or None,
            processing_class=tokenizer,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        trainer.loss_name = self.name
        trainer.beta = pref.beta_for(self.name)
        trainer.gamma = pref.gamma
        trainer.label_smoothing = pref.label_smoothing
        return trainer


def stage(name: str) -> Any:
    return PairwiseStage(name)
