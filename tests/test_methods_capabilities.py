"""Every registered method's declared capabilities (``Method.capabilities``) agree with what the method does.

For each method of the matrix (tests/test_methods_matrix.py's rows, on the tiny Llama), plus LoRA's base-changing
initialisations:

* ``quantized_base`` ⇔ the base loaded with the method's ``model_load_kwargs`` holds quantized (bitsandbytes) layers;
* ``changes_base`` ⇔ the base weights differ after ``apply``;
* ``mergeable`` ⇔ folding the adapter into the base (peft ``merge_and_unload``) succeeds and keeps the logits;
* ``owns_optimizer`` ⇔ the method builds an optimizer (or names the Trainer's) itself;
* ``shardable`` ⇔ the distributed strategy check accepts it under DeepSpeed ZeRO-2 on two processes, and a
  ``quantized_base`` method is refused under FSDP.
"""

from __future__ import annotations

import pytest

from tests.test_methods_matrix import QLORA_ATOL, ROWS, _batch, _fresh_base, _logits, _train_config
from tuneforge.config import validate_config
from tuneforge.errors import UserError

torch = pytest.importorskip("torch")

CASES = {name: row.config for name, row in ROWS.items()}
CASES["lora-init-pissa"] = {"name": "lora", "r": 4, "dropout": 0.0, "init": "pissa"}
CASES["lora-init-olora"] = {"name": "lora", "r": 4, "dropout": 0.0, "init": "olora"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the SVDs of PiSSA/OLoRA/GaLore are slow on two shared OpenMP threads
    yield
    torch.set_num_threads(threads)


def _setup(case: str, tokenizer, tmp_path):
    """``(method, method config, base as the trainer loads it, base weights before apply)``."""
    from pydantic import TypeAdapter
    from transformers import AutoModelForCausalLM

    from tuneforge.config.schema import MethodConfig
    from tuneforge.methods import get_method

    cfg = TypeAdapter(MethodConfig).validate_python(CASES[case])
    method = get_method(cfg.name)
    plain = tmp_path / "base"
    _fresh_base("llama", tokenizer).save_pretrained(plain)
    base = AutoModelForCausalLM.from_pretrained(plain, device_map="cpu",
                                                **method.model_load_kwargs(cfg, torch.float32))
    weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    return method, cfg, base, weights


def _quantized(model) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


def _base_changed(model, before: dict) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    after = {name.replace(".base_layer", ""): p for name, p in base.named_parameters()}
    return any(not torch.equal(after[name].detach().float(), w.float()) for name, w in before.items() if name in after)


def _merges(model, ids, tolerance: float) -> bool:
    want = _logits(model, ids)
    try:
        merged = model.merge_and_unload()
    except Exception:  # noqa: BLE001 - any refusal means "cannot be merged"
        return False
    if any("lora_" in name or "vera_" in name or "ia3_" in name for name, _ in merged.named_parameters()):
        return False
    return torch.allclose(_logits(merged, ids), want, atol=tolerance, rtol=0)


def _strategy_accepts(method, section: dict, strategy: str, monkeypatch, tmp_path) -> bool:
    from tuneforge.train import distributed

    monkeypatch.setattr(distributed, "_require_deepspeed", lambda: None)  # the check, not the package
    raw = {"run_name": "r", "output_dir": str(tmp_path / "r"), "model": {"name_or_path": "x"},
           "method": section, "data": {"train": ["x.jsonl"]},
           "distributed": {"strategy": strategy, "deepspeed": {"zero_stage": 2}}}
    try:
        distributed.check_strategy(validate_config(raw), method, world_size=2)
    except UserError:
        return False
    return True


@pytest.mark.parametrize("case", sorted(CASES))
def test_declared_capabilities_match_what_the_method_does(case, tiny_tokenizer, tmp_path, monkeypatch):
    method, cfg, base, before = _setup(case, tiny_tokenizer, tmp_path)
    caps = method.capabilities(cfg)
    assert _quantized(base) == caps.quantized_base, case

    torch.manual_seed(0)
    model = method.apply(base, cfg)
    assert _base_changed(model, before) == caps.changes_base, case

    optimizer = method.create_optimizer(model, cfg, _train_config(1e-3))
    assert (optimizer is not None or "optim" in method.trainer_args(cfg)) == caps.owns_optimizer, case

    assert _strategy_accepts(method, CASES[case], "deepspeed", monkeypatch, tmp_path) == caps.shardable, case
    if caps.shardable:
        assert _strategy_accepts(method, CASES[case], "fsdp", monkeypatch, tmp_path) == (not caps.quantized_base), case

    tolerance = QLORA_ATOL if caps.quantized_base else 1e-4
    assert _merges(model, _batch(tiny_tokenizer), tolerance) == caps.mergeable, case


def test_capabilities_are_recorded_in_the_run_manifest_for_readers_that_never_import_methods(tmp_path, base_dir):
    """merge reads ``quantized_base`` from the run (the dequantise-first note), not from the method's name."""
    from tests.helpers import make_run
    from tuneforge.merge.lora import _trained_on_quantized_base
    from tuneforge.models.reference import resolve
    from tuneforge.train.rundir import recorded_capabilities

    for name, quantized in (("qlora", True), ("lora", False)):
        run = make_run(tmp_path / name, base_dir, method=name)
        assert recorded_capabilities(run)["quantized_base"] is quantized
        assert _trained_on_quantized_base(resolve(run)) is quantized


@pytest.fixture()
def base_dir(tmp_path, tiny_tokenizer):
    from tests.helpers import save_base

    return save_base(_fresh_base("llama", tiny_tokenizer), tiny_tokenizer, tmp_path / "base_model")
