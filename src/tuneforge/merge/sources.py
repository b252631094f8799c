"""What a merge/export argument points at: a tuneforge run, a PEFT adapter, or a plain HF model directory.

Nothing here imports torch: it reads JSON/YAML metadata only, so a wrong path fails at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tuneforge.errors import UserError

# peft types whose adapters `merge_and_unload` can fold into the base weights (prompt-learning types cannot).
_MERGEABLE_PEFT_TYPES = {"LORA", "ADALORA", "IA3", "VERA", "LOHA", "LOKR", "OFT", "BOFT", "FOURIERFT", "HRA"}
TEMPLATE_FILES = ("chat_template.jinja", "template.json")


@dataclass
class Source:
    """A resolved model source.

    Attributes:
        given: the argument as the user wrote it.
        kind: ``"adapter"`` (a PEFT adapter directory) or ``"model"`` (a full HF model directory).
        model_dir: the directory holding the weights (``final/`` for a run).
        run_dir: the run directory when the argument was a tuneforge run, else None.
        base: for adapters, the base model directory or hub id the adapter was trained on.
        method: the run's ``method.name`` when known (from ``config.yaml``).
        adapter_config: the parsed ``adapter_config.json`` for adapters.
    """

    given: str
    kind: str
    model_dir: Path
    run_dir: Path | None = None
    base: str | None = None
    method: str | None = None
    adapter_config: dict | None = None

    @property
    def peft_type(self) -> str | None:
        return (self.adapter_config or {}).get("peft_type")

    def template_dir(self) -> Path | None:
        """The directory holding ``template.json``/``chat_template.jinja`` for this source, if any."""
        for folder in (self.model_dir, self.run_dir):
            if folder and any((folder / name).is_file() for name in TEMPLATE_FILES):
                return folder
        return None


def resolve_source(path: str | Path, *, base_override: str | None = None) -> Source:
    """Resolve a run directory, adapter directory or model directory.

    Args:
        path: a tuneforge run directory (``config.yaml`` + ``final/``), a PEFT adapter directory
            (``adapter_config.json``) or an HF model directory (``config.json``).
        base_override: for adapters, use this base model instead of the one recorded in the adapter.

    Raises:
        UserError: the path does not exist or is none of the above.
    """
    given = str(path)
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"{given}: no such run, adapter or model directory")
    run_dir = None
    method = None
    if folder.is_dir() and (folder / "final").is_dir():
        run_dir = folder
        method = _run_method(folder)
        folder = folder / "final"
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        config = _read_json(folder / "adapter_config.json")
        base = base_override or config.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{folder}/adapter_config.json names no base_model_name_or_path; pass --base DIR")
        return Source(given, "adapter", folder, run_dir, _resolve_base(base, run_dir), method, config)
    if folder.is_dir() and (folder / "config.json").is_file():
        return Source(given, "model", folder, run_dir, None, method)
    hint = " (a run whose training has not finished has no final/)" if (Path(path) / "config.yaml").is_file() else ""
    raise UserError(
        f"{given}: not a tuneforge run (config.yaml + final/), a PEFT adapter (adapter_config.json) "
        f"or an HF model directory (config.json){hint}"
    )


def check_mergeable(source: Source) -> None:
    """Raise UserError unless ``source`` is an adapter that can be folded into its base.

    The run's method (``tuneforge.methods.base.get_method(name).mergeable``) decides when known; otherwise the
    adapter's ``peft_type``.
    """
    if source.kind != "adapter":
        what = f"method {source.method!r} " if source.method else ""
        raise UserError(
            f"{source.given}: {what}saved a full model, not an adapter: there is nothing to merge "
            "(use the directory as it is, or `tuneforge merge recipe.yaml` to merge several models)"
        )
    mergeable = None
    if source.method:
        try:
            from tuneforge.methods.base import get_method

            mergeable = bool(get_method(source.method).mergeable)
        except (ModuleNotFoundError, UserError):  # method module not built yet: fall back on the peft type
            mergeable = None
    if mergeable is None:
        mergeable = source.peft_type in _MERGEABLE_PEFT_TYPES
    if not mergeable:
        name = source.method or source.peft_type
        raise UserError(
            f"{source.given}: a {name} adapter cannot be merged into the base weights (it adds virtual tokens or "
            "extra computation rather than a weight delta); serve it as an adapter with `tuneforge serve` instead"
        )


def quantization_of(model_dir: str | Path) -> dict | None:
    """The ``quantization_config`` stored in a model directory's ``config.json``, or None."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    return _read_json(config).get("quantization_config")


def _run_method(run_dir: Path) -> str | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{config}: not valid YAML ({exc})") from None
    method = data.get("method") if isinstance(data, dict) else None
    return method.get("name") if isinstance(method, dict) else None


def _resolve_base(base: str, run_dir: Path | None) -> str:
    """A recorded base path: as written if it exists, else relative to the run dir, else as a hub id."""
    if Path(base).exists():
        return str(Path(base).resolve())
    if run_dir is not None and (run_dir / base).exists():
        return str((run_dir / base).resolve())
    if run_dir is not None and (run_dir / "base").is_dir():  # a from-config base saved beside its adapter
        return str((run_dir / "base").resolve())
    return base


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data
