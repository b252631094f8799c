"""``stage: grpo`` — Group Relative Policy Optimization (Shao et al., 2024) on TRL's GRPOTrainer.

For each prompt, ``grpo.group_size`` completions are sampled and scored by the verifiable rewards
(:mod:`tuneforge.train.stages.rewards`); each completion's advantage is its reward minus the group mean (scaled by
the group's standard deviation), and the clipped policy-ratio objective (``grpo.epsilon``) pushes towards the
better completions, with an optional KL penalty ``grpo.beta`` against the reference (the disabled adapter for
adapters, a frozen copy for full fine-tuning; none when beta is 0).

Generation: prompts are rendered by the run's chat template exactly as ``tuneforge generate`` renders them
(``models.generation.render_prompt``), generation stops at the same stop tokens (``stop_token_ids``), and rewards
see the text cut at the same stop strings. The sampling call itself is TRL's (``model.generate`` inside its
unwrap context), because the trainer needs the sampled token ids including the stop token, which
``models.generation.complete`` deliberately strips.

``train.batch_size`` counts completions: a step sees ``batch_size / group_size`` prompts.
"""

from __future__ import annotations

import math
from typing import Any

from tuneforge.errors import UserError
from tuneforge.train.stages.base import Stage
from tuneforge.train.stages.common import to_dataset, trl_args
from tuneforge.train.stages.dpo import choose_reference, finish_peft_reference, frozen_reference_adapters
from tuneforge.train.stages.rewards import RESERVED_FIELDS, build_rewards


def trainer_base():
    """TRL's GRPOTrainer whose prompts are already rendered by the run's template (no second renderer)."""
    from trl import GRPOTrainer

    class TuneforgeGRPOTrainer(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list):
            # Rendered chat prompts carry their own BOS (as in models.generation): no special tokens added.
            return [self._tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts], None, {}

    return TuneforgeGRPOTrainer


class GRPOStage(Stage):
    """GRPO on prompts with verifiable rewards; see the module docstring."""

    def build_data(self, cfg, tokenizer, template):
        from tuneforge.data.preference import PreferenceBundle, load_stage_records
        from tuneforge.models.generation import render_prompt

        g = cfg.grpo
        records, eval_records, stats = load_stage_records(cfg.data, "prompt", cfg.seed)
        budget = cfg.data.max_length - g.max_new_tokens
        if budget < 1:
            raise UserError(f"data.max_length ({cfg.data.max_length}) leaves no room for a prompt beside "
                            f"grpo.max_new_tokens ({g.max_new_tokens}); raise data.max_length")

        def rows(items):
            kept, dropped = [], 0
            for record in items:
                clash = [k for k in record["fields"] if k in RESERVED_FIELDS]
                if clash:
                    raise UserError(f"{record['source']}: field name(s) {clash} are reserved by the GRPO trainer; "
                                    "rename them")
                text, _ = render_prompt(tokenizer, template, record["prompt"])
                if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > budget:
                    dropped += 1  # a prompt is never cut: the answer would then respond to another question
                    continue
                kept.append({"prompt": text, **{k: _as_text(v) for k, v in record["fields"].items()}})
            return kept, dropped

        train, dropped = rows(records)
        if not train:
            raise UserError(f"no prompt is left: all {len(records)} are longer than data.max_length - "
                            f"grpo.max_new_tokens = {budget} tokens; raise data.max_length or shorten the prompts")
        evaluation = rows(eval_records)[0] if eval_records else None
        stats.update(samples=len(train), rows=len(train), eval_rows=len(evaluation or []),
                     dropped_too_long=dropped)
        return PreferenceBundle(train=train, eval=evaluation, stats=stats, records=records)

    def build_trainer(self, cfg, model, tokenizer, template, bundle, args, callbacks, optimizers, trainer_class):
        from trl import GRPOConfig

        from tuneforge.models.generation import cut_at_stop, stop_strings, stop_token_ids

        g = cfg.grpo
        _quiet_loss_spikes(callbacks)
        per_generation = cfg.train.batch_size * (g.steps_per_generation or cfg.train.grad_accum)
        if per_generation % g.group_size:
            raise UserError(f"train.batch_size x steps per generation ({per_generation}) must be a multiple of "
                            f"grpo.group_size ({g.group_size}): every prompt's whole group is generated together")
        stops = stop_strings(tokenizer, template)
        rewards = build_rewards(g.rewards, bundle.records, lambda text: cut_at_stop(text, stops),
                                prompt_messages=_prompt_lookup(bundle.records, tokenizer, template))
        # TRL stops sampling at the model's EOS ids and keeps that token in the completion: give it ours.
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, template, model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        reference, disable_for_reference = choose_reference(
            model, g.beta <= 0, tokenizer(bundle.train[0]["prompt"], add_special_tokens=False)["input_ids"])
        grpo_args = trl_args(
            args, GRPOConfig,
            num_generations=g.group_size,
            beta=0.0 if reference is not None else g.beta,  # set below, with our reference copy
            epsilon=g.epsilon,
            max_completion_length=g.max_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            top_k=g.top_k,
            steps_per_generation=g.steps_per_generation,
            reward_weights=[r.weight for r in g.rewards],
            include_num_input_tokens_seen="no",  # batches hold prompts, not input_ids
            log_completions=False,
        )
        with frozen_reference_adapters(model):
            trainer = trainer_class(trainer_base())(
                model=model,
                reward_funcs=rewards,
                args=grpo_args,
                train_dataset=to_dataset(bundle.train),
                eval_dataset=to_dataset(bundle.eval),
                processing_class=tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
            )
        if reference is not None:
            _attach_reference(trainer, reference, g.beta)
        finish_peft_reference(trainer, disable_for_reference)
        return trainer


def _prompt_lookup(records: list[dict], tokenizer: Any, template: Any):
    """Rendered prompt text (what TRL hands the rewards) → the record's prompt messages (reward models re-render
    them with their own template)."""
    from tuneforge.models.generation import render_prompt

    table = {render_prompt(tokenizer, template, r["prompt"])[0]: r["prompt"] for r in records}
    return table.get


def _quiet_loss_spikes(callbacks: list) -> None:
    """GRPO's loss is a surrogate near 0 by construction (advantages are zero-mean per group), so "x times its moving
    average" means nothing: the monitor's loss-spike check is off; its NaN, grad-norm and memory checks stay."""
    from tuneforge.train.monitor import StabilityMonitor

    for callback in callbacks:
        if isinstance(callback, StabilityMonitor):
            callback.cfg = callback.cfg.model_copy(update={"loss_spike_ratio": math.inf})


def _attach_reference(trainer: Any, reference: Any, beta: float) -> None:
    """Full fine-tuning with a KL term: TRL would reload the base from a path; use the frozen copy instead."""
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    disable_dropout_in_model(reference)
    add_fused_lm_head(reference, temperature=trainer.temperature)
    trainer.ref_model = trainer.accelerator.prepare_model(reference, evaluation_mode=True)
    trainer.beta = beta
    trainer.args.beta = beta


def _as_text(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def stage(name: str) -> GRPOStage:
    return GRPOStage(name)
