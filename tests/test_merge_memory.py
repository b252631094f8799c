"""The merge's memory bill against a hand computation: per shard for the shard-by-shard merge, by moment for the
in-memory merge; and the logit check that works one probe at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneforge.models import memory

VOCAB, HIDDEN, RANK = 100, 8, 2


def _two_shards(folder: Path, *, config_vocab: int = 0, dtype: str = "float32") -> Path:
    """A base in two safetensors shards: an unadapted embedding alone in the first (VOCAB x HIDDEN), an adapted
    q_proj (HIDDEN x HIDDEN) and a norm (HIDDEN) in the second; an adapter of rank 2 on q_proj. ``config_vocab``
    is config.json's vocab_size (0: none, so no tokenizer term)."""
    import torch
    from safetensors.torch import save_file

    kind = getattr(torch, dtype)
    base = folder / "base"
    base.mkdir(parents=True)
    save_file({"model.embed_tokens.weight": torch.zeros(VOCAB, HIDDEN, dtype=kind)},
              str(base / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(HIDDEN, HIDDEN, dtype=kind),
               "model.norm.weight": torch.ones(HIDDEN, dtype=kind)}, str(base / "model-00002-of-00002.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                  "model.layers.0.self_attn.q_proj.weight": "model-00002-of-00002.safetensors",
                  "model.norm.weight": "model-00002-of-00002.safetensors"}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"hidden_size": HIDDEN, **({"vocab_size": config_vocab} if config_vocab else {})}
    (base / "config.json").write_text(json.dumps(config))
    adapter = folder / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(RANK, HIDDEN), f"{prefix}.lora_B.weight": torch.zeros(HIDDEN, RANK)},
              str(adapter / "adapter_model.safetensors"))
    return folder


def test_shard_by_shard_bill_is_the_largest_shard_of_its_own_not_two_shards(tmp_path):
    from tuneforge.merge.sharded import estimate_merge_bytes

    folder = _two_shards(tmp_path)
    adapter = 2 * RANK * HIDDEN
    got = estimate_merge_bytes(folder / "base", folder / "adapter", 4, dtype_name="float32")["sharded"]
    # fp32 -> fp32: the embedding has no adapter and is written from its mapped pages (no new tensor, no fold);
    # the second shard: its pages + the merged q_proj + the fold temporaries of q_proj (B @ A and its scaled copy)
    embedding_shard = VOCAB * HIDDEN * 4
    layer_shard = (HIDDEN * HIDDEN + HIDDEN) * 4 + HIDDEN * HIDDEN * 4 + 8 * HIDDEN * HIDDEN
    assert got == 4 * adapter + max(embedding_shard, layer_shard) == 4 * adapter + embedding_shard
    assert got < 4 * adapter + 2 * embedding_shard  # the old bound: two of the largest shard

    # saved in bf16: every floating tensor gets a converted copy, the adapted one too
    got = estimate_merge_bytes(folder / "base", folder / "adapter", 2, dtype_name="bfloat16")["sharded"]
    embedding_shard = VOCAB * HIDDEN * 4 + VOCAB * HIDDEN * 2
    layer_shard = (HIDDEN * HIDDEN + HIDDEN) * 4 + (HIDDEN * HIDDEN + HIDDEN) * 2 + 8 * HIDDEN * HIDDEN
    assert got == 4 * adapter + max(embedding_shard, layer_shard)


def test_the_tokenizer_load_after_the_last_shard_is_the_peak_of_small_shards(tmp_path):
    from tuneforge.merge.sharded import estimate_merge_bytes

    folder = _two_shards(tmp_path, config_vocab=49152)  # small shards, a large vocabulary's tokenizer
    need = estimate_merge_bytes(folder / "base", folder / "adapter", 4)["sharded"]
    assert need == 4 * 2 * RANK * HIDDEN + memory.tokenizer_load_bytes(49152)
    got = memory.sharded_merge_components([1000, 2000], 50, vocab=49152)
    assert got == {"adapter (fp32)": 200, "tokenizer while it loads (after the last shard)": 49152 * 1235}
    assert memory.sharded_merge_components([10 ** 9], 50, vocab=49152) == {
        "adapter (fp32)": 200, "largest shard: its file pages, new tensors, one fold": 10 ** 9}
    # a base stored in bf16 and saved in bf16: nothing unadapted is copied, the fold also upcasts the weight
    folder = _two_shards(tmp_path / "bf16", dtype="bfloat16")
    need = estimate_merge_bytes(folder / "base", folder / "adapter", 2, dtype_name="bfloat16")["sharded"]
    embedding_shard = VOCAB * HIDDEN * 2
    layer_shard = (HIDDEN * HIDDEN + HIDDEN) * 2 + HIDDEN * HIDDEN * 2 + 12 * HIDDEN * HIDDEN
    assert need == 4 * 2 * RANK * HIDDEN + max(embedding_shard, layer_shard) == 4 * 2 * RANK * HIDDEN + 1600


def test_in_memory_merge_bill_fp32_is_the_check_and_bf16_the_cast():
    params, adapter, vocab, embedding = 15_700_000, 311_296, 49152, 49152 * 256
    logits = memory.PROBE_POSITIONS * vocab * 4
    fp32 = memory.merge_components(params, adapter, 4, vocab=vocab, largest_tensor=embedding)
    common = {"base weights (fp32)": 4 * params, "adapter (fp32)": 4 * adapter,
              "tokenizer": memory.tokenizer_bytes(vocab),
              "library code paged in by the forward passes": memory.FORWARD_CODE_BYTES}
    assert fp32 == {**common, "logit check: adapter's and merged logits, one probe's difference":
                    2 * logits + memory.PROBE_TEXT_POSITIONS * vocab * 4}
    bf16 = memory.merge_components(params, adapter, 2, vocab=vocab, largest_tensor=embedding)
    # the cast of the embedding beside every fp32 weight and the adapter's logits outweighs the check in bf16
    assert bf16 == {**common, "cast to the saved precision (one tensor), beside the adapter's logits": 2 * embedding + logits}


def test_forward_passes_bill_the_library_code_they_page_in():
    shape = {"vocab": 1000, "hidden": 64, "intermediate": 256, "element": 4.0}
    for of in (memory.scoring_components, memory.generation_components):
        parts = of(10 ** 6, 1024, rows=2, tokens=16, **shape)
        assert parts["library code paged in by the forward passes"] == memory.FORWARD_CODE_BYTES


def test_logit_difference_one_probe_at_a_time_matches_the_concatenation_and_keeps_nan():
    import torch

    from tuneforge.merge.lora import logit_difference

    torch.manual_seed(0)
    a = [torch.randn(1, n, 50) for n in (3, 5, 4)]
    b = [x + 0.01 * torch.randn_like(x) for x in a]
    diffs = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b, strict=True)])
    worst, mean = logit_difference(a, b)
    assert worst == pytest.approx(float(diffs.max()), rel=0, abs=0)
    assert mean == pytest.approx(float(diffs.mean()), rel=1e-6)
    b[1][0, 2, 7] = float("nan")
    assert math.isnan(logit_difference(a, b)[0])
    assert a[0].shape == (1, 3, 50) and not torch.equal(a[0], b[0])  # the inputs are left as they were
