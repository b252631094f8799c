"""LoRA merge: adapter folded into its base, saved as a plain HF model, checked against adapter inference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_adapter, make_run, save_base
from tuneforge.errors import UserError


def peft_logits(base_dir: Path, adapter_dir: Path, ids):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def base_dir(tmp_path, tiny_llama, tiny_tokenizer):
    return save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")


# ----------------------------------------------------------------------------- tests


def test_merged_run_loads_in_stock_transformers_and_matches_adapter(tmp_path, base_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.merge.lora import merge_lora

    run = make_run(tmp_path / "runs" / "a", base_dir)
    out = tmp_path / "merged"
    report = merge_lora(run, out)

    assert report.max_diff < 1e-4 and report.mean_diff <= report.max_diff
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "chat_template.jinja").is_file() and (out / "template.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("A sentence the probes never saw, with numbers 1 2 3.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got = merged(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
    want = peft_logits(base_dir, run / "final", ids)
    assert torch.allclose(got, want, atol=1e-4)
    assert (got - base).abs().max() > 1e-2  # the adapter really changed the model: the comparison can fail
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["max_logit_diff"] == pytest.approx(report.max_diff)


def test_adapter_dir_merge_and_template_from_adapter(tmp_path, base_dir, capsys):
    from tuneforge.merge.lora import merge_lora

    adapter = make_adapter(base_dir, tmp_path / "adapter", seed=3, target_modules=("q_proj", "down_proj"))
    report = merge_lora(adapter, tmp_path / "out")
    assert report.base == str(base_dir.resolve())
    assert (tmp_path / "out" / "chat_template.jinja").is_file()
    # a run's final/ is the run (models.reference.resolve): its qlora method is known, so the note appears
    run = make_run(tmp_path / "runs" / "q", base_dir, method="qlora")
    capsys.readouterr()
    merge_lora(run / "final", tmp_path / "out2")
    assert "dequantise-first" in capsys.readouterr().out


def test_merge_above_tolerance_fails_and_writes_nothing(tmp_path, base_dir, capsys):
    from tuneforge.cli import main

    run = make_run(tmp_path / "run", base_dir, scale=5.0)
    out = tmp_path / "merged"
    code = main(["merge", str(run), "--out", str(out), "--dtype", "bf16", "--tolerance", "1e-6"])
    err = capsys.readouterr().err
    assert code == 2
    assert "above --tolerance" in err and "nothing was written" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp dir left either


def test_cli_merge_prints_logit_difference(tmp_path, base_dir, capsys):
    from tuneforge.cli import main

    run = make_run(tmp_path / "run", base_dir)
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "logit difference adapter vs merged" in out and "max" in out and "mean" in out


def test_full_model_run_and_prompt_adapters_are_refused(tmp_path, base_dir):
    from tuneforge.merge.lora import merge_lora

    with pytest.raises(UserError, match="nothing to merge"):
        merge_lora(base_dir, tmp_path / "x")
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PREFIX_TUNING", "base_model_name_or_path": str(base_dir)}))
    with pytest.raises(UserError, match="cannot be merged"):
        merge_lora(prefix, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_quantized_base_is_refused_with_reason(tmp_path, base_dir):
    import shutil

    from tuneforge.merge.lora import merge_lora

    adapter = make_adapter(base_dir, tmp_path / "adapter")
    qbase = tmp_path / "qbase"
    shutil.copytree(base_dir, qbase)
    config = json.loads((qbase / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized.*--base"):
        merge_lora(adapter, tmp_path / "out", base=str(qbase))
    # the dequantise-first route: the original unquantized base is given explicitly
    merge_lora(adapter, tmp_path / "out", base=str(base_dir))
    assert (tmp_path / "out" / "config.json").is_file()


def test_qlora_run_merges_into_unquantized_base_with_a_note(tmp_path, base_dir, capsys):
    from tuneforge.merge.lora import merge_lora

    run = make_run(tmp_path / "q", base_dir, method="qlora")
    capsys.readouterr()
    merge_lora(run, tmp_path / "out")
    assert "dequantise-first" in capsys.readouterr().out


def test_missing_and_wrong_paths_are_user_errors(tmp_path):
    from tuneforge.merge.lora import merge_lora

    with pytest.raises(UserError, match="no such"):
        merge_lora(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a tuneforge run"):
        merge_lora(tmp_path / "empty", tmp_path / "out")
