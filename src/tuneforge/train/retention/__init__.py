"""Retention loss terms: keep a fine-tuned model close to what it knew (docs/forgetting.md).

One small module per term, registered by name (``@register("ewc")``): ``ewc`` (elastic weight consolidation),
``l2sp`` (L2 towards the start weights), ``kd`` (distillation to the start model on general data) and ``distill``
(a teacher model on the SFT data, ``train.distill``). A ``train.retention`` term's options are its config class in
:mod:`tuneforge.config.retention` (pure; the schema's discriminated union is built from it), registered under the
same name; ``register`` refuses a name the config does not declare. ``train/run.py`` asks :func:`build_retention` for a
:class:`Retention` before anything is written (bad input fails there), and trains with
:meth:`Retention.trainer_class`, a Trainer subclass whose ``compute_loss`` adds the terms; with neither
``train.retention`` nor ``train.distill`` the Trainer is untouched.

Every term is added to the training loss (scaled like the Trainer scales the loss for gradient accumulation, so
that one optimizer step sees each term once) and logged under its own key in ``metrics.jsonl`` (the mean since
the previous log line): ``ewc_penalty``, ``l2sp_penalty``, ``kd_loss``, ``distill_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RETENTION_DIR = "retention"  # inside the run directory: what a term computed once (EWC's Fisher, anchors)

_TERMS: dict[str, type[RetentionTerm]] = {}


def register(name: str):
    """Class decorator: make a :class:`RetentionTerm` available as ``train.retention.method: <name>``."""

    from tuneforge.config.retention import RETENTION_CONFIGS

    if name not in RETENTION_CONFIGS and name != "distill":  # distill's options are train.distill
        raise ValueError(f"retention term {name!r} has no config class in tuneforge.config.retention")

    def wrap(cls):
        cls.name = name
        _TERMS[name] = cls
        return cls

    return wrap


def known_terms() -> tuple[str, ...]:
    _load_modules()
    return tuple(_TERMS)


def _load_modules() -> None:
    """Import every module of this package (each registers its terms), so a new term is one new file."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


class RetentionTerm:
    """A loss term added to the task loss during training.

    Attributes:
        name: the registered name.
        log_key: the key its value is logged under in ``metrics.jsonl``.
        task_weight: factor applied to the task loss while this term is on (``1 - alpha`` for distillation).
    """

    name = ""
    log_key = ""
    task_weight = 1.0

    def prepare(self, model: Any, run_dir: Path) -> None:
        """Called once the run directory may be written, before training, on the model at its start weights."""

    def loss(self, trainer: Any, model: Any, inputs: dict, outputs: Any):
        """The term's value for this micro-batch (a scalar tensor with a graph to the trainable parameters)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What the summary records about the term."""
        return {"method": self.name}


@dataclass
class Retention:
    """The retention terms of a run (from ``train.retention`` and ``train.distill``)."""

    terms: list[RetentionTerm] = field(default_factory=list)

    def trainer_class(self, model: Any, run_dir: Path, base: Any = None):
        """Prepare every term on ``model`` (start weights) and return a Trainer subclass that adds them.

        Args:
            model: the model about to be trained (method already applied, weights not yet resumed).
            run_dir: the run directory (terms save what they computed under ``retention/``).
            base: the Trainer class to extend (default ``transformers.Trainer``).
        """
        for term in self.terms:
            term.prepare(model, run_dir)
        return retention_trainer(self.terms, base)

    def describe(self) -> dict:
        return {term.name: term.describe() for term in self.terms}


def build_retention(cfg: Any, tokenizer: Any, template: Any) -> Retention | None:
    """The run's retention terms, with their data read and teachers loaded (``None`` when there are none).

    Called before the run directory is touched: every user error (a missing reference, an unreachable teacher,
    a teacher with another vocabulary) raises here.

    Raises:
        UserError: naming the config key.
    """
    terms: list[RetentionTerm] = []
    if cfg.train.retention is not None:
        _load_modules()
        terms.append(_TERMS[cfg.train.retention.method].from_config(cfg, tokenizer, template))
    if cfg.train.distill is not None:
        _load_modules()
        terms.append(_TERMS["distill"].from_config(cfg, tokenizer, template))
    return Retention(terms) if terms else None


def retention_trainer(terms: list[RetentionTerm], base: Any = None):
    """A Trainer subclass of ``base`` whose training loss is ``task_weight * task loss + sum(terms)``.

    Terms are only added in training mode (evaluation reports the plain task loss). Each term is divided by the
    gradient-accumulation steps exactly when the Trainer's own loss is already normalised over the whole
    accumulated batch (``num_items_in_batch``), so that it counts once per optimizer step either way.
    """
    from transformers import Trainer

    class RetentionTrainer(base or Trainer):
        retention_terms = list(terms)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            scale = 1.0 / self.current_gradient_accumulation_steps if self._loss_is_scaled(num_items_in_batch) else 1.0
            sums = self.__dict__.setdefault("_retention_sums", {})
            added = []
            for term in self.retention_terms:
                value = term.loss(self, model, inputs, outputs)
                loss = loss * term.task_weight
                added.append(value)
                total, count = sums.get(term.log_key, (0.0, 0))
                sums[term.log_key] = (total + float(value.detach()), count + 1)
            for value in added:
                loss = loss + scale * value
            return (loss, outputs) if return_outputs else loss

        def _loss_is_scaled(self, num_items_in_batch) -> bool:
            # The rule Trainer.training_step applies before dividing the loss by the accumulation steps.
            fixed = getattr(self, "loss_is_scaled_for_ga", None)
            if fixed is not None:
                return bool(fixed)
            return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                        or self.compute_loss_func is not None)

        def log(self, logs, start_time=None):
            sums = self.__dict__.get("_retention_sums")
            if sums and "loss" in logs:
                for key, (total, count) in sums.items():
                    logs[key] = total / max(1, count)
                sums.clear()
            return super().log(logs, start_time)

    return RetentionTrainer


def reference_samples(spec: str | list[str], key: str, cfg: Any, tokenizer: Any, template: Any,
                      limit: int, seed: int) -> list[dict]:
    """Encoded reference samples (text chunks trained on every token, chat records on their answers), a seeded
    selection of at most ``limit``.

    Raises:
        UserError: naming ``key`` when a source is missing or yields no sample.
    """
    from tuneforge.data.mix import draw, read_general, text_samples
    from tuneforge.data.samples import sft_samples
    from tuneforge.errors import UserError

    specs = [spec] if isinstance(spec, str) else list(spec)
    samples: list[dict] = []
    for i, one in enumerate(specs):
        where = key if len(specs) == 1 else f"{key}[{i}]"
        records = read_general(one, where, cfg.data)
        chat = [r for r in records if "messages" in r]
        samples += text_samples([r for r in records if "text" in r], tokenizer, cfg.data.max_length)
        if chat:
            samples += sft_samples(chat, tokenizer, template, cfg.data, "reference")[0]
    if not samples:
        raise UserError(f"{key}: the reference data gave no sample to score")
    return draw(samples, min(limit, len(samples)), seed)


def batches(samples: list[dict], batch_size: int, pad_id: int):
    """Padded batches (``input_ids``, ``attention_mask``, ``labels``) of ``samples`` in order, as tensors."""
    from tuneforge.data.packing import PaddingCollator

    collate = PaddingCollator(pad_id)
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


def trainable_parameters(model: Any) -> dict[str, Any]:
    """``name -> parameter`` of every parameter that trains (the adapter's, for adapters)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_tensors(run_dir: Path, name: str, tensors: dict[str, Any], meta: dict | None = None) -> Path:
    """Write ``retention/<name>.safetensors`` atomically (temp file + rename) and return its path."""
    import os
    import tempfile

    from safetensors.torch import save_file

    from tuneforge.utils import current_umask, fsync_dir

    folder = Path(run_dir) / RETENTION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata={k: str(v) for k, v in (meta or {}).items()})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
        fsync_dir(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_tensors(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The tensors saved by :func:`save_tensors`, or ``None`` when the file is not there."""
    from safetensors.torch import load_file

    path = Path(run_dir) / RETENTION_DIR / f"{name}.safetensors"
    return load_file(str(path)) if path.is_file() else None

