"""Build a randomly initialised Llama-style or GPT-2-style causal LM from architecture numbers."""

from __future__ import annotations

from typing import Any

#: ``head`` of ``load_model`` / ``load_pretrained`` / :func:`build_model` → the transformers auto class and its
#: extra kwargs: the language model, or a reward model (sequence-classification head with one output)
HEADS = {"causal_lm": ("AutoModelForCausalLM", {}), "reward": ("AutoModelForSequenceClassification", {"num_labels": 1})}


def build_model(fc: Any, tokenizer: Any, dtype: Any = None, rope_scaling: Any = None, head: str = "causal_lm"):
    """Instantiate a fresh model described by ``fc`` (a :class:`tuneforge.config.schema.FromConfig`).

    The vocabulary is taken from the tokenizer (``len(tokenizer)``) so that every special token has an
    embedding; pad/bos/eos ids are written into the model config. ``rope_scaling``: a resolved
    ``model.rope_scaling`` (:mod:`tuneforge.models.rope`); ``head``: ``causal_lm`` or ``reward`` (a
    sequence-classification head with one output).
    """
    import torch
    import transformers
    from transformers import GPT2Config, LlamaConfig

    from tuneforge.models.rope import apply_rope_scaling

    vocab = len(tokenizer)
    ids = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=fc.tie_word_embeddings,
    )
    if fc.architecture == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=fc.hidden_size,
            intermediate_size=fc.intermediate_size or _llama_intermediate(fc.hidden_size),
            num_hidden_layers=fc.num_layers,
            num_attention_heads=fc.num_heads,
            num_key_value_heads=fc.num_kv_heads or fc.num_heads,
            max_position_embeddings=fc.max_position_embeddings,
            use_cache=False,
            **ids,
        )
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=fc.hidden_size,
            n_layer=fc.num_layers,
            n_head=fc.num_heads,
            n_inner=fc.intermediate_size,
            n_positions=fc.max_position_embeddings,
            use_cache=False,
            **ids,
        )
    apply_rope_scaling(config, rope_scaling)
    class_name, head_kwargs = HEADS[head]
    for key, value in head_kwargs.items():
        setattr(config, key, value)
    model = getattr(transformers, class_name).from_config(config, dtype=dtype or torch.float32)
    model.config.use_cache = True  # cache for generation; the trainer turns it off while training
    return model


def _llama_intermediate(hidden: int) -> int:
    """Llama's SwiGLU width: 8/3 of hidden, rounded up to a multiple of 32."""
    return ((int(hidden * 8 / 3) + 31) // 32) * 32


def build_from_hf_config(config: Any, **kwargs):
    """A fresh, randomly initialised causal LM from a ``transformers`` config object (e.g. ``LlamaConfig``); inside
    ``torch.device("meta")`` it holds shapes only (estimate, inspect)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, **kwargs)
