"""DPO loss and reference on hand-made batches: tuneforge's pipeline vs stock TRL vs a hand computation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tuneforge.data.preference import PairCollator, encode_pair
from tuneforge.data.readers import preference_record
from tuneforge.data.templates import ChatTemplate
from tuneforge.models.scoring import sequence_logps
from tuneforge.train.stages.common import to_dataset

# No text after the end marker, so stock TRL's "completion = tokens after the prompt" equals our masked span.
JINJA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'A: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}"
)
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris", "rejected": "Rome, I think"},
    {"prompt": "Name a mutable sequence type.", "chosen": "list", "rejected": "tuple"},
    {"prompt": "2 + 2 =", "chosen": "4", "rejected": "five"},
]
BETA = 0.3


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))


def _perturb(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B.default" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def _args(tmp_path, **kw):
    from trl import DPOConfig

    return DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=BETA,
                     max_length=None, gradient_checkpointing=False, per_device_train_batch_size=3, **kw)


def _our_rows(tokenizer):
    template = ChatTemplate("t", JINJA, [])
    return [encode_pair(preference_record(p, f"hand:{i}"), tokenizer, template, 256)[0] for i, p in enumerate(PAIRS)]


def _our_trainer(model, tokenizer, tmp_path, rows):
    from tuneforge.train.stages.dpo import adapter_is_identity, finish_peft_reference, trainer_base

    identity = adapter_is_identity(model, rows[0]["chosen_ids"])
    trainer = trainer_base()(model=model, args=_args(tmp_path / "ours"), data_collator=PairCollator(0),
                             train_dataset=to_dataset(rows), processing_class=tokenizer)
    finish_peft_reference(trainer, identity)
    return trainer


@pytest.fixture()
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = JINJA
    return tok


def test_dpo_loss_equals_stock_trl_and_the_hand_computed_sigmoid_loss(tiny_llama, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOTrainer

    ours_model = _lora(tiny_llama)
    stock_model = copy.deepcopy(ours_model)
    rows = _our_rows(tokenizer)
    ours = _our_trainer(ours_model, tokenizer, tmp_path, rows)
    conversational = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                       "chosen": [{"role": "assistant", "content": p["chosen"]}],
                       "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in PAIRS]
    stock = DPOTrainer(model=stock_model, args=_args(tmp_path / "stock"), processing_class=tokenizer,
                       train_dataset=Dataset.from_list(conversational))
    # Move both policies away from the reference by the same amount, so the loss is not log 2.
    _perturb(ours.model)
    _perturb(stock.model)

    our_batch = PairCollator(tokenizer.pad_token_id)(rows)
    stock_batch = stock.data_collator([stock.train_dataset[i] for i in range(len(PAIRS))])
    assert torch.equal(our_batch["input_ids"], stock_batch["input_ids"])
    assert torch.equal(our_batch["completion_mask"], stock_batch["completion_mask"])

    our_loss = ours.compute_loss(ours.model, our_batch)
    stock_loss = stock.compute_loss(stock.model, stock_batch)
    assert our_loss.item() == pytest.approx(stock_loss.item(), abs=1e-5)
    assert abs(our_loss.item() - torch.log(torch.tensor(2.0)).item()) > 1e-2

    # By hand: summed completion log-probs from full logits, reference = adapter disabled.
    model = ours.model
    with torch.no_grad():
        policy, _, _ = sequence_logps(model, our_batch)
        with model.disable_adapter():
            reference, _, _ = sequence_logps(model, our_batch)
    n = len(PAIRS)
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    assert our_loss.item() == pytest.approx((-F.logsigmoid(BETA * margin)).mean().item(), abs=1e-5)
    # The same rewards TRL logs (β · log-ratio), averaged.
    ours.log({"loss": our_loss.item()})
    logged = ours.state.log_history[-1]
    assert logged["rewards/margins"] == pytest.approx((BETA * margin).mean().item(), abs=1e-5)


def test_adapter_disabled_reference_equals_a_separate_base_copy(tiny_llama, tokenizer, tmp_path):
    base_copy = copy.deepcopy(tiny_llama).eval()
    rows = _our_rows(tokenizer)
    trainer = _our_trainer(_lora(tiny_llama), tokenizer, tmp_path, rows)
    assert list(trainer.model.peft_config) == ["default"]  # no reference adapter: the adapter is disabled
    _perturb(trainer.model)
    batch = PairCollator(tokenizer.pad_token_id)(rows)
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    with torch.no_grad():
        separate, _, _ = sequence_logps(base_copy, batch)
        policy, _, _ = sequence_logps(trainer.model, batch)
    n = len(PAIRS)
    torch.testing.assert_close(ref_chosen, separate[:n], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_rejected, separate[n:], atol=1e-5, rtol=0)
    assert (policy[:n] - ref_chosen).abs().max() > 1e-2  # the policy itself is elsewhere


def test_an_adapter_that_changes_the_model_at_init_keeps_a_reference_copy(tiny_llama, tokenizer, tmp_path):
    from tuneforge.train.stages.dpo import adapter_is_identity

    model = _lora(tiny_llama)
    _perturb(model)  # like PiSSA/OLoRA: the starting adapter is not a no-op
    rows = _our_rows(tokenizer)
    assert not adapter_is_identity(model, rows[0]["chosen_ids"])
    trainer = _our_trainer(model, tokenizer, tmp_path, rows)
    assert "ref" in trainer.model.peft_config  # reference = the starting adapter, not the bare base
    batch = PairCollator(tokenizer.pad_token_id)(rows)
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(0.6931, abs=1e-3)
    remover = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "RemoveAdapter"]
    remover[0].on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model)
    assert list(trainer.model.peft_config) == ["default"]  # removed before final/ is written
