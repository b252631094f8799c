"""Model merging from mergekit-format recipes: the defining property of each method, LoRA adapters as inputs,
sharded output, bad recipes, and (when mergekit is installed) agreement with mergekit's own linear and TIES."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_adapter, save_base
from tuneforge.errors import UserError


def tensors(folder: Path) -> dict:
    """Every tensor of a saved model directory (single file or shards)."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def perturbed(tiny_llama, tiny_tokenizer, folder: Path, seed: int, *, sign: float | None = None) -> Path:
    """A copy of the base with noise added to every float weight (all-positive noise when ``sign`` is given)."""
    import copy

    import torch

    model = copy.deepcopy(tiny_llama)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.02
            param.add_(noise.abs() * sign if sign is not None else noise)
    return save_base(model, tiny_tokenizer, folder)


@pytest.fixture()
def models(tmp_path, tiny_llama, tiny_tokenizer):
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    a = perturbed(tiny_llama, tiny_tokenizer, tmp_path / "a", seed=1)
    b = perturbed(tiny_llama, tiny_tokenizer, tmp_path / "b", seed=2)
    return base, a, b


def run(tmp_path: Path, recipe: dict, name: str = "out", **kwargs) -> dict:
    from tuneforge.merge.recipe import merge_recipe

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    merge_recipe(path, tmp_path / name, **kwargs)
    return tensors(tmp_path / name)


def assert_same(got: dict, want: dict, atol: float = 1e-6) -> None:
    import torch

    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name].float(), want[name].float(), atol=atol), name


def test_linear_one_model_weight_one_is_that_model(tmp_path, models):
    base, a, _ = models
    got = run(tmp_path, {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]})
    assert_same(got, tensors(a), atol=0)


def test_linear_is_the_normalised_weighted_average(tmp_path, models):
    base, a, b = models
    got = run(tmp_path, {"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 3.0}}]})
    ta, tb = tensors(a), tensors(b)
    assert_same(got, {k: (ta[k] + 3 * tb[k]) / 4 for k in ta})


def test_slerp_endpoints_and_parallel_fallback(tmp_path, models):
    import torch

    from tuneforge.merge.methods import slerp

    base, a, _ = models
    recipe = {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(base)}, {"model": str(a)}]}
    assert_same(run(tmp_path, {**recipe, "parameters": {"t": 0.0}}, "t0"), tensors(base))
    assert_same(run(tmp_path, {**recipe, "parameters": {"t": 1.0}}, "t1"), tensors(a))
    mid = run(tmp_path, {**recipe, "parameters": {"t": 0.5}}, "t5")
    tb, ta = tensors(base), tensors(a)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(mid[name], tb[name]) and not torch.allclose(mid[name], ta[name])
    # orthogonal unit vectors: the midpoint stays on the unit circle (linear interpolation would shrink it to 0.707)
    half = slerp(0.5, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert torch.allclose(half, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    # parallel vectors: sin Ω = 0, so it falls back to linear interpolation instead of dividing by zero
    v = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(slerp(0.25, v, 2 * v), 0.75 * v + 0.25 * 2 * v)


def test_slerp_gradient_and_filters_vary_t_per_tensor(tmp_path, models):
    base, a, _ = models
    tb, ta = tensors(base), tensors(a)
    got = run(tmp_path, {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(a)}],
                         "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.0}]}})
    # self_attn of layer 0 gets t=0 (base), of layer 1 t=1 (a); everything else t=0
    assert_same({"x": got["model.layers.0.self_attn.k_proj.weight"]}, {"x": tb["model.layers.0.self_attn.k_proj.weight"]})
    assert_same({"x": got["model.layers.1.self_attn.k_proj.weight"]}, {"x": ta["model.layers.1.self_attn.k_proj.weight"]})
    assert_same({"x": got["model.layers.1.mlp.up_proj.weight"]}, {"x": tb["model.layers.1.mlp.up_proj.weight"]})


def test_task_arithmetic_lambda_zero_is_base_and_negative_subtracts(tmp_path, models):
    base, a, b = models
    tb, ta, tbb = tensors(base), tensors(a), tensors(b)
    common = {"merge_method": "task_arithmetic", "base_model": str(base)}
    zero = run(tmp_path, {**common, "models": [{"model": str(a), "parameters": {"weight": 1.0}}],
                          "parameters": {"lambda": 0.0}}, "zero")
    assert_same(zero, tb)
    sub = run(tmp_path, {**common, "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                                              {"model": str(b), "parameters": {"weight": -1.0}}]}, "sub")
    assert_same(sub, {k: tb[k] + (ta[k] - tb[k]) - (tbb[k] - tb[k]) for k in tb}, atol=1e-6)


def test_ties_density_one_with_agreeing_signs_is_the_mean(tmp_path, tiny_llama, tiny_tokenizer):
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    up1 = perturbed(tiny_llama, tiny_tokenizer, tmp_path / "up1", seed=1, sign=1.0)
    up2 = perturbed(tiny_llama, tiny_tokenizer, tmp_path / "up2", seed=2, sign=1.0)
    got = run(tmp_path, {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 1.0},
                         "models": [{"model": str(up1), "parameters": {"weight": 1.0}},
                                    {"model": str(up2), "parameters": {"weight": 1.0}}]})
    t1, t2 = tensors(up1), tensors(up2)
    assert_same(got, {k: (t1[k] + t2[k]) / 2 for k in t1})


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    import torch

    from tuneforge.merge.methods import get_merge_method

    ties = get_merge_method("ties")
    base = torch.zeros(4)
    m1 = torch.tensor([3.0, -1.0, 0.1, 2.0])
    m2 = torch.tensor([1.0, 2.0, -0.2, -5.0])
    params = [{"weight": 1.0, "density": 0.5}] * 2
    got = ties.merge(base, [m1, m2], params, {"normalize": True, "lambda": 1.0})
    # trim to the top 2 magnitudes: m1 → [3, 0, 0, 2], m2 → [0, 2, 0, -5]; elected signs: +, +, (0 → +), -;
    # disjoint mean over the agreeing, non-zero entries: [3, 2, 0, -5]
    assert torch.allclose(got, torch.tensor([3.0, 2.0, 0.0, -5.0]))


def test_dare_density_one_is_a_no_op_and_drop_rescales(tmp_path, models):
    import torch

    from tuneforge.merge.methods import sparsify_dare

    base, a, _ = models
    ta, tb = tensors(a), tensors(base)
    for method in ("dare_linear", "dare_ties"):
        got = run(tmp_path, {"merge_method": method, "base_model": str(base),
                             "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 1.0}}]}, method)
        assert_same(got, ta)
    delta = torch.randn(200, 200)
    dropped = sparsify_dare(delta, 0.3, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert 0.27 < kept.float().mean() < 0.33  # p = 0.7 dropped
    assert torch.allclose(dropped[kept], delta[kept] / 0.3)  # survivors rescaled by 1/(1-p)
    # the expectation is preserved: the sum changes far less than the dropped mass
    assert abs(float(dropped.sum() - delta.sum())) < 0.1 * float(delta.abs().sum())
    half = run(tmp_path, {"merge_method": "dare_linear", "base_model": str(base), "parameters": {"seed": 3},
                          "models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}}]}, "half")
    name = "model.layers.0.mlp.up_proj.weight"
    changed = (half[name] != tb[name]).float().mean()
    assert 0.4 < changed < 0.6


def test_lora_adapters_are_materialised_tensor_by_tensor(tmp_path, tiny_llama, tiny_tokenizer):
    """A LoRA input equals peft's own merge_and_unload, including rsLoRA scaling and rank patterns."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", target_modules=("q_proj", "up_proj", "embed_tokens"),
                           use_rslora=True, rank_pattern={"up_proj": 2}, alpha_pattern={"q_proj": 3})
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    want = {k: v for k, v in want.state_dict().items()}
    got = run(tmp_path, {"merge_method": "linear", "models": [{"model": str(adapter)}]})
    for name, tensor in got.items():
        assert (tensor - want[name]).abs().max() < 1e-5, name
    base_t = tensors(base)
    assert (got["model.layers.0.mlp.up_proj.weight"] - base_t["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-3


def test_gpt2_conv1d_adapter_uses_fan_in_fan_out(tmp_path, tiny_gpt2, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tiny_gpt2, tiny_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", target_modules=("c_attn",), fan_in_fan_out=True)
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    want = want.state_dict()
    got = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                         "models": [{"model": f"{base}+{adapter}"}]})
    name = "transformer.h.0.attn.c_attn.weight"
    assert (got[name] - want[name]).abs().max() < 1e-5


def test_two_adapters_merge_and_output_loads_sharded(tmp_path, tiny_llama, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    a1 = make_adapter(base, tmp_path / "a1", seed=1)
    a2 = make_adapter(base, tmp_path / "a2", seed=2)
    recipe = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5, "weight": 0.5},
              "models": [{"model": str(a1)}, {"model": str(a2)}]}
    single = run(tmp_path, recipe, "single")
    sharded = run(tmp_path, recipe, "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert_same(sharded, single, atol=0)
    ids = torch.tensor([[5, 6, 7, 8]])
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "single")(input_ids=ids).logits
    many = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")(input_ids=ids).logits
    assert torch.allclose(one, many)
    assert (tmp_path / "single" / "tokenizer.json").is_file() and (tmp_path / "single" / "template.json").is_file()


def test_bad_recipes_give_clear_errors(tmp_path, models, tiny_tokenizer):
    from tuneforge.config.schema import FromConfig
    from tuneforge.merge.recipe import merge_recipe
    from tuneforge.models import build_model

    base, a, b = models

    def fails(recipe, match):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(recipe) if isinstance(recipe, dict) else recipe)
        with pytest.raises(UserError, match=match):
            merge_recipe(path, tmp_path / "never")
        assert not (tmp_path / "never").exists()

    fails({"merge_method": "tiess", "base_model": str(base), "models": [{"model": str(a)}]},
          r"unknown method 'tiess' — did you mean 'ties'\?; known: dare_linear, dare_ties, linear, slerp, task_arithmetic, ties")
    fails({"merge_method": "ties", "base_model": str(base), "models": [{"model": str(a),
                                                                        "parameters": {"densty": 0.5}}]},
          "densty.*did you mean 'density'")
    fails({"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(a)}]}, "needs parameters.t")
    fails({"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
           "models": [{"model": str(a)}, {"model": str(b)}]}, "exactly one other model")
    fails({"merge_method": "ties", "models": [{"model": str(a)}]}, "needs base_model")
    fails({"merge_method": "linear", "modles": []}, "unknown key 'modles'")
    fails({"merge_method": "linear", "models": [{"model": str(tmp_path / "missing")}]}, "not found")
    fails("merge_method: [unclosed", "not valid YAML")
    # a model of another size: the error names the first tensor whose shape differs
    other = build_model(FromConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512, intermediate_size=96),
                        tiny_tokenizer)
    wide = save_base(other, tiny_tokenizer, tmp_path / "wide")
    fails({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(wide)}]},
          r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \[64, 96\]")


def test_adapters_of_different_bases_are_refused(tmp_path, models, tiny_llama, tiny_tokenizer):
    from tuneforge.merge.recipe import merge_recipe

    base, a, _ = models
    ad1 = make_adapter(base, tmp_path / "ad1")
    ad2 = make_adapter(a, tmp_path / "ad2")
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(ad1)}, {"model": str(ad2)}]}))
    with pytest.raises(UserError, match="different bases"):
        merge_recipe(path, tmp_path / "out")


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_matches_mergekit(tmp_path, models, method):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, a, b = models
    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.7, "density": 0.6}},
                         {"model": str(b), "parameters": {"weight": 0.3, "density": 0.6}}]}
    if method == "ties":
        recipe["base_model"] = str(base)
    else:
        for entry in recipe["models"]:
            entry["parameters"].pop("density")
    ours = run(tmp_path, recipe, "ours")
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "theirs"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    theirs = tensors(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for name in ours:
        assert (ours[name] - theirs[name]).abs().max() < 1e-6, name


def test_adapter_on_half_precision_base_rounds_once(tmp_path, tiny_llama, tiny_tokenizer):
    """W_bf16 + ΔW must not be rounded back to bf16 before the float32 output: equal to peft's fp32 merge."""
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(copy.deepcopy(tiny_llama).to(torch.bfloat16), tiny_tokenizer, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "ad", target_modules=("q_proj",))
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     str(adapter)).merge_and_unload().state_dict()
    got = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                         "models": [{"model": str(adapter)}]}, "fp32")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (got[name] - want[name]).abs().max() < 1e-6
    default = run(tmp_path, {"merge_method": "task_arithmetic", "base_model": str(base),
                             "models": [{"model": str(adapter)}]}, "native")
    assert {t.dtype for t in default.values()} == {torch.bfloat16}  # without dtype: the base's own precision


def test_adapter_against_another_base_model_is_refused(tmp_path, models):
    from tuneforge.merge.recipe import merge_recipe

    base, a, _ = models
    adapter = make_adapter(base, tmp_path / "ad")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(a),
                                    "models": [{"model": str(adapter)}]}))
    with pytest.raises(UserError, match="different bases"):
        merge_recipe(path, tmp_path / "out")
    # a fine-tuned full model and an adapter of the shared base may be averaged
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(adapter)}]}))
    merge_recipe(path, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
