"""Parameter counts without weights: exact against instantiated models, tied embeddings once, peft's LoRA count."""

from __future__ import annotations

import json

import pytest

from tuneforge.errors import UserError
from tuneforge.estimate.bill import Setup, lora_trainable
from tuneforge.estimate.spec import model_spec

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 128}


def _real_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data))


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    {**TINY_LLAMA, "tie_word_embeddings": True},
    {**TINY_LLAMA, "tie_word_embeddings": False},
    TINY_GPT2,
], ids=["llama-tied", "llama-untied", "gpt2"])
def test_meta_count_equals_instantiated_model(config):
    spec = model_spec(config, name="tiny")
    model = _real_model(config)
    assert spec.total_params == _count(model)
    assert spec.tie_word_embeddings == bool(config.get("tie_word_embeddings", True))
    # the untied model has one more vocab x hidden matrix than the tied one
    if config is not TINY_GPT2:
        other = model_spec({**config, "tie_word_embeddings": not config["tie_word_embeddings"]}, name="other")
        assert abs(other.total_params - spec.total_params) == 512 * 64


def test_conftest_fixture_model_counts(tiny_llama, tiny_gpt2):
    for model in (tiny_llama, tiny_gpt2):
        config = model.config.to_dict()
        assert model_spec(config, name="fixture").total_params == _count(model)


def test_local_directory_and_config_file(tmp_path):
    model = _real_model(TINY_LLAMA)
    model.config.save_pretrained(tmp_path)
    assert model_spec(str(tmp_path)).total_params == _count(model)
    assert model_spec(str(tmp_path / "config.json")).total_params == _count(model)


@pytest.mark.parametrize("name,published", [
    ("Qwen/Qwen2.5-0.5B", 494_032_768),        # tied embeddings: 630M if counted twice
    ("Qwen/Qwen2.5-0.5B-Instruct", 494_032_768),
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("gpt2", 124_439_808),
])
def test_builtin_table_matches_published_counts(name, published):
    # Published on the model cards / reproduced by `sum(p.numel() for p in model.parameters())` on the real weights.
    assert model_spec(name).total_params == published


def test_from_config_section_matches_build_model(tiny_tokenizer):
    from tuneforge.config.schema import FromConfig
    from tuneforge.models import build_model

    fc = FromConfig(architecture="llama", hidden_size=64, num_layers=2, num_heads=4, vocab_size=len(tiny_tokenizer),
                    tie_word_embeddings=False)
    assert model_spec(fc).total_params == _count(build_model(fc, tiny_tokenizer))


@pytest.mark.parametrize("config,targets", [
    (TINY_LLAMA, "all-linear"),
    (TINY_LLAMA, "attention"),
    (TINY_LLAMA, ["q_proj", "v_proj"]),
    (TINY_GPT2, "all-linear"),
    (TINY_GPT2, ["c_attn"]),
])
def test_lora_trainable_count_equals_peft(config, targets):
    from peft import LoraConfig, get_peft_model

    spec = model_spec(config, name="tiny")
    setup = Setup(method="lora", r=4, target_modules=targets)
    ours = sum(a + b for a, b in lora_trainable(spec, setup))
    from tuneforge.models.targets import resolve_target_modules

    model = _real_model(config)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=resolve_target_modules(model, targets)))
    trainable, _ = model.get_nb_trainable_parameters()
    assert ours == trainable


def test_unknown_model_names_the_fix():
    with pytest.raises(UserError, match="unknown model 'Qwen/Qwen2.5-0.6B'.*did you mean 'Qwen/Qwen2.5-0.5B'"):
        model_spec("Qwen/Qwen2.5-0.6B")
    with pytest.raises(UserError, match="unknown model 'not-a-model'"):
        model_spec("not-a-model")


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=r"config\.json: not a readable JSON config"):
        model_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}), encoding="utf-8")
    with pytest.raises(UserError, match="'model_type'"):
        model_spec(str(tmp_path))
    with pytest.raises(UserError, match="no such file"):
        model_spec(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not known to transformers"):
        model_spec({"model_type": "no_such_arch"}, name="x")


def test_targets_the_model_lacks_are_refused():
    spec = model_spec(TINY_GPT2, name="tiny-gpt2")
    with pytest.raises(UserError, match="'q_proj' matches no module.*attention: c_attn"):
        lora_trainable(spec, Setup(method="lora", target_modules=["q_proj"]))


def test_table_title_names_a_long_local_path_by_its_last_component(tmp_path, capsys):
    from tuneforge.cli import main

    deep = tmp_path / "a-rather-long-directory-name" / "and-another-one-below-it" / "tiny-llama-model"
    _real_model(TINY_LLAMA).config.save_pretrained(deep)
    assert main(["estimate", str(deep), "--phase", "merge"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip() == "tiny-llama-model: merge" for line in lines), lines[:4]
