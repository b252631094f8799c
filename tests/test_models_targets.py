"""Target-module discovery: groups, GPT-2's two c_proj, per-architecture defaults, bad explicit names."""

from __future__ import annotations

import pytest

from tuneforge.errors import UserError


def _meta(config, bare: bool = False):
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    with torch.device("meta"):
        return (AutoModel if bare else AutoModelForCausalLM).from_config(config)


def _matched(model, targets: list[str]) -> set[str]:
    """Module paths peft would target with ``targets`` (its suffix rule), among linear layers."""
    from tuneforge.models.targets import is_linear, matches

    return {name for name, module in model.named_modules()
            if is_linear(module) and any(matches(name, t) for t in targets)}


def test_llama_groups(tiny_llama):
    from tuneforge.models import linear_module_paths, linear_modules

    groups = linear_modules(tiny_llama)
    assert groups["attention"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert groups["mlp"] == ["gate_proj", "up_proj", "down_proj"]
    assert groups["other"] == []
    paths = linear_module_paths(tiny_llama)
    assert len(paths["attention"]) == 2 * 4 and len(paths["mlp"]) == 2 * 3
    assert not any("lm_head" in p for ps in paths.values() for p in ps)


def test_gpt2_attention_and_mlp_c_proj_are_separated(tiny_gpt2):
    from tuneforge.models import linear_module_paths, linear_modules, resolve_target_modules

    groups = linear_modules(tiny_gpt2)
    assert groups["attention"] == ["c_attn", "attn.c_proj"]
    assert groups["mlp"] == ["c_fc", "mlp.c_proj"]
    paths = linear_module_paths(tiny_gpt2)
    attention = resolve_target_modules(tiny_gpt2, "attention")
    mlp = resolve_target_modules(tiny_gpt2, "mlp")
    # Each group's names select exactly that group's layers: the attention spec never grabs mlp.c_proj.
    assert _matched(tiny_gpt2, attention) == set(paths["attention"])
    assert _matched(tiny_gpt2, mlp) == set(paths["mlp"])
    assert _matched(tiny_gpt2, resolve_target_modules(tiny_gpt2, "all-linear")) == set(
        paths["attention"] + paths["mlp"])


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gpt_neox", "bloom"])
def test_architecture_table_agrees_with_discovery(arch):
    from transformers import BloomConfig, GPTNeoXConfig, MistralConfig, Qwen2Config

    from tuneforge.models.targets import ARCHITECTURE_DEFAULTS, linear_module_paths

    small = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = {
        "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=128, **small),
        "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, **small),
        "gpt_neox": lambda: GPTNeoXConfig(hidden_size=64, intermediate_size=128, **small),
        "bloom": lambda: BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128),
    }[arch]()
    model = _meta(config)
    paths = linear_module_paths(model)
    table = ARCHITECTURE_DEFAULTS[model.config.model_type]
    assert paths["attention"] and paths["mlp"]
    assert _matched(model, table["attention"]) == set(paths["attention"])
    assert _matched(model, table["mlp"]) == set(paths["mlp"])
    assert paths["other"] == []


def test_bert_style_query_key_value_and_output_dense():
    from transformers import BertConfig

    from tuneforge.models import linear_module_paths, resolve_target_modules

    model = _meta(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=128), bare=True)
    paths = linear_module_paths(model)
    leaves = {p.split(".")[-1] for p in paths["attention"]}
    assert {"query", "key", "value"} <= leaves
    assert "encoder.layer.0.attention.output.dense" in paths["attention"]
    assert "encoder.layer.0.output.dense" in paths["mlp"]  # the second FFN projection, not attention
    assert "encoder.layer.0.intermediate.dense" in paths["mlp"]
    assert _matched(model, resolve_target_modules(model, "mlp")) == set(paths["mlp"])
    assert _matched(model, resolve_target_modules(model, "attention")) == set(paths["attention"])


def test_chatglm_style_names():
    """ChatGLM builds only with remote code: the same module tree, by hand."""
    import torch
    from torch import nn

    from tuneforge.models import linear_module_paths, resolve_target_modules

    def block():
        attn = nn.Module()
        attn.query_key_value, attn.dense = nn.Linear(8, 24), nn.Linear(8, 8)
        mlp = nn.Module()
        mlp.dense_h_to_4h, mlp.dense_4h_to_h = nn.Linear(8, 32), nn.Linear(32, 8)
        layer = nn.Module()
        layer.self_attention, layer.mlp = attn, mlp
        return layer

    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.encoder = nn.Module()
    model.transformer.encoder.layers = nn.ModuleList([block(), block()])
    model.transformer.output_layer = nn.Linear(8, 100)
    model.lm_head = model.transformer.output_layer
    assert isinstance(model.lm_head, torch.nn.Linear)
    paths = linear_module_paths(model)
    assert paths["attention"] == [f"transformer.encoder.layers.{i}.self_attention.{n}"
                                  for i in range(2) for n in ("query_key_value", "dense")]
    assert len(paths["mlp"]) == 4
    assert paths["other"] == []  # the output layer is the lm head, never a target
    assert _matched(model, resolve_target_modules(model, "attention")) == set(paths["attention"])


def test_explicit_names(tiny_llama):
    from tuneforge.models import resolve_target_modules

    assert resolve_target_modules(tiny_llama, ["q_proj", "v_proj"]) == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_llama, ["model.layers.0.self_attn.q_proj"]) == [
        "model.layers.0.self_attn.q_proj"]


def test_explicit_name_matching_nothing_lists_what_exists(tiny_llama):
    from tuneforge.models import resolve_target_modules

    with pytest.raises(UserError) as info:
        resolve_target_modules(tiny_llama, ["q_proj", "query"])
    message = str(info.value)
    assert "'query'" in message and "'q_proj'" not in message
    assert "attention: q_proj, k_proj, v_proj, o_proj" in message
    assert "mlp: gate_proj, up_proj, down_proj" in message


def test_bad_spec_strings(tiny_llama):
    from tuneforge.models import resolve_target_modules

    with pytest.raises(UserError, match="all-linear"):
        resolve_target_modules(tiny_llama, "everything")
    with pytest.raises(UserError, match="empty"):
        resolve_target_modules(tiny_llama, [])


def test_rules_read_names_only_meta_model_and_name_list_agree(tiny_gpt2):
    """The estimator resolves on a meta-device model; a bare list of names resolves the same way."""
    from tuneforge.models.targets import (
        ModuleNames,
        linear_module_paths,
        module_names,
        resolve_target_modules,
    )

    meta = _meta(tiny_gpt2.config)
    for spec in ("attention", "mlp", "all-linear"):
        assert resolve_target_modules(meta, spec) == resolve_target_modules(tiny_gpt2, spec)
    layers = [f"model.layers.{i}.{part}" for i in range(2) for part in
              ("self_attn.q_proj", "self_attn.o_proj", "block_sparse_moe.experts.0.w1", "block_sparse_moe.gate")]
    names = ModuleNames(modules=("model", "model.layers", *layers, "lm_head"), linears=(*layers, "lm_head"))
    paths = linear_module_paths(names)
    assert paths["mlp"] == [p for p in layers if "block_sparse_moe" in p]  # MoE experts and router are MLP
    assert "lm_head" not in sum(paths.values(), [])
    assert resolve_target_modules(names, "mlp") == ["w1", "gate"]
    assert module_names(names) is names
