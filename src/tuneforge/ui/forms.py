"""The new-run form, generated from the run config's pydantic JSON schema, and what it computes.

Fields are the schema's keys (dotted, e.g. ``train.lr``) with the schema's default, allowed values and help; a
value typed into a field is parsed exactly like a CLI override (``train.lr=1e-4``) and the whole config is
validated by :func:`tuneforge.config.validate_config` — so the messages are the ones ``tuneforge validate``
prints, naming the key. Paths (data files, output directory, a local model) must lie under ``--runs`` or a
``--data-root``.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.ui.security import Roots

#: human labels; the dotted key is always appended ("Learning rate (train.lr)")
LABELS = {
    "run_name": "Run name", "seed": "Seed", "stage": "Stage", "output_dir": "Output directory",
    "model.name_or_path": "Base model (hub id or local directory)", "model.chat_template": "Chat template",
    "model.precision": "Precision", "model.device": "Device",
    "model.from_config.architecture": "Architecture", "model.from_config.hidden_size": "Hidden size",
    "model.from_config.num_layers": "Layers", "model.from_config.num_heads": "Attention heads",
    "model.from_config.vocab_size": "Vocabulary size",
    "method.name": "Method", "method.r": "Rank", "method.alpha": "Alpha", "method.dropout": "Dropout",
    "method.target_modules": "Target modules",
    "data.train": "Training data files", "data.eval": "Evaluation data file", "data.eval_split": "Eval split",
    "data.format": "Data format", "data.max_length": "Max length (tokens)", "data.packing": "Packing",
    "train.epochs": "Epochs", "train.max_steps": "Max steps", "train.batch_size": "Batch size",
    "train.grad_accum": "Gradient accumulation", "train.lr": "Learning rate", "train.scheduler": "LR scheduler",
    "train.warmup_ratio": "Warmup ratio", "train.warmup_steps": "Warmup steps", "train.weight_decay": "Weight decay",
    "train.max_grad_norm": "Max gradient norm", "train.optim": "Optimizer",
    "train.gradient_checkpointing": "Gradient checkpointing", "train.logging_steps": "Logging steps",
    "train.eval_steps": "Eval steps", "train.save_steps": "Save steps", "train.report_to": "Report to",
    "train.memory_budget_gb": "Memory budget (GiB)",
}

#: help for keys whose schema field carries no description
HELP = {
    "run_name": "names the run directory (runs/<run_name>)",
    "seed": "random seed for data order, initialisation and dropout",
    "stage": "pt: causal LM on raw text · sft: loss on assistant answers only · dpo/orpo/kto/simpo: preference "
             "pairs · grpo: reinforcement with rewards",
    "model.name_or_path": "a hub id (Qwen/Qwen2.5-0.5B), a local model directory or a .gguf file; leave empty "
                          "to build a model from the architecture numbers below",
    "model.chat_template": "auto: the tokenizer's own; or chatml, llama3, alpaca, plain …",
    "model.precision": "auto: bf16 on a GPU that supports it, fp32 on CPU",
    "method.name": "how the model is fine-tuned; the fields below change with the method",
    "method.r": "adapter rank: more capacity and memory with a larger r",
    "method.alpha": "adapter scale (the update is multiplied by alpha / r)",
    "method.target_modules": "attention | mlp | all-linear | explicit module names",
    "data.train": "training files (comma-separated): text, alpaca, chat/ShareGPT, csv, parquet",
    "data.eval": "a held-out file evaluated every train.eval_steps",
    "data.eval_split": "or: the share of the training records held out for evaluation",
    "data.max_length": "longer samples are truncated (and counted in the data statistics)",
    "data.packing": "pack samples into rows of max_length (no padding, attention kept per sample)",
    "train.epochs": "passes over the data (train.max_steps wins when set)",
    "train.max_steps": "optimizer steps to train (overrides epochs)",
    "train.batch_size": "samples (or packed rows) per device per step",
    "train.grad_accum": "micro-batches accumulated per optimizer step",
    "train.lr": "peak learning rate",
    "train.warmup_ratio": "share of the steps spent warming the learning rate up",
    "train.eval_steps": "evaluate every N steps (needs data.eval or data.eval_split)",
    "train.save_steps": "write a complete checkpoint every N steps (what --resume and Stop use)",
    "train.memory_budget_gb": "GPU memory to plan for (method auto and the estimate use it)",
}

#: schema sections whose nested options are edited as YAML in "Other keys" (too deep for one field each)
NESTED_AS_YAML = ("preference", "grpo", "distributed", "train.monitor", "train.retention", "train.distill",
                  "data.mix", "data.clean", "model.chat_template_kwargs", "model.rope_scaling", "method.per_task")


@dataclass
class Field:
    key: str
    label: str
    widget: str               # text | number | select | checkbox | list
    default: Any = None
    choices: list | None = None
    help: str = ""
    section: str = ""
    method: str | None = None  # the method this field belongs to (shown only when it is chosen)
    required: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def schema() -> dict:
    from tuneforge.config import RunConfig

    return RunConfig.model_json_schema()


def _deref(node: dict, defs: dict) -> dict:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _non_null(node: dict, defs: dict) -> tuple[dict, bool]:
    """The non-null branch of ``anyOf [X, null]`` and whether null is allowed."""
    options = node.get("anyOf")
    if not options:
        return _deref(node, defs), False
    real = [o for o in options if o.get("type") != "null"]
    nullable = len(real) < len(options)
    if len(real) == 1:
        return _deref(real[0], defs), nullable
    return {"anyOf": real}, nullable


def _describe(node: dict, nullable: bool) -> str:
    bits = []
    for word, key in (("≥", "minimum"), (">", "exclusiveMinimum"), ("≤", "maximum"), ("<", "exclusiveMaximum")):
        if key in node:
            bits.append(f"{word} {node[key]}")
    if nullable:
        bits.append("empty: not set")
    return ", ".join(bits)


def _label(key: str) -> str:
    human = LABELS.get(key) or key.rsplit(".", 1)[-1].replace("_", " ").capitalize()
    return f"{human} ({key})"


def _field(key: str, node: dict, defs: dict, section: str, method: str | None, required: bool) -> Field | None:
    default = node.get("default")
    inner, nullable = _non_null(node, defs)
    kind = inner.get("type")
    choices = inner.get("enum")
    if "const" in inner:
        choices = [inner["const"]]
    if "anyOf" in inner:  # e.g. Literal["auto"] | bool, or str | list[str]
        branches = [_deref(b, defs) for b in inner["anyOf"]]
        if all("enum" in b or "const" in b or b.get("type") == "boolean" for b in branches):
            choices = []
            for b in branches:
                choices += b.get("enum") or ([b["const"]] if "const" in b else [True, False])
        kind = "list" if any(b.get("type") == "array" for b in branches) else "text"
    if kind == "object" and "properties" not in inner:
        return None  # free-form mapping: edited in "Other keys"
    help_text = node.get("description") or inner.get("description") if kind != "object" else node.get("description")
    help_text = help_text or HELP.get(key, "")
    extra = _describe(inner, nullable)
    if choices is not None:
        widget = "select"
        if nullable and None not in choices:
            choices = [*choices, None]
    elif kind == "boolean":
        widget = "checkbox"
    elif kind in ("integer", "number"):
        widget = "number"
    elif kind == "array":
        widget = "list"
        items = _deref(inner.get("items", {}), defs)
        if "enum" in items:
            extra = ", ".join(["one or more of: " + ", ".join(map(str, items["enum"]))] + ([extra] if extra else []))
    else:
        widget = "text"
    if extra:
        help_text = f"{help_text} ({extra})" if help_text else extra
    return Field(key=key, label=_label(key), widget=widget, default=default, choices=choices, help=help_text,
                 section=section, method=method, required=required)


def _walk(prefix: str, node: dict, defs: dict, section: str, method: str | None, out: list[Field]) -> None:
    node = _deref(node, defs)
    required = set(node.get("required", []))
    for name, prop in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        if key in NESTED_AS_YAML or (method and name == "name"):
            continue
        inner, _ = _non_null(prop, defs)
        if inner.get("type") == "object" and "properties" in inner:
            _walk(f"{key}.", inner, defs, section, method, out)
            continue
        field = _field(key, prop, defs, section, method, name in required)
        if field:
            out.append(field)


def form_fields() -> dict:
    """Fields of the new-run form: ``{"sections": {name: [field, ...]}, "methods": [...]}``.

    The method section lists ``method.name`` first, then every method's own fields tagged with the method.
    """
    doc = schema()
    defs = doc["$defs"]
    props = doc["properties"]
    sections: dict[str, list[Field]] = {"run": [], "model": [], "method": [], "data": [], "train": []}
    for name in ("run_name", "seed", "stage"):
        sections["run"].append(_field(name, props[name], defs, "run", None, False))
    _walk("model.", props["model"], defs, "model", None, sections["model"])
    method = props["method"]
    mapping = method["discriminator"]["mapping"]
    names = sorted(mapping)
    sections["method"].append(Field(key="method.name", label=_label("method.name"), widget="select", default="lora",
                                    choices=names, help=HELP["method.name"], section="method", required=True))
    for name in names:
        _walk("method.", defs[mapping[name].rsplit("/", 1)[-1]], defs, "method", name, sections["method"])
    _walk("data.", props["data"], defs, "data", None, sections["data"])
    _walk("train.", props["train"], defs, "train", None, sections["train"])
    return {"sections": {k: [f.to_json() for f in v] for k, v in sections.items()}, "methods": names}


# --------------------------------------------------------------------------- values → config


def _value(text: Any, widget: str) -> Any:
    """A field's text parsed as a CLI override would be (YAML; ``1e-4`` is a number)."""
    from tuneforge.config.load import parse_override

    if isinstance(text, (bool, int, float)) or text is None:
        return text
    text = str(text).strip()
    if widget == "list" and text and not text.startswith("["):
        return [part.strip() for part in text.split(",") if part.strip()]
    if text == "":
        return None
    return parse_override(f"x={text}")[1]


def raw_config(values: dict[str, Any], widgets: dict[str, str] | None = None, extra_yaml: str = "") -> dict:
    """Nested raw config from ``{"train.lr": "1e-4", ...}`` (fields left at their default are not sent) plus the
    "Other keys" YAML."""
    import yaml

    raw: dict[str, Any] = {}
    if extra_yaml and extra_yaml.strip():
        try:
            extra = yaml.safe_load(extra_yaml)
        except yaml.YAMLError as exc:
            raise UserError(f"other keys: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if extra is not None and not isinstance(extra, dict):
            raise UserError("other keys: expected a YAML mapping (key: value)")
        raw = _merge(raw, extra or {})
    widgets = widgets or {}
    for key, text in values.items():
        value = _value(text, widgets.get(key, "text"))
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part), dict) or part not in node else node[part]
        node[parts[-1]] = value
    return raw


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


_KEY_IN_LINE = re.compile(r"^(?:unknown key '(?P<u>[\w.]+)'|missing required key '(?P<m>[\w.]+)'|(?P<k>[\w.]+):)")


def split_messages(message: str) -> list[dict]:
    """``tuneforge validate``'s message → ``[{"key", "message"}]`` (one per ``- `` line)."""
    lines = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
    if not lines:
        lines = [message]
    out = []
    for line in lines:
        match = _KEY_IN_LINE.match(line)
        key = (match.group("u") or match.group("m") or match.group("k")) if match else ""
        out.append({"key": key, "message": line})
    return out


def confine_paths(raw: dict, roots: Roots) -> list[dict]:
    """Errors for every path in the config that lies outside the allowed roots (and output_dir outside --runs)."""
    errors = []
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    train = data.get("train")
    files = train if isinstance(train, list) else [train] if isinstance(train, str) else []
    for index, item in enumerate(files):
        source = item.get("path") if isinstance(item, dict) else item
        if isinstance(source, str) and _looks_local(source):
            _check(errors, roots, source, f"data.train[{index}]" if len(files) > 1 else "data.train")
    if isinstance(data.get("eval"), str) and _looks_local(data["eval"]):
        _check(errors, roots, data["eval"], "data.eval")
    if raw.get("output_dir"):
        _check(errors, roots, str(raw["output_dir"]), "output_dir", runs_only=True)
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    if isinstance(model.get("name_or_path"), str) and _looks_local(model["name_or_path"], hub_like=True):
        _check(errors, roots, model["name_or_path"], "model.name_or_path")
    return errors


def _looks_local(value: str, hub_like: bool = False) -> bool:
    """A path rather than a hub name: absolute, ``./``/``~``, an existing file, or (data) any file-like name."""
    if value.startswith(("/", ".", "~")) or Path(value).exists():
        return True
    if hub_like:
        return False  # "org/name" is a hub id
    return bool(Path(value).suffix) or "/" in value and not re.fullmatch(r"[\w.-]+/[\w.-]+", value)


def _check(errors: list, roots: Roots, value: str, key: str, runs_only: bool = False) -> None:
    try:
        roots.confine(value, key, runs_only=runs_only)
    except UserError as exc:
        errors.append({"key": key, "message": str(exc)})


def resolve_paths(raw: dict) -> dict:
    """Relative data/model paths made absolute (the job runs with the same working directory, but the written
    config should mean the same thing wherever it is read)."""
    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("train"), list):
            data["train"] = [str(Path(p).resolve()) if isinstance(p, str) and _looks_local(p) else p
                             for p in data["train"]]
        if isinstance(data.get("eval"), str) and _looks_local(data["eval"]):
            data["eval"] = str(Path(data["eval"]).resolve())
    return raw


def check(values: dict, widgets: dict, extra_yaml: str, roots: Roots) -> dict:
    """Validate the form: ``{"ok", "errors": [{key, message}], "yaml", "config"}``.

    ``output_dir`` defaults to ``<runs>/<run_name>`` so the run lands where the UI lists it.
    """
    import yaml

    from tuneforge.config import validate_config

    try:
        raw = raw_config(values, widgets, extra_yaml)
    except UserError as exc:
        return {"ok": False, "errors": split_messages(str(exc)), "yaml": "", "config": None}
    raw.setdefault("run_name", "run")
    if not raw.get("output_dir") and isinstance(raw.get("run_name"), str):
        raw["output_dir"] = str(roots.runs_dir / raw["run_name"])
    errors = confine_paths(raw, roots)
    raw = resolve_paths(raw)
    text = yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
    try:
        cfg = validate_config(raw, source="form")
    except UserError as exc:
        return {"ok": False, "errors": errors + split_messages(str(exc)), "yaml": text, "config": raw}
    return {"ok": not errors, "errors": errors, "yaml": text, "config": raw, "_cfg": cfg}


# --------------------------------------------------------------------------- estimate and preview


def estimate(cfg: Any, gpu_mem: float | None) -> dict:
    """The memory bill of the config (as ``tuneforge estimate CONFIG``) and, with a budget, the recommendation."""
    from tuneforge.estimate.bill import GiB, estimate_memory
    from tuneforge.estimate.choose import recommend, setup_from_run
    from tuneforge.estimate.spec import model_spec

    device = "cuda" if gpu_mem else None
    try:
        source, setup = setup_from_run(cfg, device=device)
        spec = model_spec(source)
        bill = estimate_memory(spec, setup).to_json()
    except UserError as exc:
        return {"error": str(exc)}
    out: dict[str, Any] = {"bill": bill}
    if gpu_mem:
        out["fits"] = bill["total_bytes"] <= gpu_mem * GiB * 0.9
        try:
            rec = recommend(spec, gpu_mem, seq_len=cfg.data.max_length,
                            target_batch=cfg.train.batch_size * cfg.train.grad_accum, device="cuda")
            out["recommendation"] = json.loads(json.dumps(rec.to_json(), default=str))
        except UserError as exc:
            out["recommendation_error"] = str(exc)
    return out


def preview(config_yaml: str, folder: Path, n: int = 3) -> str:
    """``tuneforge data preview`` of the config, as HTML: supervised tokens in ``<mark>``."""
    import html
    import tempfile

    from tuneforge.commands.preview import CLOSE, OPEN, run_preview

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=folder, delete=False, encoding="utf-8") as handle:
        handle.write(config_yaml)
        path = handle.name
    out = io.StringIO()
    try:
        run_preview(path, n=n, out=out)
    finally:
        Path(path).unlink(missing_ok=True)
    raw = out.getvalue().replace(f"between {OPEN} and {CLOSE}", "highlighted")  # the header names the markers
    text = html.escape(raw, quote=False)
    return text.replace(html.escape(OPEN), "<mark>").replace(html.escape(CLOSE), "</mark>")
