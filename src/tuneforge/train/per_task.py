"""One adapter per task (``method.per_task: true``): a parent run of task runs on one base.

The records' ``task`` field (``data/mix.py``) splits the data. ``runs/<name>/`` is the parent: its manifest,
``config.yaml`` (the config as given), ``data/<task>.train.jsonl`` / ``<task>.eval.jsonl`` (each task's records,
after the parent's cleaning, ``max_samples`` and ``eval_split``, so train and eval are split exactly as one
multi-task run would split them), ``base/`` (for a from-config model: the one random base every task adapter is
trained on) and ``summary.json`` with a per-task table. ``runs/<name>/tasks/<task>/`` is each task's complete
run (``tuneforge.models.reference.per_task_runs``), trained by :func:`tuneforge.train.phases.run` with the
parent's settings on that task's records only. The front door :func:`tuneforge.train.train` sends a
``method.per_task`` config here.

``--resume`` skips finished tasks, resumes the one with a checkpoint, and restarts a task that stopped before its
first checkpoint. Refused (``UserError``, before anything is written): a record without ``task``, a task name
that cannot be a directory name, fewer than two tasks, an eval task without training records,
``data.task_weights`` (each task trains alone), ``method.continue_from`` (each task adapter would need its own
stack: continue one task's run instead), a stage other than sft/pt, several processes (torchrun).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, dump_config, validate_config
from tuneforge.console import say
from tuneforge.errors import UserError
from tuneforge.models.reference import (
    RUN_BASE,
    RUN_CHECKPOINTS,
    RUN_CONFIG,
    RUN_FINAL,
    RUN_SUMMARY,
    RUN_TASKS,
)
from tuneforge.train import checkpoints, distributed, rundir
from tuneforge.train.results import TrainingInterrupted, TrainingStopped, TrainResult
from tuneforge.utils import atomic_write_json, atomic_write_text

KEY = "method.per_task"
DATA_DIR = "data"  # the parent's per-task record files
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def run_per_task(cfg: RunConfig, resume: bool = False, overwrite: bool = False, callbacks: list | None = None,
                 allow_config_change: bool = False):
    """Train one adapter per task of ``cfg``'s data, task by task, into ``<output_dir>/tasks/<task>/``.

    Args: as :func:`tuneforge.train.train` (``resume`` and ``overwrite`` act on the parent run).

    Returns:
        ``TrainResult(run_dir=<parent>, final_dir=<parent>/tasks, summary=<parent summary>, model=None)``.

    Raises:
        UserError: see the module docstring; also what a task run raises (``TrainingInterrupted`` on SIGTERM,
            exit 75: ``--resume`` continues that task).
    """
    run_dir = Path(cfg.output_dir)
    check_options(cfg)
    with rundir.run_lock(run_dir):
        start, train, evaluation, files = _begin_parent(cfg, run_dir, resume, overwrite, allow_config_change)
        say(f"per-task: {len(train)} tasks ({', '.join(f'{t}: {len(r)}' for t, r in train.items())} training "
            f"records) → {run_dir / RUN_TASKS}/<task>")
        rows: dict[str, dict] = {}
        for task in train:
            task_dir = run_dir / RUN_TASKS / task
            _train_task(cfg, task, task_dir, files[task], start, rows, callbacks, allow_config_change)
            rows[task] = task_row(task_dir, len(train[task]), len(evaluation.get(task, [])))
        summary = {"status": "completed", "run_name": cfg.run_name, "stage": cfg.stage, "method": cfg.method.name,
                   "per_task": True, "tasks": rows}
        atomic_write_json(run_dir / RUN_SUMMARY, summary)
        start.finish()
    say(f"done: {run_dir} ({len(rows)} task adapters in {run_dir / RUN_TASKS})")
    return TrainResult(run_dir=run_dir, final_dir=run_dir / RUN_TASKS, summary=summary, model=None)


def _begin_parent(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, allow_config_change: bool):
    """The parent's checks (nothing written), then its files: ``(start, train, evaluation, task files)``."""
    from transformers import set_seed

    check_parent_start(run_dir, resume, overwrite)
    if resume:
        rundir.check_same_setup(cfg.model_dump(mode="json"), run_dir, allow_config_change)
    train, evaluation = split_by_task(cfg)
    set_seed(cfg.seed)
    reuse_base = resume and _has_base(run_dir)  # the base the finished tasks were trained on
    staged_base = _stage_base(cfg, run_dir) if cfg.model.from_config and not reuse_base else None
    try:
        start = rundir.begin(run_dir, cfg.run_name, resume, overwrite)
    except BaseException:
        _remove(staged_base)
        raise
    try:
        atomic_write_text(run_dir / RUN_CONFIG, dump_config(cfg))
        if staged_base is not None:
            staged_base.rename(run_dir / RUN_BASE)
        files = _write_task_data(run_dir, train, evaluation)
    except BaseException:
        start.undo()
        _remove(staged_base)
        raise
    return start, train, evaluation, files


def _train_task(cfg: RunConfig, task: str, task_dir: Path, files, start, rows: dict, callbacks,
                allow_config_change: bool) -> None:
    """One task's run (skipped when finished); a stop records the parent's state and re-raises."""
    run_dir = Path(cfg.output_dir)
    state = task_state(task_dir)
    if state == "done":
        say(f"per-task: {task}: finished, skipped")
        return
    say(f"per-task: training {task} ({state})")
    task_cfg = task_config(cfg, task, files, run_dir)
    try:
        run_training_of(task_cfg, resume=state == "resumable", overwrite=state == "restart", callbacks=callbacks,
                        allow_config_change=allow_config_change)
    except (TrainingInterrupted, TrainingStopped) as exc:
        status = "interrupted" if isinstance(exc, TrainingInterrupted) else "stopped"
        atomic_write_json(run_dir / RUN_SUMMARY, {"status": status, "task": task, **_done(rows)})
        raise
    except UserError:
        if not _task_dirs(run_dir):  # nothing trained yet: leave no half-made parent behind
            start.undo()
        raise


def run_training_of(task_cfg: RunConfig, **kwargs):
    """One task's run: a plain run through the phases (a seam for tests)."""
    from tuneforge.train.phases import run

    return run(task_cfg, **kwargs)


# ----------------------------------------------------------------------------- checks


def check_options(cfg: RunConfig) -> None:
    """Refuse combinations per-task training does not support (writes nothing).

    Raises:
        UserError: naming the key.
    """
    from tuneforge.methods import get_method

    if not get_method(cfg.method.name).is_adapter:
        raise UserError(f"{KEY} trains one adapter per task; method {cfg.method.name} trains the full model. Use an "
                        "adapter method (lora, dora, ...)")
    if getattr(cfg.method, "continue_from", None):
        raise UserError(f"{KEY} together with method.continue_from: not supported (each task adapter would need its "
                        "own stack of earlier adapters); continue one task's run instead: method.continue_from: "
                        "runs/<name>/tasks/<task>")
    if cfg.stage not in ("sft", "pt"):
        raise UserError(f"{KEY} with stage {cfg.stage}: only sft and pt data are split by task")
    if cfg.data.task_weights:
        raise UserError(f"data.task_weights with {KEY}: each task trains alone on its own records, so weights between "
                        "tasks do nothing; remove data.task_weights (set train.max_steps or epochs instead)")
    if distributed.world().distributed:
        raise UserError(f"{KEY} runs the tasks one after another in one process; start it without torchrun/--nproc")


def check_parent_start(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """The parent-run version of :func:`tuneforge.train.rundir.check_start` (a parent has no checkpoints of its
    own: finished means its summary says completed).

    Raises:
        UserError: as ``check_start``.
    """
    exists = rundir.check_output_dir(run_dir, resume, overwrite)
    if resume:
        if not exists:
            raise UserError(f"--resume: {run_dir} holds no per-task run to continue; start it without --resume")
        return
    if not exists or overwrite:
        return
    if _summary(run_dir).get("status") == "completed":
        raise UserError(f"{run_dir} already holds a finished per-task run; choose another run_name/output_dir or "
                        "pass --overwrite")
    raise UserError(f"{run_dir} holds an unfinished per-task run; pass --resume to continue it (finished tasks are "
                    "skipped), or --overwrite to start again")


def split_by_task(cfg: RunConfig) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """``({task: train records}, {task: eval records})`` after the run's cleaning, ``max_samples`` and eval split.

    Raises:
        UserError: a record without ``task`` or with a task name unfit for a directory (naming the record), fewer
            than two tasks, an eval task with no training records.
    """
    from tuneforge.data.build import load_records

    records, eval_records, _ = load_records(cfg.data, cfg.seed)
    train = _group(records, "training")
    evaluation = _group(eval_records or [], "eval")
    if len(train) < 2:
        raise UserError(f"{KEY}: the training records hold {len(train)} task ({', '.join(train) or 'none'}); one "
                        "adapter per task needs at least two (for one task, set method.per_task: false)")
    stray = sorted(set(evaluation) - set(train))
    if stray:
        raise UserError(f"{KEY}: eval records of task(s) {stray} have no training records (tasks: "
                        f"{', '.join(train)}); fix the task names or drop those eval records")
    return dict(sorted(train.items())), evaluation


def _group(records: list[dict], what: str) -> dict[str, list[dict]]:
    from tuneforge.data.mix import task_of

    groups: dict[str, list[dict]] = {}
    for record in records:
        task = task_of(record)
        source = record.get("source", "?")
        if task is None:
            raise UserError(f"{source}: {what} record has no 'task' field, but {KEY} is on (give every record a "
                            "task name, or set method.per_task: false)")
        if not _TASK_NAME.fullmatch(task):
            raise UserError(f"{source}: task name {task!r} cannot name a task run directory ({KEY}); use letters, "
                            "digits, '_', '-' and '.', starting with a letter or digit")
        groups.setdefault(task, []).append(record)
    return groups


# ----------------------------------------------------------------------------- the parent's files


def _has_base(run_dir: Path) -> bool:
    return (run_dir / RUN_BASE / "config.json").is_file()


def _stage_base(cfg: RunConfig, run_dir: Path) -> Path:
    """The one random base of a from-config per-task run, built from all tasks' text and saved beside the run."""
    import torch

    from tuneforge.data.build import tokenizer_texts
    from tuneforge.models.load import load_model
    from tuneforge.train.outputs import save_base
    from tuneforge.train.phases import resolve_template

    model, tokenizer = load_model(cfg.model, texts=tokenizer_texts(cfg.data), device="cpu", dtype=torch.float32)
    staged = rundir.stage_dir(run_dir, RUN_BASE)
    try:
        save_base(model, tokenizer, resolve_template(cfg, tokenizer), staged)
    except BaseException:
        _remove(staged)
        raise
    return staged


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _write_task_data(run_dir: Path, train: dict, evaluation: dict) -> dict[str, tuple[Path, Path | None]]:
    """``data/<task>.train.jsonl`` (and ``.eval.jsonl``) in the parent; each record keeps its first source as
    ``origin``."""
    files = {}
    for task, records in train.items():
        paths = [run_dir / DATA_DIR / f"{task}.train.jsonl"]
        if evaluation.get(task):
            paths.append(run_dir / DATA_DIR / f"{task}.eval.jsonl")
        for path, group in zip(paths, (records, evaluation.get(task)), strict=False):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(_row(r), ensure_ascii=False) + "\n" for r in group))
        files[task] = (paths[0], paths[1] if len(paths) > 1 else None)
    return files


def _row(record: dict) -> dict:
    row = {k: v for k, v in record.items() if k != "source"}
    row["origin"] = record.get("origin") or record.get("source")
    return row


def task_config(cfg: RunConfig, task: str, files: tuple[Path, Path | None], run_dir: Path) -> RunConfig:
    """The config of one task's run: the parent's, on that task's record files, into ``tasks/<task>/``, on the
    parent's base (``base/`` for a from-config model)."""
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw["run_name"] = f"{cfg.run_name}.{task}"
    raw["output_dir"] = str(run_dir / RUN_TASKS / task)
    raw["method"]["per_task"] = False
    train_file, eval_file = files
    raw["data"].update(train=[str(train_file)], eval=str(eval_file) if eval_file else None, eval_split=None,
                       max_samples=None, task_weights={}, format="auto")
    if cfg.model.from_config is not None:
        raw["model"].update(from_config=None, tokenizer=None, name_or_path=str(run_dir / RUN_BASE))
    return validate_config(raw, source=f"{KEY} ({task})")


# ----------------------------------------------------------------------------- task runs


def task_state(task_dir: Path) -> str:
    """``new`` (no run yet), ``done`` (finished), ``resumable`` (a complete checkpoint) or ``restart`` (stopped
    before its first checkpoint: trained again from the start)."""
    if not task_dir.exists():
        return "new"
    if (task_dir / RUN_FINAL).is_dir() and _summary(task_dir).get("status") == "completed":
        return "done"
    if checkpoints.latest_checkpoint(task_dir / RUN_CHECKPOINTS):
        return "resumable"
    return "restart"


def task_row(task_dir: Path, train_records: int, eval_records: int) -> dict:
    """One row of the parent summary's per-task table, read from the task run's ``summary.json``."""
    import math

    summary = _summary(task_dir)
    data = summary.get("data") or {}
    final_eval = (summary.get("tasks") or {}).get(task_dir.name) or {}  # the run's end-of-training eval of its task
    loss = final_eval.get("eval_loss", summary.get("eval_loss"))

    return {"run": f"{RUN_TASKS}/{task_dir.name}", "train_records": train_records, "eval_records": eval_records,
            "samples": data.get("samples"), "supervised_tokens": data.get("supervised_tokens"),
            "global_step": summary.get("global_step"), "train_loss": summary.get("train_loss"),
            "eval_loss": loss, "eval_ppl": math.exp(loss) if loss is not None and loss < 50 else None,
            "runtime_s": summary.get("runtime_s")}


def _task_dirs(run_dir: Path) -> list[Path]:
    folder = run_dir / RUN_TASKS
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")] if folder.is_dir() else []


def _done(rows: dict) -> dict:
    return {"finished_tasks": sorted(rows)}


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RUN_SUMMARY
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
