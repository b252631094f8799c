"""The bill's formulas against the real thing: saved activations tensor for tensor, and one measured peak."""

from __future__ import annotations

import pytest

from tuneforge.estimate.bill import GiB, Setup, estimate_memory, layer_activation_bytes, weight_bytes
from tuneforge.estimate.measure import saved_activation_bytes
from tuneforge.estimate.spec import model_spec

H, INTER, HEADS, VOCAB, BATCH, SEQ = 64, 160, 4, 300, 2, 24


def _config(layers: int, kv_heads: int = HEADS, attn: str = "sdpa") -> dict:
    return {"model_type": "llama", "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": kv_heads, "vocab_size": VOCAB,
            "attn_implementation": attn, "use_cache": False}


def _traced(layers: int, setup: Setup, kv_heads: int, attn: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = _config(layers, kv_heads, attn)
    cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg))
    if setup.method == "lora":
        from peft import LoraConfig, get_peft_model

        from tuneforge.models.targets import resolve_target_modules

        targets = resolve_target_modules(model, setup.target_modules)
        model = get_peft_model(model, LoraConfig(r=setup.r, lora_dropout=setup.lora_dropout, target_modules=targets))
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.method == "lora":
            model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return saved_activation_bytes(model, ids)


CASES = [
    ("full", dict(method="full"), HEADS, "sdpa"),
    ("full-gqa", dict(method="full"), 2, "sdpa"),
    ("full-eager", dict(method="full"), HEADS, "eager"),
    ("full-checkpointing", dict(method="full", gradient_checkpointing=True), HEADS, "sdpa"),
    ("lora-no-dropout", dict(method="lora", r=4, lora_dropout=0.0), HEADS, "sdpa"),
    ("lora-dropout", dict(method="lora", r=4, lora_dropout=0.1), HEADS, "sdpa"),
    ("lora-attention-dropout", dict(method="lora", r=4, lora_dropout=0.1, target_modules="attention"), 2, "sdpa"),
    ("lora-qv", dict(method="lora", r=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]), HEADS, "sdpa"),
]


@pytest.mark.parametrize("name,fields,kv_heads,attn", CASES, ids=[c[0] for c in CASES])
def test_block_activations_equal_saved_tensors(name, fields, kv_heads, attn):
    """One more block adds exactly the bytes the formula says (fp32, CPU dropout masks)."""
    setup = Setup(precision="fp32", device="cpu", batch_size=BATCH, seq_len=SEQ, attn_implementation=attn, **fields)
    spec = model_spec(_config(2, kv_heads, attn), name=name)
    per_block, kept = layer_activation_bytes(spec, setup)
    expected = (kept if setup.gradient_checkpointing else per_block) * BATCH * SEQ
    measured = _traced(3, setup, kv_heads, attn) - _traced(2, setup, kv_heads, attn)
    assert measured == expected


def test_components_sum_to_total_and_peak_is_the_largest_phase():
    spec = model_spec("meta-llama/Llama-3.1-8B")
    for method in ("full", "lora", "qlora", "galore"):
        bill = estimate_memory(spec, Setup(method=method, batch_size=1, seq_len=1024, gradient_checkpointing=True))
        assert sum(bill.components.values()) == bill.total_bytes
        assert bill.total_bytes == max(bill.phases.values()) + bill.components["framework"]
        if method in ("full", "galore"):
            assert bill.trainable_params == spec.total_params
        else:
            assert 0 < bill.trainable_params < spec.total_params / 100


def test_guide_llama3_8b_bill():
    """The guide's table (003 §2.3): full fine-tuning of Llama-3-8B needs > 80 GB; QLoRA fits far below LoRA."""
    spec = model_spec("meta-llama/Llama-3.1-8B")
    full = estimate_memory(spec, Setup(method="full", batch_size=1, seq_len=512))
    assert full.components["weights"] + full.components["master_weights"] + full.components["gradients"] \
        + full.components["optimizer"] == 16 * spec.total_params  # 2 + 4 + 2 + 8 bytes/param (ZeRO's 16)
    assert full.total_bytes > 80 * GiB
    lora = estimate_memory(spec, Setup(method="lora", batch_size=1, seq_len=512, gradient_checkpointing=True))
    qlora = estimate_memory(spec, Setup(method="qlora", batch_size=1, seq_len=512, gradient_checkpointing=True))
    assert qlora.total_bytes < lora.total_bytes / 2
    # r=16 on all linear layers of Llama-3-8B: 41.9M adapter parameters (r x (in + out) summed over 224 linears)
    assert lora.trainable_params == 16 * sum(lin.in_features + lin.out_features
                                             for lin in spec.linears if lin.kind != "head")


def test_nf4_bytes_include_quantization_constants():
    spec = model_spec("meta-llama/Llama-2-7b-hf")
    quantized = sum(lin.numel for lin in spec.linears if lin.kind != "head")
    rest = spec.total_params - quantized
    dq, _ = weight_bytes(spec, Setup(method="qlora", double_quant=True), 0)
    no_dq, _ = weight_bytes(spec, Setup(method="qlora", double_quant=False), 0)
    # 4 bits + fp32 absmax per 64 = 0.5625 B/param; double quantization: 0.5 + 1/64 + 8/(64*256) B/param
    assert no_dq - rest * 2 == pytest.approx(quantized * 0.5625, rel=1e-6)
    assert dq - rest * 2 == pytest.approx(quantized * (0.5 + 1 / 64 + 8 / (64 * 256)), rel=1e-4)


def test_estimate_within_15_percent_of_measured_peak():
    """A fresh process trains two steps of a 6M-parameter Llama; its peak RSS delta vs the bill (fp32, CPU)."""
    from tuneforge.estimate.measure import job_setup, measure_peak

    job = dict(hidden=256, intermediate=688, layers=4, heads=4, vocab=4000, method="full", batch=4, seq_len=128,
               gc=False, steps=2, threads=1)
    setup, config = job_setup(job)
    bill = estimate_memory(model_spec(config, name="measured"), setup)
    measured = measure_peak(job)["peak_bytes"]
    assert abs(bill.total_bytes / measured - 1) <= 0.15, (bill.total_bytes, measured)
