"""The export bills of ``tuneforge.models.memory`` against hand computations (what the code holds at its peak), and
the export preflight reading them from a safetensors directory."""

from __future__ import annotations

import json

import pytest

from tuneforge.models.memory import (
    FORWARD_CODE_BYTES,
    GGUF_RELOAD_BYTES_PER_TOKEN,
    GGUF_RELOAD_FIXED_BYTES,
    export_components,
    gguf_reload_components,
    tokenizer_bytes,
)

V = 49_152


def test_gguf_reload_of_a_large_model_peaks_at_the_end_of_the_tensors():
    """SmolLM2-135M's shape (tied): every tensor in fp32 beside the whole mapped file, plus the vocabulary term."""
    params, largest = 134_515_008, 28_311_552
    f16 = gguf_reload_components(params, largest, "f16", vocab=V)
    assert f16 == {"gate: reloaded GGUF, dequantized (fp32)": 4 * params,
                   "gate: GGUF file pages mapped by the reader": 2 * params,
                   "gate: GGUF tokenizer conversion and metadata": GGUF_RELOAD_FIXED_BYTES
                   + GGUF_RELOAD_BYTES_PER_TOKEN * V}
    q8 = gguf_reload_components(params, largest, "q8_0", vocab=V)
    assert q8["gate: GGUF file pages mapped by the reader"] == int(params * 34 / 32)
    # the f16 file is larger: its pages are what the f16 reload holds beyond q8_0's (measured +120 MiB on 135M)
    assert sum(f16.values()) - sum(q8.values()) == 2 * params - int(params * 34 / 32)


def test_gguf_reload_of_a_small_model_peaks_at_the_embedding():
    """The 16M test model: the embedding (12.6M of 15.7M elements) is read first, as 2 (f16) or 3 (q8_0, bf16)
    fp32 copies beside its own mapped pages — more than every tensor in fp32 with the whole file."""
    params, largest = 15_730_944, 12_582_912
    f16 = gguf_reload_components(params, largest, "f16")
    assert f16 == {"gate: GGUF file pages mapped by the reader (the embedding's)": 2 * largest,
                   "gate: largest tensor dequantized (2 fp32 copies)": 2 * 4 * largest}
    q8 = gguf_reload_components(params, largest, "q8_0")
    assert q8 == {"gate: GGUF file pages mapped by the reader (the embedding's)": int(largest * 34 / 32),
                  "gate: largest tensor dequantized (3 fp32 copies)": 3 * 4 * largest}
    assert sum(gguf_reload_components(params, largest, "bf16").values()) == 2 * largest + 12 * largest


def test_gguf_reload_with_an_untied_head_and_q4_0():
    """An untied output head is the file's last tensor: every other tensor is in fp32 by then. q4_0 stores the
    embedding and the head in q8_0 (the writer's rule), so the file and the dequantization are q8_0's there."""
    params, largest = 1_000_000, 200_000
    other = params - 2 * largest
    bill = gguf_reload_components(params, largest, "q4_0", head_last=True)
    assert bill == {"gate: reloaded tensors before the output head (fp32)": 4 * (params - largest),
                    "gate: GGUF file pages mapped by the reader": int(other * 18 / 32) + 2 * int(largest * 34 / 32),
                    "gate: largest tensor dequantized (3 fp32 copies)": 12 * largest}


def test_gguf_export_bill_is_the_merged_model_beside_the_reload():
    """The writer's one encoded tensor comes before the reload and is smaller: it is not added to the peak."""
    params, largest, adapter = 134_515_008, 28_311_552, 4_884_480
    bill = export_components(params, adapter, "q8_0", vocab=V, largest_tensor=largest)
    reload = gguf_reload_components(params, largest, "q8_0", vocab=V)
    assert bill == {"merged model (fp32)": 4 * params, "adapter (fp32)": 4 * adapter, "tokenizer": tokenizer_bytes(V),
                    "library code paged in by the forward passes": FORWARD_CODE_BYTES, **reload}
    assert not any("encoded" in name for name in bill)


def test_gguf_preflight_reads_an_untied_head_from_the_safetensors(tmp_path):
    """``merge.gguf.estimate_export_bytes`` prices the file the writer will write: an ``lm_head.weight`` in the
    headers is an untied head, read last by the gate."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from tuneforge.merge.gguf import estimate_export_bytes

    vocab, hidden = 1000, 64
    tensors = {"model.embed_tokens.weight": torch.zeros(vocab, hidden),
               "model.layers.0.mlp.up_proj.weight": torch.zeros(128, hidden),
               "model.norm.weight": torch.zeros(hidden)}
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file(tensors, str(tied / "model.safetensors"))
    (tied / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    untied = tmp_path / "untied"
    untied.mkdir()
    save_file({**tensors, "lm_head.weight": torch.zeros(vocab, hidden)}, str(untied / "model.safetensors"))
    (untied / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    params = vocab * hidden + 128 * hidden + hidden
    assert estimate_export_bytes(tied, None, "f16")["memory"] == sum(
        export_components(params, 0, "f16", vocab=vocab, largest_tensor=vocab * hidden).values())
    untied_params = params + vocab * hidden
    assert estimate_export_bytes(untied, None, "f16")["memory"] == sum(
        export_components(untied_params, 0, "f16", vocab=vocab, largest_tensor=vocab * hidden,
                          head_last=True).values())


def test_int8_bill_holds_the_fp32_weights_beside_the_check_or_the_quantized_model():
    """int8: the merged fp32 model (then its mapped saved file) with the larger of the check and the quantized
    model; one quantized copy, not two (the quantized model is freed once written; its reload is scored)."""
    params, linear, adapter = 1_000_000, 800_000, 10_000
    check = {"weights": 0, "tokenizer": 7, "logits, shifted fp32 copy, log-softmax (4 x 100)": 5_000_000}
    bill = export_components(params, adapter, "int8", check=check, vocab=512, quantized_params=linear)
    assert bill == {"merged model (fp32; then its saved file, mapped while quantized)": 4 * params,
                    "adapter (fp32)": 4 * adapter, "tokenizer": tokenizer_bytes(512),
                    "perplexity check: logits, shifted fp32 copy, log-softmax (4 x 100)": 5_000_000}
    small = {**check, "logits, shifted fp32 copy, log-softmax (4 x 100)": 1_000}
    bill = export_components(params, adapter, "int4", check=small, quantized_params=linear)
    assert bill["quantized model (int4)"] == linear // 2 + 4 * (params - linear)
    assert not any(name.startswith("perplexity check") for name in bill)


def test_int8_preflight_bills_the_widest_batch_of_its_texts(tmp_path, tiny_llama, tiny_tokenizer):
    """The export preflight prices the check on the texts it will score: the widest windows, 4 at a time — the
    same :func:`export_components` as ``estimate --phase export`` with that window."""
    from tests.helpers import make_run, save_base
    from tuneforge.merge.export import check_memory, check_windows
    from tuneforge.merge.lora import local_ref
    from tuneforge.models.memory import model_numbers, scoring_components

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    run = make_run(tmp_path / "run", base)
    texts = ["a short one", "The with statement wraps a block of code in a context manager. " * 3, "x y z", "one more text"]
    source = local_ref(run)
    longest = max(len(tiny_tokenizer(t)["input_ids"]) for t in texts)
    assert check_windows(source, texts) == (4, longest)
    assert check_windows(source, texts[:2]) == (2, longest)
    lines = []
    need = check_memory(source, "int8", None, lines.append, texts=texts)["need"]
    numbers = model_numbers(source)
    check = scoring_components(0, numbers.kv_per_token(4), rows=4, tokens=longest, element=4, **numbers.shape())
    linear = sum(p.numel() for n, p in tiny_llama.named_parameters() if p.dim() == 2 and "embed" not in n
                 and not n.startswith("lm_head"))
    assert need == sum(export_components(numbers.params, numbers.adapter_params, "int8", check=check,
                                         vocab=numbers.vocab,
                                         quantized_params=linear).values())
    assert f"the perplexity check's widest batch 4 x {longest} tokens" in lines[0]


def test_streaming_bill_is_the_larger_of_the_tensors_and_the_tokenizer_conversion():
    """Streaming: adapter and tokenizer throughout, then the larger of the largest tensor's three fp32 copies (+ its
    encoded bytes) and the gate's conversion of the written file's tokenizer (after the tensors are done)."""
    from tuneforge.models.memory import GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN, streaming_export_components

    small = streaming_export_components(12_582_912, 311_296, "q8_0", vocab=V)  # the 16M model: 48 MiB embedding
    assert small == {"adapter (fp32)": 4 * 311_296, "tokenizer": tokenizer_bytes(V),
                     "gate: the written file's tokenizer converted back": GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN * V}
    big = streaming_export_components(500_000_000, 0, "f16", vocab=V)  # a 7B-class embedding: the tensors win
    assert big == {"adapter (fp32)": 0, "tokenizer": tokenizer_bytes(V),
                   "largest tensor: read, merged, read back (fp32)": 12 * 500_000_000,
                   "largest tensor encoded (f16)": 2 * 500_000_000}
