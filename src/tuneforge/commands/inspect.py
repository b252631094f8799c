"""``tuneforge inspect MODEL``: linear layers grouped attention / mlp / other, parameter count, resolved targets.

Light module: torch and transformers are imported inside the command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tuneforge.errors import UserError


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="list a model's linear layers (attention / mlp / other) and the target modules each method resolves to",
        description="Build MODEL on the meta device from its config (no weights are read) and list its linear and "
        "Conv1D layers grouped attention / mlp / other, its parameter count, and the target_modules that "
        "'attention', 'mlp' and 'all-linear' resolve to (or those of --method).",
    )
    parser.add_argument("model", metavar="MODEL", help="model directory, run directory, adapter directory or hub id")
    from tuneforge.methods import known_methods

    # Checked by get_method (a UserError with a did-you-mean), not by argparse choices.
    parser.add_argument("--method", help=f"show what this method's defaults adapt: {', '.join(known_methods())}")
    parser.add_argument("--paths", action="store_true", help="also list the full module path of every layer")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (hub models)")
    parser.set_defaults(func=run_inspect)


def meta_model(base: str, trust_remote_code: bool = False):
    """The model ``base`` (a directory or hub id) built on the meta device from its config: no weights read.

    Raises:
        UserError: a missing directory or an unreachable hub id.
    """
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tuneforge.models.load import check_model_source, hub_error, hub_kwargs, looks_local

    base = check_model_source(base, "MODEL")
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **hub_kwargs(base))
    except (OSError, ValueError) as exc:
        if looks_local(base):
            raise UserError(f"could not read the model config in {base}: {exc}") from exc
        raise hub_error(base, exc, "MODEL") from exc
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:  # not a causal LM (e.g. BERT): inspect the bare model
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    # Built on meta, tied embeddings are separate tensors until tied (they would be counted twice).
    model.tie_weights()
    return model


def inspect_model(source: str, method: str | None = None, trust_remote_code: bool = False) -> dict:
    """Everything ``tuneforge inspect`` prints, as a dict (see :func:`run_inspect`)."""
    from tuneforge.models.reference import resolve
    from tuneforge.models.targets import (
        GROUP_SPECS,
        linear_module_paths,
        linear_modules,
    )

    resolved = resolve(source, "MODEL")
    model = meta_model(resolved.base, trust_remote_code)
    info: dict[str, Any] = {
        "model": source,
        "base": resolved.base,
        "adapter": resolved.adapter,
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "groups": linear_modules(model),
        "paths": linear_module_paths(model),
        "targets": {spec: _try_resolve(model, spec) for spec in GROUP_SPECS},
    }
    if resolved.adapter is not None:
        adapter_config = resolved.adapter_config or {}
        info["adapter_type"] = adapter_config.get("peft_type")
        info["adapter_targets"] = adapter_config.get("target_modules")
    if resolved.stack:  # progressive LoRA: merged into the base, in this order, before the adapter
        info["stack"] = list(resolved.stack)
    if method:
        info["method"] = _method_targets(model, method)
    return info


def _method_targets(model: Any, name: str) -> dict:
    """What method ``name`` with its default config adapts on ``model`` (the method's own resolution)."""
    from tuneforge.methods import get_method, registrations

    method = get_method(name)
    cfg = registrations()[name].config(name=name)
    entry: dict[str, Any] = {"name": name, "target_modules": getattr(cfg, "target_modules", None)}
    resolved = _try_resolve(model, cfg, method.target_modules)
    if resolved is None:
        summary = type(method).__doc__.splitlines()[0].split(" (")[0].rstrip(".")  # e.g. "Trained key/value prefixes"
        entry["note"] = f"{'every parameter trains' if not method.is_adapter else summary}; no target modules"
    else:
        entry["resolved"] = resolved
    return entry


def _try_resolve(model: Any, spec: Any, resolve=None) -> list[str] | str:
    """``resolve(model, spec)`` (default: the group resolution), or why nothing matched."""
    from tuneforge.models.targets import resolve_target_modules

    try:
        return (resolve or resolve_target_modules)(model, spec)
    except UserError as exc:
        return f"(none: {exc})"


def _names(value: Any) -> str:
    if isinstance(value, str):
        return value
    return ", ".join(value) if value else "-"


def format_report(info: dict, show_paths: bool = False) -> str:
    """The text ``tuneforge inspect`` prints."""
    lines = [f"model: {info['model']}  ({info['architecture']}, model_type {info['model_type']})"]
    if info.get("adapter"):
        lines.append(f"adapter: {info['adapter']} ({info.get('adapter_type')}, targets "
                     f"{_names(info.get('adapter_targets') or [])}) on base {info['base']}")
    if info.get("stack"):
        lines.append(f"stack: {len(info['stack'])} earlier adapter(s) merged into the base first (method.continue_from)")
        lines.extend(f"  {i}. {path}" for i, path in enumerate(info["stack"], start=1))
    lines.append(f"parameters: {info['parameters']:,d}")
    total = sum(len(v) for v in info["paths"].values())
    lines.append(f"linear layers: {total} (lm_head excluded)")
    for group, names in info["groups"].items():
        lines.append(f"  {group:<10} ({len(info['paths'][group])} layers): {_names(names)}")
        if show_paths:
            lines.extend(f"      {path}" for path in info["paths"][group])
    lines.append("target_modules resolve to:")
    for spec, names in info["targets"].items():
        lines.append(f"  {spec:<10} -> {_names(names)}")
    method = info.get("method")
    if method:
        lines.append(f"method {method['name']}: target_modules {method['target_modules']!r}")
        if "resolved" in method:
            lines.append(f"  -> {_names(method['resolved'])}")
        if "note" in method:
            lines.append(f"  ({method['note']})")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.model, args.method, args.trust_remote_code)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info, args.paths))
    return 0
