"""The training entry: config → model, data, method → HF Trainer → run directory.

``run_training(cfg)`` is the one function the CLI, the quickstart and the tests call. It owns the run
directory contract (docs/architecture.md): resolved ``config.yaml``, ``checkpoints/`` with completion
markers, ``final/`` written atomically, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, dump_config
from tuneforge.errors import UserError
from tuneforge.models.reference import RUN_BASE, RUN_STACK  # parts saved beside the adapter
from tuneforge.train import checkpoints, distributed, progressive, rundir
from tuneforge.utils import atomic_dir, atomic_write_json, atomic_write_text, gc_frozen


class TrainingStopped(UserError):
    """Training was stopped by the stability monitor (e.g. NaN loss); the last good checkpoint is kept."""

    exit_code = 3


class TrainingInterrupted(UserError):
    """SIGTERM arrived during training: a complete checkpoint was saved and ``--resume`` continues from it.

    Exit code 75 (``EX_TEMPFAIL``: try again later), so a job script can tell "resume me" from a failure.
    """

    exit_code = 75


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    run_dir: Path
    final_dir: Path
    summary: dict = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the trained model in memory (for callers in the same process)


def run_training(cfg: RunConfig, resume: bool = False, overwrite: bool = False, echo=print,
                 callbacks: list | None = None, allow_config_change: bool = False) -> TrainResult:
    """Train one run described by ``cfg`` and write its run directory.

    The whole setup (config, model, template, data, method, target modules) is built before the run directory is
    touched, so bad input never damages an existing run (docs/architecture.md, "Run directory").

    Args:
        cfg: a validated run config.
        resume: continue from the newest complete checkpoint in ``<output_dir>/checkpoints``.
        overwrite: replace the tuneforge run (finished or not) in the output directory; the old run is moved aside
            once the new setup is built and deleted once the new ``final/`` exists.
        echo: where progress lines go (``print`` by default).
        callbacks: extra ``transformers.TrainerCallback`` objects, appended after tuneforge's own
            (``tuneforge search`` reports intermediate evals and stops pruned trials through one).
        allow_config_change: with ``resume``, continue even though stage, model, method or data differ from the
            run's saved ``config.yaml``.

    Raises:
        UserError: for anything the user can fix (data, paths, options), before a file is written; also a fresh
            start over an unfinished run, a directory that is not a tuneforge run, a run another process holds.
        TrainingStopped: when the stability monitor stopped training.
        TrainingInterrupted: SIGTERM during training (a complete checkpoint was saved first).
    """
    if getattr(cfg.method, "per_task", False):  # one adapter per task: a parent run of task runs (per_task.py)
        from tuneforge.train.per_task import run_per_task

        return run_per_task(cfg, resume=resume, overwrite=overwrite, echo=echo, callbacks=callbacks,
                            allow_config_change=allow_config_change)
    run_dir = Path(cfg.output_dir)
    stop = rundir.SigtermStop()
    me = distributed.world()
    if not me.is_main:  # ranks > 0 write nothing: rank 0 checks, locks, tokenises and hands its setup over
        with stop.installed():
            return _train_rank(cfg, run_dir, callbacks, stop, me)
    handed_over: list[bool] = []
    try:
        with rundir.run_lock(run_dir), stop.installed():
            return _train_locked(cfg, run_dir, resume, overwrite, echo, callbacks, allow_config_change, stop, me,
                                 handed_over)
    except BaseException as exc:
        if me.distributed and not handed_over:  # the other ranks are waiting for the setup: stop them too
            distributed.send_failure(str(exc) or type(exc).__name__, getattr(exc, "exit_code", 1))
        raise
    finally:
        if me.distributed:
            distributed.finish_cache(run_dir)


def _train_locked(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, echo, callbacks,
                  allow_config_change: bool, stop: rundir.SigtermStop, me: distributed.World,
                  handed_over: list) -> TrainResult:
    from transformers import set_seed

    rundir.check_start(run_dir, resume, overwrite)
    set_seed(cfg.seed)
    cfg = _resolve_auto_method(cfg, echo)
    if resume:
        rundir.check_same_setup(cfg.model_dump(mode="json"), run_dir, allow_config_change, echo)
        latest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
        distributed.check_resume_world(latest, me.world_size, cfg.distributed.strategy, echo)
    from tuneforge.methods import get_method

    method = get_method(cfg.method.name)
    distributed.check_strategy(cfg, method, me.world_size)

    from tuneforge.data.build import build_datasets, tokenizer_texts
    from tuneforge.data.packing import packing_supported
    from tuneforge.train.stages import get_stage

    stage = get_stage(cfg.stage)  # dpo/orpo/kto/simpo/grpo: train/stages/ build their data and trainer
    texts_of = stage.tokenizer_texts if stage else tokenizer_texts
    texts = texts_of(cfg.data) if cfg.model.from_config and not _saved_base(run_dir, resume) else None
    stack = progressive.resolve_stack(cfg, method, run_dir, resume)  # method.continue_from: checked before loading
    model, tokenizer = _load_model(cfg, method, texts, run_dir, resume)
    model = progressive.merge(model, stack)  # the earlier adapters, frozen into the base weights
    template = _template(cfg, tokenizer)
    from tuneforge.train.loss import check_speed_options

    check_speed_options(cfg, model)  # train.loss_chunk / kernels against this model and device, before any write

    packing = bool(cfg.data.packing and cfg.stage == "sft")
    if packing and not _packing_works(model, packing_supported):
        echo("packing: this model's attention does not separate packed samples; using length-grouped batches")
        packing = False
    if stage is not None:
        bundle = stage.build_data(cfg, tokenizer, template)
    else:
        bundle = build_datasets(cfg.data, cfg.stage, tokenizer, template, seed=cfg.seed, packing=packing,
                                batch_size=cfg.train.batch_size)
    from tuneforge.train.retention import build_retention

    retention = build_retention(cfg, tokenizer, template, echo)  # train.retention / train.distill, checked here

    # A random from-config base is saved before the method changes the model, beside the run dir until it commits.
    staged_base = staged_stack = None
    if cfg.model.from_config and method.is_adapter and not _saved_base(run_dir, resume):
        staged_base = rundir.stage_dir(run_dir, RUN_BASE)
    if stack is not None and not stack.own:  # the earlier adapters, copied into this run
        staged_stack = rundir.stage_dir(run_dir, RUN_STACK)
    try:
        if staged_base is not None:
            _save_base(model, tokenizer, template, staged_base)
        if staged_stack is not None:
            progressive.stage_copy(stack, staged_stack)
        set_seed(cfg.seed)  # every rank initialises the adapter from the same state, whatever data building drew
        model = method.apply(model, cfg.method)
        if resume:  # before anything is written: a checkpoint of other shapes would fail inside the Trainer
            _check_checkpoint_fits(model, run_dir)
        from tuneforge.models.params import count_parameters

        trainable, total = count_parameters(model)
        # Everything that can fail on user input has been checked: from here on, write the run directory.
        start = rundir.begin(run_dir, cfg.run_name, resume, overwrite)
    except BaseException:
        _remove_staged(staged_base, staged_stack)
        raise
    if stack is not None:
        echo(f"continue_from {stack.origin}: {len(stack.adapters)} earlier adapter(s) merged into the base, frozen")
    echo(f"method {cfg.method.name}: trainable params {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    _describe_data(bundle.stats, echo)

    try:
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        template.save(run_dir)
        if staged_base is not None:
            os.rename(staged_base, run_dir / RUN_BASE)
        if staged_stack is not None:
            os.rename(staged_stack, run_dir / RUN_STACK)
        manifest = {rundir.CAPABILITIES: method.capabilities(cfg.method).as_dict()}  # merge reads them
        rundir.update_manifest(run_dir, {**manifest, **(stack.describe() if stack is not None else {})})
        resume_from = _resume_point(run_dir, resume, echo)
        if me.distributed:
            _hand_over(cfg, run_dir, bundle, packing, resume_from, tokenizer, echo, me)
            handed_over.append(True)
        from tuneforge.train.loss import loss_trainer_class

        trainer_base = loss_trainer_class(cfg, model)  # train.loss_chunk: compute_loss from hidden states in chunks
        if retention:  # its compute_loss adds the terms to super()'s loss, chunked or not
            trainer_base = retention.trainer_class(model, run_dir, echo, base=trainer_base)
        trainer, monitor = _build_trainer(cfg, method, model, tokenizer, template, bundle, packing, run_dir, stage,
                                          trainer_base)
        for callback in callbacks or ():
            trainer.add_callback(callback)
        trainer.add_callback(stop.callback())
    except BaseException:
        start.undo()  # training never started: the directory is as it was (a replaced run is put back)
        _remove_staged(staged_base, staged_stack)
        raise
    if start.aside is not None:
        echo(f"overwrite: the previous run is kept at {start.aside} until this one has finished")
    started = time.time()
    with stop.training(), gc_frozen():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    runtime = time.time() - started

    if stop.stopped_at is not None:
        last = checkpoints.latest_checkpoint(run_dir / "checkpoints")
        atomic_write_json(run_dir / "summary.json", {"status": "interrupted", "global_step": stop.stopped_at,
                                                     "checkpoint": str(last) if last else None})
        raise TrainingInterrupted(
            f"SIGTERM: training stopped at step {stop.stopped_at} after saving the complete checkpoint {last}; "
            "run the same command with --resume to continue"
        )

    if monitor is not None and getattr(monitor, "stopped_reason", None):
        last = checkpoints.latest_checkpoint(run_dir / "checkpoints")
        summary = {"status": "stopped", "reason": monitor.stopped_reason, "last_good_checkpoint": str(last) if last else None}
        atomic_write_json(run_dir / "summary.json", summary)
        raise TrainingStopped(
            f"training stopped at step {trainer.state.global_step}: {monitor.stopped_reason}\n"
            f"last good checkpoint: {last or 'none (no checkpoint was saved before the problem)'}; nothing was written to final/"
        )

    final_dir = run_dir / "final"
    _save_final_of(trainer, tokenizer, template, final_dir, run_dir, method, cfg)
    summary = _summary(cfg, trainer, output, bundle, trainable, total, runtime, packing)
    if me.distributed:
        summary["distributed"] = {"world_size": me.world_size, "strategy": cfg.distributed.strategy}
    if retention:
        summary["retention"] = retention.describe()
    if stack is not None:
        summary.update(stack.describe())
    if getattr(bundle, "eval_by_task", None):  # multi-task data: the eval loss of each task (data/mix.py)
        summary["tasks"] = _per_task_eval(trainer, bundle.eval_by_task)
    atomic_write_json(run_dir / "summary.json", summary)
    start.finish(echo)  # only now may a replaced run go
    echo(f"done: {run_dir} (final model in {final_dir})")
    return TrainResult(run_dir=run_dir, final_dir=final_dir, summary=summary, model=trainer.model)


def _hand_over(cfg, run_dir: Path, bundle, packing: bool, resume_from, tokenizer, echo, me) -> None:
    """Rank 0: the engine's config into the run directory, then the setup to the other ranks."""
    engine_file = distributed.write_engine_config(cfg, run_dir)
    if engine_file is not None:
        echo(f"distributed: DeepSpeed config written to {engine_file}")
    folder = distributed.start_cache(run_dir)
    tokenizer_dir = None
    if cfg.model.from_config and not (run_dir / RUN_BASE / "config.json").is_file():
        tokenizer_dir = str(folder / "tokenizer")  # the tokenizer rank 0 trained, so every rank has the same ids
        tokenizer.save_pretrained(tokenizer_dir)
    handoff = distributed.Handoff(config=cfg.model_dump(mode="json", by_alias=True), bundle=bundle,
                                  packing=packing, resume_from=str(resume_from) if resume_from else None,
                                  tokenizer_dir=tokenizer_dir)
    distributed.send_setup(handoff, run_dir)
    echo(f"distributed: {me.world_size} ranks, strategy {cfg.distributed.strategy}; data tokenised once on rank 0 "
         "and handed to the other ranks")


def _train_rank(cfg: RunConfig, run_dir: Path, callbacks, stop: rundir.SigtermStop,
                me: distributed.World) -> TrainResult:
    """Ranks > 0: rank 0's setup (config, tokenised data, resume point), the same model, the same Trainer.

    Nothing is written into the run directory here; checkpoints and ``final/`` are written by rank 0 (the engines'
    collective saves gather what this rank holds).
    """
    from transformers import set_seed

    from tuneforge.config import validate_config
    from tuneforge.methods import get_method
    from tuneforge.train.stages import get_stage

    handoff = distributed.receive_setup(echo=_quiet)
    cfg = validate_config(handoff.config, source="rank 0's resolved config")
    set_seed(cfg.seed)
    method = get_method(cfg.method.name)
    stage = get_stage(cfg.stage)
    model, tokenizer = _load_model(cfg, method, None, run_dir, True, tokenizer_dir=handoff.tokenizer_dir)
    model = progressive.merge(model, progressive.resolve_stack(cfg, method, run_dir, True))  # rank 0's stack/ copy
    template = _template(cfg, tokenizer)
    set_seed(cfg.seed)
    model = method.apply(model, cfg.method)
    from tuneforge.train.loss import loss_trainer_class

    # the same loss as rank 0 (train.loss_chunk), so every rank computes its gradients the same way
    trainer, monitor = _build_trainer(cfg, method, model, tokenizer, template, handoff.bundle, handoff.packing,
                                      run_dir, stage, loss_trainer_class(cfg, model))
    for callback in callbacks or ():
        trainer.add_callback(callback)
    trainer.add_callback(stop.callback())
    with stop.training(), gc_frozen():
        trainer.train(resume_from_checkpoint=handoff.resume_from)
    if stop.stopped_at is not None:
        raise TrainingInterrupted(f"SIGTERM: rank {me.rank} stopped at step {stop.stopped_at}")
    if monitor is not None and getattr(monitor, "stopped_reason", None):
        raise TrainingStopped(f"rank {me.rank}: {monitor.stopped_reason}")
    final_dir = run_dir / "final"
    _save_final_of(trainer, tokenizer, template, final_dir, run_dir, method, cfg)
    return TrainResult(run_dir=run_dir, final_dir=final_dir, summary={}, model=trainer.model)


def _remove_staged(*staged: Path | None) -> None:
    for folder in staged:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _quiet(*_args, **_kwargs) -> None:
    """``echo`` of ranks > 0: rank 0 says everything once."""


# ----------------------------------------------------------------------------- setup


def _resolve_auto_method(cfg: RunConfig, echo) -> RunConfig:
    """``method.name: auto`` → the method, batch and accumulation the estimator recommends for the budget."""
    if cfg.method.name != "auto":
        return cfg
    from tuneforge.config import validate_config
    from tuneforge.estimate import recommendation_for_run

    choice = recommendation_for_run(cfg)
    raw = cfg.model_dump(mode="json")
    raw["method"] = choice.method_section()
    raw["train"] = {**raw["train"], **choice.train_overrides()}
    echo(f"method auto → {raw['method']} with {choice.train_overrides()} (budget {cfg.train.memory_budget_gb} GB)")
    echo(choice.explanation)
    return validate_config(raw, source="method auto")


def _saved_base(run_dir: Path, resume: bool) -> bool:
    return resume and (run_dir / RUN_BASE / "config.json").is_file()


def _packing_works(model, check) -> bool:
    try:
        return check(model)
    except (TypeError, ValueError, RuntimeError):  # an architecture that rejects position_ids-only inputs
        return False


def _load_model(cfg: RunConfig, method, texts, run_dir: Path, resume: bool, tokenizer_dir: str | None = None):
    from tuneforge.models.device import resolve_device, resolve_dtype
    from tuneforge.models.load import load_model

    device = resolve_device(cfg.model.device)
    if device == "cuda" and distributed.world().distributed:
        device = f"cuda:{distributed.world().local_rank}"  # one GPU per rank
    dtype = resolve_dtype(cfg.model.precision, device)
    model_cfg = cfg.model
    if _saved_base(run_dir, resume):  # the random base the adapter was trained on, not a new random one
        model_cfg = cfg.model.model_copy(update={"from_config": None, "name_or_path": str(run_dir / RUN_BASE)})
    elif tokenizer_dir and cfg.model.from_config:  # ranks > 0: rank 0's trained tokenizer
        model_cfg = cfg.model.model_copy(
            update={"from_config": cfg.model.from_config.model_copy(update={"tokenizer": tokenizer_dir})})
    extra = method.model_load_kwargs(cfg.method, dtype)
    model, tokenizer = load_model(model_cfg, texts=texts, extra_kwargs=extra, device=device, dtype=dtype)
    model.config.use_cache = False  # packed rows are only kept apart without the KV cache (ENVIRONMENT.md)
    return model, tokenizer


def _template(cfg: RunConfig, tokenizer):
    from tuneforge.data.templates import resolve_template

    return resolve_template(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs,
                            cfg.data.system_message)


def _save_base(model, tokenizer, template, target: Path) -> None:
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def _describe_data(stats: dict, echo) -> None:
    keys = ("samples", "rows", "eval_rows", "dropped_no_supervised", "truncated", "supervised_share", "padding_share")
    shown = {k: stats[k] for k in keys if k in stats}
    if shown:
        echo("data: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- trainer


def _steps_per_epoch(rows: int, cfg: RunConfig, world_size: int = 1) -> int:
    return max(1, math.ceil(math.ceil(rows / (cfg.train.batch_size * world_size)) / cfg.train.grad_accum))


def _total_steps(rows: int, cfg: RunConfig, world_size: int = 1) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return max(1, math.ceil(_steps_per_epoch(rows, cfg, world_size) * cfg.train.epochs))


def _training_arguments(cfg: RunConfig, method, run_dir: Path, has_eval: bool, packing: bool, total_steps: int):
    import torch
    from transformers import TrainingArguments

    from tuneforge.models.device import resolve_device, resolve_dtype

    t = cfg.train
    device = resolve_device(cfg.model.device)
    device_is_cpu = device == "cpu"
    dtype = resolve_dtype(cfg.model.precision, device)
    warmup = t.warmup_steps if t.warmup_steps is not None else t.warmup_ratio
    evaluating = bool(has_eval and t.eval_steps)
    save_steps = t.save_steps or total_steps + 1
    if t.early_stopping_patience and evaluating and save_steps % t.eval_steps:
        save_steps = t.eval_steps  # the best checkpoint can only be one that was evaluated
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=warmup,
        lr_scheduler_type=t.scheduler,
        max_grad_norm=t.max_grad_norm or 0.0,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # the stability monitor must see a NaN loss, not a running average
        eval_strategy="steps" if evaluating else "no",
        eval_steps=t.eval_steps if evaluating else None,
        save_strategy="steps" if t.save_steps or t.early_stopping_patience else "no",
        save_steps=save_steps,
        save_total_limit=None,  # we rotate ourselves, after the completion marker (checkpoints.py)
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[r for r in t.report_to if r not in ("none", "tensorboard")],  # tensorboard: our own writer
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        use_cpu=device_is_cpu,
        bf16=dtype == torch.bfloat16 and not device_is_cpu,
        fp16=dtype == torch.float16 and not device_is_cpu,  # autocast flags are CUDA's; on CPU the dtype is the model's
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        optim={"adamw_8bit": "adamw_bnb_8bit", "paged_adamw_8bit": "paged_adamw_8bit"}.get(t.optim, t.optim),
        neftune_noise_alpha=t.neftune_alpha,
        load_best_model_at_end=bool(t.early_stopping_patience and evaluating),
        metric_for_best_model="eval_loss" if t.early_stopping_patience else None,
        greater_is_better=False if t.early_stopping_patience else None,
        disable_tqdm=False,
        include_num_input_tokens_seen="non_padding",  # tokens/s in the progress display
        train_sampling_strategy="random" if packing or cfg.stage == "pt" else "group_by_length",
    )
    if t.scheduler == "cosine_with_restarts":
        kwargs["lr_scheduler_kwargs"] = {"num_cycles": t.num_cycles}
    kwargs.update(method.trainer_args(cfg.method))
    engine = distributed.trainer_arguments(cfg, run_dir, distributed.world(), device)
    if engine.get("fsdp") and engine["fsdp_config"]["activation_checkpointing"]:
        kwargs["activation_checkpointing"] = False  # FSDP checkpoints each wrapped layer itself
    kwargs.update(engine)
    return TrainingArguments(**kwargs)


def _build_trainer(cfg, method, model, tokenizer, template, bundle, packing, run_dir, stage=None, trainer_base=None):
    from transformers import EarlyStoppingCallback

    from tuneforge.train.callbacks import MetricsFileCallback, install_progress

    me = distributed.world()
    total_steps = _total_steps(len(bundle.train), cfg, me.world_size)
    args = _training_arguments(cfg, method, run_dir, bool(bundle.eval), packing, total_steps)
    from tuneforge.models.device import resolve_device
    from tuneforge.train.loss import compile_model

    compile_model(model, cfg.train, resolve_device(cfg.model.device))  # train.compile: the decoder, in place
    collator = bundle.collator(tokenizer)

    callbacks = [MetricsFileCallback(run_dir)]
    if "tensorboard" in cfg.train.report_to and me.is_main:  # one event file, not one per rank
        callbacks.append(_tensorboard(run_dir / "tensorboard"))
    monitor = _monitor(cfg, run_dir, model, tokenizer, template)
    if monitor is not None and not me.is_main:
        # Every rank sees the same gathered loss, so every rank stops alike; only rank 0 reports.
        monitor.run_dir = Path(os.devnull)  # not a directory: the monitor appends nothing
        monitor.echo = _quiet
    if monitor is not None:
        callbacks.append(monitor)
    if args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    callbacks.extend(method.callbacks(cfg.method, total_steps))

    optimizer = method.create_optimizer(model, cfg.method, cfg.train)
    if stage is not None:  # the stage's TRL trainer, from these arguments, callbacks and optimizer
        trainer = stage.build_trainer(cfg, model, tokenizer, template, bundle, args, callbacks, (optimizer, None),
                                      _marked_trainer_class)
        trainer.keep_checkpoints = cfg.train.save_total_limit
        trainer.strategy = cfg.distributed.strategy
        install_progress(trainer, cfg.stage)
        return trainer, monitor
    trainer = _marked_trainer_class(trainer_base)(  # trainer_base: retention terms (train/retention/)
        model=model,
        args=args,
        train_dataset=bundle.train,  # a list of rows is a map-style dataset
        eval_dataset=bundle.eval or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )
    trainer.keep_checkpoints = cfg.train.save_total_limit
    trainer.strategy = cfg.distributed.strategy
    install_progress(trainer, cfg.stage)
    return trainer, monitor


def _tensorboard(log_dir: Path):
    """TensorBoard logs in ``run_dir/tensorboard`` (the Trainer's default would bury them under checkpoints/)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir)))


def _monitor(cfg, run_dir, model, tokenizer, template):
    if not cfg.train.monitor.enabled:
        return None
    from tuneforge.train.monitor import StabilityMonitor, generation_sampler

    sampler = None
    if cfg.train.monitor.sample_every and cfg.stage == "sft":
        sampler = generation_sampler(model, tokenizer, template, [SAMPLE_PROMPT])
    return StabilityMonitor(run_dir, cfg.train.monitor, sampler=sampler)


SAMPLE_PROMPT = [{"role": "user", "content": "Explain what a Python list is."}]


def _marked_trainer_class(base=None):
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


def _check_checkpoint_fits(model: Any, run_dir: Path) -> None:
    """Refuse to resume from a checkpoint whose tensors this config's model cannot hold (``--allow-config-change``
    after a change of ``method.r``, targets, method or model)."""
    latest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
    problem = checkpoints.checkpoint_mismatch(model, latest) if latest is not None else None
    if problem:
        raise UserError(f"--resume: {latest} does not fit this config's model: {problem}. The change to the method "
                        "or model (see --allow-config-change's list) changes the trained tensors; resume with the "
                        f"settings in {run_dir / 'config.yaml'}, or start a new run (another run_name, or "
                        "--overwrite)")


def _resume_point(run_dir: Path, resume: bool, echo) -> Path | None:
    if not resume:
        return None
    removed = checkpoints.discard_incomplete(run_dir / "checkpoints")
    for path in removed:
        echo(f"resume: removed incomplete checkpoint {path.name} (left by an interrupted save)")
    latest = checkpoints.latest_checkpoint(run_dir / "checkpoints")
    echo(f"resume: continuing from {latest}")
    return latest


# ----------------------------------------------------------------------------- outputs


def _save_final_of(trainer, tokenizer, template, final_dir: Path, run_dir: Path, method, cfg) -> None:
    """``final/`` from the trained Trainer: rank 0 writes; under FSDP/DeepSpeed every rank joins the gather."""
    me = distributed.world()
    if not me.distributed or cfg.distributed.strategy == "ddp":
        if me.is_main:
            model = trainer.accelerator.unwrap_model(trainer.model) if me.distributed else trainer.model
            _save_final(model, tokenizer, template, final_dir, run_dir, method)
        return
    # The engine holds shards: the Trainer gathers a full state dict (a collective) and rank 0 saves it.
    _point_adapter_at_base(trainer.accelerator.unwrap_model(trainer.model), run_dir)
    if not me.is_main:
        trainer.save_model(str(final_dir))  # joins the gather; only rank 0 writes
        return
    with atomic_dir(final_dir) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def _point_adapter_at_base(model, run_dir: Path) -> None:
    """The adapter's ``base_model_name_or_path``: the saved random base, or the absolute local base directory."""
    base = run_dir / RUN_BASE
    for peft_cfg in getattr(model, "peft_config", {}).values():
        source = peft_cfg.base_model_name_or_path
        if base.is_dir():
            peft_cfg.base_model_name_or_path = str(base.resolve())
        elif source and Path(source).is_dir():
            peft_cfg.base_model_name_or_path = str(Path(source).resolve())


def _save_final(model, tokenizer, template, final_dir: Path, run_dir: Path, method) -> None:
    """Adapter (PEFT format) or full model + tokenizer + template, written atomically.

    A method may convert its adapter for the original base on the way out (PiSSA trains against a residual base).
    """
    _point_adapter_at_base(model, run_dir)
    save_adapter = getattr(method, "save_adapter", None)
    with atomic_dir(final_dir) as tmp:
        if save_adapter is not None:
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def _per_task_eval(trainer, rows_by_task: dict) -> dict:
    """``{task: {"eval_loss", "eval_ppl", "eval_rows"}}`` from the Trainer's evaluation of each task's eval rows."""
    out = {}
    for task, rows in rows_by_task.items():
        metrics = trainer.evaluate(eval_dataset=rows, metric_key_prefix=f"eval_task_{task}")  # logged as such
        loss = metrics.get(f"eval_task_{task}_loss")
        out[task] = {"eval_loss": loss, "eval_ppl": math.exp(loss) if loss is not None and loss < 50 else None,
                     "eval_rows": len(rows)}
    return out


def _summary(cfg, trainer, output, bundle, trainable, total, runtime, packing) -> dict:
    import torch

    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = bundle.stats.get("tokens")
    steps = trainer.state.global_step
    return {
        "status": "completed",
        "run_name": cfg.run_name,
        "stage": cfg.stage,
        "method": cfg.method.name,
        "global_step": steps,
        "epochs": trainer.state.epoch,
        "train_loss": output.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "runtime_s": round(runtime, 2),
        "trainable_params": trainable,
        "total_params": total,
        "packing": packing,
        "device": str(next(trainer.model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "data": bundle.stats,
        "train_tokens_seen_approx": int(tokens * trainer.state.epoch) if tokens and trainer.state.epoch else None,
    }
