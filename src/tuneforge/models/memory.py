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
#: a loaded fast (Rust) byte-level BPE tokenizer keeps ``TOKENIZER_FIXED_BYTES`` + ``TOKENIZER_BYTES_PER_TOKEN``
#: per vocabulary entry resident (its load peaks higher, before any model is loaded, so the resident part is what
#: adds to a phase's peak; :data:`TOKENIZER_LOAD_BYTES_PER_TOKEN` for the one phase that loads it last). Measured,
#: not derived (``load_tokenizer`` in a fresh process, libraries imported, ``MALLOC_MMAP_THRESHOLD_=65536``):
#: 7.1-8.1 MiB for an 8,192-entry and 25.0 MiB for a 32,768-entry tokenizer trained on the standard library
#: (``benchmarks/phase_memory.py --vocab``), 31.6 MiB for SmolLM2's 49,152 entries — not proportional to the
#: vocabulary (1,000, 800, 670 B per entry): the least-squares line through the three is 3.5 MiB + 625 B per entry
#: (within 2 MiB of each). A second copy in the same process costs the per-entry part only, or less (two loads
#: keep 11.5, 40.8 and 47.6 MiB: the second reuses the first load's freed memory)
TOKENIZER_FIXED_BYTES = int(3.5 * 2 ** 20)
TOKENIZER_BYTES_PER_TOKEN = 625
#: the peak while a fast tokenizer loads, per vocabulary entry: measured, not derived — 10.0, 38.5 and 58.8 MiB
#: above the imported libraries for the 8,192, 32,768 and 49,152-entry tokenizers above (1,280, 1,231 and 1,255 B
#: per entry; two runs each alike). It is the peak of a phase only when the tokenizer loads after the weights are
#: gone (the shard-by-shard merge saves it after the last shard)
TOKENIZER_LOAD_BYTES_PER_TOKEN = 1235
#: shared-library code a command's forward passes page in (the libtorch_cpu.so and libtorch_python.so pages of the
#: kernels they run): file pages, resident from then on, so part of the peak. Measured, not derived: 12.8-14.6 MiB
#: in ``/proc/self/smaps`` at the peak of the merge's logit check and of generation, on a 16M-parameter Llama and on
#: SmolLM2-135M alike (fp32, AMD EPYC AVX2; ``benchmarks/phase_memory.py``'s baseline has the libraries imported
#: and no forward run): code, not data, so one figure per process whatever the model's size
FORWARD_CODE_BYTES = 13 * 2 ** 20
#: the GGUF gate's reload (transformers' GGUF loader) apart from the weights: ``GGUF_RELOAD_FIXED_BYTES`` +
#: ``GGUF_RELOAD_BYTES_PER_TOKEN`` per vocabulary entry, measured, not derived. ``read_gguf`` first converts the
#: file's token list and merges into a fast tokenizer (:data:`GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN`; 32-34 MiB
#: of it kept on 49,152 entries), then the loader parses the metadata twice (for the config, then with the tensors),
#: and the gguf package's reader keeps every string of the token list and merges as numpy views while the tensors are
#: read (~137 MiB on 49,152 entries) beside ~25 MiB left from the config pass. ``read_gguf`` of an f16 file of a
#: 1-layer hidden-64 Llama in a fresh process peaks 37.4, 132.1 and 193.9 MiB above the weight terms of
#: :func:`gguf_reload_components` with 8,192 and 32,768-entry tokenizers trained on the standard library and
#: SmolLM2's 49,152: 4,000 B per entry + 6.2-7.1 MiB (a per-entry constant alone misses the small vocabulary by 20%)
GGUF_RELOAD_FIXED_BYTES = int(6.5 * 2 ** 20)
GGUF_RELOAD_BYTES_PER_TOKEN = 4000
#: transformers converting a GGUF file's token list and merges into a fast tokenizer (``read_gguf_tokenizer``, the
#: streamed export's tokenizer check), per vocabulary entry: measured, not derived — its peak is 27.3, 109.8 and
#: 165.9 MiB above the imported libraries for 8,192, 32,768 (tokenizers trained on the standard library) and 49,152
#: entries (SmolLM2's), 3,490-3,540 B per entry (proportional: no fixed part), 10.6-12.8, 31 and 40 MiB of it kept
GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN = 3500
#: fp32 copies of one tensor alive while transformers' GGUF loader turns it into a torch tensor, by the type the file
#: stores it in: the gguf package's numpy dequantization (f16: one ``astype``; bf16 and q8_0 keep an intermediate
#: fp32 array beside the result) and then the loader's ``np.copy`` of the result. Measured on a 12.6M-element
#: embedding (48 MiB in fp32): +96 MiB for f16, +144 MiB for bf16 and q8_0 beside its mapped file pages
GGUF_DEQUANT_COPIES = {"f32": 1, "f16": 2, "bf16": 3, "q8_0": 3}
#: the type the GGUF writer stores the largest tensor (the embedding, an untied output head) in: q4_0 exports keep
#: them in q8_0 (``merge.gguf._tensor_type``)
GGUF_LARGEST_TYPE = {"f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q8_0"}
#: the rows ``tuneforge.models.generation.generate`` decodes together (its ``batch_size`` default)
GENERATION_ROWS = 8
#: token positions of one probe text of the merge's logit check (``merge.lora.PROBE_TEXTS``: 10-16 tokens each
#: with common tokenizers; an upper bound) and of all three
PROBE_TEXT_POSITIONS = 16
PROBE_POSITIONS = 3 * PROBE_TEXT_POSITIONS
#: the windows per forward pass of export's perplexity check (``tuneforge.evaluate.perplexity``'s default)
CHECK_ROWS = 4


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element: float) -> int:
    """Bytes of the key/value cache for one token across all layers."""
    return int(2 * num_layers * num_kv_heads * head_dim * element)


def serve_activation_bytes(hidden: int, element: float) -> int:
    """The serve engine's rough allowance for a forward pass's activations per token of its KV token budget:
    8 x hidden in ``element`` bytes."""
    return int(8 * hidden * element)


def serve_bytes_per_token(kv_per_token: int, hidden: int, element: float) -> int:
    """What one token of the serve engine's KV token budget costs in its bill (:func:`serve_components`; the
    engine and serve's preflight size the budget in these): its keys and values in the KV store with the store's
    spare columns (:data:`KV_STORE_SPARE_DIVISOR`), the prefix-reuse store's share (:data:`PREFIX_BUDGET_DIVISOR`)
    and the activation allowance (:func:`serve_activation_bytes`)."""
    return (kv_per_token + -(-kv_per_token // KV_STORE_SPARE_DIVISOR) + kv_per_token // PREFIX_BUDGET_DIVISOR
            + serve_activation_bytes(hidden, element))


#: serve's KV store (``models.decoding._KVStore``) is sized at admission: as many rows as run, and as many columns
#: as the longest running row may need (prompt + max_tokens) plus a quarter of that as spare. The running rows'
#: window moves right one column per step and is moved back to the buffers' start when it reaches their end: the
#: spare bounds that copy to once per quarter-row of steps (with no spare it could happen at every step)
KV_STORE_SPARE_DIVISOR = 4
#: the prefix-reuse store (``models.decoding.ContinuousBatch``: the keys and values of recent prompts) holds at
#: most this fraction of serve's KV token budget (1/8), oldest entries dropped first
PREFIX_BUDGET_DIVISOR = 8


def kv_store_columns(longest_row: int) -> int:
    """Columns of serve's KV store for rows of at most ``longest_row`` tokens (prompt + max_tokens): the row and
    its spare (:data:`KV_STORE_SPARE_DIVISOR`)."""
    return longest_row + max(1, -(-longest_row // KV_STORE_SPARE_DIVISOR))


def kv_store_tokens(token_budget: int, rows: int) -> int:
    """Token slots serve's KV store holds at most when its ``rows`` rows x the longest (prompt + max_tokens) come
    to ``token_budget`` (what the scheduler admits): :func:`kv_store_columns` for every row (the rounding up of the
    spare is one column per row at most)."""
    return token_budget + -(-token_budget // KV_STORE_SPARE_DIVISOR) + rows


def prefix_budget(token_budget: int) -> int:
    """Tokens the prefix-reuse store may hold beside a KV token budget (:data:`PREFIX_BUDGET_DIVISOR`)."""
    return token_budget // PREFIX_BUDGET_DIVISOR


def tokenizer_bytes(vocab: int, copies: int = 1) -> int:
    """What ``copies`` loaded fast tokenizers of ``vocab`` entries keep resident: :data:`TOKENIZER_FIXED_BYTES` once
    and :data:`TOKENIZER_BYTES_PER_TOKEN` per entry for each copy (0 when the vocabulary is not known)."""
    if not vocab:
        return 0
    return TOKENIZER_FIXED_BYTES + int(TOKENIZER_BYTES_PER_TOKEN * vocab) * copies


def tokenizer_load_bytes(vocab: int) -> int:
    """The peak while a fast tokenizer loads (:data:`TOKENIZER_LOAD_BYTES_PER_TOKEN` per entry)."""
    return int(TOKENIZER_LOAD_BYTES_PER_TOKEN * vocab)


def merge_components(params: int, adapter_params: int, element: float, *, vocab: int = 0,
                     largest_tensor: int = 0) -> dict[str, int]:
    """An in-memory LoRA merge (``merge.lora.merge_lora``), in the order the code holds things: the base in fp32
    with the adapter and the tokenizer; the adapter model's logits on the probe texts (kept for the check); the
    fold (in place; the adapter is freed with it, billed throughout: an upper bound by its size); below fp32 the
    cast, one parameter at a time, while the fp32 weights are still there (a memory-mapped base's file pages stay
    mapped until every tensor of the file is converted, and a tied embedding's fp32 tensor until the head's turn:
    measured, one cast tensor beside all of them); then the merged model's logits and one probe's difference beside
    the adapter's (``logit_difference`` takes a probe at a time); the save writes from the tensors' own memory (no
    serialised copy, measured) after the logits are freed. Plus the library code the forward passes page in.

    The peak is the check (fp32), or the larger of the cast and the check in the saved precision.
    """
    weights = 4 * params
    components = {"base weights (fp32)": weights, "adapter (fp32)": 4 * adapter_params}
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
    components["library code paged in by the forward passes"] = FORWARD_CODE_BYTES
    logits = PROBE_POSITIONS * vocab * 4
    check = 2 * logits + PROBE_TEXT_POSITIONS * vocab * 4
    check_name = "logit check: adapter's and merged logits, one probe's difference"
    if element == 4 or not largest_tensor:
        if vocab:
            components[check_name] = check
        return components
    cast = int(largest_tensor * element) + logits
    after_cast = check - (weights - int(params * element))  # the weights are in the saved precision by then
    if cast >= after_cast:
        components["cast to the saved precision (one tensor), beside the adapter's logits"] = cast
    else:
        components[check_name + " (weights in the saved precision)"] = after_cast
    return components


def shard_merge_bytes(stored_bytes: int, new_elements: int, element: float, fold_elements: int, *,
                      stored_below_fp32: bool = False) -> int:
    """What merging one shard holds (``merge.sharded.merge_shards``): the shard file's pages (``safe_open`` maps it;
    every tensor read stays resident until the file is closed, and a tensor written unchanged is written from those
    pages), the new tensors in the saved precision (``new_elements``: the adapted weights, and every floating tensor
    when the saved precision is not the stored one), and the temporaries of its largest fold (``fold_elements``):
    ``B @ A`` and its scaled copy in fp32, plus the weight's fp32 copy when it is stored below fp32."""
    return int(stored_bytes) + int(new_elements * element) + fold_elements * (12 if stored_below_fp32 else 8)


def sharded_merge_components(shard_bytes: list[int], adapter_params: int, *, vocab: int = 0) -> dict[str, int]:
    """The shard-by-shard merge: the adapter's factors in fp32 (held throughout), and the larger of the largest
    shard's :func:`shard_merge_bytes` (one shard at a time: a shard's pages and tensors are freed before the next
    opens) and the tokenizer's load (it is saved after the last shard: its load peak, not its resident size).

    Measured (``benchmarks/phase_memory.py``): SmolLM2-135M in 134 MB shards peaks at a fully adapted shard; a
    16M-parameter model with a 49k vocabulary whose largest shard is its unadapted embedding (48 MiB, written from
    its mapped pages as it is) peaks while the tokenizer loads (58 MiB).
    """
    largest = max(shard_bytes, default=0)
    loading = tokenizer_load_bytes(vocab)
    components = {"adapter (fp32)": 4 * adapter_params}
    if largest >= loading:
        components["largest shard: its file pages, new tensors, one fold"] = largest
    else:
        components["tokenizer while it loads (after the last shard)"] = loading
    return components


def scoring_components(weight_bytes: int, kv_per_token: int, *, rows: int, tokens: int, vocab: int, hidden: int,
                       intermediate: int, element: float) -> dict[str, int]:
    """Scoring ``rows`` windows of ``tokens`` (perplexity, reward/likelihood scoring) with weights loaded.

    The forward pass holds the growing KV cache (``use_cache`` is the config's default), one block's activations
    and the logits; the loss then holds the logits, their shifted fp32 copy (``logits[:, :-1].float()`` reshaped:
    a copy in fp32, a cast in bf16) and ``log_softmax``'s output — three vocabulary-wide tensors, which is the peak
    for any real vocabulary (the cache is gone by then). Plus the library code the forward pages in.
    """
    positions = rows * tokens
    forward = (kv_per_token * positions + int(positions * (2 * hidden + 3 * intermediate) * element)
               + int(positions * vocab * element))
    loss = int(positions * vocab * (element + 8))
    components = {"weights": int(weight_bytes), "tokenizer": tokenizer_bytes(vocab),
                  "library code paged in by the forward passes": FORWARD_CODE_BYTES}
    if loss >= forward:
        components[f"logits, shifted fp32 copy, log-softmax ({rows} x {tokens})"] = loss
    else:
        components[f"forward: KV cache, one block, logits ({rows} x {tokens})"] = forward
    return components


def generation_components(weight_bytes: int, kv_per_token: int, *, rows: int, tokens: int, vocab: int,
                          hidden: int, intermediate: int, element: float) -> dict[str, int]:
    """Generating ``rows`` answers together, ``tokens`` = prompt + new tokens per row: the KV cache of all of them,
    the prompt pass's block activations (bounded by ``tokens`` per row) and one step's logits (generate asks the
    model for the last position's logits only: ``logits_to_keep``), and the library code the forward passes page
    in."""
    positions = rows * tokens
    return {"weights": int(weight_bytes), "tokenizer": tokenizer_bytes(vocab),
            "library code paged in by the forward passes": FORWARD_CODE_BYTES,
            f"KV cache ({rows} x {tokens} tokens)": kv_per_token * positions,
            "prompt pass: one block's activations": int(positions * (2 * hidden + 3 * intermediate) * element),
            "one step's logits (fp32, + a processed copy)": 2 * 4 * rows * vocab}


def serve_components(weight_bytes: int, kv_per_token: int, *, token_budget: int, rows: int, vocab: int,
                     activation_per_token: int = 0, prefix_tokens: int | None = None,
                     tokenizers: int = 2) -> dict[str, int]:
    """The server (``tuneforge serve``'s own engine) running ``token_budget`` tokens (rows x the longest prompt +
    max_tokens: what its scheduler admits) in at most ``rows`` rows.

    - the weights, and ``tokenizers`` loaded tokenizers: each served name has the generating thread's and the
      request handlers' own copy (``serve.engine.Served``: one Rust tokenizer used from two threads can fail);
    - the KV store (``models.decoding._KVStore``), sized at admission: :func:`kv_store_tokens` token slots of
      ``kv_per_token`` bytes (a quarter of spare columns). It grows one layer's keys or values at a time (the old
      tensor freed before the next is allocated), and a joining group's prefill cache is freed layer by layer as
      it is copied in, so neither the old store nor the prefill cache adds a second copy;
    - ``activation_per_token`` per budget token: the allowance for a forward pass's activations that the engine's
      per-token price includes (:func:`serve_bytes_per_token`);
    - the prefix-reuse store: ``prefix_tokens`` tokens of keys and values (default: its bound beside
      ``token_budget``, :func:`prefix_budget`);
    - one step's logits (fp32, the last position of every row);
    - the library code the forward passes page in (:data:`FORWARD_CODE_BYTES`; measured in serve too: the libtorch
      mappings' resident pages grew 14 MiB from the preflight to the peak, ``benchmarks/phase_memory.py`` trace).
    """
    if prefix_tokens is None:
        prefix_tokens = prefix_budget(token_budget)
    return {"weights": int(weight_bytes), f"tokenizers ({tokenizers})": tokenizer_bytes(vocab, tokenizers),
            "library code paged in by the forward passes": FORWARD_CODE_BYTES,
            "kv store (token budget + spare columns)": kv_per_token * kv_store_tokens(token_budget, rows),
            "activations (allowance per budget token)": activation_per_token * token_budget,
            "prefix-reuse store": kv_per_token * prefix_tokens,
            "logits (one step)": 4 * rows * vocab}


def gguf_reload_components(params: int, largest_tensor: int, quantize: str, *, vocab: int = 0,
                           head_last: bool = False) -> dict[str, int]:
    """The GGUF gate's reload of the written file (``models.gguf.read_gguf``: transformers' GGUF loader, which for
    llama/qwen2 dequantizes every tensor to fp32 in file order and keeps each until the model takes them).

    What is resident at once, from the file order the writer uses (embedding first, the blocks, an untied output
    head last): the loader memory-maps the file and every page it has dequantized stays resident while it reads
    (``file`` bytes: ``params`` at the export type's size, the largest tensors at :data:`GGUF_LARGEST_TYPE`'s); the
    fp32 tensors read so far; the tensor being read, as :data:`GGUF_DEQUANT_COPIES` fp32 copies; and the
    vocabulary's metadata (:data:`GGUF_RELOAD_BYTES_PER_TOKEN`). The peak is the larger of two moments: the end of
    the tensors (all ``params`` in fp32 beside the whole mapped file) and the largest tensor's dequantization. The
    embedding comes first, when nothing else is read yet; an untied head (``head_last``) comes last, when every
    other tensor is already read — then that moment is the peak.
    """
    big_type = GGUF_LARGEST_TYPE[quantize]
    largest = largest_tensor or params
    heads = 2 if head_last else 1  # the embedding and an untied output head have the same shape
    big_bytes = int(largest * ELEMENT_BYTES[big_type])
    file = int(max(params - heads * largest, 0) * ELEMENT_BYTES[quantize]) + heads * big_bytes
    copies = GGUF_DEQUANT_COPIES[big_type]
    dequantizing = f"gate: largest tensor dequantized ({copies} fp32 copies)"
    if head_last:
        components = {"gate: reloaded tensors before the output head (fp32)": 4 * (params - largest),
                      "gate: GGUF file pages mapped by the reader": file, dequantizing: copies * 4 * largest}
    elif 4 * params + file >= big_bytes + copies * 4 * largest:
        components = {"gate: reloaded GGUF, dequantized (fp32)": 4 * params,
                      "gate: GGUF file pages mapped by the reader": file}
    else:
        components = {"gate: GGUF file pages mapped by the reader (the embedding's)": big_bytes,
                      dequantizing: copies * 4 * largest}
    if vocab:
        components["gate: GGUF tokenizer conversion and metadata"] = gguf_reload_vocab_bytes(vocab)
    return components


def gguf_reload_vocab_bytes(vocab: int) -> int:
    """The GGUF reload's vocabulary term: :data:`GGUF_RELOAD_FIXED_BYTES` + :data:`GGUF_RELOAD_BYTES_PER_TOKEN`
    per entry."""
    return GGUF_RELOAD_FIXED_BYTES + GGUF_RELOAD_BYTES_PER_TOKEN * vocab


def export_components(params: int, adapter_params: int, quantize: str, *, check: dict[str, int] | None = None,
                      vocab: int = 0, largest_tensor: int = 0, quantized_params: int = 0,
                      head_last: bool = False) -> dict[str, int]:
    """Merge in fp32, then the quantized copy; an HF int8/int4 export adds its perplexity check (``check``: the
    :func:`scoring_components` of the check's windows; its weights and tokenizer are not counted twice).

    GGUF (``merge.gguf.export_gguf``): the merged model (and the adapter it was merged from), the tokenizer and the
    library code the merge's parity check pages in (:data:`FORWARD_CODE_BYTES`) stay loaded through two moments, of which the bill is the larger: the writer encoding one tensor at a time (the
    largest, ``largest_tensor`` elements, in the export type) and the gate reloading the written file
    (:func:`gguf_reload_components`; ``head_last`` for an untied output head) — the reload is the larger for any
    model with a vocabulary.

    int8/int4 (``merge.export.export_model``): the merged model is saved in fp32 and scored (the perplexity check),
    then freed; bitsandbytes quantizes the linear layers (``quantized_params`` elements; the embeddings, norms and a
    tied head stay fp32) while loading that saved file, whose pages are memory-mapped and resident as it reads them
    (the whole fp32 file: as large as the merged model); the quantized model is saved and freed, and its reload from
    the written directory is scored. So the fp32 weights (in memory, then as the mapped file) are there at both
    moments, beside the check's activations or the quantized model, whichever is larger; the reload's check holds
    less (the quantized model instead of the fp32 weights)."""
    hf = quantize in ("int8", "int4")
    merged = "merged model (fp32; then its saved file, mapped while quantized)" if hf else "merged model (fp32)"
    components = {merged: 4 * params, "adapter (fp32)": 4 * adapter_params}
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
    if not hf:
        # the merge's parity check (``merge.gguf._merge_with_parity``) runs forward passes: the libtorch code they page
        # in stays resident through the gate (traced: 62 -> 75 MiB of libtorch pages, 76 at the gate's end)
        components["library code paged in by the forward passes"] = FORWARD_CODE_BYTES
        encoded = {f"largest tensor encoded ({quantize})": int((largest_tensor or params) * ELEMENT_BYTES[quantize])}
        reload = gguf_reload_components(params, largest_tensor, quantize, vocab=vocab, head_last=head_last)
        components.update(max(encoded, reload, key=lambda part: sum(part.values())))
        return components
    linear = quantized_params or params
    quantized = {f"quantized model ({quantize})": int(linear * ELEMENT_BYTES[quantize] + 4 * (params - linear))}
    scored = {f"perplexity check: {name}": value for name, value in (check or {}).items()
              if name not in ("weights", "tokenizer")}
    components.update(max(scored, quantized, key=lambda part: sum(part.values())))
    return components


def streaming_export_components(largest_tensor: int, adapter_params: int, quantize: str, *,
                                vocab: int = 0) -> dict[str, int]:
    """A GGUF export written tensor by tensor from safetensors files (``merge.gguf``'s streaming strategy): the
    adapter in fp32 and the tokenizer throughout, and the larger of two moments. Writing and gating the tensors:
    the largest tensor in fp32 three times (read, its LoRA delta, the merged sum — or the read-back copy beside the
    merged tensor in the per-tensor gate) and its encoded bytes. Then the gate reads the written file's tokenizer
    back through transformers, which converts the token list and merges into a fast tokenizer
    (:data:`GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN` per entry of ``vocab``).

    Not billed: the pages of the memory-mapped safetensors files the tensors are read from. They are clean file
    pages — resident while memory is free (the measured peak includes them: the whole base file by the end), dropped
    by the kernel under pressure instead of failing — which is what lets a model larger than memory stream."""
    tensors = {"largest tensor: read, merged, read back (fp32)": 3 * 4 * largest_tensor,
               f"largest tensor encoded ({quantize})": int(ELEMENT_BYTES[quantize] * largest_tensor)}
    conversion = {"gate: the written file's tokenizer converted back": GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN * vocab}
    components = {"adapter (fp32)": 4 * adapter_params}
    if vocab:
        components["tokenizer"] = tokenizer_bytes(vocab)
    components.update(max(tensors, conversion, key=lambda part: sum(part.values())))
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
