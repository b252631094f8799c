"""Shard-by-shard LoRA merge: identical to the in-memory merge, chosen by the memory preflight, refused honestly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_adapter, make_run, save_base
from tuneforge.errors import UserError


@pytest.fixture()
def sharded_base(tmp_path, tiny_llama, tiny_tokenizer):
    """The tiny Llama saved in several safetensors shards (an index and >= 3 files)."""
    folder = tmp_path / "base"
    tiny_llama.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer.save_pretrained(folder)
    from tuneforge.data.templates import get_template

    get_template("chatml").save(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_sharded_merge_equals_the_in_memory_merge(tmp_path, sharded_base):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.merge.lora import merge_lora

    run = make_run(tmp_path / "run", sharded_base, target_modules=("q_proj", "v_proj", "down_proj"))
    memory = merge_lora(run, tmp_path / "memory", strategy="memory")
    assert memory.max_diff <= memory.tolerance
    merge_lora(run, tmp_path / "sharded", strategy="sharded")

    in_memory, by_shard = _tensors(tmp_path / "memory"), _tensors(tmp_path / "sharded")
    base = _tensors(sharded_base)
    assert set(by_shard) == set(base)  # the tied head stays tied: no extra tensor
    changed = [name for name in base if not torch.equal(base[name], by_shard[name])]
    assert len(changed) == 2 * 3  # q, v and down of both layers received their delta
    for name in in_memory:
        torch.testing.assert_close(by_shard[name], in_memory[name], rtol=0, atol=1e-6)
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "memory")(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "sharded").glob("model-*.safetensors")}
    report = json.loads((tmp_path / "sharded" / "merge_report.json").read_text())
    assert report["strategy"] == "sharded" and report["merged_weights"] == 6
    assert (tmp_path / "sharded" / "chat_template.jinja").is_file() or (tmp_path / "sharded" / "template.json").is_file()


def test_auto_goes_shard_by_shard_when_the_model_exceeds_the_budget(tmp_path, sharded_base, capsys):
    from tuneforge.merge.lora import local_ref
    from tuneforge.merge.sharded import estimate_merge_bytes, plan_merge

    run = make_run(tmp_path / "run", sharded_base)
    ref = local_ref(run)
    need = estimate_merge_bytes(sharded_base, Path(ref.adapter), 4)
    assert need["sharded"] * 3 < need["memory"]  # several shards: one shard is a fraction of the model
    assert plan_merge(ref, 4, "auto", max_memory=need["memory"] * 2).strategy == "memory"
    budget = need["memory"] // 3  # the model is 3x the budget
    plan = plan_merge(ref, 4, "auto", max_memory=budget)
    assert plan.strategy == "sharded" and "GiB" in plan.describe()
    with pytest.raises(UserError, match="--max-memory"):
        plan_merge(ref, 4, "auto", max_memory=need["sharded"] // 2)

    from tuneforge.merge.lora import merge_lora

    capsys.readouterr()
    merge_lora(run, tmp_path / "out", max_memory=budget)
    assert "→ sharded" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["strategy"] == "sharded"


def test_adapters_that_do_not_fold_tensor_by_tensor_are_refused_before_writing(tmp_path, sharded_base):
    from tuneforge.merge.lora import merge_lora

    dora = make_adapter(sharded_base, tmp_path / "dora", use_dora=True)
    with pytest.raises(UserError, match="in memory"):
        merge_lora(dora, tmp_path / "out", strategy="sharded")
    assert not (tmp_path / "out").exists()


def test_cli_max_memory_is_parsed_and_bad_sizes_name_the_option(tmp_path, sharded_base, capsys):
    from tuneforge.cli import main

    run = make_run(tmp_path / "run", sharded_base)
    # ~15 MB in memory (weights, tokenizer, logit check, the 13 MiB of library code a forward pages in); shard by
    # shard the tokenizer's load after the last shard (~0.6 MB for 512 entries) is the peak
    assert main(["merge", str(run), "--out", str(tmp_path / "out"), "--max-memory", "1MB"]) == 0
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["strategy"] == "sharded"
    assert main(["merge", str(run), "--out", str(tmp_path / "o2"), "--max-memory", "lots"]) == 2
    assert "--max-memory 'lots'" in capsys.readouterr().err


def test_single_file_base_merges_shard_by_shard_too(tmp_path, tiny_llama, tiny_tokenizer):
    import torch

    from tuneforge.merge.lora import merge_lora

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    run = make_run(tmp_path / "run", base)
    merge_lora(run, tmp_path / "a", strategy="memory")
    merge_lora(run, tmp_path / "b", strategy="sharded", dtype="bf16")
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(t.dtype == torch.bfloat16 for t in b.values())
    for name in a:
        torch.testing.assert_close(b[name], a[name].to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_model_three_times_the_budget_merges_shard_by_shard_identically(tmp_path):
    """Issue 28's target on weights, not on the bill's constants: a model whose fp32 weights are 3x the
    --max-memory budget merges shard by shard within the budget's bill, identical to the in-memory merge."""
    import torch

    from tests.helpers import stdlib_texts, tiny_from_config
    from tuneforge.merge.lora import local_ref, merge_lora
    from tuneforge.merge.sharded import estimate_merge_bytes
    from tuneforge.models.build import build_model
    from tuneforge.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(stdlib_texts(), vocab_size=512)
    torch.manual_seed(0)
    spec = tiny_from_config("llama").model_copy(update={"num_kv_heads": 2, "num_layers": 16, "hidden_size": 128})
    model = build_model(spec, tokenizer)
    weights = 4 * sum(p.numel() for p in model.parameters())
    base = tmp_path / "base"
    model.save_pretrained(base, max_shard_size="1MB")  # shards of a tenth of the weights
    tokenizer.save_pretrained(base)
    run = make_run(tmp_path / "run", base, scale=0.2, target_modules=("q_proj", "k_proj", "v_proj", "down_proj"))
    budget = weights // 3
    need = estimate_merge_bytes(base, Path(local_ref(run).adapter), 4)
    assert need["sharded"] <= budget < need["memory"]

    merge_lora(run, tmp_path / "sharded", max_memory=budget)
    assert json.loads((tmp_path / "sharded" / "merge_report.json").read_text())["strategy"] == "sharded"
    merge_lora(run, tmp_path / "memory", strategy="memory")
    in_memory, by_shard = _tensors(tmp_path / "memory"), _tensors(tmp_path / "sharded")
    assert set(in_memory) == set(by_shard)
    for name in in_memory:
        torch.testing.assert_close(by_shard[name], in_memory[name], rtol=0, atol=1e-6)
