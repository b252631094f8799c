"""Load the model and tokenizer a run config names: a local directory, a hub id, or ``from_config``."""

from __future__ import annotations

import functools
import logging
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tuneforge.errors import UserError

log = logging.getLogger(__name__)

# Tokens that are pads in well-known vocabularies (used when the tokenizer has no pad token set).
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>", "<|padding|>")


def looks_local(name: str) -> bool:
    """Whether ``name`` is written as a filesystem path rather than a hub id (``org/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or (os.sep != "/" and os.sep in name)
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def check_model_source(name: str, what: str = "model.name_or_path") -> str:
    """Return ``name`` (``~`` expanded when it is a path) after checking that a local path exists.

    Raises:
        UserError: ``local model path does not exist: ...`` for a path-like name that is not on disk, or a
            directory without ``config.json`` / ``adapter_config.json``.
    """
    if not looks_local(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        shown = f"{name} ({path})" if name.startswith("~") else name
        raise UserError(f"local model path does not exist: {shown} (given as {what}; give a model directory "
                        "or a hub id)")
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
        raise UserError(f"{path} (from {what}) is not a model directory: it has no config.json")
    return str(path)


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached (``False`` at once when ``HF_HUB_OFFLINE`` is set).

    Why: without a network, huggingface_hub retries each request with back-off (~30 s) before failing; one
    quick TCP probe lets us go straight to the local cache (``local_files_only``) instead.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def hub_kwargs(name: str) -> dict:
    """``{"local_files_only": True}`` for a hub id when the hub is unreachable (use the cache only), else ``{}``."""
    return {} if looks_local(name) or hub_reachable() else {"local_files_only": True}


def hub_error(name: str, exc: Exception, what: str = "model.name_or_path") -> UserError:
    """A :class:`UserError` for a hub id that could not be fetched (offline, wrong id, gated)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(
        f"{name!r} ({what}) is not a local directory and could not be loaded from the Hugging Face hub: the hub "
        f"is unreachable or the id is wrong ({first}). Give a local model directory instead, or check the id "
        f"and your network / HF_HUB_OFFLINE."
    )


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give ``tokenizer`` a pad token if it has none, and set right padding (the training side).

    Preference: an existing dedicated pad token in the vocabulary, then the unknown token, then EOS. Using EOS
    as pad is safe with tuneforge's collators (labels come from the attention mask, so EOS keeps its label);
    it is logged. A tokenizer with none of these gets a new ``<|pad|>`` token (the caller must resize the
    embeddings: :func:`load_model` does).
    """
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for candidate in PAD_CANDIDATES:
        if candidate in vocab:
            tokenizer.pad_token = candidate
            log.info("tokenizer has no pad token: using its %s", candidate)
            return tokenizer
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        log.info("tokenizer has no pad token: using its unk token %s", tokenizer.unk_token)
    elif tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "tokenizer has no pad token: using EOS %s as pad (EOS labels are kept: the collators mask padding "
            "by the attention mask, not by token id)", tokenizer.eos_token,
        )
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        log.info("tokenizer has no pad, unk or eos token: added <|pad|>")
    return tokenizer


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False,
                   what: str = "model.tokenizer"):
    """Load a tokenizer (local dir or hub id) with a pad token and right padding (see :func:`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    source = check_model_source(name, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code,
                                                  **hub_kwargs(source))
    except (OSError, ValueError) as exc:
        if looks_local(source):
            raise UserError(f"could not load a tokenizer from {source} ({what}): {exc}") from exc
        raise hub_error(source, exc, what) from exc
    return ensure_pad_token(tokenizer)


def load_model(model_cfg: Any, *, texts: Iterable[str] | None = None, extra_kwargs: dict | None = None,
               device: str | None = None, dtype: Any = None):
    """Load (or build) the model and tokenizer described by ``model_cfg`` (a ``ModelConfig``).

    Args:
        model_cfg: the run's ``model`` section.
        texts: training text, needed only for ``from_config`` without a tokenizer (a BPE tokenizer of
            ``from_config.vocab_size`` is trained on it).
        extra_kwargs: extra ``from_pretrained`` kwargs from the method (e.g. ``quantization_config``). With a
            ``quantization_config`` and no ``device_map``, the whole model is placed on the resolved device.
        device: overrides ``model_cfg.device``.
        dtype: overrides ``model_cfg.precision``.

    Returns:
        ``(model, tokenizer)``: the model on the resolved device and dtype (quantized layers keep their
        storage type), the tokenizer with a pad token and right padding.

    Raises:
        UserError: missing local path, unreachable hub id, ``from_config`` without text or tokenizer.
    """
    from tuneforge.models.device import resolve_device, resolve_dtype

    device = device or resolve_device(model_cfg.device)
    dtype = dtype or resolve_dtype(model_cfg.precision, device)
    extra = dict(extra_kwargs or {})
    quantized = extra.get("quantization_config") is not None
    if quantized:
        extra.setdefault("device_map", {"": device})

    if model_cfg.from_config is not None:
        tokenizer = _from_config_tokenizer(model_cfg, texts)
        model = _build_from_config(model_cfg, tokenizer, dtype, extra)
    else:
        name = check_model_source(model_cfg.name_or_path)
        tokenizer = load_tokenizer(model_cfg.tokenizer or name, revision=model_cfg.revision,
                                   trust_remote_code=model_cfg.trust_remote_code,
                                   what="model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")
        model = load_pretrained(name, dtype=dtype, revision=model_cfg.revision,
                                 trust_remote_code=model_cfg.trust_remote_code,
                                 attn_implementation=model_cfg.attn_implementation, **extra)

    if len(tokenizer) > model.get_input_embeddings().weight.shape[0] and not quantized:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantized:
        from tuneforge.models.quant import keep_cpu_weights_trainable

        keep_cpu_weights_trainable(model)  # eval and train forwards must use the same (differentiable) kernel
    else:
        model.to(device=device, dtype=dtype)
    return model, tokenizer


def load_pretrained(name: str, **kwargs):
    """THE weights loader: ``AutoModelForCausalLM.from_pretrained(name, **kwargs)`` (``None`` values dropped; the
    local cache only when the hub is unreachable), with failures turned into a :class:`UserError`."""
    from transformers import AutoModelForCausalLM

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs, **hub_kwargs(name))
    except OSError as exc:
        if looks_local(name):
            raise UserError(f"could not load a model from {name}: {exc}") from exc
        raise hub_error(name, exc) from exc


def _from_config_tokenizer(model_cfg: Any, texts: Iterable[str] | None):
    from tuneforge.models.tokenizer import train_tokenizer

    fc = model_cfg.from_config
    source = fc.tokenizer or model_cfg.tokenizer
    if source:
        return load_tokenizer(source, what="model.from_config.tokenizer")
    if texts is None:
        raise UserError(
            "model.from_config needs training text to train its tokenizer (none was given), or set "
            "model.from_config.tokenizer to an existing tokenizer"
        )
    texts = [t for t in texts if t]
    if not texts:
        raise UserError("model.from_config: no training text to train the tokenizer on (data.train is empty)")
    return ensure_pad_token(train_tokenizer(texts, vocab_size=fc.vocab_size))


def _build_from_config(model_cfg: Any, tokenizer: Any, dtype: Any, extra: dict):
    from tuneforge.models.build import build_model

    if extra.get("quantization_config") is None:
        return build_model(model_cfg.from_config, tokenizer, dtype=dtype)
    # Quantized loading only exists in from_pretrained: save the fresh model, then reload it quantized.
    model = build_model(model_cfg.from_config, tokenizer, dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="tuneforge-build-") as tmp:
        model.save_pretrained(tmp)
        del model
        return load_pretrained(tmp, dtype=dtype, **extra)
