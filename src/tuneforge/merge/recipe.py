"""Merge several models (or LoRA adapters of one base) from a YAML recipe in mergekit's format.

```yaml
merge_method: ties            # linear | slerp | ties | dare_ties | dare_linear | task_arithmetic
base_model: runs/base/final   # the model the others were tuned from (slerp: the t=0 end)
models:
  - model: runs/math          # a full model dir, a tuneforge run, a PEFT adapter dir, or "BASE+ADAPTER"
    parameters: {weight: 0.6, density: 0.5}
  - model: runs/code
    parameters: {weight: 0.4, density: 0.5}
parameters: {normalize: true} # shared parameters, and defaults for every model's parameters
dtype: float32                # output dtype (default: the base's)
tokenizer_source: base        # base (default) or one of the models
```

A parameter value may be a number, a list of numbers (a gradient interpolated across the layers: the first value
at layer 0, the last at the last layer), or a list of ``{filter: substring, value: ...}`` entries (the first whose
filter is in the tensor name wins; an entry without ``filter`` is the default), as in mergekit.

Tensors are processed one name at a time and written in safetensors shards, so memory stays near one model plus
one tensor per input.
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tuneforge.console import say
from tuneforge.errors import UserError, did_you_mean
from tuneforge.merge.lora import copy_template_files, local_ref
from tuneforge.merge.methods import MergeMethod, get_merge_method
from tuneforge.merge.tensors import Checkpoint, LoraOnBase, layer_index
from tuneforge.models.reference import TEMPLATE_FILES, ModelRef
from tuneforge.utils import atomic_dir, atomic_write_json, atomic_write_text, load_yaml

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
OUT_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
              "float16": "float16", "fp16": "float16"}
# Accepted for mergekit compatibility; they change nothing here (we compute in float32 anyway).
IGNORED_PARAMS = {"int8_mask"}


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    parameters: dict[str, Any] = {}


class Recipe(BaseModel):
    """A parsed recipe (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = []
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    tokenizer_source: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _strings_are_models(cls, value):
        if isinstance(value, list):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value):
        if value is not None and value not in OUT_DTYPES:
            raise ValueError(f"unknown dtype {value!r}; choose float32, bfloat16 or float16")
        return value


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file.

    Raises:
        UserError: unreadable YAML, unknown keys (with a suggestion), ``slices`` (not supported), wrong types.
    """
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a merge recipe is a mapping with merge_method, base_model, models, parameters")
    if "slices" in data:
        raise UserError(f"{path}: 'slices' (layer-range recipes) are not supported; list whole models under "
                        "'models:' instead")
    unknown = [k for k in data if k not in Recipe.model_fields]
    if unknown:
        key = unknown[0]
        raise UserError(f"{path}: unknown key {key!r}{did_you_mean(key, Recipe.model_fields)}; "
                        f"known: {', '.join(Recipe.model_fields)}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{path}: {where}: {err['msg']}") from None


def resolve_param(value: Any, name: str, n_layers: int | None, what: str) -> Any:
    """The value of one parameter for the tensor ``name`` (scalar, layer gradient or filter list)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise UserError(f"{what}: filter entries look like {{filter: self_attn, value: 0.5}}; got {entry}")
            if entry.get("filter") is None or str(entry["filter"]) in name:
                return resolve_param(entry["value"], name, n_layers, what)
        raise UserError(f"{what}: no filter matches tensor {name!r}; add a default entry {{value: ...}}")
    if isinstance(value, list):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise UserError(f"{what}: a gradient is a non-empty list of numbers, got {value}")
        if len(value) == 1:
            return float(value[0])
        layer = layer_index(name)
        if layer is None or not n_layers:
            # embeddings come before the first block, the final norm and head after the last
            return float(value[0] if "embed" in name or ".wte." in name or ".wpe." in name else value[-1])
        position = layer / max(1, n_layers - 1) * (len(value) - 1)
        low = min(int(position), len(value) - 2)
        frac = position - low
        return float(value[low] * (1 - frac) + value[low + 1] * frac)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return value
    raise UserError(f"{what}: expected a number, a list of numbers or filter entries, got {value!r}")


class _Input:
    """One recipe model: its source and tensor reader."""

    def __init__(self, given: str, source: ModelRef, reader: Any, params: dict):
        self.given = given
        self.source = source
        self.reader = reader
        self.params = params

    @property
    def weights_dir(self) -> Path:
        """The directory whose config.json describes this model's architecture (the model, or an adapter's base)."""
        return Path(self.source.base)


def merge_recipe(recipe_path: str | Path, out: str | Path, *, max_shard_size: str | int = "2GB") -> dict:
    """Run a merge recipe and write a standard HF model directory at ``out`` (atomically).

    Returns:
        A summary dict: method, inputs, number of tensors, output dtype, shard files.

    Raises:
        UserError: bad recipe, unknown method (listing known ones), unknown/missing parameters, models of
            different bases or shapes (naming the tensor).
    """
    import torch

    recipe_path = Path(recipe_path)
    recipe = load_recipe(recipe_path)
    method = get_merge_method(recipe.merge_method)
    shared, model_defaults = _shared_params(method, recipe.parameters, recipe_path)
    base_cache: dict[str, Checkpoint] = {}
    base = _open_input(recipe.base_model, {}, recipe_path, base_cache, "base_model") if recipe.base_model else None
    inputs = [_open_input(e.model, e.parameters, recipe_path, base_cache, f"models[{i}]")
              for i, e in enumerate(recipe.models)]
    if not inputs:
        raise UserError(f"{recipe_path}: models: is empty; list the models to merge")
    if method.uses_base == "never":
        merging, base = inputs, None
    else:
        if base is None:
            raise UserError(f"{recipe_path}: merge_method {method.name!r} needs base_model")
        merging = [m for m in inputs if not _same_model(m, base)]
    method.check(len(merging), base is not None)
    for item in merging:
        _check_params(method, item, recipe_path)
        item.params = {**method.model_params, **model_defaults, **item.params}
        missing = [k for k, v in item.params.items() if v is None]
        if missing:
            raise UserError(f"{recipe_path}: {item.given}: {method.name} needs parameters.{missing[0]} for every "
                            "model (per model, or once under the top-level parameters:)")
    reference = base or merging[0]
    _check_compatible(reference, [m for m in merging if m is not reference], recipe_path)
    _check_adapter_bases(base, merging, recipe_path)

    config = json.loads((reference.weights_dir / "config.json").read_text(encoding="utf-8"))
    n_layers = config.get("num_hidden_layers") or config.get("n_layer")
    names = reference.reader.keys()
    seed = int(shared.pop("seed", 0))
    out_dtype = OUT_DTYPES[recipe.dtype] if recipe.dtype else None
    say(f"merging {len(merging)} model(s) with {method.name} over {len(names)} tensors")
    shard_limit = _parse_size(max_shard_size)
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, shard_limit)
        for name in names:
            ref_tensor = reference.reader.get(name)
            dtype = getattr(torch, out_dtype) if out_dtype else reference.reader.dtype(name)
            if not ref_tensor.is_floating_point():  # integer buffers are copied, never averaged
                writer.add(name, ref_tensor)
                continue
            tensors = [m.reader.get(name) for m in merging]
            params = [{k: resolve_param(v, name, n_layers, f"{m.given}: parameter {k}") for k, v in m.params.items()}
                      for m in merging]
            shared_now = {k: resolve_param(v, name, n_layers, f"parameters.{k}") for k, v in shared.items()}
            generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            merged = method.merge(base.reader.get(name) if base else None, tensors, params, shared_now,
                                  generator=generator)
            writer.add(name, merged.to(dtype))
        files = writer.close()
        _write_config(reference.weights_dir, tmp, out_dtype)
        _copy_tokenizer(recipe, reference, base, inputs, recipe_path, tmp)
        atomic_write_text(tmp / "merge_recipe.yaml", recipe_path.read_text(encoding="utf-8"))
        summary = {"merge_method": method.name, "base_model": recipe.base_model,
                   "models": [m.given for m in merging], "tensors": len(names),
                   "dtype": out_dtype or config.get("dtype") or config.get("torch_dtype"), "files": files}
        atomic_write_json(tmp / "merge_report.json", summary)
    say(f"merged model written to {out} ({len(files)} safetensors file(s))")
    return summary


def _shared_params(method: MergeMethod, given: dict, recipe_path: Path) -> tuple[dict, dict]:
    """``(shared parameters with defaults, per-model defaults given at the top level)``."""
    allowed = {**method.shared_params, **method.model_params, "seed": 0}
    for key in given:
        if key not in allowed and key not in IGNORED_PARAMS:
            raise UserError(f"{recipe_path}: parameters.{key}: unknown parameter for {method.name}"
                            f"{did_you_mean(key, allowed)}; known: {', '.join(sorted(allowed))}")
    shared = {k: v for k, v in method.shared_params.items()}
    shared.update({k: v for k, v in given.items() if k in method.shared_params or k == "seed"})
    missing = [k for k, v in shared.items() if v is None]
    if missing:
        raise UserError(f"{recipe_path}: merge_method {method.name!r} needs parameters.{missing[0]} "
                        f"(e.g. parameters: {{{missing[0]}: 0.5}})")
    # model-level values given at the top level apply to every model without its own value
    return shared, {k: v for k, v in given.items() if k in method.model_params}


def _check_params(method: MergeMethod, item: _Input, recipe_path: Path) -> None:
    for key in item.params:
        if key not in method.model_params and key not in IGNORED_PARAMS:
            raise UserError(f"{recipe_path}: {item.given}: parameter {key!r} is not a per-model parameter of "
                            f"{method.name}{did_you_mean(key, method.model_params)}; "
                            f"known: {', '.join(sorted(method.model_params)) or 'none'}")


def _open_input(given: str, params: dict, recipe_path: Path, base_cache: dict, what: str) -> _Input:
    base_part, adapter_part = given.split("+", 1) if "+" in given and not Path(given).exists() else (given, None)
    if adapter_part is not None:
        source = local_ref(_locate(adapter_part, recipe_path, what), base=str(_locate(base_part, recipe_path, what)))
        if not source.is_adapter:
            raise UserError(f"{recipe_path}: {what}: {adapter_part!r} after '+' must be a LoRA adapter")
    else:
        source = local_ref(_locate(given, recipe_path, what))
    if source.stack:
        # the adapter fits base + earlier adapters merged in: reading it against the bare base would be wrong
        raise UserError(f"{recipe_path}: {what}: {given!r} is a progressive run (method.continue_from: its adapter "
                        f"sits on the base with {len(source.stack)} earlier adapter(s) merged in); merge it into one "
                        f"model first (tuneforge merge {given} --out DIR) and name DIR here")
    if source.is_adapter:
        base_dir = Path(source.base)
        if not base_dir.is_dir():
            raise UserError(f"{recipe_path}: {what}: adapter {given!r} was trained on {source.base!r}, which is not a "
                            "local directory; write the model as BASE_DIR+ADAPTER_DIR")
        key = str(base_dir.resolve())
        base_cache.setdefault(key, Checkpoint(base_dir, label=f"base of {given}"))
        reader = LoraOnBase(base_cache[key], source.model_dir, source.adapter_config or {}, label=given)
    else:
        reader = Checkpoint(source.model_dir, label=given)
    return _Input(given, source, reader, dict(params))


def _locate(path: str, recipe_path: Path, what: str) -> Path:
    for candidate in (Path(path), recipe_path.parent / path):
        if candidate.exists():
            return candidate
    raise UserError(f"{recipe_path}: {what}: {path!r} not found (relative paths are tried from the current "
                    f"directory and from the recipe's directory); hub ids are not fetched by merge")


def _same_model(a: _Input, b: _Input) -> bool:
    return a.source.model_dir.resolve() == b.source.model_dir.resolve() and a.source.base == b.source.base


def _check_compatible(reference: _Input, others: list[_Input], recipe_path: Path) -> None:
    """Same architecture, same tensor names, same shapes: otherwise a UserError naming the tensor."""
    ref_config = json.loads((reference.weights_dir / "config.json").read_text(encoding="utf-8"))
    ref_names = reference.reader.keys()
    ref_set = set(ref_names)
    for other in others:
        config = json.loads((other.weights_dir / "config.json").read_text(encoding="utf-8"))
        if config.get("model_type") != ref_config.get("model_type"):
            raise UserError(f"{recipe_path}: {other.given} is a {config.get('model_type')} model but "
                            f"{reference.given} is {ref_config.get('model_type')}: models of different bases "
                            "cannot be merged")
        names = set(other.reader.keys())
        for name in ref_names:
            if name not in names:
                raise UserError(f"{recipe_path}: tensor {name!r} of {reference.given} is missing from {other.given}: "
                                "the models do not share an architecture")
            if other.reader.shape(name) != reference.reader.shape(name):
                raise UserError(f"{recipe_path}: tensor {name!r} has shape {list(other.reader.shape(name))} in "
                                f"{other.given} but {list(reference.reader.shape(name))} in {reference.given}: "
                                "models of different bases or sizes cannot be merged")
        extra = sorted(names - ref_set)
        if extra:
            raise UserError(f"{recipe_path}: tensor {extra[0]!r} of {other.given} is not in {reference.given}: "
                            "the models do not share an architecture")


def _check_adapter_bases(base: _Input | None, merging: list[_Input], recipe_path: Path) -> None:
    """Adapters must all sit on one base, and on the recipe's base_model when that is a full model."""
    adapters = [m for m in merging if m.source.kind == "adapter"]
    bases = {str(Path(m.source.base).resolve()): m.given for m in adapters}
    if len(bases) > 1:
        listed = "; ".join(f"{given} → {folder}" for folder, given in bases.items())
        raise UserError(f"{recipe_path}: the LoRA adapters come from different bases ({listed}); adapters are "
                        "merged only onto the base they were trained on")
    if bases and base is not None and base.source.kind == "model":
        folder = str(base.source.model_dir.resolve())
        if folder not in bases:
            adapter_base, given = next(iter(bases.items()))
            raise UserError(f"{recipe_path}: adapter {given} was trained on {adapter_base} but base_model is "
                            f"{base.given} ({folder}): different bases")


def _write_config(source_dir: Path, target: Path, out_dtype: str | None) -> None:
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    if out_dtype:
        config["dtype"] = out_dtype
        config.pop("torch_dtype", None)
    atomic_write_json(target / "config.json", config)
    if (source_dir / "generation_config.json").is_file():
        shutil.copyfile(source_dir / "generation_config.json", target / "generation_config.json")


def _copy_tokenizer(recipe: Recipe, reference: _Input, base: _Input | None, inputs: list[_Input],
                    recipe_path: Path, target: Path) -> None:
    """Tokenizer files from ``tokenizer_source`` (default: the base), and the chat template of a run if any."""
    choice = recipe.tokenizer_source or "base"
    if choice == "base":
        source = base or reference
    else:
        matches = [m for m in [*([base] if base else []), *inputs] if m.given == choice]
        if not matches:
            options = ["base", *(m.given for m in inputs)]
            raise UserError(f"{recipe_path}: tokenizer_source {choice!r} is not 'base' or one of the models"
                            f"{did_you_mean(choice, options)}; choose one of: {', '.join(options)}")
        source = matches[0]
    folders = [source.source.model_dir, source.weights_dir]
    folder = next((f for f in folders if any((f / n).is_file() for n in TOKENIZER_FILES)), None)
    if folder is not None:
        for name in (*TOKENIZER_FILES, *TEMPLATE_FILES):
            if (folder / name).is_file():
                shutil.copyfile(folder / name, target / name)
    if not any((target / n).is_file() for n in TEMPLATE_FILES):
        item = next((i for i in [source, *inputs] if i.source.template_dir is not None), None)
        if item is not None:
            copy_template_files(item.source, target)


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for suffix, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--max-shard-size {size!r}: use bytes or a size like 500MB, 2GB") from None


class _ShardWriter:
    """Accumulate tensors up to a byte limit per file; name files and write the index as HF does."""

    def __init__(self, folder: Path, limit: int):
        self.folder = folder
        self.limit = limit
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Any) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.limit:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        count = len(self.shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / final)
            files.append(final)
            weight_map.update({n: final for n in names})
        atomic_write_json(self.folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return files
