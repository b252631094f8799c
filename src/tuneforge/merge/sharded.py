"""Shard-by-shard LoRA merge: fold an adapter into a base larger than memory, one safetensors tensor at a time.

The in-memory merge (:func:`tuneforge.merge.lora.merge_lora`) loads the whole base in fp32 beside the adapter; a
model larger than the memory budget cannot be merged that way (unsloth#1667: a 70B model trained on an H200, then
out of memory in the merge). Here each shard of the base is read tensor by tensor with ``safe_open``; a weight
that carries LoRA factors becomes ``W + scaling · B A`` (transposed for GPT-2's ``Conv1D``), exactly the operation
peft's ``merge_and_unload`` performs, and the shard is written before the next one is read. Peak memory is about
one output shard plus the adapter.

Only plain LoRA adapters fold tensor by tensor (DoRA's magnitude vector, VeRA's shared projections and prompt
methods need the whole model or cannot be merged): anything else is refused with the in-memory merge as the way.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

#: files of a model directory that are copied unchanged beside the merged shards
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class LoraFactors:
    """The two LoRA matrices of one base weight and how they combine: ``delta = scaling · B A`` (``.T`` if
    ``fan_in_fan_out``)."""

    a: Any
    b: Any
    scaling: float
    fan_in_fan_out: bool

    def delta(self) -> Any:
        product = self.b @ self.a
        return (product.T if self.fan_in_fan_out else product) * self.scaling


def base_shards(base_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in the order its index lists them.

    Raises:
        UserError: the directory holds no safetensors weights (e.g. only ``pytorch_model.bin``).
    """
    index = base_dir / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [base_dir / name for name in names]
    single = base_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"{base_dir}: no safetensors weights (model.safetensors or {_INDEX}); the shard-by-shard "
                    "merge reads safetensors only — re-save the base with save_pretrained(safe_serialization=True) "
                    "or merge in memory")


def file_elements(path: Path) -> int:
    """The number of elements stored in one safetensors file, from its header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())


def _numel(shape: list[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def check_plain_lora(adapter_config: dict, given: str) -> None:
    """Refuse adapters that do not fold tensor by tensor.

    Raises:
        UserError: naming what the adapter is and the in-memory merge as the alternative.
    """
    kind = adapter_config.get("peft_type")
    extras = [key for key in ("use_dora", "trainable_token_indices", "modules_to_save") if adapter_config.get(key)]
    if kind != "LORA" or extras or adapter_config.get("layer_replication"):
        what = kind if kind != "LORA" else "LoRA with " + ", ".join(extras or ["layer_replication"])
        raise UserError(f"{given}: a {what} adapter cannot be merged shard by shard (only plain LoRA weights fold "
                        "one tensor at a time); merge it in memory (tuneforge merge without --strategy sharded) on "
                        "a machine that holds the whole model")


def lora_factors(adapter_dir: Path, adapter_config: dict) -> dict[str, LoraFactors]:
    """``{base weight name: LoraFactors}`` for every LoRA pair in ``adapter_dir``'s ``adapter_model.safetensors``.

    The base name is peft's saved key with ``base_model.model.`` and ``.lora_A.weight`` removed, plus ``.weight``
    (``model.layers.0.self_attn.q_proj.weight``). Scaling follows peft: ``alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``), with ``rank_pattern``/``alpha_pattern`` overrides matched on the module name.

    Raises:
        UserError: the adapter holds tensors other than LoRA factors (e.g. saved embedding layers).
    """
    from safetensors.torch import load_file

    file = adapter_dir / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{adapter_dir}: no adapter_model.safetensors; the shard-by-shard merge reads safetensors "
                        "adapters only")
    tensors = load_file(str(file))
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise UserError(f"{adapter_dir}: tensor {key!r} is not a LoRA factor (saved embedding or head layers "
                            "replace whole base tensors); merge this adapter in memory")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: module {module} has lora_{''.join(pair)} without its partner")
        r = _pattern_value(adapter_config.get("rank_pattern") or {}, module, adapter_config["r"])
        alpha = _pattern_value(adapter_config.get("alpha_pattern") or {}, module, adapter_config["lora_alpha"])
        scaling = alpha / (r ** 0.5) if adapter_config.get("use_rslora") else alpha / r
        factors[module + ".weight"] = LoraFactors(pair["A"], pair["B"], scaling,
                                                  bool(adapter_config.get("fan_in_fan_out")))
    return factors


def _pattern_value(pattern: dict, module: str, default: float) -> float:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def merge_shards(base_dir: Path, factors: dict[str, LoraFactors], target: Path, dtype: Any) -> tuple[list[str], int]:
    """Write every shard of ``base_dir`` into ``target`` with the LoRA deltas folded in, one shard at a time.

    Args:
        base_dir: the base model directory (safetensors, single file or sharded with an index).
        factors: :func:`lora_factors` of the adapter.
        target: the directory the merged shards go to (same file names as the base's).
        dtype: the torch dtype the merged weights are saved in (the fold itself runs in fp32).

    Returns:
        ``(names, total_bytes)``: the base weight names that received a delta, and the bytes of every saved tensor
        (the index's ``total_size``).

    Raises:
        UserError: an adapter module names a weight the base does not have.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    merged: list[str] = []
    total = 0
    for shard in base_shards(base_dir):
        out: dict[str, Any] = {}
        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                if name in factors:
                    tensor = (tensor.float() + factors[name].delta()).to(dtype)
                    merged.append(name)
                elif tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                out[name] = tensor.contiguous()
                total += tensor.numel() * tensor.element_size()
        save_file(out, str(target / shard.name), metadata={**metadata, "format": "pt"})
        del out
    missing = sorted(set(factors) - set(merged))
    if missing:
        raise UserError(f"the adapter's modules {missing[:3]} name weights that {base_dir} does not have: it was "
                        "trained on another base (pass the right one with --base)")
    return merged, total


def copy_model_files(base_dir: Path, target: Path, dtype_name: str, total_bytes: int) -> None:
    """Copy the base's non-weight files (config, generation config, tokenizer, index) beside the merged shards,
    with ``config.json``'s dtype set to the saved one and the index's ``total_size`` set to ``total_bytes``."""
    for path in base_dir.iterdir():
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and path.name != _INDEX:
            shutil.copyfile(path, target / path.name)
    config_file = target / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.pop("torch_dtype", None)
        config["dtype"] = dtype_name
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    index = base_dir / _INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = total_bytes
        (target / _INDEX).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- the memory preflight

_GIB = 1024 ** 3


@dataclass(frozen=True)
class MergePlan:
    """Which merge runs and what it needs: ``strategy`` is ``memory`` (the whole model, with the logit check) or
    ``sharded`` (tensor by tensor); ``need`` the estimated peak in bytes of each strategy, ``budget`` the limit."""

    strategy: str
    need: dict[str, int]
    budget: int
    reason: str

    def describe(self) -> str:
        needs = ", ".join(f"{name} {size / _GIB:.2f} GiB" for name, size in self.need.items())
        return f"merge memory: estimated peak {needs}; budget {self.budget / _GIB:.2f} GiB → {self.strategy} ({self.reason})"


def estimate_merge_bytes(base_dir: Path, adapter_dir: Path, dtype_size: int, *,
                         dtype_name: str | None = None) -> dict[str, int]:
    """Estimated peak bytes of the two merge strategies, from the safetensors headers (no weights loaded); the
    arithmetic is :func:`tuneforge.models.memory.merge_components` / ``shard_merge_bytes`` /
    ``sharded_merge_components`` (the bill of ``tuneforge estimate --phase merge``).

    In memory: the base in fp32 with the adapter, the tokenizer, the logit check, the cast of one tensor below
    fp32. Shard by shard, each shard's own figure: its stored bytes (mapped), the tensors :func:`merge_shards`
    creates for it in the saved precision (its adapted weights; every floating tensor when ``dtype_name``, the
    saved torch dtype, is not the stored one — compared by ``dtype_size`` when it is not given) and the fold of its
    largest adapted weight; the largest of them (or the tokenizer's load, after the last shard) plus the adapter.
    """
    from tuneforge.models import memory

    adapter_file = adapter_dir / "adapter_model.safetensors"
    adapter, adapted = _adapter_elements(adapter_file) if adapter_file.is_file() else (0, set())
    vocab = _vocab_size(base_dir)
    shards = [_shard_numbers(shard, adapted, dtype_size, dtype_name) for shard in base_shards(base_dir)]
    in_memory = memory.merge_components(sum(s["elements"] for s in shards), adapter, dtype_size, vocab=vocab,
                                        largest_tensor=max(s["largest"] for s in shards))
    per_shard = [memory.shard_merge_bytes(s["stored"], s["new"], dtype_size, s["fold"],
                                          stored_below_fp32=s["fold_below_fp32"]) for s in shards]
    sharded = memory.sharded_merge_components(per_shard, adapter, vocab=vocab)
    return {"memory": sum(in_memory.values()), "sharded": sum(sharded.values())}


#: bytes per element and torch dtype name of the safetensors dtype codes
_STORED = {"F64": (8, "float64"), "F32": (4, "float32"), "F16": (2, "float16"), "BF16": (2, "bfloat16"),
           "I64": (8, None), "I32": (4, None), "I16": (2, None), "I8": (1, None), "U8": (1, None),
           "BOOL": (1, None)}


def _shard_numbers(shard: Path, adapted: set[str], dtype_size: int, dtype_name: str | None) -> dict[str, Any]:
    """From one safetensors header: ``elements`` (all), ``largest`` (one tensor), ``stored`` (bytes as stored),
    ``new`` (elements :func:`merge_shards` writes as new tensors: the adapted weights, and floating tensors whose
    stored dtype is not the saved one), ``fold`` (elements of the largest adapted weight) and whether that weight is
    stored below fp32 (``fold_below_fp32``: its fp32 copy is a fold temporary too)."""
    from safetensors import safe_open

    numbers: dict[str, Any] = {"elements": 0, "largest": 0, "stored": 0, "new": 0, "fold": 0,
                               "fold_below_fp32": False}
    with safe_open(str(shard), framework="pt") as handle:
        for name in handle.keys():
            piece = handle.get_slice(name)
            count = _numel(piece.get_shape())
            size, stored_name = _STORED.get(piece.get_dtype(), (1, None))
            numbers["elements"] += count
            numbers["largest"] = max(numbers["largest"], count)
            numbers["stored"] += count * size
            if name in adapted:
                numbers["new"] += count
                if count > numbers["fold"]:
                    numbers["fold"], numbers["fold_below_fp32"] = count, size < 4
            elif stored_name is not None and (stored_name != dtype_name if dtype_name else size != dtype_size):
                numbers["new"] += count
    return numbers


def _vocab_size(base_dir: Path) -> int:
    """``vocab_size`` of the base's ``config.json`` (0 when it is not there: no tokenizer or logit terms)."""
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 0
    text = config.get("text_config") or config
    return int(text.get("vocab_size") or 0)


def _adapter_elements(path: Path) -> tuple[int, set[str]]:
    """``(elements, adapted)`` of an adapter file: all its elements, and the base weight names its LoRA factor
    pairs fold into (named as :func:`lora_factors` names them)."""
    from safetensors import safe_open

    total, adapted = 0, set()
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            total += _numel(handle.get_slice(name).get_shape())
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_[AB]\.weight", name)
            if match:
                adapted.add(match.group(1) + ".weight")
    return total, adapted


def plan_merge(ref: Any, dtype_size: int, strategy: str = "auto", max_memory: int | None = None, *,
               dtype_name: str | None = None) -> MergePlan:
    """Choose the merge strategy for ``ref`` (a :class:`tuneforge.models.reference.ModelRef` of an adapter).

    ``auto`` merges in memory (with its logit check) when that fits ``max_memory`` (default: the RAM available now),
    else shard by shard when the adapter and base allow it. ``memory``/``sharded`` force one. ``dtype_name`` (the
    saved torch dtype) tells the estimate which stored tensors get a converted copy (by ``dtype_size`` without it).

    Raises:
        UserError: nothing fits the budget (naming both estimates and ``--max-memory``), or ``sharded`` was asked
            for an adapter or base it cannot handle.
    """
    from tuneforge.models.memory import memory_budget

    budget = memory_budget(max_memory)  # the merge runs on the CPU
    base_dir = Path(ref.base)
    local = base_dir.is_dir() and not ref.stack
    need = (estimate_merge_bytes(base_dir, Path(ref.adapter), dtype_size, dtype_name=dtype_name)
            if local and _has_safetensors(base_dir) else {})
    if strategy == "memory" or (strategy == "auto" and (not need or need["memory"] <= budget)):
        return MergePlan("memory", need, budget, "asked" if strategy == "memory" else "fits")
    if ref.stack:
        raise UserError(f"{ref.given}: a progressive run (earlier adapters in stack/) merges in memory only")
    if not base_dir.is_dir():
        raise UserError(f"{ref.given}: base {ref.base} is not a local directory; the shard-by-shard merge reads "
                        "local safetensors files (download the base and pass it with --base)")
    check_plain_lora(ref.adapter_config or {}, ref.given)
    need = need or estimate_merge_bytes(base_dir, Path(ref.adapter), dtype_size, dtype_name=dtype_name)
    if need["sharded"] > budget:
        raise UserError(f"merge needs about {need['sharded'] / _GIB:.2f} GiB even shard by shard (in memory "
                        f"{need['memory'] / _GIB:.2f} GiB), above the budget of {budget / _GIB:.2f} GiB; free memory, "
                        "raise --max-memory, or re-save the base in smaller shards (save_pretrained max_shard_size)")
    return MergePlan("sharded", need, budget, "asked" if strategy == "sharded" else "the whole model does not fit")


def _has_safetensors(base_dir: Path) -> bool:
    return (base_dir / "model.safetensors").is_file() or (base_dir / _INDEX).is_file()
