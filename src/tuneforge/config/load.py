"""Load a run config from YAML, apply dotted overrides, validate, and explain errors in plain words."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.methods import METHOD_CONFIGS
from tuneforge.config.retention import RETENTION_CONFIGS
from tuneforge.config.schema import METHOD_NAMES, RunConfig
from tuneforge.errors import UserError, did_you_mean
from tuneforge.utils import load_yaml


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``train.lr=1e-4`` into (``["train", "lr"]``, ``0.0001``); the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' is not of the form key.path=value (e.g. train.lr=1e-4)")
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads '1e-4' as a string (it wants '1.0e-4'); users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def set_dotted(raw: dict, key: str | list[str], value: Any) -> None:
    """Set the dotted ``key`` (``"train.lr"`` or its parts) of the mapping ``raw`` in place to a copy of ``value``,
    creating sections as needed (a non-mapping on the way is replaced by one). Overrides and search trials share it."""
    path = key.split(".") if isinstance(key, str) else list(key)
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = copy.deepcopy(value)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with every ``a.b.c=value`` override set (creating sections as needed)."""
    data = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(data, path, value)
    return data


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with file/line in the error when it does not parse."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config must be a YAML mapping (key: value), got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config.

    A config without ``run_name`` is named after its file (``configs/sft-small.yaml`` → ``sft-small``, so it writes
    ``runs/sft-small``): two configs never share one run directory by default.

    Raises:
        UserError: naming the key, the bad value and what is allowed.
    """
    raw = apply_overrides(read_yaml(path), overrides or [])
    if "run_name" not in raw:
        raw["run_name"] = Path(path).stem
    return validate_config(raw, source=str(path))


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a mapping as a :class:`RunConfig`, turning pydantic errors into one readable message."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [explain_error(err, raw) for err in exc.errors()]
        unique = list(dict.fromkeys(lines))
        raise UserError(f"{source}: invalid config\n" + "\n".join(f"  - {line}" for line in unique)) from None


#: discriminated unions of the schema: path → (the tag key, what a tag names, the tags)
UNIONS = {
    ("method",): ("name", "method", METHOD_NAMES),
    ("train", "retention"): ("method", "retention term", tuple(sorted(RETENTION_CONFIGS))),
}


_UNION_CLASSES = {"method": METHOD_CONFIGS, "retention term": RETENTION_CONFIGS}


def explain_error(err: dict, raw: dict) -> str:
    """One line for one pydantic error: key path, bad value, what is allowed."""
    loc = [str(p) for p in err["loc"]]
    union = None
    for path, spec in UNIONS.items():
        if tuple(loc[:len(path)]) == path:
            union = (path, *spec)
            # Discriminated unions put the tag in the path ('method.lora.r'): drop it.
            if len(loc) > len(path) and loc[len(path)] in spec[2]:
                loc = [*loc[:len(path)], *loc[len(path) + 1:]]
    key = ".".join(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{key}'{_suggest_key(loc[-1], _known_keys(loc[:-1], raw))}"
    if kind in ("union_tag_invalid", "union_tag_not_found") and union is not None:
        path, tag, what, tags = union
        where = ".".join((*path, tag))
        if kind == "union_tag_not_found":
            return f"{where}: missing; known {what}s: {', '.join(tags)}"
        given = err.get("input", {}).get(tag) if isinstance(err.get("input"), dict) else err.get("input")
        return f"{where}: unknown {what} {given!r}{did_you_mean(str(given), tags)}; known: {', '.join(tags)}"
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return f"{key}: {err.get('input')!r} is not allowed; expected {allowed}{did_you_mean(str(err.get('input')), _literal_options(allowed))}"
    if kind == "missing":
        return f"missing required key '{key}'"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], dict) and key:
        return f"{key}: {msg} (got {err['input']!r})"
    return f"{key}: {msg}" if key else msg


# Names users bring from the HF Trainer, peft or the tutorials, mapped to ours.
KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
    "lr_scheduler_type": "scheduler", "warmup": "warmup_steps", "lora_r": "r", "rank": "r",
    "lora_alpha": "alpha", "lora_dropout": "dropout", "max_seq_length": "max_length", "seq_len": "max_length",
    "model_name_or_path": "name_or_path", "model_name": "name_or_path", "save_total_limits": "save_total_limit",
}


def _suggest_key(word: str, known: list[str]) -> str:
    hint = did_you_mean(word, known)
    if hint:
        return hint
    alias = did_you_mean(word, KEY_ALIASES)
    if alias:
        target = KEY_ALIASES[alias.split("'")[1]]
        if target in known:
            return f" — did you mean '{target}'?"
    return f"; allowed here: {', '.join(known)}" if known else ""


def _literal_options(expected: str) -> list[str]:
    return [part.strip().strip("'\"") for part in expected.replace(" or ", ",").split(",") if part.strip()]


def _known_keys(parent: list[str], raw: dict) -> list[str]:
    """The field names allowed at ``parent`` (a path into the RunConfig)."""
    model: type[BaseModel] | None = RunConfig
    node: Any = raw
    for i, part in enumerate(parent):
        node = node.get(part) if isinstance(node, dict) else None
        if model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        union = UNIONS.get(tuple(parent[:i + 1]))
        if union is not None:  # the class the tag picks (a method section defaults to lora)
            tag = node.get(union[0], "lora" if union[1] == "method" else None) if isinstance(node, dict) else None
            model = _UNION_CLASSES[union[1]].get(tag) if isinstance(tag, str) else None
            continue
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what is saved in the run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
