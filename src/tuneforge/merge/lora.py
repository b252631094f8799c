"""Fold a LoRA-family adapter into its base: W' = W + (alpha / r) · B A, saved as a plain HF model directory.

The merge is checked, not hoped: the logits of adapter inference (base + adapter, unmerged) and of the merged model
are compared on a few probe inputs, and a difference above the tolerance fails before anything is written.

A progressive run (``method.continue_from``) is merged whole: ``models.reference`` loads its base with the earlier
adapters (``stack/NN``) already folded in, exactly as training saw it, and the run's own adapter is folded on top,
so the output is one plain model holding the whole stack.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.console import say
from tuneforge.errors import UserError
from tuneforge.models.reference import TEMPLATE_FILES, ModelRef
from tuneforge.utils import atomic_dir, atomic_write_json

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b",
    "Question: what does a context manager do?\nAnswer:",
)

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}
# Default tolerance on the max |logit| difference, by saved dtype: fp32 merges agree to ~1e-6; half precision
# rounds every weight, which moves logits by up to a few hundredths on small models.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


@dataclass
class MergeReport:
    """What ``merge_lora`` did: where it wrote, and how far the merged logits are from adapter inference."""

    out: Path
    base: str
    max_diff: float
    mean_diff: float
    tolerance: float
    dtype: str
    notes: list[str]

    def to_dict(self) -> dict:
        return {"out": str(self.out), "base": self.base, "max_logit_diff": self.max_diff,
                "mean_logit_diff": self.mean_diff, "tolerance": self.tolerance, "dtype": self.dtype,
                "notes": self.notes}


def local_ref(path: str | Path, *, base: str | None = None) -> ModelRef:
    """``tuneforge.models.reference.resolve`` for a local run, adapter or model directory (merge and export never
    fetch from the hub).

    Raises:
        UserError: the path does not exist, or holds no model.
    """
    from tuneforge.models.reference import resolve

    if not Path(path).expanduser().exists():
        raise UserError(f"{path}: no such run, adapter or model directory")
    return resolve(path, base_override=base)


def check_mergeable(ref: ModelRef) -> None:
    """Raise UserError unless ``ref`` is an adapter whose peft type folds into the base weights."""
    if not ref.is_adapter:
        what = f"method {ref.method!r} " if ref.method else ""
        raise UserError(
            f"{ref.given}: {what}saved a full model, not an adapter: there is nothing to merge "
            "(use the directory as it is, or `tuneforge merge recipe.yaml` to merge several models)"
        )
    if not ref.mergeable():
        raise UserError(
            f"{ref.given}: a {ref.method or ref.peft_type} adapter cannot be merged into the base weights (it adds "
            "virtual tokens or extra computation rather than a weight delta); serve it as an adapter with "
            "`tuneforge serve` instead"
        )


def load_base_and_adapter(ref: ModelRef):
    """Load ``ref``'s base unquantized in fp32 with the adapter on top, on CPU (``models.reference``'s loader).

    A QLoRA adapter is folded into the *unquantized* original weights (the dequantise-first route): its base path
    is the original checkpoint, quantized only at load time during training. A base stored quantized on disk is
    refused, because its exact original weights are gone.

    Returns:
        ``(peft_model, tokenizer, notes)``.

    Raises:
        UserError: the base is stored quantized, or cannot be loaded.
    """
    import torch

    from tuneforge.models.reference import load_for_inference

    notes: list[str] = []
    refuse_quantized_base(ref)
    if _trained_on_quantized_base(ref):
        notes.append("adapter trained on a 4-bit base: merged into the unquantized original weights from "
                     f"{ref.base} (dequantise-first); the merged model does not include the 4-bit rounding")
    if ref.stack:
        notes.append(f"progressive run: its {len(ref.stack)} earlier adapter(s) ({', '.join(ref.stack)}) were merged "
                     "into the base first, then its own adapter: the output holds the whole stack")
    loaded = load_for_inference(ref, device="cpu", dtype=torch.float32)  # merges ref.stack into the base
    return loaded.model, loaded.tokenizer, notes


def refuse_quantized_base(ref: ModelRef) -> None:
    """Raise UserError when ``ref``'s base is stored quantized (its exact original weights are gone)."""
    quant = ref.quantization()
    if quant:
        method = quant.get("quant_method", "quantized")
        raise UserError(
            f"base model {ref.base} is stored {method}-quantized: folding an adapter into rounded weights and "
            "saving them unquantized would bake the rounding error into every weight. Pass the original "
            "unquantized checkpoint with --base DIR"
        )


def _trained_on_quantized_base(ref: Any) -> bool:
    """Whether the adapter was trained on a quantized base: the method's ``quantized_base`` capability, recorded in
    the run's manifest when it was trained (merge reads run directories, it never imports methods), or a QA-LoRA
    adapter config."""
    import json

    from tuneforge.models.reference import RUN_MANIFEST

    if (ref.adapter_config or {}).get("use_qalora"):
        return True
    if not ref.run_dir:
        return False
    try:
        manifest = json.loads((Path(ref.run_dir) / RUN_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    caps = manifest.get("capabilities") if isinstance(manifest, dict) else None
    return bool(isinstance(caps, dict) and caps.get("quantized_base"))


def probe_batches(tokenizer: Any, texts=PROBE_TEXTS) -> list:
    """Token-id tensors (one per text) used to compare two models' logits."""
    return [tokenizer(text, return_tensors="pt")["input_ids"] for text in texts]


def logits_on(model: Any, batches: list) -> list:
    """Logits of ``model`` on each probe batch (fp32, no grad)."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in batches]


def logit_difference(reference: list, other: list) -> tuple[float, float]:
    """``(max, mean)`` absolute difference between two lists of logit tensors (NaN when any difference is NaN).

    One pair at a time, the difference taken in place: only one probe's difference exists beside the two lists (a
    concatenation of every difference held two more vocabulary-wide copies of all the probes at the merge's peak:
    13 MiB on a 49k vocabulary, ``benchmarks/phase_memory.py``)."""
    import torch

    worst = torch.tensor(0.0)
    total, count = 0.0, 0
    for a, b in zip(reference, other, strict=True):
        diff = torch.sub(a, b).abs_()
        worst = torch.maximum(worst, diff.max().to(worst.dtype))  # maximum, not max(): NaN propagates
        total += float(diff.sum(dtype=torch.float64))
        count += diff.numel()
        del diff
    return float(worst), total / max(count, 1)


def merge_lora(path: str | Path, out: str | Path, *, tolerance: float | None = None, dtype: str = "fp32",
               base: str | None = None, strategy: str = "auto",
               max_memory: int | None = None) -> MergeReport:
    """Merge the adapter of a run (or adapter directory) into its base and save a plain HF model at ``out``.

    Args:
        path: a tuneforge run directory or a PEFT adapter directory.
        out: the output directory (written atomically: on any failure nothing is left there).
        tolerance: the largest allowed max-|logit| difference between adapter inference and the merged model;
            default by ``dtype`` (1e-3 for fp32).
        dtype: saved precision, ``fp32`` | ``bf16`` | ``fp16``.
        base: use this base model instead of the one recorded in the adapter.
        strategy: ``auto`` (in memory when the estimate fits ``max_memory``, else shard by shard), ``memory`` or
            ``sharded`` (:mod:`tuneforge.merge.sharded`: one safetensors shard at a time, no logit check).
        max_memory: the memory budget in bytes (default: the RAM available now).

    Returns:
        A :class:`MergeReport`; ``out`` then holds ``config.json``, ``model.safetensors`` (or shards), the tokenizer,
        ``chat_template.jinja``/``template.json`` when the run had them, and ``merge_report.json``.

    Raises:
        UserError: not an adapter, a non-mergeable method, a quantized base, a logit difference above tolerance, or
            a model that fits the memory budget in neither strategy.
    """
    import torch

    from tuneforge.merge.sharded import plan_merge

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of fp32, bf16, fp16")
    dtype_name = DTYPES[dtype]
    tolerance = DEFAULT_TOLERANCE[dtype_name] if tolerance is None else float(tolerance)
    source = local_ref(path, base=base)
    check_mergeable(source)
    out = Path(out)
    if out.resolve() in (source.model_dir.resolve(), Path(source.base).resolve()):
        raise UserError(f"--out {out}: would overwrite the model being merged; choose another directory")

    plan = plan_merge(source, torch.tensor([], dtype=getattr(torch, dtype_name)).element_size(), strategy,
                      max_memory, dtype_name=dtype_name)
    if plan.need:
        say(plan.describe())
    if plan.strategy == "sharded":
        return _merge_sharded(source, out, dtype_name)
    model, tokenizer, notes = load_base_and_adapter(source)
    batches = probe_batches(tokenizer)
    unmerged = logits_on(model, batches)
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, dtype_name))
    after = logits_on(merged, batches)
    max_diff, mean_diff = logit_difference(unmerged, after)
    del unmerged, after  # not held through the save (its import of deepspeed, when installed, comes on top)
    say(f"logit difference adapter vs merged on {len(batches)} probes: max {max_diff:.3g}, mean {mean_diff:.3g} "
         f"(tolerance {tolerance:g})")
    if not max_diff <= tolerance:  # also catches NaN
        raise UserError(
            f"merged model differs from adapter inference by up to {max_diff:.3g} in the logits (mean "
            f"{mean_diff:.3g}), above --tolerance {tolerance:g}; nothing was written to {out}. A half-precision "
            "--dtype rounds weights: try --dtype fp32, or raise --tolerance if this loss is acceptable"
        )
    report = MergeReport(out, source.base, max_diff, mean_diff, tolerance, dtype_name, notes)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        copy_template_files(source, tmp)
        atomic_write_json(tmp / "merge_report.json", report.to_dict())
    for note in notes:
        say(f"note: {note}")
    say(f"merged model written to {out}")
    return report


def _merge_sharded(source: ModelRef, out: Path, dtype_name: str) -> MergeReport:
    """The shard-by-shard merge (:mod:`tuneforge.merge.sharded`) into ``out``, written atomically."""
    import torch

    from tuneforge.merge import sharded
    from tuneforge.models.reference import load_tokenizer_of
    from tuneforge.models.rope import apply_rope_scaling_to_file

    refuse_quantized_base(source)
    factors = sharded.lora_factors(Path(source.adapter), source.adapter_config or {})
    notes = ["merged shard by shard: the whole model did not fit the memory budget, so no logit check was run; "
             "each weight is W + scaling·BA exactly as peft's merge computes it"]
    if _trained_on_quantized_base(source):
        notes.append(f"adapter trained on a 4-bit base: merged into the unquantized original weights from {source.base}")
    report = MergeReport(out, source.base, float("nan"), float("nan"), float("nan"), dtype_name, notes)
    with atomic_dir(out) as tmp:
        names, total = sharded.merge_shards(Path(source.base), factors, tmp, getattr(torch, dtype_name))
        sharded.copy_model_files(Path(source.base), tmp, dtype_name, total)
        apply_rope_scaling_to_file(tmp / "config.json", source.rope_scaling)  # the run's model.rope_scaling
        load_tokenizer_of(source).save_pretrained(tmp)
        copy_template_files(source, tmp)
        atomic_write_json(tmp / "merge_report.json", {**report.to_dict(), "strategy": "sharded",
                                                       "merged_weights": len(names)})
    for note in notes:
        say(f"note: {note}")
    say(f"merged model written to {out} ({len(names)} weights folded, shard by shard)")
    return report


def copy_template_files(ref: ModelRef, target: Path) -> None:
    """Copy ``chat_template.jinja``/``template.json`` of a run or adapter beside a saved model."""
    if ref.template_dir is None:
        return
    for name in TEMPLATE_FILES:
        if (Path(ref.template_dir) / name).is_file():
            shutil.copyfile(Path(ref.template_dir) / name, target / name)
