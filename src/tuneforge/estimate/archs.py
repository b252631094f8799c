"""Built-in ``config.json`` contents of common causal LMs, so ``tuneforge estimate`` works offline.

Only the keys that decide the shapes of the parameters are kept (the rest take the ``transformers``
defaults of the model type). Values are copied from each model's ``config.json`` on the Hugging Face hub;
the parameter counts the tests check against are the ones published on the model cards
(e.g. Qwen2.5-0.5B 494,032,768; Llama-2-7B 6,738,415,616; GPT-2 124,439,808).
"""

from __future__ import annotations

_QWEN25 = {"model_type": "qwen2", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu"}
_LLAMA3 = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "vocab_size": 128256, "max_position_embeddings": 131072}

BUILTIN_CONFIGS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B": {**_QWEN25, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                          "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                          "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B": {**_QWEN25, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                          "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                          "max_position_embeddings": 131072, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B": {**_QWEN25, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                        "max_position_embeddings": 32768, "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B": {**_QWEN25, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                        "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                                "tie_word_embeddings": True},
    "meta-llama/Llama-3.2-3B": {**_LLAMA3, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                                "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
                                "tie_word_embeddings": True},
    "meta-llama/Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                                "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False},
    "meta-llama/Meta-Llama-3-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                   "max_position_embeddings": 8192, "tie_word_embeddings": False},
    "meta-llama/Llama-2-7b-hf": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                                 "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                 "tie_word_embeddings": False},
    "meta-llama/Llama-2-13b-hf": {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
                                  "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
                                  "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                  "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.1": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                                  "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                                  "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False},
    "openai-community/gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12,
                              "vocab_size": 50257, "n_positions": 1024, "tie_word_embeddings": True},
    "openai-community/gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16,
                                     "vocab_size": 50257, "n_positions": 1024, "tie_word_embeddings": True},
}

# Other names people use for the same weights (instruct/chat variants share the base architecture).
ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "meta-llama/Meta-Llama-3.1-8B": "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
    "meta-llama/Llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-7b-chat-hf": "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-13b-chat-hf": "meta-llama/Llama-2-13b-hf",
    "mistralai/Mistral-7B-Instruct-v0.1": "mistralai/Mistral-7B-v0.1",
    "mistralai/Mistral-7B-Instruct-v0.2": "mistralai/Mistral-7B-v0.1",
}


def builtin_config(name: str) -> dict | None:
    """The built-in config dict for ``name`` (case-insensitive; ``-Instruct``/``-chat`` variants map to the base).

    Returns ``None`` when the name is not in the table.
    """
    table = {key.lower(): key for key in BUILTIN_CONFIGS}
    for alias, target in ALIASES.items():
        table.setdefault(alias.lower(), target)
    key = name.strip().lower()
    for suffix in ("", "-instruct", "-chat"):
        stem = key.removesuffix(suffix) if suffix else key
        if stem in table:
            return dict(BUILTIN_CONFIGS[table[stem]])
    return None


def builtin_names() -> list[str]:
    """Every model name the built-in table answers for (canonical names, then aliases)."""
    return [*BUILTIN_CONFIGS, *ALIASES]
