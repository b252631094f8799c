"""The memory arithmetic of the phases after training (merge, export, eval/generate, serve), on plain numbers.

One copy of the formulas for every caller: ``tuneforge estimate --phase`` (:mod:`tuneforge.estimate.phases`,
from a model spec) and the commands' own preflights (merge, export, eval/generate/abtest, serve), which read the
numbers from the safetensors headers or the config of the model they are about to load. Each function returns
``{component: bytes}``; the components sum to the phase's estimated peak above the process's memory once its
libraries are imported (a preflight compares that with the memory available at that point).

What each term is, and how it was checked, is in ``docs/estimate.md`` ("The phases after training"); the figures
come from ``benchmarks/phase_memory.py`` (peak RSS of the real commands against these bills).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: bytes per element of each saved/loaded precision or export type (GGUF block types include their scales)
ELEMENT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "f16": 2.0, "int8": 1.0, "int4": 0.5,
                 "q8_0": 34 / 32, "q4_0": 18 / 32}
#: a loaded fast (Rust) tokenizer, per vocabulary entry: measured, not derived — SmolLM2's 49,152-token BPE
#: tokenizer keeps 31 MiB resident (its load peaks 58 MiB higher, before any model is loaded, so the resident
#: part is what adds to a phase's peak)
TOKENIZER_BYTES_PER_TOKEN = 660
#: the GGUF gate's reload (transformers' GGUF loader) beyond the dequantized weights, per vocabulary entry:
#: measured, not derived — it converts the file's token list and merges into a fast tokenizer (167 MiB peak for
#: that alone) and parses the metadata; 281-288 MiB above the fp32 weights for SmolLM2-135M (Q4_1) and for a
#: 16M-parameter model with the same 49,152-token vocabulary (so it follows the vocabulary, not the weights)
GGUF_RELOAD_BYTES_PER_TOKEN = 6000
#: the rows ``tuneforge.models.generation.generate`` decodes together (its ``batch_size`` default)
GENERATION_ROWS = 8
#: token positions of the merge's logit check (``merge.lora.PROBE_TEXTS``: three short texts, 12-16 tokens each
#: with common tokenizers; an upper bound)
PROBE_POSITIONS = 48
#: the windows per forward pass of export's perplexity check (``tuneforge.evaluate.perplexity``'s default)
CHECK_ROWS = 4


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element: float) -> int:
    """Bytes of the key/value cache for one token across all layers."""
    return int(2 * num_layers * num_kv_heads * head_dim * element)


def serve_bytes_per_token(kv_per_token: int, hidden: int, element: float) -> int:
    """The serve engine's allowance for one running token (its KV token budget is priced in these): its keys and
    values plus a rough allowance for a forward pass's activations, 8 x hidden, in ``element`` bytes."""
    return kv_per_token + int(8 * hidden * element)


def tokenizer_bytes(vocab: int) -> int:
    """The peak a fast tokenizer adds while it loads (:data:`TOKENIZER_BYTES_PER_TOKEN` per entry)."""
    return int(TOKENIZER_BYTES_PER_TOKEN * vocab)


def merge_components(params: int, adapter_params: int, element: float, *, vocab: int = 0,
                     largest_tensor: int = 0) -> dict[str, int]:
    """An in-memory LoRA merge (``merge.lora.merge_lora``): the base in fp32 with the adapter on it, the tokenizer,
    the logit check (the adapter model's and the merged model's logits on the probe texts), and — when saving
    below fp32 — one tensor's cast (``Module.to`` converts parameter by parameter, freeing each fp32 one).

    Measured (``benchmarks/phase_memory.py``): no serialised copy of the model appears while it is saved
    (safetensors writes from the tensors' own memory), so none is billed.
    """
    components = {"base weights (fp32)": 4 * params, "adapter (fp32)": 4 * adapter_params}
    if element != 4 and largest_tensor:
        components["cast to the saved precision (one tensor at a time)"] = int(largest_tensor * element)
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
        components["logit check (probe texts, adapter and merged)"] = 2 * PROBE_POSITIONS * vocab * 4
    return components


def sharded_merge_components(shard_elements: int, fold_elements: int, adapter_params: int,
                             element: float) -> dict[str, int]:
    """The shard-by-shard merge (``merge.sharded.merge_shards``), an upper bound: the shard being read (safetensors
    maps the file: its pages are resident while its tensors are used — clean pages the kernel can drop), the
    merged copies of its adapted tensors in the saved precision (at most the whole shard; a tensor without an
    adapter is written from the mapped pages as it is), the fp32 fold of one weight, and the adapter in fp32.

    Measured (``benchmarks/phase_memory.py``): SmolLM2-135M in 134 MB shards peaks at 2.1 shards (the bound holds
    to a few %); a small model whose largest shard is only its tied, unadapted embedding peaks at 1.3 shards.
    """
    return {"one shard, read (mapped file pages)": int(shard_elements * element),
            "its merged tensors (saved precision, at most the shard)": int(shard_elements * element),
            "fold of one weight (fp32 weight + delta)": 8 * fold_elements,
            "adapter (fp32)": 4 * adapter_params}


def scoring_components(weight_bytes: int, kv_per_token: int, *, rows: int, tokens: int, vocab: int, hidden: int,
                       intermediate: int, element: float) -> dict[str, int]:
    """Scoring ``rows`` windows of ``tokens`` (perplexity, reward/likelihood scoring) with weights loaded.

    The forward pass holds the growing KV cache (``use_cache`` is the config's default), one block's activations
    and the logits; the loss then holds the logits, their shifted fp32 copy (``logits[:, :-1].float()`` reshaped:
    a copy in fp32, a cast in bf16) and ``log_softmax``'s output — three vocabulary-wide tensors, which is the peak
    for any real vocabulary (the cache is gone by then).
    """
    positions = rows * tokens
    forward = (kv_per_token * positions + int(positions * (2 * hidden + 3 * intermediate) * element)
               + int(positions * vocab * element))
    loss = int(positions * vocab * (element + 8))
    components = {"weights": int(weight_bytes), "tokenizer": tokenizer_bytes(vocab)}
    if loss >= forward:
        components[f"logits, shifted fp32 copy, log-softmax ({rows} x {tokens})"] = loss
    else:
        components[f"forward: KV cache, one block, logits ({rows} x {tokens})"] = forward
    return components


def generation_components(weight_bytes: int, kv_per_token: int, *, rows: int, tokens: int, vocab: int,
                          hidden: int, intermediate: int, element: float) -> dict[str, int]:
    """Generating ``rows`` answers together, ``tokens`` = prompt + new tokens per row: the KV cache of all of them,
    the prompt pass's block activations (bounded by ``tokens`` per row) and one step's logits (generate asks the
    model for the last position's logits only: ``logits_to_keep``)."""
    positions = rows * tokens
    return {"weights": int(weight_bytes), "tokenizer": tokenizer_bytes(vocab),
            f"KV cache ({rows} x {tokens} tokens)": kv_per_token * positions,
            "prompt pass: one block's activations": int(positions * (2 * hidden + 3 * intermediate) * element),
            "one step's logits (fp32, + a processed copy)": 2 * 4 * rows * vocab}


def serve_components(weight_bytes: int, kv_per_token: int, *, token_budget: int, rows: int,
                     vocab: int) -> dict[str, int]:
    """The server: weights, a KV cache of ``token_budget`` tokens over all running rows, one step's logits."""
    return {"weights": int(weight_bytes), "tokenizer": tokenizer_bytes(vocab),
            "kv cache (token budget)": kv_per_token * token_budget,
            "logits (one step)": 4 * rows * vocab}


def export_components(params: int, adapter_params: int, quantize: str, *, check: dict[str, int] | None = None,
                      vocab: int = 0, largest_tensor: int = 0, quantized_params: int = 0) -> dict[str, int]:
    """Merge in fp32, then the quantized copy; GGUF keeps the merged model while its reloaded file is checked
    (dequantized to fp32, its tokenizer converted: :data:`GGUF_RELOAD_BYTES_PER_TOKEN` per entry of ``vocab``);
    an HF int8/int4 export adds its perplexity check (``check``: the :func:`scoring_components` of the check's
    windows; its weights and tokenizer are not counted twice). The GGUF writer encodes one tensor at a time, so
    with ``largest_tensor`` (elements) only that tensor's encoded bytes are billed, not the whole quantized copy.

    int8/int4 (``merge.export.export_model``): bitsandbytes quantizes the linear layers (``quantized_params``
    elements; the embeddings, norms and a tied head stay fp32), and the quantized model and its reload from the
    written directory are both alive during the check, beside the merged fp32 model (still referenced by the peft
    model it was unloaded from)."""
    gguf = quantize not in ("int8", "int4")
    if gguf:
        quantized = int((largest_tensor or params) * ELEMENT_BYTES[quantize])
    else:
        linear = quantized_params or params
        quantized = 2 * int(linear * ELEMENT_BYTES[quantize] + 4 * (params - linear))
    components = {"merged model (fp32)": 4 * params, "adapter (fp32)": 4 * adapter_params,
                  f"quantized weights ({quantize})": quantized}
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
    if gguf:
        components["gate: reloaded GGUF, dequantized (fp32)"] = 4 * params
        if vocab:
            components["gate: GGUF tokenizer and metadata conversion"] = GGUF_RELOAD_BYTES_PER_TOKEN * vocab
    for name, value in (check or {}).items():
        if name not in ("weights", "tokenizer"):
            components[f"perplexity check: {name}"] = value
    return components


def streaming_export_components(largest_tensor: int, adapter_params: int, quantize: str, *,
                                vocab: int = 0) -> dict[str, int]:
    """A GGUF export written tensor by tensor from safetensors files (``merge.gguf``'s streaming strategy): the
    largest tensor in fp32 three times (read, merged, read back by the per-tensor gate) and its encoded bytes, the
    adapter in fp32 and the tokenizer.

    Not billed: the gate's conversion of the written file's tokenizer (measured 167 MiB for SmolLM2's 49,152
    entries, ~3.5 KB each). On real models it is small beside three copies of the embedding; on the tiny test models
    it would exceed their weights, so billing it needs the streaming gate to compare the GGUF token arrays directly
    instead of converting them (not done)."""
    components = {"largest tensor: read, merged, read back (fp32)": 3 * 4 * largest_tensor,
                  f"largest tensor encoded ({quantize})": int(ELEMENT_BYTES[quantize] * largest_tensor),
                  "adapter (fp32)": 4 * adapter_params}
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
    return components


def available_memory(device: str = "cpu") -> int:
    """Bytes free for a phase on ``device``: free GPU memory on ``cuda[:N]``, else the RAM the kernel reports
    available (``MemAvailable``)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def memory_budget(max_memory: int | None, device: str = "cpu") -> int:
    """The budget of a phase's preflight: ``max_memory`` (bytes, from ``--max-memory``) when given, else
    :func:`available_memory` on ``device`` now."""
    return int(max_memory) if max_memory else available_memory(device)


def largest_fitting(total_of: Callable[[int], int], rows: int, budget: int) -> int | None:
    """The largest row count ≤ ``rows`` whose ``total_of(rows)`` fits ``budget`` (``total_of`` grows with the rows:
    a binary search), or None when even one row does not."""
    if total_of(1) > budget:
        return None
    low, high = 1, rows
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if total_of(middle) <= budget else (low, middle - 1)
    return low


# --------------------------------------------------------------------------- the numbers of a model reference

@dataclass(frozen=True)
class ModelNumbers:
    """What the inference bills need to know about a model (read from its config; no weights loaded)."""

    params: int
    adapter_params: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab: int
    hidden: int
    intermediate: int

    def kv_per_token(self, element: float) -> int:
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, element)

    def weight_bytes(self, element: float) -> int:
        """The base in ``element`` bytes per parameter, an adapter on it in fp32 (peft keeps adapters in fp32)."""
        return int(self.params * element) + 4 * self.adapter_params

    def shape(self) -> dict[str, int]:
        return {"vocab": self.vocab, "hidden": self.hidden, "intermediate": self.intermediate}


def model_numbers(ref: Any) -> ModelNumbers:
    """The :class:`ModelNumbers` of a :class:`tuneforge.models.reference.ModelRef`: its base's config built on the
    meta device (parameters counted once, tied embeddings once), the adapter's elements from its file header."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tuneforge.models.load import check_model_source

    config = AutoConfig.from_pretrained(check_model_source(ref.base, ref.given))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0))
    head_dim = int(getattr(text, "head_dim", 0) or hidden // heads)
    return ModelNumbers(
        params=int(params), adapter_params=_adapter_elements(ref),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or getattr(text, "n_layer", 0)),
        num_kv_heads=int(getattr(text, "num_key_value_heads", 0) or heads), head_dim=head_dim,
        vocab=int(text.vocab_size), hidden=hidden,
        intermediate=int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden))


def _adapter_elements(ref: Any) -> int:
    from pathlib import Path

    if getattr(ref, "adapter", None) is None:
        return 0
    path = Path(ref.adapter) / "adapter_model.safetensors"
    if not path.is_file():
        return 0
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for name in handle.keys():
            count = 1
            for size in handle.get_slice(name).get_shape():
                count *= int(size)
            total += count
    return total
