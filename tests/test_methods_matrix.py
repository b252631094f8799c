"""The shared behaviour matrix: every fine-tuning method × {tiny Llama, tiny GPT-2}.

For each (method, arch) row:

1. the method builds from its validated config;
2. only the intended parameters train, and their count equals both peft's own count
   (``get_nb_trainable_parameters``) and the count computed here from the method's formula (e.g. LoRA:
   ``r * (d_in + d_out)`` per target);
3. four optimizer steps (the method's own optimizer when it has one, else AdamW) on a fixed batch lower the loss;
4. frozen base weights are bit-for-bit unchanged;
5. save (``save_pretrained``; PiSSA: its LoRA conversion) → load (``PeftModel.from_pretrained`` on a fresh copy of
   the same base) gives identical logits (to 1e-6; PiSSA 1e-5, the conversion re-factorises the update; QLoRA
   1e-2, see ``QLORA_ATOL``);
6. where mergeable, merged logits equal unmerged within ``MERGE_ATOL`` = 1e-5 absolute;
7. the disabled adapter (``with model.disable_adapter():``) gives the base model's logits (to 1e-6).

Adding a method = one entry in ``ROWS``.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

# Measured on these tiny models (fp32): merged vs unmerged ≤ 4.3e-7 for every mergeable method; save → load
# bit-identical except AdaLoRA (2.1e-7) and PiSSA's LoRA conversion (2.5e-7); disabled adapter = base exactly.
MERGE_ATOL = 1e-5  # merged vs unmerged logits
EQUAL_ATOL = 1e-6  # "identical" after save → load, disabled adapter vs base
PISSA_LOAD_ATOL = 1e-5  # PiSSA's rank-2r conversion recomputes the update in a different order
# bitsandbytes' CPU backend repacks 4-bit weights for a faster inference kernel on the first eval forward (and
# unpacks them on save); its results differ from the training path's by 2e-3–3e-3 in the logits (measured), so
# QLoRA's "identical" comparisons use this bound — still far below what a trained-vs-untrained adapter moves.
QLORA_ATOL = 1e-2
STEPS = 4
SEQ = 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from 2 threads, and LAPACK's SVD (GaLore, PiSSA) on 2 OpenMP threads takes ~1.2 s
    per 64×192 matrix on this shared machine against ~1 ms on one thread (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Row:
    """One method of the matrix: its config, how its trainable parameters are named, and its training lr."""

    config: dict
    trainable: str  # regex every trainable parameter name must match
    lr: float = 1e-2
    arch_config: dict = field(default_factory=dict)  # per-arch overrides of `config`
    skip: dict = field(default_factory=dict)  # arch → reason


ROWS: dict[str, Row] = {
    "full": Row({"name": "full"}, r".*", lr=1e-3),
    "lora": Row({"name": "lora", "r": 4, "dropout": 0.0}, r".*\.lora_[AB]\.default\.weight$"),
    "qlora": Row({"name": "qlora", "r": 4, "dropout": 0.0, "compute_dtype": "fp32"},
                 r".*\.lora_[AB]\.default\.weight$"),
    "dora": Row({"name": "dora", "r": 4, "dropout": 0.0},
                r".*\.(lora_[AB]\.default\.weight|lora_magnitude_vector\.default\.weight)$"),
    "rslora": Row({"name": "rslora", "r": 4, "dropout": 0.0}, r".*\.lora_[AB]\.default\.weight$"),
    "pissa": Row({"name": "pissa", "r": 4, "dropout": 0.0, "niter": 4}, r".*\.lora_[AB]\.default\.weight$",
                 lr=3e-3),
    "lora_plus": Row({"name": "lora_plus", "r": 4, "dropout": 0.0, "lr_ratio": 4.0},
                     r".*\.lora_[AB]\.default\.weight$", lr=3e-3),
    "adalora": Row({"name": "adalora", "init_r": 6, "target_r": 2, "dropout": 0.0, "tinit": 1, "tfinal": 1},
                   r".*\.lora_[ABE]\.default$"),
    "vera": Row({"name": "vera", "r": 16}, r".*\.vera_lambda_[bd]\.default$", lr=1e-1),
    "prefix_tuning": Row({"name": "prefix_tuning", "num_virtual_tokens": 4}, r"^prompt_encoder\..*", lr=1e-1),
    "ia3": Row({"name": "ia3"}, r".*\.ia3_l\.default$", lr=5e-2),
    "galore": Row({"name": "galore", "rank": 8, "update_proj_gap": 2, "scale": 1.0}, r".*", lr=1e-3),
}

# Parameters other than the adapter that full-parameter methods train: every parameter.
FULL_PARAMETER = {"full", "galore"}


def _method_config(name: str, arch: str):
    from pydantic import TypeAdapter

    from tuneforge.config.schema import MethodConfig

    row = ROWS[name]
    return TypeAdapter(MethodConfig).validate_python({**row.config, **row.arch_config.get(arch, {})})


def _train_config(lr: float):
    from tuneforge.config.schema import TrainConfig

    return TrainConfig(lr=lr, weight_decay=0.0)


def _fresh_base(arch: str, tokenizer):
    """The same model as the conftest fixtures (same seed, same config)."""
    from tests.helpers import tiny_from_config as _from_config
    from tuneforge.models import build_model

    torch.manual_seed(0)
    return build_model(_from_config(arch), tokenizer)


def _batch(tokenizer):
    from tests.helpers import stdlib_texts

    ids = tokenizer("\n".join(stdlib_texts(20)))["input_ids"][: 2 * SEQ]
    return torch.tensor(ids).view(2, SEQ)


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.detach().clone()


def _loss(model, ids):
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def _unique_params(model):
    seen, out = set(), []
    for name, param in model.named_parameters():
        if id(param) not in seen:
            seen.add(id(param))
            out.append((name, param))
    return out


def _module_shapes(model, targets):
    from tuneforge.methods.optim import in_out_features, matching_modules

    return [in_out_features(m) for m in matching_modules(model, targets).values()]


def expected_trainable(name: str, base, cfg) -> int:
    """The number of trained parameters by each method's formula, computed on the unwrapped base model."""
    from tuneforge.methods import get_method

    if name in FULL_PARAMETER:
        return sum(p.numel() for _, p in _unique_params(base))
    if name == "prefix_tuning":
        return cfg.num_virtual_tokens * base.config.num_hidden_layers * 2 * base.config.hidden_size
    if name == "ia3":
        from tuneforge.methods.ia3 import resolve_ia3_targets

        targets, feedforward = resolve_ia3_targets(base, cfg)
        total = 0
        for target in targets:
            for d_in, d_out in _module_shapes(base, [target]):
                total += d_in if target in feedforward else d_out
        return total
    shapes = _module_shapes(base, get_method(name).target_modules(base, cfg))
    if name == "adalora":  # A (r × in), B (out × r), E (r × 1)
        return sum(cfg.init_r * (i + o) + cfg.init_r for i, o in shapes)
    if name == "vera":  # lambda_d (r), lambda_b (out)
        return sum(cfg.r + o for _, o in shapes)
    per_module = sum(cfg.r * (i + o) for i, o in shapes)
    if name == "dora":  # + magnitude (out)
        per_module += sum(o for _, o in shapes)
    return per_module


class _State:
    """The bits of transformers' TrainerState our callbacks read."""

    def __init__(self):
        self.global_step = 0


def _train(method, model, cfg, row, ids) -> None:
    """A plain loop: the method's optimizer (or AdamW), its callbacks driven like the Trainer drives them."""
    train_cfg = _train_config(row.lr)
    optimizer = method.create_optimizer(model, cfg, train_cfg)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=row.lr)
    callbacks = method.callbacks(cfg, STEPS)
    state = _State()
    for cb in callbacks:
        cb.on_train_begin(None, state, None, model=model)
    model.train()
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        for cb in callbacks:  # Trainer order: optimizer.step → on_optimizer_step → zero_grad → global_step += 1
            cb.on_optimizer_step(None, state, None, model=model)
        optimizer.zero_grad()
        state.global_step += 1


def _load_base(name, arch, tokenizer, tmp_path, method, cfg):
    """A fresh base model; QLoRA's is the same weights reloaded 4-bit."""
    base = _fresh_base(arch, tokenizer)
    if name != "qlora":
        return base
    from transformers import AutoModelForCausalLM

    plain = tmp_path / "base_fp32"
    if not plain.exists():
        base.save_pretrained(plain)
    return AutoModelForCausalLM.from_pretrained(plain, device_map="cpu",
                                                **method.model_load_kwargs(cfg, torch.float32))


def _params(name):
    out = []
    for arch in ("llama", "gpt2"):
        row = ROWS[name]
        marks = []
        if arch in row.skip:
            marks.append(pytest.mark.skip(reason=row.skip[arch]))
        out.append(pytest.param(name, arch, id=f"{name}-{arch}", marks=marks))
    return out


@pytest.mark.parametrize(("name", "arch"), [p for name in ROWS for p in _params(name)])
def test_method_behaviour(name, arch, tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from tuneforge.methods import get_method

    try:
        importlib.import_module(f"tuneforge.methods.{name}")
    except ImportError as exc:
        pytest.skip(f"method module not importable yet: {exc}")
    row = ROWS[name]
    method = get_method(name)
    cfg = _method_config(name, arch)
    ids = _batch(tiny_tokenizer)

    base = _load_base(name, arch, tiny_tokenizer, tmp_path, method, cfg)
    base_logits = _logits(base, ids)
    expected = expected_trainable(name, base, cfg)

    # 1. builds
    model = method.apply(base, cfg)
    is_peft = isinstance(model, PeftModel)
    assert is_peft == method.is_adapter

    # 2. only the intended parameters train; the count matches peft's own and the method's formula
    trainable = [(n, p) for n, p in _unique_params(model) if p.requires_grad]
    wrong = [n for n, _ in trainable if not re.match(row.trainable, n)]
    assert not wrong, f"unexpected trainable parameters: {wrong[:5]}"
    ours = sum(p.numel() for _, p in trainable)
    assert ours == expected
    if is_peft:
        assert model.get_nb_trainable_parameters()[0] == ours
    else:
        from tuneforge.models.params import count_parameters

        assert count_parameters(model)[0] == ours
    if name not in FULL_PARAMETER | {"prefix_tuning"}:  # prefixes start random: they do change the output
        drift = _logits(model, ids).sub(base_logits).abs().max().item()
        assert drift < (QLORA_ATOL if name == "qlora" else 1e-5), f"an untrained adapter must not change the model (max logit change {drift:.2e})"

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before_train = {n: p.detach().clone() for n, p in trainable}

    # 3. a few steps lower the loss on the fixed batch
    loss_before = _loss(model, ids)
    _train(method, model, cfg, row, ids)
    loss_after = _loss(model, ids)
    assert loss_after < loss_before - 0.05, f"loss did not fall: {loss_before:.4f} → {loss_after:.4f}"
    assert any(not torch.equal(before_train[n], p) for n, p in trainable), "no trainable parameter moved"

    # 4. frozen base weights unchanged (AdaLoRA's rank pattern masks its own lora_E, which is trainable)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(frozen[n], p.detach()), f"frozen parameter changed: {n}"

    trained_logits = _logits(model, ids)

    # 5. save → load on a fresh copy of the same base gives the same logits
    out = tmp_path / "adapter"
    if hasattr(method, "save_adapter"):
        method.save_adapter(model, out)
    else:
        model.save_pretrained(out)
    if is_peft:
        reloaded = PeftModel.from_pretrained(_load_base(name, arch, tiny_tokenizer, tmp_path, method, cfg), out)
    else:
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out)
    atol = {"pissa": PISSA_LOAD_ATOL, "qlora": QLORA_ATOL}.get(name, EQUAL_ATOL)
    torch.testing.assert_close(_logits(reloaded, ids), trained_logits, atol=atol, rtol=0)

    if not is_peft:
        return

    # 7. the disabled adapter is the base model. PiSSA's trained model sits on a residual base: check the
    # reloaded, converted adapter there.
    for candidate in ([reloaded] if name == "pissa" else [model, reloaded]):
        with candidate.disable_adapter():
            torch.testing.assert_close(_logits(candidate, ids), base_logits,
                                       atol=QLORA_ATOL if name == "qlora" else EQUAL_ATOL, rtol=0,
                                       msg=lambda m, c=candidate: f"{'reloaded' if c is reloaded else 'trained'}: {m}")

    # 6. merged ≈ unmerged where the method can merge (QLoRA merges into a de-quantized copy of the base: the
    # merge package's job, not checked here)
    if method.mergeable and name != "qlora":
        merged = model.merge_and_unload()
        assert not isinstance(merged, PeftModel)
        torch.testing.assert_close(_logits(merged, ids), trained_logits, atol=MERGE_ATOL, rtol=0)


# --------------------------------------------------------------------------- method-specific behaviour


def test_adalora_callback_masks_to_target_budget(tiny_llama, tiny_tokenizer):
    """After the final allocation (step total - tfinal) each module keeps ≤ target_r non-zero singular values on
    average: the budget is init_r per module at start and target_r × modules at the end."""
    from tuneforge.methods import get_method

    method = get_method("adalora")
    cfg = _method_config("adalora", "llama")
    model = method.apply(tiny_llama, cfg)
    _train(method, model, cfg, ROWS["adalora"], _batch(tiny_tokenizer))
    config = model.peft_config["default"]
    assert config.total_step == STEPS  # set by the callback from the real number of steps
    assert config.rank_pattern, "update_and_allocate never produced a rank pattern"
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    modules = len(config.rank_pattern)
    assert kept <= cfg.target_r * modules < cfg.init_r * modules


def test_adalora_callback_runs_inside_the_hf_trainer(tiny_llama, tiny_tokenizer, tmp_path):
    """The real Trainer calls our callback after each optimizer step, with gradients still present."""
    from transformers import Trainer, TrainingArguments

    from tuneforge.methods import get_method

    method = get_method("adalora")
    cfg = _method_config("adalora", "llama")
    model = method.apply(tiny_llama, cfg)
    ids = _batch(tiny_tokenizer)
    rows = [{"input_ids": r, "labels": r} for r in ids]
    steps = 4
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=100,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=method.callbacks(cfg, steps))
    trainer.train()
    config = model.peft_config["default"]
    assert config.total_step == steps
    assert config.rank_pattern
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert kept <= cfg.target_r * len(config.rank_pattern)


def test_lora_plus_gives_b_the_larger_learning_rate(tiny_llama):
    from tuneforge.methods import get_method

    method = get_method("lora_plus")
    cfg = _method_config("lora_plus", "llama")
    model = method.apply(tiny_llama, cfg)
    optimizer = method.create_optimizer(model, cfg, _train_config(1e-3))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if "lora_A" in n:
            assert lr_of[id(p)] == pytest.approx(1e-3)
        elif "lora_B" in n:
            assert lr_of[id(p)] == pytest.approx(1e-3 * cfg.lr_ratio)


def test_lora_plus_with_8bit_adamw_steps_on_cpu(tiny_llama, tiny_tokenizer):
    """train.optim adamw_8bit keeps its meaning under LoRA+: bitsandbytes' AdamW8bit with the LoRA+ groups."""
    pytest.importorskip("bitsandbytes")
    from tuneforge.config.schema import TrainConfig
    from tuneforge.methods import get_method

    method = get_method("lora_plus")
    cfg = _method_config("lora_plus", "llama")
    model = method.apply(tiny_llama, cfg)
    optimizer = method.create_optimizer(model, cfg, TrainConfig(lr=3e-3, optim="adamw_8bit"))
    assert type(optimizer).__name__ == "AdamW8bit"
    ids = _batch(tiny_tokenizer)
    before = _loss(model, ids)
    model.train()
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _loss(model, ids) < before - 0.05


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_galore_projects_target_weights_to_rank(arch, tiny_tokenizer):
    """GaLore's Adam state for a target matrix is low-rank (one side = rank); other parameters keep full state."""
    from tuneforge.methods import get_method

    method = get_method("galore")
    cfg = _method_config("galore", arch)
    model = method.apply(_fresh_base(arch, tiny_tokenizer), cfg)
    optimizer = method.create_optimizer(model, cfg, _train_config(1e-3))
    ids = _batch(tiny_tokenizer)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    projected = optimizer.param_groups[1]["params"]
    assert projected and all(p.ndim == 2 for p in projected)
    for p in projected:
        state = optimizer.state[p]
        assert "projector" in state and cfg.rank in state["exp_avg"].shape
        assert state["exp_avg"].numel() < p.numel()
    for p in optimizer.param_groups[0]["params"]:
        assert optimizer.state[p]["exp_avg"].shape == p.shape


def test_galore_layerwise_uses_trainer_optimizer(tiny_llama):
    from tuneforge.methods import get_method

    method = get_method("galore")
    cfg = _method_config("galore", "llama").model_copy(update={"layerwise": True})
    model = method.apply(tiny_llama, cfg)
    assert method.create_optimizer(model, cfg, _train_config(1e-3)) is None
    args = method.trainer_args(cfg)
    assert args["optim"] == "galore_adamw_layerwise"
    assert "model.layers.0.self_attn.q_proj" in args["optim_target_modules"]
    assert "rank=8" in args["optim_args"]


def test_ia3_feedforward_modules_per_architecture(tiny_llama, tiny_gpt2):
    from tuneforge.methods.ia3 import resolve_ia3_targets

    cfg = _method_config("ia3", "llama")
    assert resolve_ia3_targets(tiny_llama, cfg) == (["k_proj", "v_proj", "down_proj"], ["down_proj"])
    assert resolve_ia3_targets(tiny_gpt2, cfg) == (["c_attn", "mlp.c_proj"], ["mlp.c_proj"])
    # with explicit targets, the feed-forward modules are the MLP layers that read the wide activation
    explicit = cfg.model_copy(update={"target_modules": "all-linear"})
    assert resolve_ia3_targets(tiny_llama, explicit)[1] == ["down_proj"]
    assert resolve_ia3_targets(tiny_gpt2, explicit)[1] == ["mlp.c_proj"]


def test_vera_default_targets_are_the_largest_same_shape_attention_set(tiny_llama, tiny_gpt2, tiny_tokenizer):
    """VeRA's defaults work on every architecture: one shape per shared A/B pair, the most layers of that shape."""
    from tuneforge.config.schema import FromConfig
    from tuneforge.methods import get_method
    from tuneforge.models import build_model

    vera, cfg = get_method("vera"), _method_config("vera", "llama")
    assert vera.target_modules(tiny_llama, cfg) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert vera.target_modules(tiny_gpt2, cfg) == ["c_attn"]  # 64→192; attn.c_proj is 64→64
    gqa = build_model(FromConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=512),
                      tiny_tokenizer)
    assert vera.target_modules(gqa, cfg) == ["q_proj", "o_proj"]  # k_proj, v_proj are 64→32


def test_mergeable_flags_are_truthful():
    """Every method that claims mergeable is an adapter; prefix tuning is not mergeable."""
    from tuneforge.methods import get_method, known_methods

    for name in known_methods():
        try:
            method = get_method(name)
        except ImportError:
            continue
        if method.mergeable:
            assert method.is_adapter, name
    assert get_method("prefix_tuning").mergeable is False


def test_every_registered_method_has_a_row():
    """Adding a method = its module + one row here; a registered method without a row is untested."""
    from tuneforge.methods import known_methods

    assert sorted(ROWS) == known_methods()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_default_config_trains(name, arch, tiny_tokenizer, tmp_path):
    """`method: {name: <name>}` alone works on every architecture of the matrix: it builds, steps and lowers loss."""
    from tuneforge.methods import get_method, registrations

    method = get_method(name)
    cfg = registrations()[name].config(name=name)
    ids = _batch(tiny_tokenizer)
    model = method.apply(_load_base(name, arch, tiny_tokenizer, tmp_path, method, cfg), cfg)
    trainable = {n: p.detach().clone() for n, p in _unique_params(model) if p.requires_grad}
    before = _loss(model, ids)
    _train(method, model, cfg, ROWS[name], ids)
    assert _loss(model, ids) < before
    assert any(not torch.equal(trainable[n], p) for n, p in _unique_params(model) if n in trainable)


@pytest.mark.parametrize(("name", "init", "arch"), [
    ("lora", "pissa", "llama"), ("lora", "pissa", "gpt2"), ("lora", "olora", "llama"), ("rslora", "olora", "llama"),
    ("lora_plus", "pissa", "gpt2")])
def test_lora_init_that_changes_the_base_saves_an_adapter_for_the_original_base(name, init, arch, tiny_tokenizer,
                                                                               tmp_path):
    """PiSSA/OLoRA initialisation trains against a residual base; the saved adapter still fits the original one."""
    from peft import PeftModel

    from tuneforge.methods import get_method

    method = get_method(name)
    cfg = _method_config(name, arch).model_copy(update={"init": init})
    ids = _batch(tiny_tokenizer)
    model = method.apply(_fresh_base(arch, tiny_tokenizer), cfg)
    _train(method, model, cfg, ROWS[name], ids)
    trained = _logits(model, ids)
    method.save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_fresh_base(arch, tiny_tokenizer), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, ids), trained, atol=PISSA_LOAD_ATOL, rtol=0)
    # a plain LoRA adapter (rank 2r, ordinary init): any tool that adds B·A to the original weights gets the model
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 2 * cfg.r
    torch.testing.assert_close(_logits(reloaded.merge_and_unload(), ids), trained, atol=PISSA_LOAD_ATOL, rtol=0)
    # the step-0 adapter kept for that conversion lives in a temporary directory that goes with the model
    from tuneforge.methods.lora import INIT_ATTR

    init_root = Path(getattr(model, INIT_ATTR)).parent
    assert init_root.is_dir()
    del model
    import gc

    gc.collect()
    assert not init_root.exists()


def test_olora_on_conv1d_layers_is_refused_with_the_reason(tiny_gpt2):
    from tuneforge.errors import UserError
    from tuneforge.methods import get_method

    cfg = _method_config("lora", "gpt2").model_copy(update={"init": "olora"})
    with pytest.raises(UserError, match="init 'olora'.*Conv1D"):
        get_method("lora").apply(tiny_gpt2, cfg)


def test_dora_with_a_base_changing_init_is_refused_with_the_reason(tiny_llama):
    from tuneforge.errors import UserError
    from tuneforge.methods import get_method

    cfg = _method_config("dora", "llama").model_copy(update={"init": "pissa"})
    with pytest.raises(UserError, match="cannot convert a DoRA adapter back to the original base"):
        get_method("dora").apply(tiny_llama, cfg)
