"""estimate --phase: the bills of merge, export, eval and serve, and their agreement with what the commands plan."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_run, save_base
from tuneforge.errors import UserError


@pytest.fixture()
def base_dir(tmp_path, tiny_llama, tiny_tokenizer):
    return save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")


def test_merge_bill_agrees_with_the_merge_commands_own_preflight(tmp_path, base_dir):
    from pathlib import Path

    from tuneforge.estimate.phases import phase_bill
    from tuneforge.estimate.spec import model_spec
    from tuneforge.merge.lora import local_ref
    from tuneforge.merge.sharded import estimate_merge_bytes

    run = make_run(tmp_path / "run", base_dir, r=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"))
    spec = model_spec(str(base_dir))
    bill = phase_bill(spec, "merge", precision="fp32", r=16)
    planned = estimate_merge_bytes(base_dir, Path(local_ref(run).adapter), 4)["memory"]
    assert abs(bill.total_bytes - planned) / planned < 0.05  # same arithmetic, from the config vs the files
    assert bill.components["base weights (fp32)"] == 4 * spec.total_params


def test_phase_bills_scale_with_their_knobs():
    from tuneforge.estimate.phases import kv_bytes_per_token, phase_bill
    from tuneforge.estimate.spec import model_spec

    spec = model_spec("Qwen/Qwen2.5-0.5B")  # the built-in table: no download
    serve_small = phase_bill(spec, "serve", precision="bf16", token_budget=1024)
    serve_big = phase_bill(spec, "serve", precision="bf16", token_budget=2048)
    # per budget token: keys and values in the KV store + its spare quarter + the prefix store's eighth, and the
    # serve engine's activation allowance (8 x hidden, bf16)
    kv = kv_bytes_per_token(spec, 2)
    assert serve_big.total_bytes - serve_small.total_bytes == (kv + kv // 4 + kv // 8 + 8 * 896 * 2) * 1024
    assert serve_small.components["prefix-reuse store"] == kv * 1024 // 8
    assert serve_small.components["kv store (token budget + spare columns)"] == kv * (1024 + 256 + 8)  # 8 rows
    assert phase_bill(spec, "serve", token_budget=1024, prefix_tokens=0).components["prefix-reuse store"] == 0
    assert kv_bytes_per_token(spec, 2) == 2 * 24 * 2 * 64 * 2  # 24 layers, 2 KV heads of 64, K and V, bf16
    eval_bill = phase_bill(spec, "eval", batch_size=4, seq_len=512)
    assert phase_bill(spec, "eval", batch_size=8, seq_len=512).total_bytes > eval_bill.total_bytes
    gguf = phase_bill(spec, "export", quantize="q8_0")
    assert gguf.components["gate: reloaded GGUF, dequantized (fp32)"] == 4 * spec.total_params
    # int8's perplexity check scores 4 windows: its logits (x3: logits, shifted copy, log-softmax) grow with them
    hf_short, hf_long = (phase_bill(spec, "export", quantize="int8", seq_len=n) for n in (256, 512))
    assert hf_long.total_bytes - hf_short.total_bytes == 4 * 256 * spec.vocab_size * 12
    generating = phase_bill(spec, "eval", batch_size=8, seq_len=512, generation=True)
    assert generating.total_bytes < phase_bill(spec, "eval", batch_size=8, seq_len=512).total_bytes  # last logits only
    assert phase_bill(spec, "merge", precision="bf16").total_bytes > phase_bill(spec, "merge").total_bytes - 1


def test_cli_phase_json_and_bad_values(capsys):
    from tuneforge.cli import main

    assert main(["estimate", "Qwen/Qwen2.5-0.5B", "--phase", "export", "--quantize", "q4_0", "--json",
                 "--gpu-mem", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["phase"] == "export" and data["fits"] is False
    assert "gate: GGUF file pages mapped by the reader" in data["components"]  # the reload is the peak, not the writer
    assert main(["estimate", "Qwen/Qwen2.5-0.5B", "--phase", "export", "--quantize", "q9"]) == 2
    assert "--quantize 'q9'" in capsys.readouterr().err
    from tuneforge.estimate.phases import phase_bill
    from tuneforge.estimate.spec import model_spec

    with pytest.raises(UserError, match="--phase"):
        phase_bill(model_spec("Qwen/Qwen2.5-0.5B"), "deploy")
