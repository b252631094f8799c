"""train.loss_chunk (chunked cross-entropy), train.compile and train.kernels (train/loss.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import tiny_run_config, write_chat_items
from tuneforge.config import validate_config
from tuneforge.errors import UserError


def _batch(vocab: int, seed: int = 0):
    """Two rows of 24 with a prompt mask, a padded tail and an unsupervised row start (labels -100)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 24), generator=gen)
    labels = input_ids.clone()
    labels[0, :7] = -100  # prompt
    labels[1, :3] = -100
    labels[1, 20:] = -100  # padding
    return input_ids, labels


def _grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _chunked_step(model, input_ids, labels, chunk, num_items=None):
    from tuneforge.train.loss import captured_head_input, chunked_causal_lm_loss, output_head

    inner, head = output_head(model)
    with captured_head_input(head) as store:
        out = model(input_ids=input_ids)
    assert out.logits.shape[-1] == 0  # the full logits were never computed
    loss = chunked_causal_lm_loss(store["hidden"], head, labels, chunk, num_items)
    loss.backward()
    return loss


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_chunked_loss_and_grads_equal_the_models_own(tiny_llama, chunk):
    import torch

    model = tiny_llama.float()
    input_ids, labels = _batch(model.config.vocab_size)
    reference = model(input_ids=input_ids, labels=labels).loss  # transformers' shift and -100 mask
    reference.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    loss = _chunked_step(model, input_ids, labels, chunk)
    assert torch.allclose(loss, reference, rtol=1e-6, atol=1e-6)
    got = _grads(model)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_chunked_loss_divides_by_num_items_in_batch_like_the_model(tiny_llama):
    import torch

    model = tiny_llama.float()
    input_ids, labels = _batch(model.config.vocab_size, seed=3)
    items = torch.tensor(50)  # the whole accumulated batch's supervised tokens
    reference = model(input_ids=input_ids, labels=labels, num_items_in_batch=items).loss
    with torch.no_grad():
        from tuneforge.train.loss import captured_head_input, chunked_causal_lm_loss, output_head

        _, head = output_head(model)
        with captured_head_input(head) as store:
            model(input_ids=input_ids)
        loss = chunked_causal_lm_loss(store["hidden"], head, labels, 7, items)
    assert torch.allclose(loss, reference, rtol=1e-6)


def test_chunked_loss_trains_lora_on_the_lm_head(tiny_llama):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama.float(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"],
                                                          init_lora_weights=False))
    input_ids, labels = _batch(model.config.vocab_size, seed=1)
    reference = model(input_ids=input_ids, labels=labels).loss
    reference.backward()
    expected = _grads(model)
    assert any("lm_head" in name for name in expected)
    model.zero_grad(set_to_none=True)

    loss = _chunked_step(model, input_ids, labels, 6)
    assert torch.allclose(loss, reference, rtol=1e-6, atol=1e-6)
    got = _grads(model)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-6), name


def test_head_forward_is_restored_after_capture(tiny_llama):
    import torch

    from tuneforge.train.loss import captured_head_input, output_head

    _, head = output_head(tiny_llama)
    with captured_head_input(head):
        pass
    assert "forward" not in head.__dict__
    assert tiny_llama(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == tiny_llama.config.vocab_size


def test_models_that_rescale_logits_are_refused(tiny_llama):
    from tuneforge.train.loss import output_head

    tiny_llama.config.logit_scale = 0.5
    with pytest.raises(UserError, match="train.loss_chunk.*logit_scale"):
        output_head(tiny_llama)


# ----------------------------------------------------------------------------- through run_training


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_items(tmp_path_factory.mktemp("data"), 48, seed=2)


def _raw(out: Path, data: Path, **train) -> dict:
    return tiny_run_config(out, data / "train.jsonl", seed=3, dropout=0.0,
                           train={"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "logging_steps": 1,
                                  "monitor": {"enabled": False}, **train})


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("event") == "log" and "loss" in line]


def _train(raw: dict):
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None)


@pytest.fixture()
def chunk_calls(monkeypatch) -> list:
    """Counts the chunked loss's calls (proof that a run used it)."""
    from tuneforge.train import loss

    calls = []
    original = loss.chunked_causal_lm_loss

    def counted(*args, **kwargs):
        calls.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(loss, "chunked_causal_lm_loss", counted)
    return calls


def test_run_with_loss_chunk_logs_the_same_losses(tmp_path, chat_data, chunk_calls):
    def with_eval(raw: dict) -> dict:
        raw["data"]["eval_split"] = 0.2
        raw["train"]["eval_steps"] = 2
        return raw

    from tuneforge.config.schema import auto_loss_chunk

    plain = _train(with_eval(_raw(tmp_path / "plain", chat_data, loss_chunk=None)))  # the model's own loss
    assert chunk_calls == []
    chunked = _train(with_eval(_raw(tmp_path / "chunked", chat_data, loss_chunk=16)))
    assert chunk_calls and set(chunk_calls) == {16}
    chunk_calls.clear()
    auto = _train(with_eval(_raw(tmp_path / "auto", chat_data)))  # the default: one chunk, no recompute
    assert chunk_calls and set(chunk_calls) == {auto_loss_chunk(512)}
    a, b, c = _losses(plain.run_dir), _losses(chunked.run_dir), _losses(auto.run_dir)
    assert len(a) == len(b) == len(c) == 4
    # The same steps on the same weights: only float summation order differs, over 4 optimizer steps.
    assert b == pytest.approx(a, rel=1e-4) and c == pytest.approx(a, rel=1e-4)
    # Evaluation goes through the chunked loss too (no logits needed for eval_loss).
    assert plain.summary["eval_loss"] is not None
    assert chunked.summary["eval_loss"] == pytest.approx(plain.summary["eval_loss"], rel=1e-4)
    assert auto.summary["eval_loss"] == pytest.approx(plain.summary["eval_loss"], rel=1e-4)
    assert (chunked.final_dir / "adapter_model.safetensors").is_file()


def test_loss_chunk_composes_with_a_retention_term(tmp_path, chat_data, chunk_calls):
    result = _train(_raw(tmp_path / "l2sp", chat_data, loss_chunk=16, retention={"method": "l2sp", "lambda": 1.0}))
    assert chunk_calls  # the task loss was the chunked one, and the term was added to it
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if line.get("event") == "log" and "loss" in line]
    assert logged and all("l2sp_penalty" in line for line in logged)


def test_loss_chunk_refusals_name_the_keys(tmp_path, chat_data):
    with pytest.raises(UserError, match="train.loss_chunk with train.distill"):
        validate_config(_raw(tmp_path / "a", chat_data, loss_chunk=8, distill={"teacher": str(tmp_path)}))


def test_kernels_are_refused_on_cpu_before_anything_is_written(tmp_path, chat_data):
    out = tmp_path / "kernels"
    with pytest.raises(UserError, match=r"train.kernels \['liger'\].*device is 'cpu'"):
        _train(_raw(out, chat_data, kernels=["liger"]))
    assert not out.exists()


def test_compile_auto_is_off_and_true_compiles_the_decoder_in_place(tiny_llama):
    from tuneforge.config.schema import TrainConfig
    from tuneforge.methods import get_method
    from tuneforge.methods.lora import LoraMethodConfig
    from tuneforge.train.loss import compile_model

    model = get_method("lora").apply(tiny_llama, LoraMethodConfig(name="lora", r=4))
    names = [name for name, _ in model.named_parameters()]
    assert not compile_model(model, TrainConfig(), "cpu") and not compile_model(model, TrainConfig(compile=False), "cpu")
    decoder = model.get_base_model().get_decoder()
    assert decoder._compiled_call_impl is None
    assert compile_model(model, TrainConfig(compile=True), "cpu")
    assert decoder._compiled_call_impl is not None  # the decoder stack; the head and the loss stay eager
    assert model.get_base_model().lm_head._compiled_call_impl is None
    assert [name for name, _ in model.named_parameters()] == names  # no "_orig_mod." anywhere: saving is unchanged


@pytest.mark.slow
def test_compiled_and_eager_runs_log_the_same_losses(tmp_path, chat_data):
    eager = _train(_raw(tmp_path / "eager", chat_data, compile=False))
    compiled = _train(_raw(tmp_path / "compiled", chat_data, compile=True))  # with loss_chunk: auto, as by default
    # Inductor fuses and reorders float ops: equal within 1e-3 relative over 4 steps (fp32).
    assert _losses(compiled.run_dir) == pytest.approx(_losses(eager.run_dir), rel=1e-3)
    # Saved as the uncompiled module: the adapter's keys carry no "_orig_mod." prefix.
    from safetensors.torch import load_file

    keys = load_file(str(compiled.final_dir / "adapter_model.safetensors")).keys()
    assert keys == load_file(str(eager.final_dir / "adapter_model.safetensors")).keys()


def test_estimate_bills_one_chunk_of_logits(tmp_path, chat_data):
    from tuneforge.estimate import estimate_memory, model_spec
    from tuneforge.estimate.bill import Setup
    from tuneforge.estimate.choose import setup_from_run

    spec = model_spec("meta-llama/Llama-3.1-8B")  # offline table: vocab 128,256
    from tuneforge.cli import main
    from tuneforge.config.schema import auto_loss_chunk

    spec = model_spec("meta-llama/Llama-3.1-8B")  # offline table: vocab 128,256
    plain = estimate_memory(spec, Setup(batch_size=2, seq_len=2048, loss_chunk="off"))
    chunked = estimate_memory(spec, Setup(batch_size=2, seq_len=2048, loss_chunk=512))
    auto = estimate_memory(spec, Setup(batch_size=2, seq_len=2048))  # training's default, billed by default
    assert plain.components["logits"] == 3 * 4096 * spec.vocab_size * 4
    assert chunked.components["logits"] == 3 * 512 * spec.vocab_size * 4
    assert auto_loss_chunk(spec.vocab_size) == 523
    assert auto.components["logits"] == 3 * 523 * spec.vocab_size * 4
    assert chunked.total_bytes < plain.total_bytes
    _, setup = setup_from_run(validate_config(_raw(tmp_path / "e", chat_data, loss_chunk=64)), device="cpu")
    assert setup.loss_chunk == 64
    _, setup = setup_from_run(validate_config({**_raw(tmp_path / "g", chat_data), "stage": "dpo"}), device="cpu")
    assert setup.loss_chunk is None  # auto does not apply to preference stages: their own loss is billed
    with pytest.raises(SystemExit) as stop:  # argparse: usage error, exit 2
        main(["estimate", "meta-llama/Llama-3.1-8B", "--loss-chunk", "zero"])
    assert stop.value.code == 2


def test_training_runs_with_the_startup_objects_frozen_out_of_the_collector(tmp_path, chat_data, monkeypatch):
    """run_training trains inside gc_frozen (no full walk of torch/transformers' objects per collection); the
    objects are handed back afterwards, and garbage made during training is still collected."""
    import gc

    from transformers import TrainerCallback

    from tuneforge.train.run import run_training
    from tuneforge.utils import gc_frozen

    class Cycle:
        pass

    with gc_frozen():
        assert gc.get_freeze_count() > 1000
        made = Cycle()
        made.me = made  # a reference cycle created inside the block
        del made
        assert gc.collect() >= 1  # still collectable: only what existed before is frozen
    assert gc.get_freeze_count() == 0

    seen = []

    class FreezeProbe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(gc.get_freeze_count())

    cfg = validate_config(tiny_run_config(tmp_path / "run", chat_data, train={"max_steps": 2}))
    run_training(cfg, echo=lambda *_: None, callbacks=[FreezeProbe()])
    assert seen and all(count > 1000 for count in seen)
    assert gc.get_freeze_count() == 0


def test_loss_chunk_auto_resolves_per_stage_and_model_and_falls_back_quietly(tmp_path, chat_data, tiny_llama):
    from tuneforge.config.schema import auto_loss_chunk
    from tuneforge.train.loss import check_speed_options, resolve_loss_chunk

    vocab = tiny_llama.get_output_embeddings().weight.shape[0]
    auto = validate_config(_raw(tmp_path / "a", chat_data))
    assert auto.train.loss_chunk == "auto"  # the default
    assert resolve_loss_chunk(auto, tiny_llama) == auto_loss_chunk(vocab)
    assert auto_loss_chunk(152_064) == 441 and auto_loss_chunk(8) == 2**23 and auto_loss_chunk(10**9) == 64
    assert resolve_loss_chunk(validate_config(_raw(tmp_path / "b", chat_data, loss_chunk=32)), tiny_llama) == 32
    assert resolve_loss_chunk(validate_config(_raw(tmp_path / "c", chat_data, loss_chunk=None)), tiny_llama) is None
    # auto steps aside (the model's own loss, no error) where the chunked loss cannot be used
    distill = validate_config(_raw(tmp_path / "d", chat_data, distill={"teacher": str(tmp_path)}))
    assert resolve_loss_chunk(distill, tiny_llama) is None
    compiled = validate_config(_raw(tmp_path / "e", chat_data, compile=True))
    assert resolve_loss_chunk(compiled, tiny_llama) == auto_loss_chunk(vocab)  # the head stays eager under compile
    fsdp = validate_config({**_raw(tmp_path / "h", chat_data), "distributed": {"strategy": "fsdp"}})
    assert resolve_loss_chunk(fsdp, tiny_llama) is None  # sharded heads are not gathered outside the forward
    with pytest.raises(UserError, match="train.loss_chunk with distributed.strategy 'deepspeed'"):
        validate_config({**_raw(tmp_path / "i", chat_data, loss_chunk=32), "distributed": {"strategy": "deepspeed"}})
    from tuneforge.methods import get_method
    from tuneforge.methods.adalora import AdaLoraMethodConfig

    adalora = get_method("adalora").apply(tiny_llama, AdaLoraMethodConfig(name="adalora"))
    assert resolve_loss_chunk(auto, adalora) is None  # its orthogonality penalty lives in the model's own loss
    with pytest.raises(UserError, match="AdaLoRA adds its orthogonality penalty"):
        check_speed_options(validate_config(_raw(tmp_path / "j", chat_data, loss_chunk=32)), adalora)
    tiny_llama = adalora.unload()
    tiny_llama.config.output_router_logits = True  # an MoE model's router loss, likewise
    assert resolve_loss_chunk(auto, tiny_llama) is None
    tiny_llama.config.output_router_logits = False
    tiny_llama.config.logit_scale = 0.5
    assert resolve_loss_chunk(auto, tiny_llama) is None
    with pytest.raises(UserError, match="logit_scale"):
        check_speed_options(validate_config(_raw(tmp_path / "f", chat_data, loss_chunk=32)), tiny_llama)


@pytest.mark.parametrize("by_auto", [True, False])
def test_eval_that_needs_logits_uses_the_models_loss_under_auto_and_is_refused_when_explicit(tmp_path, tiny_llama,
                                                                                           by_auto):
    import torch
    from transformers import TrainingArguments

    from tuneforge.train.loss import chunked_loss_trainer_class

    cls = chunked_loss_trainer_class(16, chosen_by_auto=by_auto)
    trainer = cls(model=tiny_llama, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    ids = torch.randint(0, 500, (2, 12))
    inputs = {"input_ids": ids, "labels": ids}
    loss_only, _, _ = trainer.prediction_step(tiny_llama, inputs, prediction_loss_only=True)  # chunked: no logits
    if not by_auto:
        with pytest.raises(UserError, match="needs logits"):
            trainer.prediction_step(tiny_llama, inputs, prediction_loss_only=False)
        return
    loss, logits, _ = trainer.prediction_step(tiny_llama, inputs, prediction_loss_only=False)
    assert logits.shape == (2, 12, tiny_llama.config.vocab_size)  # the model's own forward, full logits
    assert float(loss) == pytest.approx(float(loss_only), rel=1e-5)  # the same loss either way
