"""What a run writes at its end: ``final/`` (adapter or model, tokenizer, template), the summary, per-task evals.

Used by the ``finish`` phase (:mod:`tuneforge.train.phases`); ``save_base`` also by per-task parents.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tuneforge.models.reference import RUN_BASE
from tuneforge.train import distributed
from tuneforge.utils import atomic_dir


def save_base(model: Any, tokenizer: Any, template: Any, target: Path) -> None:
    """A (random, from-config) base model with its tokenizer and template, written atomically to ``target``."""
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def save_final_of(trainer: Any, setup: Any, final_dir: Path) -> None:
    """``final/`` from the trained Trainer: rank 0 writes; under FSDP/DeepSpeed every rank joins the gather."""
    me = distributed.world()
    if not me.distributed or setup.cfg.distributed.strategy == "ddp":
        if me.is_main:
            model = trainer.accelerator.unwrap_model(trainer.model) if me.distributed else trainer.model
            save_final(model, setup.tokenizer, setup.template, final_dir, setup.run_dir, setup.method)
        return
    # The engine holds shards: the Trainer gathers a full state dict (a collective) and rank 0 saves it.
    point_adapter_at_base(trainer.accelerator.unwrap_model(trainer.model), setup.run_dir)
    if not me.is_main:
        trainer.save_model(str(final_dir))  # joins the gather; only rank 0 writes
        return
    with atomic_dir(final_dir) as tmp:
        trainer.save_model(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)
        setup.tokenizer.save_pretrained(tmp)
        setup.template.save(tmp)


def point_adapter_at_base(model: Any, run_dir: Path) -> None:
    """The adapter's ``base_model_name_or_path``: the saved random base, or the absolute local base directory."""
    base = run_dir / RUN_BASE
    for peft_cfg in getattr(model, "peft_config", {}).values():
        source = peft_cfg.base_model_name_or_path
        if base.is_dir():
            peft_cfg.base_model_name_or_path = str(base.resolve())
        elif source and Path(source).is_dir():
            peft_cfg.base_model_name_or_path = str(Path(source).resolve())


def save_final(model: Any, tokenizer: Any, template: Any, final_dir: Path, run_dir: Path, method: Any) -> None:
    """Adapter (PEFT format) or full model + tokenizer + template, written atomically.

    A method may convert its adapter for the original base on the way out (PiSSA trains against a residual base).
    """
    point_adapter_at_base(model, run_dir)
    save_adapter = getattr(method, "save_adapter", None)
    with atomic_dir(final_dir) as tmp:
        if save_adapter is not None:
            save_adapter(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        template.save(tmp)


def per_task_eval(trainer: Any, rows_by_task: dict) -> dict:
    """``{task: {"eval_loss", "eval_ppl", "eval_rows"}}`` from the Trainer's evaluation of each task's eval rows."""
    out = {}
    for task, rows in rows_by_task.items():
        metrics = trainer.evaluate(eval_dataset=rows, metric_key_prefix=f"eval_task_{task}")  # logged as such
        loss = metrics.get(f"eval_task_{task}_loss")
        out[task] = {"eval_loss": loss, "eval_ppl": math.exp(loss) if loss is not None and loss < 50 else None,
                     "eval_rows": len(rows)}
    return out


def summary(setup: Any, trainer: Any, output: Any, runtime: float) -> dict:
    """``summary.json`` of a completed run (the run's extras — world, retention, stack, tasks — are added by
    the caller)."""
    import torch

    cfg, bundle = setup.cfg, setup.bundle
    history = trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    tokens = bundle.stats.get("tokens")
    epoch = trainer.state.epoch
    return {
        "status": "completed",
        "run_name": cfg.run_name,
        "stage": cfg.stage,
        "method": cfg.method.name,
        "global_step": trainer.state.global_step,
        "epochs": epoch,
        "train_loss": output.training_loss,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "best_eval_loss": min(evals) if evals else None,
        "runtime_s": round(runtime, 2),
        "trainable_params": setup.trainable,
        "total_params": setup.total,
        "packing": setup.packing,
        "device": str(next(trainer.model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "data": bundle.stats,
        "train_tokens_seen_approx": int(tokens * epoch) if tokens and epoch else None,
    }


def describe_data(stats: dict) -> str | None:
    """One line of the data's main statistics (``None`` when there are none)."""
    keys = ("samples", "rows", "eval_rows", "dropped_no_supervised", "truncated", "supervised_share", "padding_share")
    shown = {k: stats[k] for k in keys if k in stats}
    if not shown:
        return None
    return "data: " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items())


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
