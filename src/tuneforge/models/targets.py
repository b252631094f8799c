"""The one target-module vocabulary: a model's linear layers grouped attention / mlp / other, and
``target_modules`` resolved — for training (methods), ``tuneforge inspect`` and ``tuneforge estimate`` alike.

Target names are *suffixes* of module paths, exactly as peft matches a ``target_modules`` list (a module is
targeted when its name equals the entry or ends with ``"." + entry``). Each group gets the shortest suffix that
matches only that group's layers, so GPT-2's attention ``c_proj`` becomes ``attn.c_proj`` and never grabs the MLP
``c_proj``. The output embedding (``lm_head``) is never a target of a group.

The rules read module *names* only (:class:`ModuleNames`), so they give the same answer on a real model, a
meta-device model (the estimator's) or a plain list of names. Every function taking ``model`` also takes a
:class:`ModuleNames`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tuneforge.config.methods import TARGET_GROUPS
from tuneforge.errors import UserError

GROUPS = ("attention", "mlp", "other")
GROUP_SPECS = TARGET_GROUPS  # the values method.target_modules accepts besides explicit names

# Expected targets per architecture (model_type). resolve_target_modules uses them when every name exists in
# the model; discovery (below) handles everything else (BERT-style query/key/value, ChatGLM, unknown models), and
# the tests check that discovery selects the same layers as this table.
ARCHITECTURE_DEFAULTS: dict[str, dict[str, list[str]]] = {
    **{arch: {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
       for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]},
    "gpt_neox": {"attention": ["query_key_value", "attention.dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "bloom": {"attention": ["query_key_value", "self_attention.dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "chatglm": {"attention": ["query_key_value", "self_attention.dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
}

# A module's group is decided by the nearest enclosing module name in these sets, else by its own name.
_ATTENTION_PARENTS = {"attn", "attention", "self_attn", "self_attention", "selfattention", "cross_attn",
                      "crossattention", "encdecattention", "mixer", "attn_layer"}
_MLP_PARENTS = {"mlp", "feed_forward", "feedforward", "ffn", "ff", "ffw", "intermediate", "dense_relu_dense",
                "block_sparse_moe", "moe", "experts", "shared_expert"}
_ATTENTION_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "query", "key", "value",
                     "c_attn", "wqkv", "out_proj", "w_pack", "wq", "wk", "wv", "wo", "qkv"}
_MLP_LEAVES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "fc_in", "fc_out",
               "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}
# Names of output embeddings (lm heads) in common architectures, excluded from the groups even when the model
# does not report them through get_output_embeddings (e.g. remote-code models).
OUTPUT_NAMES = ("lm_head", "embed_out", "output_layer")
# peft's own layers inside an already-wrapped model: not targets themselves.
_PEFT_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "vera_A",
               "vera_B", "ia3_l", "lora_E"}


@dataclass(frozen=True)
class ModuleNames:
    """What target resolution reads about a model: names only.

    Attributes:
        modules: every module path (the root's empty name left out).
        linears: paths of the linear/Conv1D layers in model order (inside a peft-wrapped model, the wrapped layer).
        outputs: output-embedding paths; never a group target (names in :data:`OUTPUT_NAMES` are excluded too).
        model_type: ``config.model_type``, for :data:`ARCHITECTURE_DEFAULTS`.
    """

    modules: tuple[str, ...]
    linears: tuple[str, ...]
    outputs: frozenset[str] = frozenset()
    model_type: str | None = None


def module_names(model: Any) -> ModuleNames:
    """The :class:`ModuleNames` of a model (any device, meta included); a :class:`ModuleNames` is returned as is."""
    if isinstance(model, ModuleNames):
        return model
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules, linears, outputs = [], [], set()
    for name, module in model.named_modules():
        if not name:
            continue
        modules.append(name)
        if out is not None and module is out:
            outputs.add(name)
        parts = name.split(".")
        if _PEFT_PARTS.intersection(parts) or not is_linear(module):
            continue
        linears.append(".".join(parts[:-1]) if parts[-1] == "base_layer" else name)
    return ModuleNames(tuple(modules), tuple(linears), frozenset(outputs), model_type(model))


def is_linear(module: Any) -> bool:
    """Whether ``module`` is a ``torch.nn.Linear`` (including bitsandbytes' quantized ones) or GPT-2's ``Conv1D``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def is_conv1d(module: Any) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weights stored transposed: peft needs ``fan_in_fan_out``)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def classify(name: str) -> str:
    """The group (``attention``/``mlp``/``other``) of a linear layer from its full module path."""
    parts = name.split(".")
    for part in reversed(parts[:-1]):
        low = part.lower()
        if low in _ATTENTION_PARENTS:
            return "attention"
        if low in _MLP_PARENTS:
            return "mlp"
    leaf = parts[-1].lower()
    if leaf in _ATTENTION_LEAVES:
        return "attention"
    if leaf in _MLP_LEAVES:
        return "mlp"
    # BERT-style blocks: layer.N.output.dense is the second MLP projection.
    if len(parts) >= 3 and parts[-2] == "output" and parts[-3].isdigit():
        return "mlp"
    return "other"


def linear_module_paths(model: Any) -> dict[str, list[str]]:
    """Full module paths of every linear/Conv1D layer, grouped ``attention`` / ``mlp`` / ``other``.

    The output embedding (``lm_head``) is left out; in a peft-wrapped model the wrapped layer's own path is
    reported (not its ``base_layer`` or ``lora_A``/``lora_B`` children). Order is the model's module order.
    """
    names = module_names(model)
    groups: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name in names.linears:
        if name not in names.outputs and name.split(".")[-1] not in OUTPUT_NAMES:
            groups[classify(name)].append(name)
    return groups


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1, -1, -1)]


def _suffix_index(names: Iterable[str]) -> dict[str, set[str]]:
    index: dict[str, set[str]] = {}
    for name in names:
        for suffix in _suffixes(name):
            index.setdefault(suffix, set()).add(name)
    return index


def _short_names(paths: dict[str, list[str]], all_module_names: list[str]) -> dict[str, list[str]]:
    """For every group, the shortest suffixes that match only that group's layers (deduplicated, in order)."""
    index = _suffix_index(all_module_names)
    result: dict[str, list[str]] = {}
    for group, names in paths.items():
        members = set(names)
        chosen: list[str] = []
        for name in names:
            suffix = next(s for s in _suffixes(name) if index.get(s, {name}) <= members)
            if suffix not in chosen:
                chosen.append(suffix)
        result[group] = chosen
    return result


def linear_modules(model: Any) -> dict[str, list[str]]:
    """Target names of the linear/Conv1D layers, grouped ``{"attention": [...], "mlp": [...], "other": [...]}``.

    Each name is a module-path suffix usable in peft's ``target_modules`` that matches exactly the layers of its
    group: ``q_proj`` for Llama; ``c_attn``, ``attn.c_proj`` / ``c_fc``, ``mlp.c_proj`` for GPT-2. The output
    embedding is excluded. Full paths: :func:`linear_module_paths`.
    """
    return _short_names(linear_module_paths(model), module_names(model).modules)


def model_type(model: Any) -> str | None:
    """``model.config.model_type`` (``None`` without a config)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def matches(name: str, target: str) -> bool:
    """peft's rule: ``name`` is targeted by ``target`` when equal or ending with ``"." + target``."""
    return name == target or name.endswith("." + target)


def describe_modules(groups: dict[str, list[str]]) -> str:
    """Human-readable listing of grouped module names for error messages."""
    return "; ".join(f"{group}: {', '.join(names) if names else '(none)'}" for group, names in groups.items())


def resolve_target_modules(model: Any, spec: str | list[str], *, key: str = "method.target_modules") -> list[str]:
    """The explicit list of module-name suffixes that ``spec`` targets in ``model``.

    Args:
        model: the (not yet peft-wrapped) model, on any device, or its :class:`ModuleNames`.
        spec: ``"attention"``, ``"mlp"``, ``"all-linear"`` (every linear layer but the output embedding), or an
            explicit list of names (each a full path or a suffix, as peft matches them).
        key: the config key named in error messages.

    Returns:
        A non-empty list of names for peft's ``target_modules``. For the group specs it comes from
        :data:`ARCHITECTURE_DEFAULTS` when the architecture is listed and all its names exist, else from
        discovery; an explicit list is returned as given.

    Raises:
        UserError: an unknown spec string, a group with no layers, or explicit names matching no module
            (the message lists the linear layers that exist, grouped).
    """
    if isinstance(spec, str):
        if spec not in GROUP_SPECS:
            raise UserError(f"{key} {spec!r} is not one of {', '.join(GROUP_SPECS)} or a list of module names")
        groups = _group_targets(model)
        if spec == "all-linear":
            names = groups["attention"] + groups["mlp"] + groups["other"]
        else:
            names = groups[spec]
        if not names:
            raise UserError(
                f"{key} {spec!r} matches no linear layer in this model; layers that exist: "
                f"{describe_modules(linear_modules(model))}. Give explicit names instead."
            )
        return names
    spec = list(spec)
    if not spec:
        raise UserError(f"{key} is an empty list; give module names or attention / mlp / all-linear")
    names = module_names(model).modules
    missing = [target for target in spec if not any(matches(name, target) for name in names)]
    if missing:
        raise UserError(
            f"{key}: {', '.join(repr(m) for m in missing)} match{'es' if len(missing) == 1 else ''} no module "
            f"of this model; linear layers that exist: {describe_modules(linear_modules(model))}"
        )
    return spec


def _group_targets(model: Any) -> dict[str, list[str]]:
    model = module_names(model)
    discovered = linear_modules(model)
    known = ARCHITECTURE_DEFAULTS.get(model.model_type or "")
    if not known:
        return discovered
    names = model.modules
    if all(any(matches(n, t) for n in names) for group in known.values() for t in group):
        return {"attention": list(known["attention"]), "mlp": list(known["mlp"]), "other": discovered["other"]}
    return discovered


def targets_conv1d(model: Any, targets: list[str] | str) -> bool:
    """Whether any layer matched by ``targets`` is a GPT-2 ``Conv1D`` (peft then needs ``fan_in_fan_out=True``)."""
    if isinstance(targets, str):
        targets = [targets]
    return any(is_conv1d(module) and any(matches(name, t) for t in targets) for name, module in model.named_modules())
