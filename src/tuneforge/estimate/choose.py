"""Pick the training setup that fits a memory budget: the guide's decision tree, computed.

The guide (003 §8.2; 002 §5 and §10.2) decides by thresholds on the card size: full fine-tuning at 80 GB and above,
LoRA (r 16-64, or 8-16) from 16-24 GB, QLoRA (r 8) below, and an effective batch of 16 reached by gradient
accumulation. Thresholds in GB are only right for 7B models at the guide's sequence lengths, so here each branch
is *priced* with :func:`tuneforge.estimate.bill.estimate_memory` for the actual model, sequence length and budget,
and the first one that fits with a safety margin wins, in the guide's order of preference:

1. full fine-tuning (AdamW, then 8-bit AdamW), 2. GaLore (full-parameter learning, low-rank optimizer state),
3. LoRA (r 32 when it fits a micro-batch of at least 4 — the guide's "quality first" row — else r 16),
4. QLoRA (r 8, 4-bit NF4 base).

Within a method the largest power-of-two micro-batch up to the target batch (and at most 16) is chosen, first
without gradient checkpointing (faster), then with it when that buys a larger micro-batch; accumulation steps
make up the target effective batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from tuneforge.config.schema import loss_chunk_auto_applies
from tuneforge.errors import UserError
from tuneforge.estimate.bill import METHODS, Bill, GiB, Setup, estimate_memory
from tuneforge.estimate.spec import ModelSpec, model_spec
from tuneforge.methods.base import registrations

#: the guide's effective batch (002 §5: every scenario config reaches 16 = batch x accumulation)
DEFAULT_TARGET_BATCH = 16
DEFAULT_MARGIN = 0.10
MAX_MICRO_BATCH = 16
#: Setup field → the method config key that holds it (present in a method's config class or not)
CONFIG_KEYS = {"r": "r", "target_modules": "target_modules", "lora_dropout": "dropout", "quant_bits": "bits",
               "double_quant": "double_quant", "galore_rank": "rank", "galore_layerwise": "layerwise"}


@dataclass
class Recommendation:
    """The chosen setup, its bill, and why."""

    setup: Setup
    bill: Bill
    budget_bytes: int
    margin: float
    target_batch: int
    explanation: str
    tried: list[tuple[str, int]] = field(default_factory=list)  # (description, total bytes) in the order tried

    @property
    def method(self) -> str:
        return self.setup.method

    def method_section(self) -> dict:
        """The run config's ``method:`` section for this choice (keys of :mod:`tuneforge.config.schema`)."""
        s = self.setup
        fields = registrations()[s.method].config.model_fields
        section = {"name": s.method, **{key: getattr(s, field) for field, key in CONFIG_KEYS.items() if key in fields}}
        if "alpha" in fields:
            section["alpha"] = 2 * s.r  # the guide's alpha = 2r
        return section

    def train_overrides(self) -> dict:
        """The ``train:`` keys this choice sets."""
        optim = {"adamw": "adamw_torch"}.get(self.setup.optim, self.setup.optim)
        return {"batch_size": self.setup.batch_size, "grad_accum": self.setup.grad_accum,
                "gradient_checkpointing": self.setup.gradient_checkpointing, "optim": optim}

    def to_json(self) -> dict:
        return {"method": self.method_section(), "train": self.train_overrides(), "budget_bytes": self.budget_bytes,
                "margin": self.margin, "target_batch": self.target_batch, "explanation": self.explanation,
                "bill": self.bill.to_json()}


def _candidates(base: Setup, r: int | None) -> list[tuple[str, dict]]:
    lora_r = r or 16
    return [
        ("full fine-tuning", {"method": "full", "optim": "adamw"}),
        ("full fine-tuning with 8-bit AdamW", {"method": "full", "optim": "adamw_8bit"}),
        ("GaLore", {"method": "galore", "optim": "adamw", "galore_rank": 128}),
        ("LoRA", {"method": "lora", "optim": "adamw", "r": r or 32}),
        ("LoRA", {"method": "lora", "optim": "adamw", "r": lora_r}),
        ("QLoRA", {"method": "qlora", "optim": "adamw", "r": r or 8}),
    ]


def recommend(
    model_source: Any,
    budget_gb: float,
    seq_len: int = 2048,
    target_batch: int = DEFAULT_TARGET_BATCH,
    *,
    device: str = "cuda",
    precision: str | None = None,
    r: int | None = None,
    margin: float = DEFAULT_MARGIN,
    target_modules: Any = "all-linear",
    lora_dropout: float = 0.05,
) -> Recommendation:
    """The first setup in the guide's order of preference that fits ``budget_gb`` with ``margin`` to spare.

    Args:
        model_source: anything :func:`tuneforge.estimate.spec.model_spec` accepts, or a :class:`ModelSpec`.
        budget_gb: memory to fit in (GiB; the GPU's memory, or RAM for CPU training).
        seq_len: tokens per sequence (the data's ``max_length``).
        target_batch: effective batch (micro-batch x accumulation) to reach.
        device: ``"cuda"`` bills the CUDA context; ``"cpu"`` does not.
        precision: ``fp32`` / ``bf16`` / ``fp16``; default bf16 on CUDA, fp32 on CPU.
        r: force this LoRA/QLoRA rank instead of choosing it.

    Raises:
        UserError: nothing fits — the message gives the smallest setup found and how far it is from fitting.
    """
    if budget_gb <= 0 or target_batch <= 0 or seq_len <= 0:
        raise UserError("budget, target batch and sequence length must be positive")
    spec = model_source if isinstance(model_source, ModelSpec) else model_spec(model_source)
    budget = int(budget_gb * GiB)
    usable = budget * (1 - margin)
    base = Setup(method="full", seq_len=seq_len, precision=precision or ("bf16" if device == "cuda" else "fp32"),
                 device=device, target_modules=target_modules, lora_dropout=lora_dropout, r=r or 16)
    tried: list[tuple[str, int]] = []
    smallest: tuple[int, Setup, Bill] | None = None
    for title, changes in _candidates(base, r):
        if changes["method"] == "lora" and changes["r"] == 32 and r is None:
            pick = _fit(spec, replace(base, **changes), target_batch, usable, tried, need_batch=min(4, target_batch))
        else:
            pick = _fit(spec, replace(base, **changes), target_batch, usable, tried)
        if pick is not None:
            setup, bill = pick
            return Recommendation(setup, bill, budget, margin, target_batch,
                                  _explain(spec, title, setup, bill, budget, margin, target_batch, tried), tried)
        probe = replace(base, **changes, batch_size=1, grad_accum=target_batch, gradient_checkpointing=True)
        bill = estimate_memory(spec, probe)
        if smallest is None or bill.total_bytes < smallest[0]:
            smallest = (bill.total_bytes, probe, bill)
    assert smallest is not None
    need, setup, _ = smallest
    raise UserError(
        f"nothing fits in {budget_gb:g} GiB (with a {margin:.0%} margin: {usable / GiB:.2f} GiB usable) for "
        f"{spec.name} at seq_len {seq_len}: the smallest setup found is {_describe(setup)}, which needs "
        f"{need / GiB:.2f} GiB, {(need - usable) / GiB:.2f} GiB over; shorten --seq-len or use more memory"
    )


def _fit(spec: ModelSpec, setup: Setup, target: int, usable: float, tried: list, need_batch: int = 1):
    """Largest micro-batch that fits, without checkpointing first, then with it if that buys a larger batch."""
    best = None
    for checkpointing in (False, True):
        batch = 1 << int(math.log2(min(target, MAX_MICRO_BATCH)))
        while batch >= need_batch:
            candidate = replace(setup, batch_size=batch, grad_accum=math.ceil(target / batch),
                                gradient_checkpointing=checkpointing)
            bill = estimate_memory(spec, candidate)
            tried.append((_describe(candidate), bill.total_bytes))
            if bill.total_bytes <= usable:
                if best is None or batch > best[0].batch_size:
                    best = (candidate, bill)
                break
            batch //= 2
        if best is not None and (best[0].batch_size >= min(4, target) or checkpointing):
            return best
    return best


def _describe(s: Setup) -> str:
    parts = [s.method]
    if not s.full_parameter:
        parts.append(f"r={s.r}")
    if s.priced_as == "galore":
        parts.append(f"rank={s.galore_rank}")
    if s.optim != "adamw":
        parts.append(s.optim)
    parts.append(f"batch {s.batch_size} x {s.grad_accum} accumulation")
    parts.append("gradient checkpointing" if s.gradient_checkpointing else "no checkpointing")
    return ", ".join(parts)


def _explain(spec: ModelSpec, title: str, s: Setup, bill: Bill, budget: int, margin: float, target: int,
             tried: list) -> str:
    gib = 1 / GiB
    rejected = sorted({desc.split(",")[0] for desc, total in tried if total > budget * (1 - margin)}
                      - {s.method}, key=["full", "galore", "lora", "qlora"].index)
    titles = {"full": "full fine-tuning", "galore": "GaLore", "lora": "LoRA", "qlora": "QLoRA"}
    names = " and ".join(titles[m] for m in rejected)
    why_not = f" {names[:1].upper()}{names[1:]} did not fit at any micro-batch." if rejected else ""
    comps = bill.components
    big = max(("weights", "optimizer", "activations", "logits", "gradients"), key=lambda k: comps[k])
    return (
        f"{title} ({_describe(s)}) fits: the estimate for {spec.name} ({spec.total_params / 1e9:.2f}B params, "
        f"{bill.trainable_params:,} trainable) at seq_len {s.seq_len} in {s.precision} is "
        f"{bill.total_bytes * gib:.2f} GiB of the {budget * gib:.2f} GiB budget, leaving the {margin:.0%} margin "
        f"({(budget * (1 - margin) - bill.total_bytes) * gib:.2f} GiB beyond it).{why_not} Methods are tried in the "
        f"guide's order of preference (full, GaLore, LoRA, QLoRA) and the first that fits wins, because the more "
        f"parameters train, the closer the result is to full fine-tuning. The largest item is {big} "
        f"({comps[big] * gib:.2f} GiB); micro-batch {s.batch_size} with {s.grad_accum} accumulation steps reaches "
        f"the effective batch of {s.batch_size * s.grad_accum} (target {target})"
        + ("; gradient checkpointing is on because it buys a larger micro-batch (about 30% more compute)."
           if s.gradient_checkpointing else "; checkpointing is not needed.")
    )


# --------------------------------------------------------------------------- run configs


def setup_from_run(cfg: Any, device: str | None = None) -> tuple[Any, Setup]:
    """The model source and :class:`Setup` a run config describes (``method.name: auto`` excluded).

    Raises:
        UserError: a method the estimator does not model.
    """
    method = cfg.method
    device = device or _run_device(cfg)
    precision = cfg.model.precision if cfg.model.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    fields: dict[str, Any] = {
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.max_length, "grad_accum": cfg.train.grad_accum,
        "gradient_checkpointing": cfg.train.gradient_checkpointing, "precision": precision,
        "optim": cfg.train.optim, "device": device, "loss_chunk": cfg.train.loss_chunk,
    }
    if fields["loss_chunk"] == "auto" and not loss_chunk_auto_applies(cfg):
        fields["loss_chunk"] = None  # the model's own loss: auto does not apply to this stage / setup
    name = method.name
    if name not in METHODS:
        raise UserError(f"method.name {name!r}: tuneforge estimate models {', '.join(METHODS)}; "
                        f"price {name!r} as lora for an upper bound")
    fields["method"] = name
    fields.update({field: getattr(method, key) for field, key in CONFIG_KEYS.items() if key in type(method).model_fields})
    source = cfg.model.name_or_path or cfg.model.from_config
    return source, Setup(**fields)


def _run_device(cfg: Any) -> str:
    device = cfg.model.device
    if device != "auto":
        return "cuda" if device.startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def recommendation_for_run(cfg: Any) -> Recommendation:
    """The recommendation for a run config with ``train.memory_budget_gb`` (its target batch: batch x accum)."""
    if cfg.train.memory_budget_gb is None:
        raise UserError("train.memory_budget_gb is not set: the recommendation needs a memory budget")
    source = cfg.model.name_or_path or cfg.model.from_config
    device = _run_device(cfg)
    precision = None if cfg.model.precision == "auto" else cfg.model.precision
    # AutoMethod.r has a default; only a rank the user wrote down is imposed.
    r = cfg.method.r if "r" in cfg.method.model_fields_set else None
    return recommend(source, cfg.train.memory_budget_gb, seq_len=cfg.data.max_length,
                     target_batch=cfg.train.batch_size * cfg.train.grad_accum, device=device, precision=precision,
                     r=r)


def recommend_for_run(cfg: Any) -> dict:
    """The ``method:`` section to train with when ``method.name: auto`` (validated by the config schema).

    Use :func:`recommendation_for_run` for the matching ``train:`` keys (micro-batch, accumulation, checkpointing).
    """
    return recommendation_for_run(cfg).method_section()
