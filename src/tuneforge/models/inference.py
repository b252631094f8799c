"""Load anything a user may point ``generate`` / ``serve`` / ``eval`` at, ready for inference.

Accepted: a tuneforge run directory (``config.yaml`` + ``final/``), a PEFT adapter directory, a plain Hugging Face
model directory, or a hub id. The base model, tokenizer and chat template are found without being told again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

log = logging.getLogger(__name__)

TEMPLATE_FILES = ("template.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class Loaded:
    """A model ready for inference.

    Attributes:
        model: in eval mode; a ``peft.PeftModel`` when an adapter was loaded.
        tokenizer: with a pad token.
        template: the ``ChatTemplate`` used in training (or the tokenizer's / auto one), ``None`` if unavailable.
        source: what the user gave.
        base: the base model directory or hub id (the model itself when there is no adapter).
        adapter: the adapter directory, or ``None``.
    """

    model: Any
    tokenizer: Any
    template: Any
    source: str
    base: str
    adapter: str | None = None


@dataclass
class Resolved:
    """Where the parts of a model are (no weights loaded): see :func:`resolve_source`."""

    source: str
    base: str
    adapter: str | None
    tokenizer: str
    template_dir: str | None
    run_dir: str | None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").exists() and (path / "final").is_dir()


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").exists()


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).exists() for f in TOKENIZER_FILES)


def _base_of_adapter(adapter: Path, run_dir: Path | None) -> str:
    """The base model of an adapter: ``base_model_name_or_path`` resolved as a path (as given, relative to the
    adapter or the run directory) when one exists, else ``<run>/base`` when present, else taken as a hub id."""
    from tuneforge.models.load import looks_local

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path") or ""
    candidates = [Path(base).expanduser(), adapter / base] if base else []
    if run_dir is not None:
        candidates += [run_dir / base] if base else []
        candidates.append(run_dir / "base")
    for candidate in candidates:
        if (candidate / "config.json").exists():
            return str(candidate)
    if not base:
        raise UserError(f"{adapter}/adapter_config.json has no base_model_name_or_path: cannot find the base model")
    if looks_local(base):
        raise UserError(
            f"the base model of adapter {adapter} ({base}, from adapter_config.json base_model_name_or_path) does "
            "not exist; restore it or edit base_model_name_or_path to point at the base model directory"
        )
    return base


def resolve_source(path_or_id: str, what: str = "the model path") -> Resolved:
    """Find the base model, adapter, tokenizer and template of what the user named (no weights are read).

    Raises:
        UserError: a path that does not exist or holds no model.
    """
    from tuneforge.models.load import check_model_source

    source = str(path_or_id)
    path = Path(source).expanduser()
    if path.is_dir() and is_run_dir(path):
        run_dir: Path | None = path
        final = path / "final"
    elif path.is_dir() and path.name == "final" and is_run_dir(path.parent):
        run_dir, final = path.parent, path
    else:
        run_dir, final = None, path
    if not path.exists():
        check_model_source(source, what)  # raises for local-looking paths
        return Resolved(source, source, None, source, None, None)
    if is_adapter_dir(final):
        base = _base_of_adapter(final, run_dir)
        tokenizer = str(final) if _has_tokenizer(final) else base
        adapter: str | None = str(final)
    elif (final / "config.json").exists():
        base, adapter, tokenizer = str(final), None, str(final)
    else:
        where = f"{final} (the run's final/ directory)" if run_dir else str(final)
        raise UserError(
            f"{where} holds no model: expected adapter_config.json (a PEFT adapter) or config.json (a model). "
            "Did the training run finish?"
        )
    template_dir = next((str(d) for d in (final, run_dir) if d is not None
                         and any((d / f).exists() for f in TEMPLATE_FILES)), None)
    return Resolved(source, base, adapter, tokenizer, template_dir, str(run_dir) if run_dir else None)


def load_template(template_dir: str | None, tokenizer: Any):
    """The run's saved ``ChatTemplate`` when there is one, else ``resolve_template("auto", tokenizer)``;
    ``None`` when the templates package is unavailable or no template applies."""
    try:
        from tuneforge.data.templates import ChatTemplate, resolve_template
    except ImportError:
        log.warning("tuneforge.data.templates is not available: generating without a chat template")
        return None
    if template_dir is not None:
        template = ChatTemplate.load(template_dir)
        if template is not None:
            return template
    try:
        return resolve_template("auto", tokenizer)
    except UserError as exc:
        log.warning("no chat template: %s", exc)
        return None


def load_for_inference(path_or_id: str, device: str = "auto", dtype: Any = None) -> Loaded:
    """Load a model, its tokenizer and chat template for generation.

    Args:
        path_or_id: a run directory, a run's ``final/``, a PEFT adapter directory, an HF model directory or a
            hub id.
        device: ``auto``, ``cpu``, ``cuda``...
        dtype: a ``torch.dtype``; default: ``resolve_dtype("auto", device)``.

    Returns:
        :class:`Loaded` with the model in eval mode on ``device``. An adapter is loaded with stock
        ``peft.PeftModel.from_pretrained`` onto its base (not merged), so the logits are those of training.

    Raises:
        UserError: missing paths, an unfinished run, a base model that cannot be found.
    """
    from tuneforge.models.device import resolve_device, resolve_dtype
    from tuneforge.models.load import _from_pretrained, check_model_source, load_tokenizer

    resolved = resolve_source(path_or_id, str(path_or_id))
    device = resolve_device(device)
    dtype = dtype or resolve_dtype("auto", device)
    tokenizer = load_tokenizer(resolved.tokenizer, what=str(path_or_id))
    model = _from_pretrained(check_model_source(resolved.base, str(path_or_id)), dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    if resolved.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, resolved.adapter)
    model.to(device)
    model.eval()
    template = load_template(resolved.template_dir, tokenizer)
    return Loaded(model=model, tokenizer=tokenizer, template=template, source=str(path_or_id),
                  base=resolved.base, adapter=resolved.adapter)
