"""Knowledge distillation — Hinton, Vinyals & Dean, 2015, "Distilling the knowledge in a neural network"; as a
forgetting remedy: Li & Hoiem, 2016, "Learning without forgetting".

    KD(s, t) = T² · mean over scored positions of KL( softmax(t/T) ‖ softmax(s/T) )

``kd`` (``train.retention: {method: kd, alpha, temperature, reference}``): the teacher is the **start model** on
general reference data; each training micro-batch also runs one reference batch through the model and adds
``alpha · KD``. For adapters the teacher is the same model with its adapter disabled (no second copy in memory);
for full fine-tuning a frozen copy of the start weights is kept (one more model in memory).

``distill`` (``train.distill: {teacher, alpha, temperature}``): a separate teacher (typically larger, same
tokenizer) scores the SFT batch itself; the loss is ``(1 − alpha) · CE + alpha · KD`` on the answer positions
(the guide writes the same mix with α on CE).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

from tuneforge.console import say
from tuneforge.data.tokenize import IGNORE, pad_id
from tuneforge.errors import UserError
from tuneforge.train.retention import RetentionTerm, batches, reference_samples, register


def kd_loss(student_logits, teacher_logits, mask, temperature: float):
    """``T² · mean_{positions in mask} KL(softmax(teacher/T) ‖ softmax(student/T))`` in float32.

    Args:
        student_logits: ``[batch, length, vocab]`` (with a graph).
        teacher_logits: same shape (no graph needed).
        mask: ``[batch, length]`` bool, the positions to score.
        temperature: ``T``.
    """
    import torch.nn.functional as F

    s = student_logits[mask].float() / temperature
    t = teacher_logits[mask].float() / temperature
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0  # nothing to score: a zero that keeps the graph
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return temperature ** 2 * kl.mean()


def next_token_mask(labels):
    """Positions whose logits predict a scored token: ``labels[:, 1:] != -100``, as a mask over ``[:, :-1]``."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


class _Teacher:
    """The start model as a teacher: the adapter disabled in place, or a frozen copy for full fine-tuning."""

    def __init__(self, model: Any):
        self.adapter = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
        self.model = model
        self.copy = None
        if not self.adapter:
            self.copy = copy.deepcopy(model).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def logits(self, inputs: dict):
        import torch

        if self.copy is not None:
            with torch.no_grad():
                return self.copy(**inputs, use_cache=False).logits
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(**inputs, use_cache=False).logits
        finally:
            self.model.train(was_training)


@register("kd")
class StartModelKD(RetentionTerm):
    log_key = "kd_loss"

    def __init__(self, alpha: float, temperature: float, samples: list[dict], batch_size: int, pad_id: int,
                 seed: int):
        self.alpha, self.temperature = alpha, temperature
        self.samples, self.batch_size, self.pad_id, self.seed = samples, batch_size, pad_id, seed
        self.teacher: _Teacher | None = None
        self._queue: list[dict] = []
        self._cycle = 0

    @classmethod
    def from_config(cls, cfg, tokenizer, template):
        r = cfg.train.retention
        samples = reference_samples(r.reference, "train.retention.reference", cfg, tokenizer, template, r.samples,
                                    cfg.seed)
        return cls(r.alpha, r.temperature, samples, r.batch_size or cfg.train.batch_size, pad_id(tokenizer),
                   cfg.seed)

    def prepare(self, model: Any, run_dir: Path) -> None:
        self.teacher = _Teacher(model)
        kind = "the model with its adapter disabled" if self.teacher.adapter else "a frozen copy of the start weights"
        say(f"kd: teacher = start model ({kind}), {len(self.samples)} reference samples, "
             f"{self.batch_size} per step")

    def _next_batch(self) -> dict:
        # Reference batches cycle through the samples in a fresh seeded order per pass (not the global RNG, which
        # the Trainer's sampler and dropout use).
        if not self._queue:
            order = list(range(len(self.samples)))
            random.Random(self.seed + self._cycle).shuffle(order)
            self._cycle += 1
            self._queue = batches([self.samples[i] for i in order], self.batch_size, self.pad_id)
        return self._queue.pop(0)

    def loss(self, trainer, model, inputs, outputs):
        batch = self._next_batch()
        device = next(model.parameters()).device
        feed = _model_inputs(batch, device)
        mask = next_token_mask(batch["labels"].to(device))
        teacher = self.teacher.logits(feed)
        student = model(**feed, use_cache=False).logits
        return self.alpha * kd_loss(student, teacher, mask, self.temperature)

    def describe(self) -> dict:
        return {"method": "kd", "alpha": self.alpha, "temperature": self.temperature,
                "reference_samples": len(self.samples),
                "teacher": "adapter disabled" if self.teacher and self.teacher.adapter else "frozen copy"}


@register("distill")
class TeacherDistill(RetentionTerm):
    log_key = "distill_loss"

    def __init__(self, teacher: Any, source: str, alpha: float, temperature: float, vocab: int):
        self.teacher, self.source = teacher, source
        self.alpha, self.temperature, self.vocab = alpha, temperature, vocab
        self.task_weight = 1.0 - alpha

    @classmethod
    def from_config(cls, cfg, tokenizer, template):
        from tuneforge.models.device import resolve_device
        from tuneforge.models.reference import load_for_inference

        d = cfg.train.distill
        try:
            loaded = load_for_inference(d.teacher, device=resolve_device(cfg.model.device))
        except UserError as exc:
            raise UserError(f"train.distill.teacher: {exc}") from None
        except OSError as exc:  # a hub id that cannot be fetched (offline, no such repo)
            raise UserError(f"train.distill.teacher: cannot load {d.teacher!r} ({exc})") from None
        if loaded.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"train.distill.teacher: {d.teacher} has another tokenizer than the run's model; "
                            "distillation compares next-token distributions, so both need the same vocabulary")
        if cfg.data.packing:
            from tuneforge.data.packing import packing_supported

            if not packing_supported(loaded.model):
                raise UserError(f"train.distill.teacher: {d.teacher} does not keep packed samples apart; set "
                                "data.packing: false")
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        say(f"distill: teacher {d.teacher} (alpha {d.alpha}, temperature {d.temperature})")
        return cls(loaded.model, d.teacher, d.alpha, d.temperature, len(tokenizer))

    def loss(self, trainer, model, inputs, outputs):
        import torch

        feed = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            teacher = self.teacher(**feed, use_cache=False).logits[..., : self.vocab]
        student = outputs.logits[..., : self.vocab]
        return self.alpha * kd_loss(student, teacher, next_token_mask(inputs["labels"]), self.temperature)

    def describe(self) -> dict:
        return {"method": "distill", "teacher": self.source, "alpha": self.alpha, "temperature": self.temperature}
