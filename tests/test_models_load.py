"""Device/dtype choice, load_model (local dir, from_config, bad paths), pad tokens, inference loading,
generation stopping, and `tuneforge inspect`."""

from __future__ import annotations

import json
import logging

import pytest

from tests.helpers import stdlib_texts
from tuneforge.errors import UserError


def _fc(arch="llama", **kw):
    from tuneforge.config.schema import FromConfig

    numbers = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512, max_position_embeddings=256)
    return FromConfig(architecture=arch, **{**numbers, **kw})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama + tokenizer; returns (dir, state_dict) of the saved model."""
    import torch

    from tuneforge.models import build_model

    torch.manual_seed(0)
    model = build_model(_fc(), tiny_tokenizer)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _ids(tokenizer, n=24):
    import torch

    return torch.tensor([tokenizer(stdlib_texts(3)[2])["input_ids"][:n]])


# --------------------------------------------------------------------------- device / dtype


def test_resolve_device():
    import torch

    from tuneforge.models import resolve_device

    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            resolve_device("cuda")


def test_resolve_dtype_cpu(monkeypatch, caplog):
    import torch

    from tuneforge.models import device as dev

    assert dev.resolve_dtype("fp32", "cpu") is torch.float32
    assert dev.resolve_dtype("auto", "cpu") is torch.float32  # conftest pins auto to fp32 through the environment
    monkeypatch.setenv(dev.AUTO_PRECISION_ENV, "bf16")
    assert dev.resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setenv(dev.AUTO_PRECISION_ENV, "fp8")
    with pytest.raises(UserError, match="TUNEFORGE_AUTO_PRECISION"):
        dev.resolve_dtype("auto", "cpu")
    monkeypatch.delenv(dev.AUTO_PRECISION_ENV)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(dev, "cpu_has_amx_bf16", lambda: False)  # the CPU running the tests may have AMX
    assert dev.resolve_dtype("auto", "cpu") is torch.float32
    with caplog.at_level(logging.WARNING, logger="tuneforge.models.device"):
        assert dev.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert "emulated" in caplog.text
    caplog.clear()
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)  # avx512_bf16 only: no warning, auto stays fp32
    with caplog.at_level(logging.WARNING, logger="tuneforge.models.device"):
        assert dev.resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert "emulated" not in caplog.text
    monkeypatch.setattr(dev, "cpu_has_amx_bf16", lambda: False)
    assert dev.resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(dev, "cpu_has_amx_bf16", lambda: True)
    assert dev.resolve_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(UserError, match="precision"):
        dev.resolve_dtype("fp8", "cpu")


def test_cpu_bf16_flag_read_from_cpuinfo(tmp_path):
    from tuneforge.models.device import cpu_has_amx_bf16, cpu_has_native_bf16

    with_flag, without, amx = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    with_flag.write_text("flags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu avx512f avx512_vnni\n")
    amx.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16(str(with_flag)) is True and cpu_has_amx_bf16(str(with_flag)) is False
    assert cpu_has_native_bf16(str(without)) is False
    assert cpu_has_native_bf16(str(amx)) is True and cpu_has_amx_bf16(str(amx)) is True
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False


# --------------------------------------------------------------------------- load_model


def test_load_local_dir_gives_identical_logits(llama_dir, tiny_tokenizer):
    import torch

    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import build_model, load_model

    torch.manual_seed(0)
    reference = build_model(_fc(), tiny_tokenizer).eval()
    model, tokenizer = load_model(ModelConfig(name_or_path=str(llama_dir), precision="fp32"), device="cpu")
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert next(model.parameters()).dtype is torch.float32


def test_missing_local_path_is_a_user_error(tmp_path):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import load_model

    for path in (str(tmp_path / "nope"), "./no/such/model", "~/no-such-model-dir"):
        with pytest.raises(UserError, match="local model path does not exist"):
            load_model(ModelConfig(name_or_path=path))


def test_unreachable_hub_id_is_a_user_error(monkeypatch):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub"):
        load_model(ModelConfig(name_or_path="tuneforge-test-org/no-such-model"))


def test_from_config_trains_a_tokenizer_on_texts():
    import torch

    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import load_model

    cfg = ModelConfig(from_config=_fc(vocab_size=400), precision="fp32")
    model, tokenizer = load_model(cfg, texts=stdlib_texts(150), device="cpu")
    assert 300 <= len(tokenizer) <= 400
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer("def f(x): return x", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    assert next(model.parameters()).dtype is torch.float32
    with pytest.raises(UserError, match="training text"):
        load_model(cfg, texts=None)


def test_from_config_uses_given_tokenizer(llama_dir):
    from tuneforge.config.schema import ModelConfig
    from tuneforge.models import load_model

    cfg = ModelConfig(from_config=_fc("gpt2", tokenizer=str(llama_dir)), precision="fp32")
    model, tokenizer = load_model(cfg, device="cpu")
    assert model.config.model_type == "gpt2"
    assert model.config.vocab_size == len(tokenizer)


def _word_tokenizer(**special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "</s>": 2, "<unk>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def test_pad_token_choice(caplog):
    from tuneforge.models import ensure_pad_token

    with caplog.at_level(logging.INFO, logger="tuneforge.models.load"):
        eos_only = ensure_pad_token(_word_tokenizer(eos_token="</s>"))
    assert eos_only.pad_token == "</s>" and "EOS" in caplog.text
    assert ensure_pad_token(_word_tokenizer(eos_token="</s>", unk_token="<unk>")).pad_token == "<unk>"
    left = _word_tokenizer(eos_token="</s>", pad_token="a")
    left.padding_side = "left"
    kept = ensure_pad_token(left)
    assert kept.pad_token == "a" and kept.padding_side == "right"


# --------------------------------------------------------------------------- inference + generation


class _ChatML:
    """A minimal chat template with the interface of tuneforge.data.templates.ChatTemplate."""

    name = "test-chatml"

    def __init__(self, stop=("<|im_end|>",), extra_stop_ids=()):
        self.stop = list(stop)
        self.extra = list(extra_stop_ids)

    def render(self, messages, add_generation_prompt=False, tokenizer=None):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def stop_token_ids(self, tokenizer):
        return [tokenizer.convert_tokens_to_ids(s) for s in self.stop] + self.extra


def _peft_llama(llama_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a non-trivial adapter, so logits differ from the base
    return model.eval()


def test_load_for_inference_adapter_dir_and_run_dir(llama_dir, tiny_tokenizer, tmp_path):
    import torch

    from tuneforge.models import load_for_inference

    model = _peft_llama(llama_dir)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tiny_tokenizer.save_pretrained(adapter)
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        expected = model(ids).logits
    loaded = load_for_inference(str(adapter), device="cpu", dtype=torch.float32)
    assert loaded.adapter == str(adapter) and loaded.base == str(llama_dir)
    assert not loaded.model.training
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, expected, atol=1e-6, rtol=0)

    # The same adapter as a run directory's final/, base given relative to the run (as the trainer may write it).
    run = tmp_path / "run"
    final = run / "final"
    model.save_pretrained(final)
    tiny_tokenizer.save_pretrained(final)
    (run / "config.yaml").write_text("run_name: run\n")
    (final / "template.json").write_text(json.dumps(
        {"name": "chatml", "jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "stop": ["<|im_end|>"]}))
    from_run = load_for_inference(str(run), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(from_run.model(ids).logits, expected, atol=1e-6, rtol=0)
    assert from_run.template is not None and from_run.template.stop == ["<|im_end|>"]


def test_load_for_inference_errors(tmp_path, llama_dir):
    from tuneforge.models import load_for_inference

    with pytest.raises(UserError, match="does not exist"):
        load_for_inference(str(tmp_path / "missing"), device="cpu")
    run = tmp_path / "unfinished"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text("run_name: x\n")
    with pytest.raises(UserError, match="has no model .* did the training run finish"):
        load_for_inference(str(run), device="cpu")
    adapter = tmp_path / "orphan"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="base model"):
        load_for_inference(str(adapter), device="cpu")


@pytest.fixture(scope="module")
def llama_model(llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()


# A random tiny model repeats one token forever; a repetition penalty makes its greedy output varied.
PENALTY = 5.0


def _greedy_ids(model, tokenizer, text, n):
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id, repetition_penalty=PENALTY)
    return out[0, ids.shape[1]:].tolist()


def test_generation_stops_at_the_template_stop_token(llama_model, tiny_tokenizer):
    from tuneforge.models import GenerationSettings, generate

    messages = [{"role": "user", "content": "What is a list?"}]
    template = _ChatML()
    prompt = template.render(messages, add_generation_prompt=True)
    free = _greedy_ids(llama_model, tiny_tokenizer, prompt, 10)
    # Declare the first token the model emits after a few others to be a stop token: generation must end there.
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stopped = generate(llama_model, tiny_tokenizer, _ChatML(extra_stop_ids=[free[k]]), [messages], GenerationSettings(max_new_tokens=10, repetition_penalty=PENALTY))
    assert stopped == [tiny_tokenizer.decode(free[:k], skip_special_tokens=True)]
    unstopped = generate(llama_model, tiny_tokenizer, template, [messages], GenerationSettings(max_new_tokens=10, repetition_penalty=PENALTY))
    assert unstopped == [tiny_tokenizer.decode(free, skip_special_tokens=True)]
    # A stop *string* cuts the text even when it is not a single token.
    text = unstopped[0]
    assert len(text) > 5
    cut_text = text[2:5]
    cut = generate(llama_model, tiny_tokenizer, _ChatML(stop=("<|im_end|>", cut_text)), [messages],
                   GenerationSettings(max_new_tokens=10, repetition_penalty=PENALTY))
    assert cut == [text[: text.find(cut_text)]]


def test_batched_left_padded_generation_equals_one_by_one(llama_model, tiny_tokenizer):
    from tuneforge.models import GenerationSettings, generate

    prompts = ["The for statement", "A class definition creates a class object and"]
    batched = generate(llama_model, tiny_tokenizer, None, prompts, GenerationSettings(max_new_tokens=6, repetition_penalty=PENALTY))
    single = [generate(llama_model, tiny_tokenizer, None, [p], GenerationSettings(max_new_tokens=6, repetition_penalty=PENALTY))[0]
              for p in prompts]
    assert len(set(batched[1])) > 1
    assert batched == single


def test_stream_equals_generate(llama_model, tiny_tokenizer):
    from tuneforge.models import GenerationSettings, generate, stream_generate

    messages = [{"role": "user", "content": "Explain the with statement"}]
    whole = generate(llama_model, tiny_tokenizer, _ChatML(), [messages], GenerationSettings(max_new_tokens=12, repetition_penalty=PENALTY))[0]
    pieces = list(stream_generate(llama_model, tiny_tokenizer, _ChatML(), messages, GenerationSettings(max_new_tokens=12, repetition_penalty=PENALTY)))
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_cut_at_stop():
    from tuneforge.models.generation import cut_at_stop, held_back

    assert cut_at_stop("answer<|im_end|>junk", ["<|im_end|>", "</s>"]) == "answer"
    assert cut_at_stop("no stop", ["<|im_end|>"]) == "no stop"
    assert held_back("text <|im_", ["<|im_end|>"]) == 5


# --------------------------------------------------------------------------- inspect CLI


def test_inspect_local_dir(llama_dir, tmp_path, tiny_tokenizer, capsys):
    import torch

    from tuneforge.cli import main
    from tuneforge.models import build_model

    assert main(["inspect", str(llama_dir), "--method", "lora"]) == 0
    out = capsys.readouterr().out
    assert "attention  (8 layers): q_proj, k_proj, v_proj, o_proj" in out
    assert "mlp        (6 layers): gate_proj, up_proj, down_proj" in out
    assert "all-linear -> q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    assert "method lora: target_modules 'all-linear'" in out
    model = build_model(_fc(), tiny_tokenizer)
    assert f"parameters: {sum(p.numel() for p in model.parameters()):,d}" in out

    gpt2 = tmp_path / "gpt2"
    torch.manual_seed(0)
    build_model(_fc("gpt2"), tiny_tokenizer).save_pretrained(gpt2)
    assert main(["inspect", str(gpt2), "--json", "--method", "full"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["groups"]["attention"] == ["c_attn", "attn.c_proj"]
    assert info["targets"]["mlp"] == ["c_fc", "mlp.c_proj"]
    assert "every parameter" in info["method"]["note"]


def test_inspect_bad_input(tmp_path, llama_dir, capsys):
    from tuneforge.cli import main

    assert main(["inspect", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(llama_dir), "--method", "lorra"]) == 2
    assert "did you mean 'lora'" in capsys.readouterr().err


def test_inspect_adapter_dir_reads_the_base_config(llama_dir, tmp_path, capsys):
    from tuneforge.cli import main

    adapter = tmp_path / "adapter"
    _peft_llama(llama_dir).save_pretrained(adapter)
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"on base {llama_dir}" in out and "(LORA, targets " in out
    assert "q_proj" in out.split("(LORA, targets ")[1].split(")")[0]
    assert "attention  (8 layers)" in out


def test_moved_run_dir_finds_its_saved_base(llama_dir, tiny_tokenizer, tmp_path):
    """A from-config run keeps its base in <run>/base; after moving the run, the absolute base path in
    adapter_config.json is stale and <run>/base is used."""
    import shutil

    import torch

    from tuneforge.models import load_for_inference

    model = _peft_llama(llama_dir)
    run = tmp_path / "moved"
    shutil.copytree(llama_dir, run / "base")
    model.save_pretrained(run / "final")
    tiny_tokenizer.save_pretrained(run / "final")
    (run / "config.yaml").write_text("run_name: moved\n")
    config_path = run / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "old-location" / "base")
    config_path.write_text(json.dumps(config))
    loaded = load_for_inference(str(run), device="cpu", dtype=torch.float32)
    assert loaded.base == str(run / "base")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_generation_settings_from_flags_name_the_bad_flag():
    import argparse

    from tuneforge.models.generation import GenerationSettings, add_generation_args

    parser = argparse.ArgumentParser()
    add_generation_args(parser, max_new_tokens=32)
    assert GenerationSettings.from_args(parser.parse_args([])) == GenerationSettings(max_new_tokens=32)
    sampled = GenerationSettings.from_args(parser.parse_args(["--temperature", "0.7", "--top-k", "5"]))
    assert sampled.sampling and sampled.top_k == 5 and sampled.seed == 0
    for flags, message in ((["--top-p", "0"], "--top-p must be in"), (["--temperature", "-1"], "--temperature"),
                           (["--max-new-tokens", "0"], "--max-new-tokens"),
                           (["--repetition-penalty", "0"], "--repetition-penalty")):
        with pytest.raises(UserError, match=message):
            GenerationSettings.from_args(parser.parse_args(flags))
