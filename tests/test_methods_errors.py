"""Bad input to the method family: every mistake is a UserError that names the key and the fix."""

from __future__ import annotations

import sys

import pytest

from tuneforge.errors import UserError


def _method(raw: dict):
    from pydantic import TypeAdapter

    from tuneforge.config.schema import MethodConfig

    return TypeAdapter(MethodConfig).validate_python(raw)


def _run(method: dict) -> dict:
    return {"model": {"name_or_path": "some/model"}, "data": {"train": ["train.jsonl"]}, "method": method}


# --------------------------------------------------------------------------- names and keys


def test_unknown_method_name_lists_the_known_ones_in_get_method():
    from tuneforge.methods import get_method, known_methods

    with pytest.raises(UserError) as err:
        get_method("dorra")
    message = str(err.value)
    assert "'dorra'" in message and "did you mean 'dora'" in message
    for name in known_methods():
        assert name in message


def test_unknown_method_name_lists_the_known_ones_in_config_validation():
    from tuneforge.config.load import validate_config

    with pytest.raises(UserError) as err:
        validate_config(_run({"name": "qlora4"}))
    message = str(err.value)
    assert "method.name" in message and "'qlora4'" in message
    for name in ("lora", "qlora", "dora", "adalora", "vera", "prefix_tuning", "ia3", "galore", "lora_plus"):
        assert name in message


@pytest.mark.parametrize(("method", "key"), [
    ({"name": "lora", "lr_ratio": 16}, "lr_ratio"),
    ({"name": "vera", "init_r": 12}, "init_r"),
    ({"name": "prefix_tuning", "r": 8}, "r"),
    ({"name": "galore", "use_dora": True}, "use_dora"),
    ({"name": "adalora", "r": 8}, "r"),
])
def test_option_of_another_method_is_rejected_with_its_key(method, key):
    from tuneforge.config.load import validate_config

    with pytest.raises(UserError) as err:
        validate_config(_run(method))
    assert f"unknown key 'method.{key}'" in str(err.value)


def test_adalora_target_rank_above_initial_rank_is_rejected():
    from tuneforge.config.load import validate_config

    with pytest.raises(UserError, match=r"target_r \(16\) must not exceed init_r \(12\)"):
        validate_config(_run({"name": "adalora", "init_r": 12, "target_r": 16}))


# --------------------------------------------------------------------------- VeRA shapes


def test_vera_with_explicit_unequal_target_shapes_names_the_modules(tiny_gpt2):
    from tuneforge.methods import get_method

    with pytest.raises(UserError) as err:
        get_method("vera").apply(tiny_gpt2, _method({"name": "vera", "r": 8, "target_modules": "attention"}))
    message = str(err.value)
    # GPT-2 attention: c_attn is 64→192, attn.c_proj is 64→64
    assert "64→192: transformer.h.*.attn.c_attn" in message
    assert "64→64: transformer.h.*.attn.c_proj" in message
    assert "allow_unequal_shapes" in message and "same shape" in message


def test_vera_all_linear_on_llama_names_the_mlp_shapes(tiny_llama):
    from tuneforge.methods import get_method

    with pytest.raises(UserError) as err:
        get_method("vera").apply(tiny_llama, _method({"name": "vera", "r": 8, "target_modules": "all-linear"}))
    message = str(err.value)
    assert "64→192" in message and "mlp.gate_proj" in message and "192→64" in message
    # the suggestion is the largest group of one shape: the attention projections
    assert "self_attn.q_proj" in message.split("e.g. target_modules:")[1]


def test_vera_equal_shaped_subset_builds(tiny_gpt2):
    from tuneforge.methods import get_method

    model = get_method("vera").apply(tiny_gpt2, _method({"name": "vera", "r": 8, "target_modules": ["c_attn"]}))
    assert model.get_nb_trainable_parameters()[0] == 2 * (8 + 192)


# --------------------------------------------------------------------------- AdaLoRA steps


def test_adalora_without_enough_steps_says_how_many(tiny_llama):
    from tuneforge.methods import get_method

    cfg = _method({"name": "adalora", "tinit": 5, "tfinal": 5})
    method = get_method("adalora")
    method.apply(tiny_llama, cfg)  # builds: the step count is only known to the trainer
    with pytest.raises(UserError) as err:
        method.callbacks(cfg, total_steps=10)
    message = str(err.value)
    assert "method.tinit (5) + method.tfinal (5)" in message and "10 optimizer steps" in message
    assert method.callbacks(cfg, total_steps=11)  # one budgeting step is enough


# --------------------------------------------------------------------------- QLoRA / 8-bit without bitsandbytes


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    torch = pytest.importorskip("torch")
    from tuneforge.methods import get_method

    method = get_method("qlora")  # import the module first: it may import bitsandbytes lazily only
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(UserError) as err:
        method.model_load_kwargs(_method({"name": "qlora"}), torch.float32)
    assert "pip install" in str(err.value) and "bitsandbytes" in str(err.value)


def test_8bit_adamw_without_bitsandbytes_says_what_to_install(monkeypatch):
    from tuneforge.config.schema import TrainConfig
    from tuneforge.methods.optim import optimizer_class

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(UserError, match=r"train.optim: 'adamw_8bit' needs bitsandbytes .*pip install bitsandbytes"):
        optimizer_class(TrainConfig(optim="adamw_8bit"))


# --------------------------------------------------------------------------- merging


def test_merging_prefix_tuning_says_it_cannot_merge():
    from tuneforge.methods.optim import ensure_mergeable

    with pytest.raises(UserError, match=r"method 'prefix_tuning' cannot be merged into the base weights"):
        ensure_mergeable("prefix_tuning")


@pytest.mark.parametrize("name", ["full", "galore"])
def test_merging_a_full_parameter_method_says_there_is_no_adapter(name):
    from tuneforge.methods.optim import ensure_mergeable

    with pytest.raises(UserError, match="no adapter to merge"):
        ensure_mergeable(name)


@pytest.mark.parametrize("name", ["lora", "dora", "rslora", "pissa", "lora_plus", "adalora", "vera", "ia3"])
def test_mergeable_methods_pass_the_merge_check(name):
    from tuneforge.methods.optim import ensure_mergeable

    ensure_mergeable(name)


def test_merge_check_of_an_unknown_method_lists_the_known_ones():
    from tuneforge.methods.optim import ensure_mergeable

    with pytest.raises(UserError, match="known: .*prefix_tuning"):
        ensure_mergeable("prefix")


# --------------------------------------------------------------------------- GaLore and IA3 options


def test_galore_with_8bit_adam_on_cpu_is_refused(tiny_llama):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: GaLoreAdamW8bit is allowed")
    from tuneforge.config.schema import TrainConfig
    from tuneforge.methods import get_method

    method = get_method("galore")
    cfg = _method({"name": "galore", "rank": 8})
    model = method.apply(tiny_llama, cfg)
    with pytest.raises(UserError, match=r"train.optim: 'adamw_8bit' with method galore .*requires CUDA"):
        method.create_optimizer(model, cfg, TrainConfig(optim="adamw_8bit"))


def test_galore_layerwise_refuses_conv1d_targets(tiny_gpt2):
    from tuneforge.methods import get_method

    with pytest.raises(UserError, match=r"method.layerwise: .*only projects nn.Linear.*c_attn"):
        get_method("galore").apply(tiny_gpt2, _method({"name": "galore", "layerwise": True}))


def test_galore_target_that_matches_nothing_lists_the_layers(tiny_llama):
    from tuneforge.methods import get_method

    with pytest.raises(UserError, match=r"method.target_modules: 'qkv' matches no module.*q_proj"):
        get_method("galore").apply(tiny_llama, _method({"name": "galore", "target_modules": ["qkv"]}))


def test_ia3_feedforward_outside_the_targets_is_rejected(tiny_llama):
    from tuneforge.methods import get_method

    cfg = _method({"name": "ia3", "target_modules": ["k_proj", "v_proj"], "feedforward_modules": ["down_proj"]})
    with pytest.raises(UserError, match=r"method.feedforward_modules: \['down_proj'\] are not among the target"):
        get_method("ia3").apply(tiny_llama, cfg)
