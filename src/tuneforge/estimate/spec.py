"""Model size without weights: read a ``config.json``, build the model on the meta device, count.

A model is described by a :class:`ModelSpec`: exact parameter counts (tied embeddings counted once) and the
shape of every linear layer, which is all the memory bill needs. Sources, in order: a local directory (or a
``config.json`` file), the built-in table of common architectures (:mod:`tuneforge.estimate.archs`), the
Hugging Face hub when it is reachable, or a run config's ``model.from_config`` section.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError, did_you_mean
from tuneforge.estimate.archs import builtin_config, builtin_names
from tuneforge.models.targets import ModuleNames, classify, matches, module_names, resolve_target_modules


@dataclass(frozen=True)
class LinearShape:
    """One linear (or GPT-2 ``Conv1D``) layer: its dotted name, fan-in, fan-out and role."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    kind: str  # "head" (the output embedding), else its group: "attention" | "mlp" | "other"

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelSpec:
    """Everything the memory bill needs to know about a model; built without allocating its weights.

    ``total_params`` counts every parameter once (a tied input/output embedding is one matrix).
    ``param_numels`` lists the element count of every distinct parameter tensor (for per-tensor optimizer rules).
    ``modules`` are the module names target resolution reads (:mod:`tuneforge.models.targets`, as in training).
    """

    name: str
    origin: str
    model_type: str
    family: str  # "llama" (RMSNorm, gated MLP) or "gpt2" (LayerNorm, GELU MLP)
    total_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    linears: list[LinearShape] = field(default_factory=list)
    param_numels: list[int] = field(default_factory=list)
    embedding_params: int = 0
    modules: ModuleNames = field(default_factory=lambda: ModuleNames((), ()))

    @property
    def head(self) -> LinearShape | None:
        """The output projection (``lm_head``), if the model has one."""
        return next((lin for lin in self.linears if lin.kind == "head"), None)


# --------------------------------------------------------------------------- finding a config.json


def load_config_dict(source: str) -> tuple[dict, str]:
    """The ``config.json`` contents for ``source`` and where they came from.

    ``source`` is a local model directory, a path to a ``config.json``, a name from the built-in table, or a
    hub id (fetched only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set).

    Raises:
        UserError: unreadable file, or a name that is neither local, built in, nor on a reachable hub.
    """
    path = Path(source).expanduser()
    if path.exists():
        from tuneforge.models.gguf import gguf_path_of, materialize

        gguf = gguf_path_of(path)
        if gguf is not None:  # a GGUF file: the config of its cached plain conversion (made on first use)
            path = materialize(gguf, source)
    if path.is_dir() or path.name == "config.json" or path.suffix == ".json":
        file = path / "config.json" if path.is_dir() else path
        return _read_json(file), str(file)
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise UserError(f"{source}: no such file or directory (expected a model directory with config.json)")
    builtin = builtin_config(source)
    if builtin is not None:
        return builtin, "built-in table"
    return _from_hub(source), "hub"


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise UserError(f"{file}: no such file (a model directory must contain config.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not a readable JSON config ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserError(f"{file}: a model config.json must be a JSON object with a 'model_type' key")
    return data


def _from_hub(repo_id: str) -> dict:
    hint = did_you_mean(repo_id, builtin_names())
    known = f"built-in models: {', '.join(builtin_names()[:12])}, ..."
    if "/" not in repo_id or os.environ.get("HF_HUB_OFFLINE") == "1":
        why = "the hub is disabled (HF_HUB_OFFLINE=1)" if "/" in repo_id else "not a local directory or hub id"
        raise UserError(f"unknown model {repo_id!r}{hint}: {why}; give a local model directory or one of the {known}")
    try:
        from huggingface_hub import hf_hub_download

        file = hf_hub_download(repo_id, "config.json", etag_timeout=5)
    except Exception as exc:  # noqa: BLE001 — any hub failure (offline, 404, gated) means the same to the user
        raise UserError(
            f"unknown model {repo_id!r}{hint}: could not fetch its config.json from the hub "
            f"({type(exc).__name__}); give a local model directory or one of the {known}"
        ) from None
    return _read_json(Path(file))


def from_config_dict(fc: Any) -> dict:
    """A ``config.json``-like dict for a run config's ``model.from_config`` section.

    The vocabulary is ``fc.vocab_size``: the tokenizer trained for the run has at most that many tokens, so the
    estimate is an upper bound by at most a few embedding rows.
    """
    from tuneforge.models.build import _llama_intermediate

    if fc.architecture == "llama":
        return {
            "model_type": "llama", "hidden_size": fc.hidden_size,
            "intermediate_size": fc.intermediate_size or _llama_intermediate(fc.hidden_size),
            "num_hidden_layers": fc.num_layers, "num_attention_heads": fc.num_heads,
            "num_key_value_heads": fc.num_kv_heads or fc.num_heads, "vocab_size": fc.vocab_size,
            "max_position_embeddings": fc.max_position_embeddings, "tie_word_embeddings": fc.tie_word_embeddings,
        }
    return {
        "model_type": "gpt2", "n_embd": fc.hidden_size, "n_layer": fc.num_layers, "n_head": fc.num_heads,
        "n_inner": fc.intermediate_size, "vocab_size": fc.vocab_size, "n_positions": fc.max_position_embeddings,
        "tie_word_embeddings": fc.tie_word_embeddings,
    }


# --------------------------------------------------------------------------- meta-device instantiation


def model_spec(source: Any, name: str | None = None) -> ModelSpec:
    """Describe a model without allocating its weights.

    Args:
        source: a local directory / ``config.json`` path / built-in name / hub id (``str``), a config dict, or a
            :class:`tuneforge.config.schema.FromConfig`.
        name: display name (defaults to ``source`` when it is a string).

    Raises:
        UserError: the model cannot be found or read, or its ``model_type`` is not a causal LM transformers knows.
    """
    if isinstance(source, str):
        config, origin = load_config_dict(source)
        name = name or source
    elif isinstance(source, dict):
        config, origin = dict(source), "config dict"
    else:
        config, origin = from_config_dict(source), "from_config"
        name = name or f"from_config {source.architecture} h{source.hidden_size} L{source.num_layers}"
    model = _meta_model(config, name or "model")
    return _describe(model, name or "model", origin)


def _meta_model(config_dict: dict, name: str):
    import torch
    from transformers import AutoConfig

    from tuneforge.models.build import build_from_hf_config

    data = {k: v for k, v in config_dict.items() if k not in ("architectures", "auto_map", "quantization_config")}
    model_type = data.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise UserError(f"{name}: model_type {model_type!r} is not known to transformers ({exc})") from None
    try:
        with torch.device("meta"):
            model = build_from_hf_config(config)
    except ValueError as exc:
        raise UserError(f"{name}: model_type {model_type!r} has no causal-LM class to train ({exc})") from None
    # Meta-device builds may leave the output embedding a separate matrix until tied (then counts double).
    model.tie_weights()
    return model


def _describe(model, name: str, origin: str) -> ModelSpec:
    import torch

    cfg = model.config
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    names = module_names(model)
    linears = []
    for mod_name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        fan_in, fan_out, bias = shape
        kind = "head" if mod_name in names.outputs else classify(mod_name)
        linears.append(LinearShape(mod_name, fan_in, fan_out, bias, kind))
    embeddings = model.get_input_embeddings()
    family = "gpt2" if cfg.model_type in ("gpt2", "gpt_neo", "gpt_bigcode") else "llama"
    hidden = _first(cfg, "hidden_size", "n_embd")
    heads = _first(cfg, "num_attention_heads", "n_head")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = _first(cfg, "intermediate_size", "n_inner", default=None) or 4 * hidden
    tied_out = model.get_output_embeddings()
    tied = bool(tied_out is not None and tied_out.weight is embeddings.weight)
    del torch
    return ModelSpec(
        name=name, origin=origin, model_type=cfg.model_type, family=family,
        total_params=sum(p.numel() for p in params),
        hidden_size=hidden, intermediate_size=inter, num_layers=_first(cfg, "num_hidden_layers", "n_layer"),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, vocab_size=cfg.vocab_size,
        tie_word_embeddings=tied, linears=linears, param_numels=[p.numel() for p in params],
        embedding_params=embeddings.weight.numel(), modules=names,
    )


def _linear_shape(module) -> tuple[int, int, bool] | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features, module.bias is not None
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # GPT-2: weight is (in, out)
        return module.weight.shape[0], module.weight.shape[1], module.bias is not None
    return None


def _first(cfg, *names: str, default: Any = ...) -> Any:
    for key in names:
        value = getattr(cfg, key, None)
        if value is not None:
            return value
    if default is ...:
        raise UserError(f"model config lacks {' / '.join(names)}")
    return default


# --------------------------------------------------------------------------- target modules


def resolve_targets(spec: ModelSpec, targets: Any) -> list[LinearShape]:
    """The linear layers an adapter (or GaLore) would wrap: resolved by :mod:`tuneforge.models.targets`, the rules
    training uses, so the estimate counts exactly the layers training adapts (``None`` = ``all-linear``).

    Raises:
        UserError: when nothing matches, listing the model's linear layers by group.
    """
    names = resolve_target_modules(spec.modules, "all-linear" if targets is None else targets, key="target_modules")
    chosen = [lin for lin in spec.linears if any(matches(lin.name, name) for name in names)]
    if not chosen:
        raise UserError(f"target_modules {targets!r} match no linear layer of {spec.name}; use attention | mlp | "
                        "all-linear or names of linear layers (tuneforge inspect MODEL lists them)")
    return chosen
