"""One target vocabulary: for every architecture of the defaults table (and an MoE one), the layers `estimate`
counts for attention / mlp / all-linear are exactly the layers training adapts (peft's wrapped modules)."""

from __future__ import annotations

import dataclasses

import pytest

from tuneforge.estimate.bill import Setup, lora_trainable
from tuneforge.estimate.spec import model_spec, resolve_targets
from tuneforge.models.targets import ARCHITECTURE_DEFAULTS, GROUP_SPECS

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
#: built only with remote code: checked on a hand-built module tree with the same names
REMOTE_CODE = {"chatglm"}
#: beyond the table: an MoE model, and OPT, whose fc1/fc2 sit directly in the block (no "mlp" in their path)
ARCHS = [*sorted(set(ARCHITECTURE_DEFAULTS) - REMOTE_CODE), "qwen2_moe", "opt"]
EXTRA = {"opt": {"ffn_dim": 128, "word_embed_proj_dim": 64}}


def _trained(model, group: str) -> tuple[set[str], int]:
    """Module paths the lora method wraps for ``target_modules: group``, and peft's trainable count (r=2)."""
    from tuneforge.methods import get_method
    from tuneforge.methods.lora import LoraMethodConfig

    peft_model = get_method("lora").apply(model, LoraMethodConfig(name="lora", r=2, target_modules=group))
    wrapped = {name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A")}
    return wrapped, peft_model.get_nb_trainable_parameters()[0]


def _assert_same(spec, build, group: str) -> None:
    counted = {lin.name for lin in resolve_targets(spec, group)}
    wrapped, trainable = _trained(build(), group)
    assert counted == wrapped
    assert sum(a + b for a, b in lora_trainable(spec, Setup(method="lora", r=2, target_modules=group))) == trainable


@pytest.mark.parametrize("group", GROUP_SPECS)
@pytest.mark.parametrize("arch", ARCHS)
def test_estimate_counts_the_layers_training_adapts(arch, group):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = {**SMALL, **EXTRA.get(arch, {})}
    spec = model_spec({"model_type": arch, **config}, name=arch)
    assert spec.modules.model_type == arch

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **config))

    _assert_same(spec, build, group)


@pytest.mark.parametrize("group", GROUP_SPECS)
def test_chatglm_names_estimate_as_training_adapts(group):
    """ChatGLM needs remote code: its module tree by hand, described the way the estimator describes a model."""
    from types import SimpleNamespace

    from torch import nn

    from tuneforge.estimate.spec import LinearShape
    from tuneforge.models.targets import classify, module_names

    class Tree(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="chatglm", tie_word_embeddings=False)
            self.transformer = nn.Module()
            self.transformer.encoder = nn.Module()
            self.transformer.encoder.layers = nn.ModuleList([self._block() for _ in range(2)])
            self.transformer.output_layer = nn.Linear(8, 100)

        @staticmethod
        def _block():
            layer = nn.Module()
            layer.self_attention, layer.mlp = nn.Module(), nn.Module()
            layer.self_attention.query_key_value, layer.self_attention.dense = nn.Linear(8, 24), nn.Linear(8, 8)
            layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h = nn.Linear(8, 32), nn.Linear(32, 8)
            return layer

        def get_output_embeddings(self):
            return self.transformer.output_layer

        def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's causal-LM wrapper asks for it
            raise NotImplementedError

    tree = Tree()
    names = module_names(tree)
    linears = [LinearShape(n, m.in_features, m.out_features, True, "head" if n in names.outputs else classify(n))
               for n, m in tree.named_modules() if isinstance(m, nn.Linear)]
    spec = dataclasses.replace(model_spec({"model_type": "llama", **SMALL}, name="chatglm"), linears=linears,
                               modules=names)
    _assert_same(spec, Tree, group)
