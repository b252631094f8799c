"""RoPE scaling (model.rope_scaling): resolution, application, refusal, recording, and a model trained past its context."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from tests.helpers import stdlib_texts
from tuneforge.config import validate_config
from tuneforge.config.schema import FromConfig, ModelConfig
from tuneforge.errors import UserError
from tuneforge.models.load import load_model, model_config_of, resolve_run_rope
from tuneforge.models.rope import apply_rope_scaling, resolve_rope_scaling

CONTEXT = 32  # the tiny model's pre-trained context


def _fc(arch: str = "llama", positions: int = CONTEXT) -> FromConfig:
    return FromConfig(architecture=arch, hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                      max_position_embeddings=positions)


def _resolve(spec, max_length, arch="llama", config=None):
    model_cfg = ModelConfig(from_config=_fc(arch), rope_scaling=spec)
    return resolve_rope_scaling(model_cfg, max_length, config or model_config_of(model_cfg))


def test_auto_factor_is_ceil_of_length_over_context_and_only_past_the_context():
    assert _resolve("auto", 4 * CONTEXT) == {"type": "linear", "factor": 4.0, "original_max_position_embeddings": 32}
    assert _resolve("auto", 3 * CONTEXT + 1)["factor"] == 4.0  # ceil(97 / 32)
    assert _resolve("auto", CONTEXT) == "none"
    assert _resolve("auto", 8) == "none"
    assert _resolve("none", 4 * CONTEXT) == "none"
    explicit = _resolve({"type": "yarn", "factor": 2}, 16)
    assert explicit == {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}


def test_auto_picks_the_family_type():
    from transformers import LlamaConfig, Qwen2Config

    qwen = Qwen2Config(max_position_embeddings=CONTEXT)
    assert _resolve("auto", 128, config=qwen)["type"] == "yarn"
    llama31 = LlamaConfig(max_position_embeddings=8 * CONTEXT, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": CONTEXT, "rope_theta": 500000.0})
    # already scaled x8 from 32: 1000 tokens need ceil(1000 / 32) = 32 relative to the pre-trained context
    assert _resolve("auto", 1000, config=llama31) == {"type": "llama3", "factor": 32.0,
                                                      "original_max_position_embeddings": CONTEXT}
    yarned = Qwen2Config(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": CONTEXT, "rope_theta": 1e6})
    with pytest.raises(UserError, match="already scaled"):
        _resolve("auto", 1000, config=yarned)


def test_models_without_rope_are_refused_with_the_family_named():
    assert _resolve("auto", CONTEXT, arch="gpt2") == "none"  # nothing to scale: fine
    with pytest.raises(UserError, match=r"gpt2 models have no rotary position embeddings.*data.max_length <= 32"):
        _resolve("auto", 4 * CONTEXT, arch="gpt2")
    with pytest.raises(UserError, match="gpt2"):
        _resolve({"type": "linear", "factor": 2}, 16, arch="gpt2")


def test_schema_rejects_bad_values():
    base = {"model": {"from_config": {}}, "data": {"train": ["x.jsonl"]}}
    for bad in ("sometimes", {"type": "ntk", "factor": 2}, {"type": "linear", "factor": 1}):
        with pytest.raises(Exception, match="rope_scaling"):
            validate_config({**base, "model": {"from_config": {}, "rope_scaling": bad}})


def test_apply_scales_frequencies_and_raises_the_positions():
    from transformers import LlamaConfig

    for kind, positions in (("linear", 128), ("yarn", 128), ("llama3", 128), ("dynamic", CONTEXT)):
        config = LlamaConfig(max_position_embeddings=CONTEXT, hidden_size=64, num_attention_heads=4)
        resolved = {"type": kind, "factor": 4.0, "original_max_position_embeddings": CONTEXT}
        apply_rope_scaling(apply_rope_scaling(config, resolved), resolved)  # idempotent
        assert config.rope_parameters["rope_type"] == kind
        assert config.rope_parameters["factor"] == 4.0
        assert config.rope_parameters["rope_theta"] == 10000.0
        assert config.max_position_embeddings == positions  # dynamic NTK stays relative to the trained context
    model, _ = load_model(ModelConfig(from_config=_fc(), rope_scaling="auto"), texts=stdlib_texts(100),
                          max_length=4 * CONTEXT, device="cpu", dtype=torch.float32)
    plain, _ = load_model(ModelConfig(from_config=_fc()), texts=stdlib_texts(100), device="cpu", dtype=torch.float32)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq * 4, plain.model.rotary_emb.inv_freq)
    assert model.config.max_position_embeddings == 4 * CONTEXT


def test_run_config_records_the_resolved_scaling():
    raw = {"model": {"from_config": _fc().model_dump(), "rope_scaling": "auto"},
           "data": {"train": ["x.jsonl"], "max_length": 100}}
    cfg = resolve_run_rope(validate_config(raw))
    assert cfg.model.rope_scaling.model_dump() == {"type": "linear", "factor": 4.0,
                                                   "original_max_position_embeddings": 32}
    again = validate_config(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert resolve_run_rope(again).model.rope_scaling == cfg.model.rope_scaling  # --resume compares equal


def _blocks(tokenizer, texts, length):
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return [ids[i:i + length] for i in range(0, len(ids) - length, length)]


def _ppl(model, blocks) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([b]), labels=torch.tensor([b])).loss.item() for b in blocks]
    return math.exp(sum(losses) / len(losses))


@pytest.mark.slow
def test_auto_trains_at_four_times_the_context_and_beats_the_unscaled_model(tmp_path):
    """A tiny Llama pre-trained at 32 positions, then fine-tuned at 128 with rope_scaling auto (linear x4, full
    fine-tuning): its perplexity on held-out 128-token blocks beats the unscaled model's at that length, and the run
    records the scaling (config.yaml, final/config.json) so loading the run gives the scaled model back."""
    from tuneforge.models.reference import load_for_inference
    from tuneforge.train.run import run_training

    texts = stdlib_texts(400)
    train, held_out = texts[:340], texts[340:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in train))

    def run(name, max_length, steps, source, rope="none"):
        raw = {"run_name": name, "output_dir": str(tmp_path / name), "seed": 5, "stage": "pt",
               "model": {**source, "rope_scaling": rope}, "method": {"name": "full"},
               "data": {"train": [str(tmp_path / "train.jsonl")], "max_length": max_length},
               "train": {"report_to": ["none"], "max_steps": steps, "batch_size": 8, "lr": 2e-3,
                         "scheduler": "constant", "logging_steps": 50}}
        return run_training(validate_config(raw), echo=lambda *a: None)

    base = run("base", CONTEXT, 150, {"from_config": _fc().model_dump()})
    base_dir = str(base.final_dir)
    long = run("long", 4 * CONTEXT, 40, {"name_or_path": base_dir}, rope="auto")

    recorded = yaml.safe_load((long.run_dir / "config.yaml").read_text())["model"]["rope_scaling"]
    assert recorded == {"type": "linear", "factor": 4.0, "original_max_position_embeddings": CONTEXT}
    saved = json.loads((long.final_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "linear" and saved["max_position_embeddings"] == 4 * CONTEXT

    loaded = load_for_inference(str(long.run_dir), device="cpu", dtype=torch.float32)
    unscaled = load_for_inference(base_dir, device="cpu", dtype=torch.float32)
    blocks = _blocks(loaded.tokenizer, held_out, 4 * CONTEXT)[:12]
    scaled_ppl, unscaled_ppl = _ppl(loaded.model, blocks), _ppl(unscaled.model, blocks)
    short = [b[:CONTEXT] for b in blocks]
    print(f"ppl at {4 * CONTEXT}: scaled {scaled_ppl:.1f}, unscaled {unscaled_ppl:.1f}; "
          f"unscaled at {CONTEXT}: {_ppl(unscaled.model, short):.1f}")
    assert scaled_ppl < unscaled_ppl


def test_an_adapter_run_loads_and_merges_with_its_recorded_scaling(tmp_path):
    """An adapter on a local base: every loader re-applies the run's config.yaml scaling to the base (generate,
    eval, serve, merge in memory), and the shard-by-shard merge writes it into the merged config.json."""
    from tests.helpers import make_run, save_base
    from tuneforge.merge.lora import merge_lora
    from tuneforge.models.reference import load_for_inference, resolve

    model, tokenizer = load_model(ModelConfig(from_config=_fc()), texts=stdlib_texts(100), device="cpu",
                                  dtype=torch.float32)
    run = make_run(tmp_path / "run", save_base(model, tokenizer, tmp_path / "base"))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"]["rope_scaling"] = {"type": "linear", "factor": 4.0, "original_max_position_embeddings": CONTEXT}
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    ref = resolve(str(run))
    assert ref.rope_scaling["factor"] == 4.0 and "rope=" in ref.base_key  # serve shares bases only alike
    loaded = load_for_inference(ref, device="cpu", dtype=torch.float32)
    config = loaded.model.get_base_model().config
    assert config.rope_parameters["rope_type"] == "linear" and config.max_position_embeddings == 4 * CONTEXT
    for strategy in ("memory", "sharded"):
        merge_lora(str(run), tmp_path / strategy, strategy=strategy)
        saved = json.loads((tmp_path / strategy / "config.json").read_text())
        assert saved["rope_parameters"]["rope_type"] == "linear", strategy
        assert saved["rope_parameters"]["factor"] == 4.0 and saved["max_position_embeddings"] == 4 * CONTEXT


def test_estimate_bills_the_scaled_length():
    from tuneforge.estimate import estimate_memory, model_spec
    from tuneforge.estimate.choose import setup_from_run

    bills = {}
    for length in (CONTEXT, 4 * CONTEXT):
        raw = {"model": {"from_config": _fc().model_dump(), "rope_scaling": "auto"},
               "data": {"train": ["x.jsonl"], "max_length": length}}
        source, setup = setup_from_run(resolve_run_rope(validate_config(raw)), device="cpu")
        assert setup.seq_len == length
        bills[length] = estimate_memory(model_spec(source), setup).total_gb
    assert bills[4 * CONTEXT] > bills[CONTEXT]
