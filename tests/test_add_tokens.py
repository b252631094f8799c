"""model.add_tokens (new vocabulary rows, initialised) and train.embedding_lr (their own learning rate)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import save_base, stdlib_texts, tiny_from_config
from tuneforge.config import validate_config
from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.models.load import load_model

NEW = ["frobnicator", "zzyzxq"]
SPECIAL = ["<|tool_call|>"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer was trained on the stdlib docs (none of the new tokens is in its vocabulary)."""
    model, tokenizer = load_model(ModelConfig(from_config=tiny_from_config()), texts=stdlib_texts(300),
                                  device="cpu", dtype=torch.float32)
    assert not set(NEW + SPECIAL) & set(tokenizer.get_vocab())
    return save_base(model, tokenizer, tmp_path_factory.mktemp("base"))


def _load(base_dir, **add):
    return load_model(ModelConfig(name_or_path=str(base_dir), add_tokens=add or None), device="cpu",
                      dtype=torch.float32)


def test_new_tokens_are_single_ids_with_rows_initialised_from_their_pieces(base_dir):
    plain, tok0 = _load(base_dir)
    model, tok = _load(base_dir, tokens=NEW, special_tokens=SPECIAL)
    rows = plain.get_input_embeddings().weight
    assert len(tok) == len(tok0) + 3 == model.get_input_embeddings().weight.shape[0]
    for token in NEW + SPECIAL:
        ids = tok(f"x {token} y", add_special_tokens=False)["input_ids"]
        new_id = tok.convert_tokens_to_ids(token)
        assert new_id >= len(tok0) and new_id in ids  # one id, not pieces
        pieces = tok0(token, add_special_tokens=False)["input_ids"]
        torch.testing.assert_close(model.get_input_embeddings().weight[new_id], rows[pieces].mean(dim=0))
    assert tok.convert_tokens_to_ids(SPECIAL[0]) in tok.all_special_ids or \
        tok.decode([tok.convert_tokens_to_ids(SPECIAL[0])], skip_special_tokens=True) == ""
    torch.testing.assert_close(model.get_input_embeddings().weight[: len(tok0)], rows)  # old rows untouched

    mean_model, mean_tok = _load(base_dir, tokens=NEW, init="mean")
    torch.testing.assert_close(mean_model.get_input_embeddings().weight[mean_tok.convert_tokens_to_ids(NEW[0])],
                               rows.mean(dim=0))
    known = tok0.convert_ids_to_tokens(5)
    same, same_tok = _load(base_dir, tokens=[known])  # already in the vocabulary: nothing added
    assert len(same_tok) == len(tok0)


def test_schema_forms_and_errors():
    base = {"model": {"from_config": {}}, "data": {"train": ["x.jsonl"]}}
    cfg = validate_config({**base, "model": {"from_config": {}, "add_tokens": ["<a>", "<b>"]}})
    assert cfg.model.add_tokens.tokens == ["<a>", "<b>"] and cfg.model.add_tokens.init == "pieces"
    for bad, message in (([], "lists no token"), (["<a>", "<a>"], "listed twice"),
                         ({"tokens": ["a"], "init": "zero"}, "init")):
        with pytest.raises(Exception, match=message):
            validate_config({**base, "model": {"from_config": {}, "add_tokens": bad}})
    with pytest.raises(Exception, match="embedding_lr"):
        validate_config({**base, "train": {"embedding_lr": 0}})
    with pytest.raises(Exception, match="train.embedding_lr with distributed.strategy 'fsdp'"):
        validate_config({**base, "train": {"embedding_lr": 1e-4}, "distributed": {"strategy": "fsdp"}})


def test_embedding_lr_is_refused_by_methods_with_their_own_groups():
    from tuneforge.methods import get_method

    train_cfg = validate_config({"model": {"from_config": {}}, "data": {"train": ["x.jsonl"]},
                                 "train": {"embedding_lr": 1e-3}}).train
    with pytest.raises(UserError, match="train.embedding_lr with method 'lora_plus'"):
        get_method("lora_plus").create_optimizer(None, None, train_cfg)


def _train(tmp_path, base_dir, name, embedding_lr, method):
    from tuneforge.train.run import run_training

    data = tmp_path / "new.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps({"text": f"the {NEW[i % 2]} {t[:150]} {SPECIAL[0]} {NEW[(i + 1) % 2]}"})
                                + "\n" for i, t in enumerate(stdlib_texts(64))))
    raw = {"run_name": name, "output_dir": str(tmp_path / name), "seed": 3, "stage": "pt",
           "model": {"name_or_path": str(base_dir), "add_tokens": {"tokens": NEW, "special_tokens": SPECIAL}},
           "method": {"name": method, **({"r": 4, "alpha": 8, "dropout": 0.0} if method == "lora" else {})},
           "data": {"train": [str(data)], "max_length": 64},
           "train": {"report_to": ["none"], "max_steps": 3, "batch_size": 4, "lr": 1e-4, "embedding_lr": embedding_lr,
                     "scheduler": "constant", "max_grad_norm": None, "logging_steps": 1}}
    return run_training(validate_config(raw))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_added_token_rows_move_at_embedding_lr(tmp_path, base_dir, method):
    """Two runs that differ only in train.embedding_lr (1e-3 vs 1e-2, train.lr 1e-4): the new tokens' rows move
    ~10x further in the second (Adam's step is proportional to the learning rate), the other weights the same;
    the saved run (adapter + resized embeddings, or full model) loads back with the trained rows."""
    from tuneforge.models.reference import load_for_inference

    start, tok = _load(base_dir, tokens=NEW, special_tokens=SPECIAL)
    ids = [tok.convert_tokens_to_ids(t) for t in NEW + SPECIAL]
    before = start.get_input_embeddings().weight[ids].detach()
    moved, other = {}, {}
    for lr in (1e-3, 1e-2):
        result = _train(tmp_path, base_dir, f"{method}-{lr}", lr, method)
        loaded = load_for_inference(str(result.run_dir), device="cpu", dtype=torch.float32)
        after = loaded.model.get_input_embeddings().weight[ids].detach()
        moved[lr] = (after - before).norm().item()
        # a weight trained at train.lr in both runs (an adapter's B starts at 0; a full run's MLP)
        name = "lora_B" if method == "lora" else "mlp.down_proj.weight"
        trained = [p for n, p in result.model.named_parameters() if name in n][0]
        reference = [p for n, p in start.named_parameters() if name in n]
        other[lr] = (trained.detach() - (reference[0] if reference and method == "full" else 0)).norm().item()
        with torch.no_grad():  # saved and reloaded: same logits on text with the new tokens
            x = torch.tensor([tok(f"a {NEW[0]} b {SPECIAL[0]}", add_special_tokens=False)["input_ids"]])
            result.model.eval()
            torch.testing.assert_close(loaded.model(input_ids=x).logits, result.model(input_ids=x).logits)
    ratio = moved[1e-2] / moved[1e-3]
    assert 6 < ratio < 14, (moved, ratio)
    assert 0.7 < other[1e-2] / other[1e-3] < 1.4, other
