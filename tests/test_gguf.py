"""GGUF in (a .gguf file as a model reference) and GGUF out (export + round-trip gate), on tiny local models.

The tiny bases are trained for a few dozen steps on stdlib text first: a random model's logits are nearly flat, so
its greedy next token flips under any rounding and says nothing about the exporter.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tests.helpers import make_run, stdlib_texts, tiny_from_config
from tuneforge.errors import UserError


def _train_briefly(model, tokenizer, steps: int = 40) -> None:
    import torch

    texts = stdlib_texts(64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        batch = tokenizer(texts[(step * 4) % 60:(step * 4) % 60 + 4], return_tensors="pt", padding=True,
                          truncation=True, max_length=64)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    from tuneforge.models.tokenizer import train_tokenizer

    return train_tokenizer(stdlib_texts(), vocab_size=512)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with grouped-query attention (4 heads, 2 kv heads: the k permutation differs from q's)."""
    import torch

    from tests.helpers import save_base
    from tuneforge.models.build import build_model

    torch.manual_seed(0)
    model = build_model(tiny_from_config("llama").model_copy(update={"num_kv_heads": 2}), tokenizer)
    _train_briefly(model, tokenizer)
    return save_base(model, tokenizer, tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def qwen2_base(tmp_path_factory, tokenizer) -> Path:
    """A tiny Qwen2 (q/k/v biases, untied output head)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.helpers import save_base

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config)
    _train_briefly(model, tokenizer)
    return save_base(model, tokenizer, tmp_path_factory.mktemp("qwen2") / "base")


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, llama_base) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "run", llama_base, scale=0.2)


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TUNEFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _reader(file: Path):
    import gguf

    return gguf.GGUFReader(str(file))


def _field(reader, key):
    return reader.fields[key].contents()


# ----------------------------------------------------------------------------- GGUF out


@pytest.fixture(scope="module")
def llama_exports(llama_run, tmp_path_factory) -> dict:
    """The llama run exported once per quant type: ``{quantize: (out_dir, report, printed lines)}``."""
    from tuneforge.merge.gguf import export_gguf

    exports = {}
    for quantize in ("f16", "bf16", "q8_0", "q4_0"):
        lines: list[str] = []
        out = tmp_path_factory.mktemp("exports") / quantize
        exports[quantize] = (out, export_gguf(llama_run, out, quantize=quantize, echo=lines.append), lines)
    return exports


@pytest.mark.parametrize("quantize", ["f16", "bf16", "q8_0", "q4_0"])
def test_export_llama_run_passes_gate_for_each_quant_type(llama_exports, quantize):
    from tuneforge.merge.gguf import TOLERANCES

    out, report, lines = llama_exports[quantize]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"model-{quantize}.gguf", "Modelfile", "README.md", "export_report.json"])
    assert report["agreement"] >= TOLERANCES[quantize].agreement
    assert report["tokenization_ok"] and report["eos_ok"] and report["template_ok"]
    assert any(line.startswith("merge parity:") for line in lines)
    assert any(line.startswith(f"gate {quantize}: greedy agreement on the merged model's answers to 8 chat prompts")
               and "at every position of the sample texts" in line for line in lines)
    assert report["answers"] == 8 and report["answers_bounded"] == (report["answer_positions"] >= 100)
    assert report["answer_agreement"] >= TOLERANCES[quantize].answers
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["sha256"] == report["sha256"] and saved["quantize"] == quantize

    reader = _reader(out / f"model-{quantize}.gguf")
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    from tuneforge.data.templates import get_template

    assert _field(reader, "tokenizer.chat_template") == get_template("chatml").jinja
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    expected = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[quantize]
    assert types["blk.0.attn_q.weight"] == expected and types["blk.1.ffn_down.weight"] == expected
    assert types["token_embd.weight"] == ("Q8_0" if quantize == "q4_0" else expected)


def test_gate_enforces_the_answer_positions_bound(llama_run, tmp_path, monkeypatch):
    """The answer-position bound is a check of its own: above what the file reaches, the export is refused."""
    from tuneforge.merge import gguf as export

    monkeypatch.setitem(export.TOLERANCES, "f16", export.Tolerance(0.0, 1.0, 1.01))
    monkeypatch.setattr(export, "MIN_ANSWER_POSITIONS", 1)  # the tiny model's answers may be short
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"gate failed for f16: greedy agreement on answer positions [0-9.]+% < 101%"):
        export.export_gguf(llama_run, out, quantize="f16", echo=lambda *_: None)
    assert not out.exists()


def test_gate_reports_but_does_not_bound_too_few_answer_positions(llama_run, tmp_path, monkeypatch):
    from tuneforge.merge import gguf as export

    monkeypatch.setitem(export.TOLERANCES, "f16", export.Tolerance(0.0, 1.0, 1.01))
    monkeypatch.setattr(export, "MIN_ANSWER_POSITIONS", 10_000)
    lines: list[str] = []
    report = export.export_gguf(llama_run, tmp_path / "out", quantize="f16", echo=lines.append)
    assert report["answers_bounded"] is False
    assert any("answer positions (not bounded: fewer than 10000 positions" in line for line in lines)


def test_export_without_rope_permutation_fails_gate_and_leaves_nothing(llama_run, tmp_path, monkeypatch):
    """The q/k row permutation is what llama.cpp (and transformers' reader) expect: skipping it must fail."""
    from tuneforge.merge import gguf as export

    monkeypatch.setattr(export, "_permute_rope_rows", lambda weight, n_head, n_kv: weight)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="round-trip gate failed for q8_0: (greedy agreement on answer positions [0-9.]+% < 95%; )?greedy "
                                        "next-token agreement"):
        export.export_gguf(llama_run, out, quantize="q8_0", echo=lambda *_: None)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary sibling left


@pytest.mark.parametrize("quantize", ["f16", "q8_0"])
def test_export_qwen2_model_passes_gate(qwen2_base, tmp_path, quantize):
    from tuneforge.merge.gguf import TOLERANCES, export_gguf

    out = tmp_path / "out"
    report = export_gguf(qwen2_base, out, quantize=quantize, echo=lambda *_: None)
    assert report["agreement"] >= TOLERANCES[quantize].agreement
    reader = _reader(out / f"model-{quantize}.gguf")
    assert _field(reader, "general.architecture") == "qwen2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.bias"] == "F32" and types["blk.0.attn_k.bias"] == "F32"
    assert "output.weight" in types  # untied head is written


def test_export_refuses_unsupported_family(tmp_path, tokenizer):
    from tests.helpers import save_base
    from tuneforge.merge.gguf import export_gguf
    from tuneforge.models.build import build_model

    base = save_base(build_model(tiny_from_config("gpt2"), tokenizer), tokenizer, tmp_path / "gpt2")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="supports the model families llama, qwen2.*'gpt2'"):
        export_gguf(base, out, quantize="q8_0", echo=lambda *_: None)
    assert not out.exists()


def test_export_cli_checks_quant_type_against_format(llama_run, tmp_path):
    from tuneforge.merge.cli import export_command

    args = argparse.Namespace(source=str(llama_run), out=str(tmp_path / "o"), format="gguf", quantize="int8",
                              force=False, data=None, base=None)
    with pytest.raises(UserError, match="choose one of f16, bf16, q8_0, q4_0 \\(int8 is a --format hf type\\)"):
        export_command(args)
    args.format, args.quantize = "hf", "q8_0"
    with pytest.raises(UserError, match="choose one of int8, int4 \\(q8_0 is a --format gguf type\\)"):
        export_command(args)


def test_modelfile_has_template_stops_and_sampling(llama_exports):
    out = llama_exports["q8_0"][0]
    text = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf" in text
    assert ('TEMPLATE """{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
            in text)
    assert '{{ end }}{{ end }}<|im_start|>assistant\n"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0.0" in text
    readme = (out / "README.md").read_text()
    assert "llama-cli -m model-q8_0.gguf" in readme and "ollama create" in readme


def test_ollama_template_reads_a_default_system_prompt(tokenizer):
    """SmolLM2's template inserts a system prompt when none is given: it becomes the Modelfile's SYSTEM."""
    from tuneforge.data.templates import ChatTemplate
    from tuneforge.merge.gguf import ollama_template

    jinja = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
             "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
             "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    go, system, why = ollama_template(tokenizer, ChatTemplate("file", jinja, stop=["<|im_end|>"]))
    assert system == "You are helpful."
    assert go.startswith("{{ range .Messages }}") and "You are helpful" not in go
    assert why.startswith("verified")


def test_ollama_template_refuses_what_it_cannot_reproduce(tokenizer):
    from tuneforge.data.templates import ChatTemplate
    from tuneforge.merge.gguf import ollama_template

    # the text depends on the turn's position: not a per-role prefix/suffix
    jinja = "{% for m in messages %}[{{ loop.index }}]{{ m['content'] }}\n{% endfor %}"
    go, _, why = ollama_template(tokenizer, ChatTemplate("file", jinja))
    assert go is None and ("does not" in why or "could not" in why)


# ----------------------------------------------------------------------------- GGUF in


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory, llama_base) -> Path:
    """The tiny Llama base written as an f16 GGUF file (by the exporter: gated against the base)."""
    from tuneforge.merge.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "export"
    export_gguf(llama_base, out, quantize="f16", echo=lambda *_: None)
    return out / "model-f16.gguf"


def _logits(model, tokenizer, text="def add(a, b):\n    return a + b"):
    import torch

    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_gguf_file_is_a_model_reference_and_is_converted_once(llama_gguf, llama_base, cache, monkeypatch):
    import torch

    from tuneforge.models import gguf
    from tuneforge.models.reference import load_for_inference, resolve

    ref = resolve(llama_gguf)
    assert ref.kind == "model" and ref.base == str(llama_gguf.resolve())
    loaded = load_for_inference(ref, device="cpu", dtype=torch.float32)
    assert loaded.model.name_or_path == str(llama_gguf.resolve())
    assert loaded.template is not None and "<|im_start|>" in loaded.template.jinja  # the file's chat template
    original = load_for_inference(llama_base, device="cpu", dtype=torch.float32)
    assert (_logits(loaded.model, loaded.tokenizer) - _logits(original.model, original.tokenizer)).abs().max() < 0.05
    converted = gguf.converted_dir(llama_gguf)
    record = json.loads((converted / "gguf_source.json").read_text())
    assert record["sha256"] == gguf.file_sha256(llama_gguf) and record["architecture"] == "llama"
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())

    monkeypatch.setattr(gguf, "_convert", lambda *a, **k: pytest.fail("converted twice"))
    load_for_inference(llama_gguf, device="cpu", dtype=torch.float32)  # from the cache


def test_gguf_directory_and_gguf_file_key(llama_gguf, cache):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.load import check_model_source, load_model

    assert check_model_source(str(llama_gguf.parent.parent / "export")) == str(
        __import__("tuneforge.models.gguf", fromlist=["x"]).converted_dir(llama_gguf))
    cfg = ModelConfig(name_or_path=str(llama_gguf.parent), gguf_file=llama_gguf.name, precision="fp32")
    assert cfg.name_or_path == f"{llama_gguf.parent}/{llama_gguf.name}"
    model, tokenizer = load_model(cfg)
    assert model.name_or_path == str(llama_gguf.resolve())
    assert tokenizer.eos_token == "<|endoftext|>"


def test_adapter_trained_on_gguf_loads_back_onto_it(llama_gguf, tmp_path, cache):
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.config.schema import ModelConfig
    from tuneforge.models.load import load_model
    from tuneforge.models.reference import load_for_inference, resolve

    model, tokenizer = load_model(ModelConfig(name_or_path=str(llama_gguf), precision="fp32"))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    expected = _logits(peft_model, tokenizer)
    peft_model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_gguf.resolve())
    ref = resolve(tmp_path / "adapter")
    assert ref.base == str(llama_gguf.resolve())
    loaded = load_for_inference(ref, device="cpu", dtype=torch.float32)
    assert torch.allclose(_logits(loaded.model, loaded.tokenizer), expected, atol=1e-5)


def test_unsupported_gguf_refused_naming_what_is_supported(tmp_path, cache, monkeypatch, llama_gguf):
    import gguf
    import numpy as np

    from tuneforge.models import gguf as models_gguf
    from tuneforge.models.load import check_model_source

    file = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(file), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match="architecture 'falcon' is not supported; supported: llama, qwen2"):
        check_model_source(str(file))
    monkeypatch.setattr(models_gguf, "SUPPORTED_TENSOR_TYPES", ("F32", "Q8_0"))
    with pytest.raises(UserError, match="tensor type\\(s\\) F16 cannot be dequantized here; supported: F32, Q8_0"):
        check_model_source(str(llama_gguf))


def test_estimate_and_inspect_take_a_gguf_file(llama_gguf, cache):
    from tuneforge.commands.inspect import inspect_model
    from tuneforge.estimate.spec import model_spec

    spec = model_spec(str(llama_gguf))
    assert spec.model_type == "llama" and spec.num_kv_heads == 2 and spec.num_layers == 2
    info = inspect_model(str(llama_gguf))
    assert info["architecture"] == "LlamaForCausalLM" and info["base"] == str(llama_gguf.resolve())


def test_answer_agreement_compares_on_the_reference_answers(llama_base, tokenizer):
    """The held-out measure: positions are the reference's own greedy answers; a model compared with itself agrees
    everywhere and regenerates identical answers, a broken one flips (with the reference's margin recorded)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from tuneforge.data.templates import get_template
    from tuneforge.merge.gguf import answer_agreement, end_of_turn_ids

    model = AutoModelForCausalLM.from_pretrained(llama_base).eval()
    template = get_template("chatml")
    prompts = [tokenizer(template.render([{"role": "user", "content": text[:60]}], add_generation_prompt=True,
                                         tokenizer=tokenizer), add_special_tokens=False)["input_ids"]
               for text in stdlib_texts(3)]
    stops = end_of_turn_ids(tokenizer, template)
    same = answer_agreement(model, model, prompts, stops, cap=6)
    assert same["answers"] == 3 and 3 <= same["positions"] <= 18
    assert same["agreement"] == 1.0 and same["identical"] == 3 and same["flip_margins"] == []
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight.neg_()  # every logit negated: argmax becomes argmin
    other = answer_agreement(model, broken, prompts, stops, cap=6)
    assert other["positions"] == same["positions"]  # the reference's answers decide the positions
    assert other["agree"] == 0 and other["identical"] == 0
    assert len(other["flip_margins"]) == other["positions"] and min(other["flip_margins"]) > 0
