"""full, lora and qlora: what trains, how it is counted, GPT-2 Conv1D, 4-bit loading on CPU."""

from __future__ import annotations

import pytest

from tests.helpers import stdlib_texts
from tuneforge.errors import UserError


def _lora_cfg(**kw):
    from tuneforge.methods.lora import LoraMethodConfig

    return LoraMethodConfig(name="lora", **kw)


def _ids(tokenizer, n=32):
    import torch

    return torch.tensor([tokenizer(stdlib_texts(2)[1])["input_ids"][:n]])


def _expected_lora_params(model, targets, r):
    """r * (fan_in + fan_out) for every layer the targets match (independent of peft)."""
    from tuneforge.models.targets import is_linear, matches

    total = 0
    for name, module in model.named_modules():
        if is_linear(module) and any(matches(name, t) for t in targets):
            total += r * sum(module.weight.shape)
    return total


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_counts_like_peft(arch, tiny_llama, tiny_gpt2):
    from tuneforge.methods import get_method
    from tuneforge.models import count_parameters, resolve_target_modules

    model = tiny_llama if arch == "llama" else tiny_gpt2
    base_total = sum(p.numel() for p in model.parameters())
    targets = resolve_target_modules(model, "all-linear")
    expected = _expected_lora_params(model, targets, r=4)
    peft_model = get_method("lora").apply(model, _lora_cfg(r=4, target_modules="all-linear"))
    trainable, total = count_parameters(peft_model)
    assert (trainable, total) == peft_model.get_nb_trainable_parameters()
    assert trainable == expected and total == base_total + expected
    grads = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert grads and all(".lora_A." in n or ".lora_B." in n for n in grads)


def test_gpt2_conv1d_lora_is_correctly_oriented(tiny_gpt2, tiny_tokenizer):
    """fan_in_fan_out: the merged weights must reproduce the unmerged adapter's logits."""
    import torch

    from tuneforge.methods import get_method

    peft_model = get_method("lora").apply(tiny_gpt2, _lora_cfg(r=4, target_modules="attention", dropout=0.0))
    wrapped = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and all(".attn." in name for name in wrapped)  # attention never grabs mlp.c_proj
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.eval()
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        unmerged = peft_model(ids).logits
        merged = peft_model.merge_and_unload()(ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5)


def test_lora_options(tiny_llama):
    from tuneforge.methods import get_method

    cfg = _lora_cfg(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True,
                    modules_to_save=["lm_head"], init="gaussian")
    config = get_method("lora").peft_config(cfg, tiny_llama)
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert (config.r, config.lora_alpha, config.use_rslora, config.init_lora_weights) == (2, 4, True, "gaussian")
    assert config.fan_in_fan_out is False
    with pytest.raises(UserError, match="linear layers that exist"):
        get_method("lora").apply(tiny_llama, _lora_cfg(target_modules=["c_attn"]))


def test_full_trains_everything(tiny_llama):
    from tuneforge.methods import get_method
    from tuneforge.models import count_parameters

    for p in tiny_llama.parameters():
        p.requires_grad = False
    model = get_method("full").apply(tiny_llama, None)
    trainable, total = count_parameters(model)
    assert trainable == total == sum(p.numel() for p in tiny_llama.parameters())
    assert not get_method("full").is_adapter and get_method("lora").is_adapter


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory, tiny_tokenizer):
    import torch

    from tuneforge.config.schema import FromConfig
    from tuneforge.models import build_model

    torch.manual_seed(0)
    fc = FromConfig(architecture="llama", hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                    max_position_embeddings=256)
    path = tmp_path_factory.mktemp("qbase")
    build_model(fc, tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _qlora(saved_llama, **kw):
    import torch

    from tuneforge.config.schema import ModelConfig
    from tuneforge.methods import get_method
    from tuneforge.methods.qlora import QLoraMethodConfig
    from tuneforge.models import load_model

    method = get_method("qlora")
    cfg = QLoraMethodConfig(name="qlora", r=4, dropout=0.0, **kw)
    extra = method.model_load_kwargs(cfg, torch.float32)
    model, tokenizer = load_model(ModelConfig(name_or_path=str(saved_llama), precision="fp32"),
                                  extra_kwargs=extra, device="cpu")
    return method, cfg, model, tokenizer


def test_qlora_4bit_on_cpu_one_step_changes_only_lora(saved_llama):
    import bitsandbytes as bnb
    import torch

    from tuneforge.models import count_parameters

    method, cfg, model, tokenizer = _qlora(saved_llama)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    quant = model.config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"] is True
    ids = _ids(tokenizer)
    with torch.no_grad():
        base_logits = model.eval()(ids).logits
    peft_model = method.apply(model, cfg)
    trainable, total = count_parameters(peft_model)
    assert (trainable, total) == peft_model.get_nb_trainable_parameters() and 0 < trainable < total
    with torch.no_grad():  # the untrained adapter (B = 0) leaves the quantized model's output unchanged
        assert torch.allclose(peft_model.eval()(ids).logits, base_logits, atol=1e-5)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    lora = {n for n in before if ".lora_A." in n or ".lora_B." in n}
    assert changed == lora  # every adapter matrix moved, nothing else did


def test_qlora_8bit_loads_int8(saved_llama):
    import bitsandbytes as bnb

    _, _, model, _ = _qlora(saved_llama, bits=8)
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())


def test_qlora_compute_dtype():
    import torch

    from tuneforge.methods.qlora import QLoraMethodConfig, compute_dtype

    assert compute_dtype(QLoraMethodConfig(name="qlora"), torch.bfloat16) is torch.bfloat16
    assert compute_dtype(QLoraMethodConfig(name="qlora", compute_dtype="fp32"), torch.bfloat16) is torch.float32


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    import sys

    import torch

    from tuneforge.methods import get_method
    from tuneforge.methods.qlora import QLoraMethodConfig

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(UserError, match="pip install 'bitsandbytes"):
        get_method("qlora").model_load_kwargs(QLoraMethodConfig(name="qlora"), torch.float32)


def test_qlora_on_unquantized_model_is_refused(tiny_llama):
    from tuneforge.methods import get_method
    from tuneforge.methods.qlora import QLoraMethodConfig

    with pytest.raises(UserError, match="not loaded quantized"):
        get_method("qlora").apply(tiny_llama, QLoraMethodConfig(name="qlora"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_gradients_survive_an_eval_forward(arch, tmp_path, tiny_tokenizer):
    """bitsandbytes repacks 4-bit weights for CPU inference at the first eval forward (on avx512_bf16 CPUs),
    after which no gradient flows through the base layers (and biased layers fail). Evaluating mid-training
    must not change the gradients. (On CPUs without avx512_bf16 there is no repack and this holds trivially.)"""
    import torch

    from tuneforge.config.schema import FromConfig, ModelConfig
    from tuneforge.methods import get_method
    from tuneforge.methods.qlora import QLoraMethodConfig
    from tuneforge.models import build_model, load_model

    torch.manual_seed(0)
    fc = FromConfig(architecture=arch, hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                    max_position_embeddings=256)
    build_model(fc, tiny_tokenizer).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ids = _ids(tiny_tokenizer, 16)

    def first_layer_grad(eval_first: bool) -> float:
        method = get_method("qlora")
        cfg = QLoraMethodConfig(name="qlora", r=4, dropout=0.0, compute_dtype="fp32", target_modules="attention")
        model, _ = load_model(ModelConfig(name_or_path=str(tmp_path), precision="fp32"),
                              extra_kwargs=method.model_load_kwargs(cfg, torch.float32), device="cpu")
        torch.manual_seed(1)
        peft_model = method.apply(model, cfg)
        if eval_first:
            peft_model.eval()
            with torch.no_grad():
                peft_model(ids)
        peft_model.train()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad.norm().item() for n, p in peft_model.named_parameters()
                 if p.requires_grad and ".0." in n and "lora_B" in n]
        return sum(grads)

    clean = first_layer_grad(False)
    assert clean > 0
    assert first_layer_grad(True) == pytest.approx(clean, rel=1e-5)


def test_adapter_on_a_tied_output_layer_is_refused_and_untied_one_merges(tiny_llama, tiny_tokenizer):
    import torch

    from tuneforge.config.schema import FromConfig
    from tuneforge.methods import get_method
    from tuneforge.methods.lora import LoraMethodConfig
    from tuneforge.models import build_model

    cfg = LoraMethodConfig(name="lora", r=4, dropout=0.0, target_modules=["q_proj", "lm_head"])
    with pytest.raises(UserError, match="ties to its input embeddings"):
        get_method("lora").apply(tiny_llama, cfg)

    torch.manual_seed(0)
    untied = build_model(FromConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                                    tie_word_embeddings=False), tiny_tokenizer)
    model = get_method("lora").apply(untied, cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained-looking adapter, so the merge has something to fold
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-4)


@pytest.mark.parametrize("resized", [False, True])
def test_an_adapter_on_the_embeddings_saves_the_base_embedding_only_when_resized(tmp_path, tiny_llama, tiny_tokenizer,
                                                                                resized):
    """peft's "auto" would save the whole base embedding with every adapter that targets it; tuneforge saves it only
    when the vocabulary differs from the base's, and the adapter reloads to the same logits either way."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.helpers import save_base
    from tuneforge.methods import get_method

    base_dir = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if resized:
        model.resize_token_embeddings(model.get_input_embeddings().weight.shape[0] + 8)
    adapted = get_method("lora").apply(model, _lora_cfg(r=4, target_modules=["q_proj", "embed_tokens"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    get_method("lora").save_adapter(adapted, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        base_layers = [k for k in handle.keys() if "base_layer" in k or k.endswith("embed_tokens.weight")]
    assert bool(base_layers) == resized
    reloaded_base = AutoModelForCausalLM.from_pretrained(base_dir)
    if resized:
        reloaded_base.resize_token_embeddings(reloaded_base.get_input_embeddings().weight.shape[0] + 8)
    reloaded = PeftModel.from_pretrained(reloaded_base, tmp_path / "adapter").eval()
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted.eval()(ids).logits, rtol=0, atol=1e-6)
