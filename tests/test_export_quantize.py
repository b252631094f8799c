"""Quantized export: int8 / int4 weight-only, reloadable with stock transformers, perplexity delta reported."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_run, save_base
from tuneforge.errors import UserError

pytest.importorskip("bitsandbytes")


def test_int8_and_int4_exports_reload_and_report_perplexity(tmp_path, tiny_llama, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.merge.export import export_model

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    run = make_run(tmp_path / "run", base)
    data = tmp_path / "eval.txt"
    data.write_text("The with statement wraps a block.\n\nA list is a mutable sequence of items.\n\n" * 5)
    reports = {}
    for kind in ("int8", "int4"):
        out = tmp_path / kind
        reports[kind] = export_model(run, out, quantize=kind, data=str(data), echo=lambda *_: None)
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "bitsandbytes"
        model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")  # stock transformers
        linear_types = {type(m).__name__ for m in model.modules()}
        assert ("Linear8bitLt" if kind == "int8" else "Linear4bit") in linear_types
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()
        assert (out / "template.json").is_file() and (out / "tokenizer.json").is_file()
        report = reports[kind]
        assert report["ppl_delta"] == pytest.approx(report["ppl_quantized"] - report["ppl_original"])
        assert report["ppl_original"] > 1 and math_finite(report["ppl_quantized"])
        assert report["bytes_quantized"] < report["bytes_original"]
    # 4 bits lose more than 8: the int4 model's logits drift further from the original's
    assert 0 < reports["int8"]["logit_max_diff"] < reports["int4"]["logit_max_diff"]
    # one perplexity: the export's "before" figure is what `tuneforge eval` computes for the (unmerged) run
    from tuneforge.evaluate.perplexity import perplexity
    from tuneforge.merge.export import read_texts
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(run, device="cpu", dtype=torch.float32)
    records = [{"text": text} for text in read_texts(data)]
    assert perplexity(loaded.model, loaded.tokenizer, records).ppl == pytest.approx(reports["int8"]["ppl_original"],
                                                                                   rel=1e-4)


def math_finite(value: float) -> bool:
    import math

    return math.isfinite(value)


def test_export_bad_input(tmp_path, tiny_llama, tiny_tokenizer, capsys):
    from tuneforge.cli import main
    from tuneforge.merge.export import export_model

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    with pytest.raises(UserError, match="choose one of int8, int4"):
        export_model(base, tmp_path / "o", quantize="int3")
    with pytest.raises(UserError, match="no such file"):
        export_model(base, tmp_path / "o", quantize="int8", data=str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        export_model(base, tmp_path / "o", quantize="int8", data=str(bad))
    assert main(["export", str(tmp_path / "nope"), "--quantize", "int8", "--out", str(tmp_path / "o")]) == 2
    assert "no such run" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
