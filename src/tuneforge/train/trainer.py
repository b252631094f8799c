"""The Trainer of a run: its ``TrainingArguments``, callbacks, optimizer and the checkpoint-marking subclass.

:func:`build_trainer` is what the ``fit`` phase (:mod:`tuneforge.train.phases`) calls on every rank; a stage
(``train/stages/``) builds its own TRL trainer from the same arguments, callbacks and optimizer.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from tuneforge.models.reference import RUN_CHECKPOINTS
from tuneforge.train import checkpoints, distributed

SAMPLE_PROMPT = [{"role": "user", "content": "Explain what a Python list is."}]
_OPTIM_NAMES = {"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}


def steps_per_epoch(rows: int, cfg: Any, world_size: int = 1) -> int:
    """Optimizer steps in one epoch of ``rows`` rows on ``world_size`` processes."""
    return max(1, math.ceil(math.ceil(rows / (cfg.train.batch_size * world_size)) / cfg.train.grad_accum))


def total_steps(rows: int | None, cfg: Any, world_size: int = 1) -> int:
    """The run's optimizer steps: ``train.max_steps``, or the epochs' steps (``rows`` is ``None`` for a stream,
    whose config always sets ``train.max_steps``)."""
    if cfg.train.max_steps or rows is None:
        return cfg.train.max_steps
    return max(1, math.ceil(steps_per_epoch(rows, cfg, world_size) * cfg.train.epochs))


def _precision_kwargs(cfg: Any, device: str) -> dict:
    import torch

    from tuneforge.models.device import resolve_dtype

    dtype = resolve_dtype(cfg.model.precision, device)
    on_cpu = device == "cpu"
    # autocast flags are CUDA's; on CPU the dtype is the model's
    return {"use_cpu": on_cpu, "bf16": dtype == torch.bfloat16 and not on_cpu,
            "fp16": dtype == torch.float16 and not on_cpu}


def _schedule_kwargs(cfg: Any, has_eval: bool, steps: int) -> dict:
    """Evaluation, saving and early stopping."""
    t = cfg.train
    evaluating = bool(has_eval and t.eval_steps)
    save_steps = t.save_steps or steps + 1
    if t.early_stopping_patience and evaluating and save_steps % t.eval_steps:
        save_steps = t.eval_steps  # the best checkpoint can only be one that was evaluated
    return dict(
        eval_strategy="steps" if evaluating else "no",
        eval_steps=t.eval_steps if evaluating else None,
        save_strategy="steps" if t.save_steps or t.early_stopping_patience else "no",
        save_steps=save_steps,
        save_total_limit=None,  # we rotate ourselves, after the completion marker (checkpoints.py)
        load_best_model_at_end=bool(t.early_stopping_patience and evaluating),
        metric_for_best_model="eval_loss" if t.early_stopping_patience else None,
        greater_is_better=False if t.early_stopping_patience else None,
    )


def _optimization_kwargs(cfg: Any) -> dict:
    t = cfg.train
    kwargs = dict(
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm or 0.0,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        optim=_OPTIM_NAMES.get(t.optim, t.optim),
        neftune_noise_alpha=t.neftune_alpha,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
    )
    if t.scheduler == "cosine_with_restarts":
        kwargs["lr_scheduler_kwargs"] = {"num_cycles": t.num_cycles}
    return kwargs


def training_arguments(cfg: Any, method: Any, run_dir: Path, has_eval: bool, packing: bool, steps: int):
    """The ``transformers.TrainingArguments`` of the run (the method's and the engine's additions included)."""
    from transformers import TrainingArguments

    from tuneforge.models.device import resolve_device

    t = cfg.train
    device = resolve_device(cfg.model.device)
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / RUN_CHECKPOINTS),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the stability monitor must see a NaN loss, not a running average
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[r for r in t.report_to if r not in ("none", "tensorboard")],  # tensorboard: our own writer
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # tokens/s in the progress display
        train_sampling_strategy="random" if packing or cfg.stage == "pt" else "group_by_length",
        **_optimization_kwargs(cfg), **_schedule_kwargs(cfg, has_eval, steps), **_precision_kwargs(cfg, device),
    )
    kwargs.update(method.trainer_args(cfg.method))
    engine = distributed.trainer_arguments(cfg, run_dir, distributed.world(), device)
    if engine.get("fsdp") and engine["fsdp_config"]["activation_checkpointing"]:
        kwargs["activation_checkpointing"] = False  # FSDP checkpoints each wrapped layer itself
    kwargs.update(engine)
    return TrainingArguments(**kwargs)


def build_trainer(setup: Any, trainer_base: Any = None):
    """``(trainer, stability monitor or None)`` for a prepared run (:class:`tuneforge.train.phases.Setup`).

    Args:
        setup: the prepared run.
        trainer_base: the ``Trainer`` subclass to mark (loss terms: ``train.loss_chunk``, retention).
    """
    from tuneforge.models.device import resolve_device
    from tuneforge.train.callbacks import install_progress
    from tuneforge.train.loss import compile_model

    cfg, method, model = setup.cfg, setup.method, setup.model
    me = distributed.world()
    streaming = bool(getattr(cfg.data, "streaming", False))  # a stream has no length (data/stream.py)
    steps = total_steps(None if streaming else len(setup.bundle.train), cfg, me.world_size)
    args = training_arguments(cfg, method, setup.run_dir, bool(setup.bundle.eval), setup.packing, steps)
    compile_model(model, cfg.train, resolve_device(cfg.model.device))  # train.compile: the decoder, in place
    monitor = _monitor(setup, me)
    callbacks = _callbacks(cfg, setup.run_dir, args, monitor, me) + method.callbacks(cfg.method, steps)
    if streaming:  # data_state.json in every checkpoint; resume seeks the stream (given at construction)
        from tuneforge.data.stream import StreamStateCallback

        callbacks.append(StreamStateCallback(setup.bundle.train))
    optimizers = (method.create_optimizer(model, cfg.method, cfg.train), None)
    if setup.stage is not None:  # the stage's TRL trainer, from these arguments, callbacks and optimizer
        trainer = setup.stage.build_trainer(cfg, model, setup.tokenizer, setup.template, setup.bundle, args,
                                            callbacks, optimizers, marked_trainer_class)
    else:
        trainer = marked_trainer_class(trainer_base)(
            model=model, args=args, train_dataset=setup.bundle.train, eval_dataset=setup.bundle.eval or None,
            data_collator=setup.bundle.collator(setup.tokenizer), processing_class=setup.tokenizer,
            callbacks=callbacks, optimizers=optimizers)
    trainer.keep_checkpoints = cfg.train.save_total_limit
    trainer.strategy = cfg.distributed.strategy
    install_progress(trainer, cfg.stage)
    return trainer, monitor


def _callbacks(cfg: Any, run_dir: Path, args: Any, monitor: Any, me: Any) -> list:
    from transformers import EarlyStoppingCallback

    from tuneforge.train.callbacks import MetricsFileCallback

    callbacks = [MetricsFileCallback(run_dir)]
    if "tensorboard" in cfg.train.report_to and me.is_main:  # one event file, not one per rank
        callbacks.append(_tensorboard(run_dir / "tensorboard"))
    if monitor is not None:
        callbacks.append(monitor)
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return callbacks


def _tensorboard(log_dir: Path):
    """TensorBoard logs in ``run_dir/tensorboard`` (the Trainer's default would bury them under checkpoints/)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def _monitor(setup: Any, me: Any):
    cfg = setup.cfg
    if not cfg.train.monitor.enabled:
        return None
    from tuneforge.train.monitor import StabilityMonitor, generation_sampler

    sampler = None
    if cfg.train.monitor.sample_every and cfg.stage == "sft":
        sampler = generation_sampler(setup.model, setup.tokenizer, setup.template, [SAMPLE_PROMPT])
    monitor = StabilityMonitor(setup.run_dir, cfg.train.monitor, sampler=sampler)
    if not me.is_main:
        # Every rank sees the same gathered loss, so every rank stops alike; only rank 0 reports.
        monitor.run_dir = Path(os.devnull)  # not a directory: the monitor appends nothing
        monitor.echo = _quiet
    return monitor


def _quiet(*_args, **_kwargs) -> None:
    """The monitor's ``echo`` on ranks > 0: rank 0 says everything once."""


def marked_trainer_class(base=None):
    """A ``Trainer`` subclass (of ``base``) whose checkpoints get a completion marker before any old one is rotated
    away, and record the world they were written by."""
    from transformers import Trainer

    class MarkedTrainer(base or Trainer):
        """A Trainer whose checkpoints get a completion marker before any old one is rotated away."""

        keep_checkpoints: int | None = None
        strategy: str = "ddp"

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            self.accelerator.wait_for_everyone()  # every rank's files (its RNG state, its shards) are written
            if not self.is_world_process_zero():
                return
            distributed.write_checkpoint_world(folder, self.args.world_size, self.strategy)
            checkpoints.mark_complete(folder)
            checkpoints.rotate(self.args.output_dir, self.keep_checkpoints, self.state.best_model_checkpoint)

    return MarkedTrainer
