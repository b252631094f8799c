"""A training run in named phases — prepare → commit → fit → finish — the same path on every rank.

* :func:`prepare` builds everything a run needs (method, stage, model, tokenizer, template, data, retention, the
  progressive stack, the adapter applied) and checks every option that can fail on user input; it writes nothing
  into the run directory (a from-config base and a progressive stack are staged in hidden siblings). Ranks > 0
  call it with rank 0's :class:`~tuneforge.train.distributed.Handoff` (resolved config, tokenised data, trained
  tokenizer, resume point) instead of checking and building the data again.
* :func:`commit` (rank 0) makes every run-directory write: ``rundir.begin`` (an ``--overwrite``'s old run goes
  aside), ``config.yaml``, the template, the staged base/stack, the manifest (with the method's capabilities),
  the resume point, and the hand-off to the other ranks.
* :func:`fit` builds the Trainer and trains; SIGTERM and the stability monitor end it with
  :class:`~tuneforge.train.results.TrainingInterrupted` / :class:`~tuneforge.train.results.TrainingStopped`.
* :func:`finish` writes ``final/`` (every rank joins a sharded gather) and, on rank 0, ``summary.json``; only then
  is a replaced run deleted.

:func:`run` strings them together for one plain (or progressive) run; :func:`tuneforge.train.train` is the front
door that also picks per-task runs.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, dump_config
from tuneforge.console import say
from tuneforge.errors import UserError
from tuneforge.models.reference import (
    RUN_BASE,
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_FINAL,
    RUN_STACK,
    RUN_SUMMARY,
)
from tuneforge.train import checkpoints, distributed, outputs, progressive, rundir, watchdog
from tuneforge.train import trainer as trainers
from tuneforge.train.results import TrainingInterrupted, TrainingStopped, TrainResult
from tuneforge.utils import atomic_write_json, atomic_write_text, gc_frozen


@dataclass
class Setup:
    """A prepared run: everything :func:`commit`, :func:`fit` and :func:`finish` need.

    Attributes:
        from_run: the run directory holds the base/stack to use (``--resume``, or ranks > 0 after rank 0's commit).
        staged: hidden sibling directories (a random base, a progressive stack) that :func:`commit` renames into
            the run; removed if the run stops before.
        resume_from: the checkpoint training continues from (set by :func:`commit`, or by rank 0's hand-off).
    """

    cfg: RunConfig
    run_dir: Path
    resume: bool
    overwrite: bool
    from_run: bool
    me: Any
    method: Any
    stage: Any
    stack: Any = None
    model: Any = None
    tokenizer: Any = None
    template: Any = None
    bundle: Any = None
    packing: bool = False
    retention: Any = None
    trainable: int = 0
    total: int = 0
    staged: dict[str, Path] = field(default_factory=dict)
    untrained: list = field(default_factory=list)  # template tokens with untrained embedding rows (models.untrained)
    resume_from: Path | str | None = None
    handed_over: bool = False

    def remove_staged(self) -> None:
        """Delete the staged sibling directories that were not committed."""
        for folder in self.staged.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.staged.clear()


@dataclass
class Fitted:
    """A trained Trainer, its ``train()`` output and the training time."""

    trainer: Any
    output: Any
    runtime: float


# ----------------------------------------------------------------------------- the whole run


def run(cfg: RunConfig, resume: bool = False, overwrite: bool = False, callbacks: list | None = None,
        allow_config_change: bool = False) -> TrainResult:
    """One plain (or progressive) run on this rank: prepare → commit (rank 0) → fit → finish.

    Args: as :func:`tuneforge.train.train`.

    Raises:
        UserError: bad input (before a file is written), a start that would lose work, a run another process holds.
        TrainingStopped: the stability monitor stopped training.
        TrainingInterrupted: SIGTERM during training (a complete checkpoint was saved first).
    """
    run_dir = Path(cfg.output_dir)
    stop = rundir.SigtermStop()
    me = distributed.world()
    if not me.is_main:  # ranks > 0 write nothing: rank 0 checks, locks, tokenises and hands its setup over
        with stop.installed():
            setup = prepare(cfg, run_dir, handoff=distributed.receive_setup())
            return finish(setup, fit(setup, callbacks, stop))
    setup = None
    try:
        with rundir.run_lock(run_dir), stop.installed():
            setup = prepare(cfg, run_dir, resume, overwrite, allow_config_change)
            start = commit(setup)
            return finish(setup, fit(setup, callbacks, stop, start), start)
    except BaseException as exc:
        if me.distributed and not (setup and setup.handed_over):  # the other ranks wait for the setup: stop them
            distributed.send_failure(str(exc) or type(exc).__name__, getattr(exc, "exit_code", 1))
        raise
    finally:
        if me.distributed:
            distributed.finish_cache(run_dir)


# ----------------------------------------------------------------------------- prepare


def prepare(cfg: RunConfig, run_dir: Path, resume: bool = False, overwrite: bool = False,
            allow_config_change: bool = False, handoff: Any = None) -> Setup:
    """Build and check everything the run needs; nothing is written into ``run_dir``.

    Args:
        cfg: the run's validated config (ranks > 0: ignored, rank 0's resolved config comes with ``handoff``).
        run_dir: the run directory.
        resume, overwrite, allow_config_change: as :func:`tuneforge.train.train` (rank 0).
        handoff: ranks > 0: rank 0's :class:`~tuneforge.train.distributed.Handoff`.

    Raises:
        UserError: anything the user can fix (options, data, paths, a start that would lose work).
    """
    from transformers import set_seed

    from tuneforge.methods import get_method
    from tuneforge.train.stages import get_stage

    me = distributed.world()
    if handoff is None:
        cfg = _check_start(cfg, run_dir, resume, overwrite, allow_config_change, me)
    else:
        from tuneforge.config import validate_config

        cfg = validate_config(handoff.config, source="rank 0's resolved config")
        set_seed(cfg.seed)
    method = get_method(cfg.method.name)
    if handoff is None:
        distributed.check_strategy(cfg, method, me.world_size)
    setup = Setup(cfg=cfg, run_dir=run_dir, resume=resume, overwrite=overwrite, me=me, method=method,
                  from_run=resume or handoff is not None, stage=get_stage(cfg.stage))
    _load(setup, handoff)
    if handoff is None:
        _build_data(setup)
    else:
        setup.bundle, setup.packing, setup.resume_from = handoff.bundle, handoff.packing, handoff.resume_from
    _apply_method(setup)
    return setup


def _check_start(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, allow_config_change: bool,
                 me: Any) -> RunConfig:
    """Rank 0's checks before anything is built; returns the config with ``method: auto`` resolved."""
    from transformers import set_seed

    from tuneforge.models.load import resolve_run_rope

    rundir.check_start(run_dir, resume, overwrite)
    set_seed(cfg.seed)
    cfg = _resolve_auto_method(cfg)
    cfg = resolve_run_rope(cfg, say)  # model.rope_scaling: auto → the scaling config.yaml records
    if resume:
        rundir.check_same_setup(cfg.model_dump(mode="json"), run_dir, allow_config_change)
        latest = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
        distributed.check_resume_world(latest, me.world_size, cfg.distributed.strategy)
    return cfg


def _resolve_auto_method(cfg: RunConfig) -> RunConfig:
    """``method.name: auto`` → the method, batch and accumulation the estimator recommends for the budget."""
    if cfg.method.name != "auto":
        return cfg
    from tuneforge.config import validate_config
    from tuneforge.estimate import recommendation_for_run

    choice = recommendation_for_run(cfg)
    raw = cfg.model_dump(mode="json")
    raw["method"] = choice.method_section()
    raw["train"] = {**raw["train"], **choice.train_overrides()}
    say(f"method auto → {raw['method']} with {choice.train_overrides()} (budget {cfg.train.memory_budget_gb} GB)")
    say(choice.explanation)
    return validate_config(raw, source="method auto")


def _load(setup: Setup, handoff: Any) -> None:
    """The model (with a progressive stack merged in), tokenizer and template."""
    from tuneforge.train.loss import check_speed_options

    cfg = setup.cfg
    texts = _tokenizer_texts(setup) if handoff is None else None
    setup.stack = progressive.resolve_stack(cfg, setup.method, setup.run_dir, setup.from_run)  # checked first
    tokenizer_dir = handoff.tokenizer_dir if handoff is not None else None
    model, setup.tokenizer = load_run_model(cfg, setup.method, setup.stage, texts, setup.run_dir, setup.from_run,
                                            tokenizer_dir)
    setup.model = progressive.merge(model, setup.stack)  # the earlier adapters, frozen into the base weights
    setup.template = resolve_template(cfg, setup.tokenizer)
    if handoff is None:
        check_speed_options(cfg, setup.model)  # train.loss_chunk / kernels against this model and device
    _untrained_tokens(setup, say if handoff is None else None)


def _untrained_tokens(setup: Setup, echo: Any) -> None:
    """Template tokens whose embedding rows were never trained: trained, refused or ignored
    (``model.untrained_tokens``), before the method wraps the model; every rank alike."""
    from tuneforge.models.untrained import apply_untrained_policy

    method = setup.method
    setup.untrained = apply_untrained_policy(
        setup.model, setup.tokenizer, setup.template, setup.cfg.model.untrained_tokens,
        trainable_rows=not method.is_adapter or hasattr(method, "lora_options"), echo=echo)


def _tokenizer_texts(setup: Setup) -> list[str] | None:
    """The text a from-config model's new tokenizer is trained on (``None`` when no tokenizer is trained)."""
    if not setup.cfg.model.from_config or saved_base(setup.run_dir, setup.from_run):
        return None
    from tuneforge.data.build import tokenizer_texts

    texts_of = setup.stage.tokenizer_texts if setup.stage else tokenizer_texts
    return texts_of(setup.cfg.data)


def _build_data(setup: Setup) -> None:
    """Rank 0: packing decided against the model, the data bundle, the retention terms."""
    from tuneforge.data.build import build_datasets
    from tuneforge.data.packing import packing_supported
    from tuneforge.train.retention import build_retention

    cfg, model, tokenizer, template = setup.cfg, setup.model, setup.tokenizer, setup.template
    packing = bool(cfg.data.packing and cfg.stage == "sft")
    if packing and not _packing_works(model, packing_supported):
        say("packing: this model's attention does not separate packed samples; using length-grouped batches")
        packing = False
    setup.packing = packing
    if setup.stage is not None:  # dpo/orpo/kto/simpo/grpo/rm: train/stages/ build their data and trainer
        setup.bundle = setup.stage.build_data(cfg, tokenizer, template)
    else:
        setup.bundle = build_datasets(cfg.data, cfg.stage, tokenizer, template, seed=cfg.seed, packing=packing,
                                      batch_size=cfg.train.batch_size)
    setup.retention = build_retention(cfg, tokenizer, template)  # train.retention / train.distill, checked


def _packing_works(model: Any, check: Any) -> bool:
    try:
        return check(model)
    except (TypeError, ValueError, RuntimeError):  # an architecture that rejects position_ids-only inputs
        return False


def _apply_method(setup: Setup) -> None:
    """Stage what must be saved of the base first, then apply the method; refuse a checkpoint it cannot hold."""
    from transformers import set_seed

    from tuneforge.models.params import count_parameters

    cfg, run_dir = setup.cfg, setup.run_dir
    try:
        # A random from-config base is saved before the method changes the model, beside the run until commit.
        if cfg.model.from_config and setup.method.is_adapter and not saved_base(run_dir, setup.from_run):
            setup.staged[RUN_BASE] = rundir.stage_dir(run_dir, RUN_BASE)
            outputs.save_base(setup.model, setup.tokenizer, setup.template, setup.staged[RUN_BASE])
        if setup.stack is not None and not setup.stack.own:  # the earlier adapters, copied into this run
            setup.staged[RUN_STACK] = rundir.stage_dir(run_dir, RUN_STACK)
            progressive.stage_copy(setup.stack, setup.staged[RUN_STACK])
        set_seed(cfg.seed)  # every rank initialises the adapter from the same state, whatever data building drew
        setup.model = setup.method.apply(setup.model, cfg.method)
        if setup.resume:  # before anything is written: a checkpoint of other shapes would fail inside the Trainer
            _check_checkpoint_fits(setup.model, run_dir)
        setup.trainable, setup.total = count_parameters(setup.model)
    except BaseException:
        setup.remove_staged()
        raise


def _check_checkpoint_fits(model: Any, run_dir: Path) -> None:
    """Refuse to resume from a checkpoint whose tensors this config's model cannot hold (``--allow-config-change``
    after a change of ``method.r``, targets, method or model)."""
    latest = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
    problem = checkpoints.checkpoint_mismatch(model, latest) if latest is not None else None
    if problem:
        raise UserError(f"--resume: {latest} does not fit this config's model: {problem}. The change to the method "
                        "or model (see --allow-config-change's list) changes the trained tensors; resume with the "
                        f"settings in {run_dir / RUN_CONFIG}, or start a new run (another run_name, or "
                        "--overwrite)")


def saved_base(run_dir: Path, from_run: bool) -> bool:
    """Whether the run directory's saved random base is the one to load (resume, ranks > 0)."""
    return from_run and (run_dir / RUN_BASE / "config.json").is_file()


def load_run_model(cfg: RunConfig, method: Any, stage: Any, texts: list[str] | None, run_dir: Path,
                   from_run: bool, tokenizer_dir: str | None = None):
    """``(model, tokenizer)`` of the run: the saved random base on resume, rank 0's tokenizer on ranks > 0."""
    from tuneforge.models.device import resolve_device, resolve_dtype
    from tuneforge.models.load import load_model

    device = resolve_device(cfg.model.device)
    if device == "cuda" and distributed.world().distributed:
        device = f"cuda:{distributed.world().local_rank}"  # one GPU per rank
    dtype = resolve_dtype(cfg.model.precision, device)
    model_cfg = cfg.model
    if saved_base(run_dir, from_run):  # the random base the adapter was trained on, not a new random one
        model_cfg = cfg.model.model_copy(update={"from_config": None, "name_or_path": str(run_dir / RUN_BASE)})
    elif tokenizer_dir and cfg.model.from_config:  # ranks > 0: rank 0's trained tokenizer
        model_cfg = cfg.model.model_copy(
            update={"from_config": cfg.model.from_config.model_copy(update={"tokenizer": tokenizer_dir})})
    extra = method.model_load_kwargs(cfg.method, dtype)
    head = getattr(stage, "model_head", None)  # rm: "reward", a sequence-classification head
    extra_args = {"head": head} if head else {}
    model, tokenizer = load_model(model_cfg, texts=texts, extra_kwargs=extra, device=device, dtype=dtype,
                                  **extra_args)
    model.config.use_cache = False  # packed rows are only kept apart without the KV cache (ENVIRONMENT.md)
    return model, tokenizer


def resolve_template(cfg: RunConfig, tokenizer: Any):
    """The run's chat template (``model.chat_template``, its kwargs and ``data.system_message``)."""
    from tuneforge.data.templates import resolve_template as resolve

    return resolve(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs, cfg.data.system_message)


# ----------------------------------------------------------------------------- commit


def commit(setup: Setup):
    """Rank 0: every write into the run directory, then the hand-off to the other ranks.

    Returns:
        the :class:`~tuneforge.train.rundir.RunStart` (``undo`` before training starts, ``finish`` at the end).
    """
    cfg, run_dir = setup.cfg, setup.run_dir
    try:  # everything that can fail on user input has been checked: from here on, write the run directory
        start = rundir.begin(run_dir, cfg.run_name, setup.resume, setup.overwrite)
    except BaseException:
        setup.remove_staged()
        raise
    _describe(setup)
    try:
        atomic_write_text(run_dir / RUN_CONFIG, dump_config(cfg))
        setup.template.save(run_dir)
        for name, folder in list(setup.staged.items()):
            folder.rename(run_dir / name)
            del setup.staged[name]
        rundir.update_manifest(run_dir, _manifest_fields(setup))
        setup.resume_from = _resume_point(run_dir, setup.resume)
        if setup.me.distributed:
            _hand_over(setup)
    except BaseException:
        start.undo()  # training never started: the directory is as it was (a replaced run is put back)
        setup.remove_staged()
        raise
    return start


def _manifest_fields(setup: Setup) -> dict:
    """What the run records beside its config: the method's capabilities (readers of the run, such as merge, never
    import methods), untrained template tokens, a GGUF base's source, a progressive stack."""
    from tuneforge.models.gguf import model_source_record

    cfg = setup.cfg
    fields = {rundir.CAPABILITIES: setup.method.capabilities(cfg.method).as_dict(),
              "untrained_tokens": [dict(t.__dict__) for t in setup.untrained],
              "model_source": model_source_record(cfg.model.name_or_path)}
    if setup.stack is not None:
        fields.update(setup.stack.describe())
    return fields


def _describe(setup: Setup) -> None:
    if setup.stack is not None:
        say(f"continue_from {setup.stack.origin}: {len(setup.stack.adapters)} earlier adapter(s) merged into the "
            "base, frozen")
    share = 100 * setup.trainable / setup.total
    say(f"method {setup.cfg.method.name}: trainable params {setup.trainable:,} of {setup.total:,} ({share:.4f}%)")
    line = outputs.describe_data(setup.bundle.stats)
    if line:
        say(line)


def _resume_point(run_dir: Path, resume: bool) -> Path | None:
    if not resume:
        return None
    for path in checkpoints.discard_incomplete(run_dir / RUN_CHECKPOINTS):
        say(f"resume: removed incomplete checkpoint {path.name} (left by an interrupted save)")
    latest = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
    say(f"resume: continuing from {latest}")
    return latest


def _hand_over(setup: Setup) -> None:
    """Rank 0: the engine's config into the run directory, then the setup to the other ranks."""
    cfg, run_dir = setup.cfg, setup.run_dir
    engine_file = distributed.write_engine_config(cfg, run_dir)
    if engine_file is not None:
        say(f"distributed: DeepSpeed config written to {engine_file}")
    folder = distributed.start_cache(run_dir)
    tokenizer_dir = None
    if cfg.model.from_config and not (run_dir / RUN_BASE / "config.json").is_file():
        tokenizer_dir = str(folder / "tokenizer")  # the tokenizer rank 0 trained, so every rank has the same ids
        setup.tokenizer.save_pretrained(tokenizer_dir)
    resume_from = str(setup.resume_from) if setup.resume_from else None
    handoff = distributed.Handoff(config=cfg.model_dump(mode="json", by_alias=True), bundle=setup.bundle,
                                  packing=setup.packing, resume_from=resume_from, tokenizer_dir=tokenizer_dir)
    distributed.send_setup(handoff, run_dir)
    setup.handed_over = True
    say(f"distributed: {setup.me.world_size} ranks, strategy {cfg.distributed.strategy}; data tokenised once on "
        "rank 0 and handed to the other ranks")


# ----------------------------------------------------------------------------- fit


def fit(setup: Setup, callbacks: list | None, stop: rundir.SigtermStop, start: Any = None) -> Fitted:
    """Build the Trainer and train; a build failure on rank 0 puts the run directory back (``start.undo``).

    Raises:
        TrainingInterrupted: SIGTERM (a complete checkpoint was saved; rank 0 records it in the summary).
        TrainingStopped: the stability monitor stopped training (rank 0 records it in the summary).
    """
    try:
        trainer, monitor = _build(setup, callbacks, stop)
    except BaseException:
        if start is not None:
            start.undo()  # training never started: the directory is as it was (a replaced run is put back)
        setup.remove_staged()
        raise
    if start is not None and start.aside is not None:
        say(f"overwrite: the previous run is kept at {start.aside} until this one has finished")
    started = time.time()
    resume_from = str(setup.resume_from) if setup.resume_from else None
    with stop.training(), gc_frozen(), watchdog.watching(trainer, setup, distributed.report_status):
        output = trainer.train(resume_from_checkpoint=resume_from)
    runtime = time.time() - started
    _check_outcome(setup, trainer, monitor, stop)
    return Fitted(trainer, output, runtime)


def _build(setup: Setup, callbacks: list | None, stop: rundir.SigtermStop):
    from tuneforge.train.loss import loss_trainer_class

    # the same loss on every rank (train.loss_chunk: compute_loss from hidden states in chunks)
    trainer_base = loss_trainer_class(setup.cfg, setup.model)
    if setup.retention:  # its compute_loss adds the terms to super()'s loss, chunked or not
        trainer_base = setup.retention.trainer_class(setup.model, setup.run_dir, base=trainer_base)
    trainer, monitor = trainers.build_trainer(setup, trainer_base)
    for callback in callbacks or ():
        trainer.add_callback(callback)
    trainer.add_callback(stop.callback())
    return trainer, monitor


def _check_outcome(setup: Setup, trainer: Any, monitor: Any, stop: rundir.SigtermStop) -> None:
    """Raise for a SIGTERM stop or a monitor stop; rank 0 writes what happened into ``summary.json``."""
    main, run_dir, me = setup.me.is_main, setup.run_dir, setup.me
    if stop.stopped_at is not None:
        if not main:
            raise TrainingInterrupted(f"SIGTERM: rank {me.rank} stopped at step {stop.stopped_at}")
        last = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
        atomic_write_json(run_dir / RUN_SUMMARY, {"status": "interrupted", "global_step": stop.stopped_at,
                                                  "checkpoint": str(last) if last else None})
        raise TrainingInterrupted(
            f"SIGTERM: training stopped at step {stop.stopped_at} after saving the complete checkpoint {last}; "
            "run the same command with --resume to continue")
    reason = getattr(monitor, "stopped_reason", None) if monitor is not None else None
    if not reason:
        return
    if not main:
        raise TrainingStopped(f"rank {me.rank}: {reason}")
    last = checkpoints.latest_checkpoint(run_dir / RUN_CHECKPOINTS)
    atomic_write_json(run_dir / RUN_SUMMARY, {"status": "stopped", "reason": reason,
                                              "last_good_checkpoint": str(last) if last else None})
    raise TrainingStopped(
        f"training stopped at step {trainer.state.global_step}: {reason}\n"
        f"last good checkpoint: {last or 'none (no checkpoint was saved before the problem)'}; nothing was written "
        "to final/")


# ----------------------------------------------------------------------------- finish


def finish(setup: Setup, fitted: Fitted, start: Any = None) -> TrainResult:
    """``final/`` (every rank joins a sharded gather), then on rank 0 ``summary.json``; only then does a replaced
    run go."""
    final_dir = setup.run_dir / RUN_FINAL
    outputs.save_final_of(fitted.trainer, setup, final_dir)
    if not setup.me.is_main:
        return TrainResult(run_dir=setup.run_dir, final_dir=final_dir, summary={}, model=fitted.trainer.model)
    summary = outputs.summary(setup, fitted.trainer, fitted.output, fitted.runtime)
    if setup.me.distributed:
        summary["distributed"] = {"world_size": setup.me.world_size, "strategy": setup.cfg.distributed.strategy}
    if setup.retention:
        summary["retention"] = setup.retention.describe()
    if setup.stack is not None:
        summary.update(setup.stack.describe())
    if getattr(setup.bundle, "eval_by_task", None):  # multi-task data: the eval loss of each task (data/mix.py)
        summary["tasks"] = outputs.per_task_eval(fitted.trainer, setup.bundle.eval_by_task)
    atomic_write_json(setup.run_dir / RUN_SUMMARY, summary)
    if start is not None:
        start.finish()  # only now may a replaced run go
    say(f"done: {setup.run_dir} (final model in {final_dir})")
    return TrainResult(run_dir=setup.run_dir, final_dir=final_dir, summary=summary, model=fitted.trainer.model)
