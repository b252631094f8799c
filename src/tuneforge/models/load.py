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
    from tuneforge.models.gguf import gguf_path_of, materialize

    gguf = gguf_path_of(path)  # a .gguf file (or a folder holding one): its cached plain HF conversion
    if gguf is not None:
        return str(materialize(gguf, what))
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "adapter_config.json")):
        raise UserError(f"{path} (from {what}) is not a model directory: it has no config.json (or one .gguf file)")
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
               device: str | None = None, dtype: Any = None, max_length: int | None = None,
               head: str = "causal_lm"):
    """Load (or build) the model and tokenizer described by ``model_cfg`` (a ``ModelConfig``).

    Args:
        model_cfg: the run's ``model`` section.
        texts: training text, needed only for ``from_config`` without a tokenizer (a BPE tokenizer of
            ``from_config.vocab_size`` is trained on it).
        extra_kwargs: extra ``from_pretrained`` kwargs from the method (e.g. ``quantization_config``). With a
            ``quantization_config`` and no ``device_map``, the whole model is placed on the resolved device.
        device: overrides ``model_cfg.device``.
        dtype: overrides ``model_cfg.precision``.
        max_length: ``data.max_length``, for an unresolved ``model.rope_scaling: auto`` (a run resolves it first:
            :func:`tuneforge.models.rope.resolve_run_rope`).
        head: ``causal_lm`` (the language model) or ``reward`` (a sequence-classification head with one output on
            the same base: the ``rm`` stage).

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

    rope = model_cfg.rope_scaling
    if rope == "auto":
        from tuneforge.models.rope import resolve_rope_scaling

        rope = resolve_rope_scaling(model_cfg, max_length, model_config_of(model_cfg))
    if model_cfg.from_config is not None:
        tokenizer = _from_config_tokenizer(model_cfg, texts)
        model = _build_from_config(model_cfg, tokenizer, dtype, extra, rope, head)
    else:
        name = check_model_source(model_cfg.name_or_path)
        tokenizer = load_tokenizer(model_cfg.tokenizer or name, revision=model_cfg.revision,
                                   trust_remote_code=model_cfg.trust_remote_code,
                                   what="model.tokenizer" if model_cfg.tokenizer else "model.name_or_path")
        model = load_pretrained(name, dtype=dtype, revision=model_cfg.revision,
                                 trust_remote_code=model_cfg.trust_remote_code,
                                 attn_implementation=model_cfg.attn_implementation, rope_scaling=rope,
                                 head=head, **extra)

    if model_cfg.add_tokens is not None:
        from tuneforge.models.vocab import add_tokens

        add_tokens(model, tokenizer, model_cfg.add_tokens, resizable=not quantized)
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


def load_pretrained(name: str, *, head: str = "causal_lm", rope_scaling: Any = None, **kwargs):
    """THE weights loader: ``AutoModelForCausalLM.from_pretrained(name, **kwargs)`` (``None`` values dropped; the
    local cache only when the hub is unreachable), with failures turned into a :class:`UserError`.

    ``head="reward"`` loads ``AutoModelForSequenceClassification`` with one output (a reward model; a causal LM's
    directory gets a new, random score head). ``rope_scaling``: a resolved ``model.rope_scaling``
    (:mod:`tuneforge.models.rope`) written into the config before the weights load.
    """
    import transformers

    from tuneforge.models.build import HEADS

    class_name, head_kwargs = HEADS[head]
    kwargs = {k: v for k, v in {**head_kwargs, **kwargs}.items() if v is not None}
    try:
        if rope_scaling not in (None, "none"):
            from tuneforge.models.rope import apply_rope_scaling

            config = transformers.AutoConfig.from_pretrained(
                name, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code", "num_labels")},
                **hub_kwargs(name))
            kwargs["config"] = apply_rope_scaling(config, rope_scaling)
            kwargs.pop("num_labels", None)
        model = getattr(transformers, class_name).from_pretrained(name, **kwargs, **hub_kwargs(name))
    except OSError as exc:
        if looks_local(name):
            raise UserError(f"could not load a model from {name}: {exc}") from exc
        raise hub_error(name, exc) from exc
    from tuneforge.models.gguf import source_of_dir

    gguf = source_of_dir(name) if looks_local(name) else None
    if gguf is not None:  # converted from a GGUF file: adapters and runs name the file, not the cache directory
        model.name_or_path = model.config._name_or_path = gguf["gguf_file"]
    return model


def model_config_of(model_cfg: Any) -> Any:
    """The transformers config a run's ``model`` section describes, without loading weights (``from_config``:
    built from its numbers; a path or hub id: ``AutoConfig``).

    Raises:
        UserError: the config cannot be read (missing path, unreachable hub id).
    """
    from pathlib import Path

    from transformers import AutoConfig, GPT2Config, LlamaConfig

    fc = model_cfg.from_config
    if fc is not None:
        if fc.architecture == "gpt2":
            return GPT2Config(n_positions=fc.max_position_embeddings)
        return LlamaConfig(max_position_embeddings=fc.max_position_embeddings)
    name = check_model_source(model_cfg.name_or_path)
    kwargs = dict(revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, **hub_kwargs(name))
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        if name.endswith(".gguf"):
            return AutoConfig.from_pretrained(str(Path(name).parent), gguf_file=Path(name).name, **kwargs)
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        if looks_local(name):
            raise UserError(f"could not read the model config of {name} (model.name_or_path): {exc}") from exc
        raise hub_error(name, exc) from exc


def resolve_run_rope(cfg: Any, echo: Any = None) -> Any:
    """``cfg`` (a ``RunConfig``) with ``model.rope_scaling`` resolved (:func:`resolve_rope_scaling`), so that the
    run's ``config.yaml`` records the scaling it trained with and ``--resume`` compares like with like."""
    from tuneforge.models.rope import resolve_rope_scaling, scaled_context

    if cfg.model.rope_scaling == "none":
        return cfg
    resolved = resolve_rope_scaling(cfg.model, cfg.data.max_length, model_config_of(cfg.model))
    if resolved == cfg.model.rope_scaling:
        return cfg
    if echo is not None and resolved != "none":
        echo(f"rope scaling: {resolved['type']} x{resolved['factor']:g} (context "
             f"{resolved['original_max_position_embeddings']} -> {scaled_context(resolved)}) for data.max_length "
             f"{cfg.data.max_length}")
    model = cfg.model.model_copy(update={"rope_scaling": _rope_field(cfg, resolved)})
    return cfg.model_copy(update={"model": model})


def _rope_field(cfg: Any, resolved: str | dict) -> Any:
    if resolved == "none":
        return "none"
    field_type = type(cfg.model).model_fields["rope_scaling"].annotation
    from pydantic import TypeAdapter

    return TypeAdapter(field_type).validate_python(resolved)


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


def _build_from_config(model_cfg: Any, tokenizer: Any, dtype: Any, extra: dict, rope: Any = None,
                       head: str = "causal_lm"):
    from tuneforge.models.build import build_model

    model = build_model(model_cfg.from_config, tokenizer, dtype=dtype, rope_scaling=rope, head=head)
    if extra.get("quantization_config") is None:
        return model
    # Quantized loading only exists in from_pretrained: save the fresh model, then reload it quantized.
    with tempfile.TemporaryDirectory(prefix="tuneforge-build-") as tmp:
        model.save_pretrained(tmp)
        del model
        return load_pretrained(tmp, dtype=dtype, head=head, **extra)
