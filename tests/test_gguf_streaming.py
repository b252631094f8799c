"""The GGUF export's memory preflight and its streaming path (a model larger than the --max-memory budget is merged
and written one tensor at a time, then gated tensor by tensor)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import make_run, stdlib_texts
from tests.test_gguf import _train_briefly
from tuneforge.errors import UserError

TARGETS = ("q_proj", "k_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory) -> Path:
    """A run on a tiny Llama with 16 layers (grouped-query attention): many tensors of similar size, so that one
    tensor at a time fits a budget a third of the model's weights; LoRA on q, k, v and down."""
    import torch

    from tests.helpers import save_base, tiny_from_config
    from tuneforge.models.build import build_model
    from tuneforge.models.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(stdlib_texts(), vocab_size=512)
    torch.manual_seed(0)
    # hidden 192: a third of the weights (9 MB) must hold the streamed export's fixed terms (the tokenizer, its
    # conversion by the gate) beside three copies of the largest tensor
    spec = tiny_from_config("llama").model_copy(update={"num_kv_heads": 2, "num_layers": 16, "hidden_size": 192})
    model = build_model(spec, tokenizer)
    _train_briefly(model, tokenizer, steps=20)
    base = save_base(model, tokenizer, tmp_path_factory.mktemp("deep") / "base")
    return make_run(tmp_path_factory.mktemp("deep-runs") / "run", base, scale=0.2, target_modules=TARGETS)


def _weight_bytes(run: Path) -> int:
    from tuneforge.merge.gguf import safetensors_shapes
    from tuneforge.models.reference import resolve

    shapes = safetensors_shapes(Path(resolve(str(run)).base))
    total = 0
    for shape, _ in shapes.values():
        count = 1
        for n in shape:
            count *= n
        total += 4 * count
    return total


def _tensors(file: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, bytes(t.data.tobytes())) for t in gguf.GGUFReader(str(file)).tensors}


def test_model_three_times_the_budget_streams_and_equals_the_in_memory_file(deep_run, tmp_path, capsys):
    """Through the CLI: the estimate is printed, the streaming path is taken, the per-tensor gate says what it
    checked, and the file is the in-memory export's, tensor by tensor and byte for byte."""
    from tuneforge.cli import main
    from tuneforge.merge.gguf import export_gguf

    budget = _weight_bytes(deep_run) // 3
    streamed = tmp_path / "streamed"
    assert main(["export", str(deep_run), "--format", "gguf", "--quantize", "q8_0", "--out", str(streamed),
                 "--max-memory", str(budget)]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "export memory: estimated peak memory" in text and "→ streaming (the whole merged model does not fit)" in text
    assert "gate q8_0 (per tensor, streaming" in text and "no logits are compared" in text
    report = json.loads((streamed / "export_report.json").read_text())
    assert report["strategy"] == "streaming" and report["gate"] == "per-tensor"
    assert report["memory_budget"] == budget and report["memory_estimate"]["streaming"] <= budget
    assert report["memory_estimate"]["memory"] > 3 * budget  # the whole merged model would not have fit
    assert 0 < report["tensor_errors"]["Q8_0"] <= 0.0045 and report["tensor_errors"]["F32"] == 0.0
    assert "no logits were compared" in (streamed / "README.md").read_text()

    in_memory = tmp_path / "memory"
    export_gguf(deep_run, in_memory, quantize="q8_0", strategy="memory", echo=lambda *_: None)
    a, b = _tensors(streamed / "model-q8_0.gguf"), _tensors(in_memory / "model-q8_0.gguf")
    assert list(a) == list(b) and len(a) == 2 + 16 * 9
    for name in a:
        assert a[name] == b[name], name
    assert (streamed / "model-q8_0.gguf").read_bytes() == (in_memory / "model-q8_0.gguf").read_bytes()


def test_export_refuses_with_both_numbers_when_nothing_fits(deep_run, tmp_path):
    from tuneforge.merge.gguf import export_gguf

    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"needs about [0-9.]+ GiB even tensor by tensor \(in memory [0-9.]+ GiB\), "
                                        r"above the budget of [0-9.]+ GiB; .*--max-memory"):
        export_gguf(deep_run, out, quantize="q8_0", max_memory=20_000, echo=lambda *_: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_streaming_gate_catches_a_wrong_tensor_and_leaves_nothing(deep_run, tmp_path, monkeypatch):
    """Without the q/k row permutation the file is wrong for llama.cpp; the per-tensor gate (transformers' own inverse
    permutation) must refuse it."""
    from tuneforge.merge import gguf as export

    monkeypatch.setattr(export, "_permute_rope_rows", lambda weight, n_head, n_kv: weight)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"round-trip gate \(per tensor\) failed for f16: blk\.0\.attn_k\.weight \(F16\): max error"):
        export.export_gguf(deep_run, out, quantize="f16", strategy="streaming", echo=lambda *_: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_hf_export_refuses_above_the_budget(deep_run, tmp_path):
    pytest.importorskip("bitsandbytes")
    from tuneforge.merge.export import export_model

    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"needs about [0-9.]+ GiB, above the budget of [0-9.]+ GiB.*--format gguf"):
        export_model(deep_run, out, quantize="int8", max_memory=10_000, echo=lambda *_: None)
    assert not out.exists()
