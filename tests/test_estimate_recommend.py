"""Recommendation: the guide's decision tree, priced; the CLI around the bill."""

from __future__ import annotations

import json

import pytest

from tuneforge.errors import UserError
from tuneforge.estimate.bill import GiB, estimate_memory
from tuneforge.estimate.choose import recommend, recommend_for_run, recommendation_for_run
from tuneforge.estimate.spec import model_spec


@pytest.fixture(scope="module")
def llama8b():
    return model_spec("meta-llama/Llama-3.1-8B")


def test_choice_follows_the_budget_down_the_tree(llama8b):
    chosen = {gb: recommend(llama8b, gb, seq_len=1024) for gb in (400, 100, 40, 24, 12)}
    assert [chosen[gb].method for gb in (400, 24, 12)] == ["full", "lora", "qlora"]
    assert chosen[100].method in ("full", "galore")  # 16 B/param AdamW does not fit; 8-bit Adam or GaLore does
    order = ["full", "galore", "lora", "qlora"]
    ranks = [order.index(chosen[gb].method) for gb in (400, 100, 40, 24, 12)]
    assert ranks == sorted(ranks)  # less memory never buys a heavier method
    for gb, rec in chosen.items():
        assert rec.bill.total_bytes <= gb * GiB * 0.9  # fits with the 10% margin
        assert rec.setup.batch_size * rec.setup.grad_accum >= 16  # the guide's effective batch
        # and its bill is the bill of the setup it reports
        assert estimate_memory(llama8b, rec.setup).total_bytes == rec.bill.total_bytes
    assert "QLoRA" in chosen[12].explanation and "fits" in chosen[12].explanation


def test_micro_batch_and_accumulation_reach_the_target(llama8b):
    rec = recommend(llama8b, 24, seq_len=512, target_batch=32)
    assert rec.setup.batch_size * rec.setup.grad_accum >= 32
    assert rec.setup.grad_accum == -(-32 // rec.setup.batch_size)
    # doubling the micro-batch would not fit the same method without more checkpointing
    bigger = estimate_memory(llama8b, type(rec.setup)(**{**rec.setup.__dict__, "batch_size": rec.setup.batch_size * 2,
                                                         "grad_accum": max(1, rec.setup.grad_accum // 2)}))
    assert rec.setup.batch_size == 16 or bigger.total_bytes > 24 * GiB * 0.9


def test_budget_too_small_says_smallest_setup_and_gap(llama8b):
    with pytest.raises(UserError, match=r"nothing fits in 3 GiB.*smallest setup found is qlora.*GiB over"):
        recommend(llama8b, 3, seq_len=2048)


def _run_cfg(tmp_path, method: dict, budget: float | None = 2.0):
    from tuneforge.config.load import validate_config

    raw = {"model": {"from_config": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 4096},
                     "device": "cpu"},
           "method": method, "data": {"train": ["x.jsonl"], "max_length": 512},
           "train": {"batch_size": 4, "grad_accum": 2, **({"memory_budget_gb": budget} if budget else {})}}
    return validate_config(raw)


def test_recommend_for_run_returns_a_valid_method_section(tmp_path):
    from tuneforge.config.load import validate_config

    cfg = _run_cfg(tmp_path, {"name": "auto"}, budget=2.0)
    section = recommend_for_run(cfg)
    assert section["name"] == "full"  # a 5M-parameter model fits 2 GiB of RAM fully
    rec = recommendation_for_run(cfg)
    assert rec.setup.batch_size * rec.setup.grad_accum >= 8  # the config's effective batch (4 x 2)
    raw = cfg.model_dump(mode="json")
    raw["method"] = section
    raw["train"].update(rec.train_overrides())
    assert validate_config(raw).method.name == "full"
    # a budget just below full fine-tuning's smallest setup (batch 1, checkpointing) forces an adapter method
    from tuneforge.estimate.bill import Setup

    spec = model_spec(cfg.model.from_config)
    smallest_full = min(
        estimate_memory(spec, Setup(method="full", optim=optim, batch_size=1, grad_accum=8, seq_len=512,
                                    gradient_checkpointing=True, precision="fp32", device="cpu")).total_bytes
        for optim in ("adamw", "adamw_8bit"))
    budget = smallest_full / 0.9 / GiB * 0.98
    tight = recommend_for_run(_run_cfg(tmp_path, {"name": "auto", "r": 4}, budget=budget))
    assert tight["name"] in ("galore", "lora", "qlora")
    if tight["name"] != "galore":
        assert tight["r"] == 4  # a rank the user wrote is kept


def test_cli_json_and_table(capsys):
    from tuneforge.cli import main

    assert main(["estimate", "gpt2", "--method", "lora", "--r", "8", "--seq-len", "256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == 124_439_808
    assert sum(data["components"].values()) == data["total_bytes"]
    assert 0 < data["trainable_params"] < data["total_params"]
    assert main(["estimate", "Qwen/Qwen2.5-0.5B", "--method", "qlora", "--gpu-mem", "8"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states" in out and ("fits" in out or "does not fit" in out)


def test_cli_reads_a_run_config(tmp_path, capsys):
    from tuneforge.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  from_config: {hidden_size: 128, num_layers: 2, num_heads: 4, vocab_size: 1000}\n"
        "  device: cpu\nmethod: {name: lora, r: 4, target_modules: attention}\n"
        "data: {train: [a.jsonl], max_length: 64}\ntrain: {batch_size: 3}\n", encoding="utf-8")
    assert main(["estimate", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["setup"]["seq_len"] == 64 and data["setup"]["batch_size"] == 3 and data["setup"]["r"] == 4
    assert data["setup"]["precision"] == "fp32" and data["components"]["framework"] == 0  # CPU run
    assert data["trainable_params"] == 2 * 4 * 4 * (128 + 128)  # 2 blocks x q,k,v,o x r(in + out)
    assert main(["estimate", str(path), "--batch-size", "6", "--json"]) == 0  # flags override the config
    assert json.loads(capsys.readouterr().out)["setup"]["batch_size"] == 6


@pytest.mark.parametrize("argv,message", [
    (["estimate", "no-such/model-xyz"], "unknown model 'no-such/model-xyz'"),
    (["estimate", "gpt2", "--recommend"], "--recommend needs a budget"),
    (["estimate", "gpt2", "--method", "lora", "--target-modules", "q_proj"], "'q_proj' matches no module"),
    (["estimate", "meta-llama/Llama-3.1-8B", "--recommend", "--gpu-mem", "2"], "nothing fits in 2 GiB"),
    (["estimate", "gpt2", "--batch-size", "0"], "--batch-size must be positive"),
])
def test_cli_bad_input_exits_2_with_the_fix(argv, message, capsys):
    from tuneforge.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
