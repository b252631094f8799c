"""Untrained chat-template token rows: detected before training, trained by default, refused on request."""

from __future__ import annotations

import pytest

from tuneforge.errors import UserError


@pytest.fixture()
def chatml():
    from tuneforge.data.templates import get_template

    return get_template("chatml")


def _ids(tokenizer, *tokens):
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_template_tokens_are_the_markers_eos_and_stops(tiny_tokenizer, chatml):
    from tuneforge.models.untrained import template_token_ids

    found = template_token_ids(tiny_tokenizer, chatml)
    assert set(found.values()) == {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}


def test_zero_and_equal_rows_are_found(tiny_llama, tiny_tokenizer, chatml):
    import torch

    from tuneforge.models.untrained import untrained_template_tokens

    assert untrained_template_tokens(tiny_llama, tiny_tokenizer, chatml) == []  # random rows look trained
    start, end = _ids(tiny_tokenizer, "<|im_start|>", "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    found = untrained_template_tokens(tiny_llama, tiny_tokenizer, chatml)
    assert [(t.token, t.where) for t in found] == [("<|im_end|>", "input")]
    assert found[0].reason.startswith("norm 0 vs median")
    with torch.no_grad():  # both set to one shared vector (of a typical norm), as some initialisations do
        shared = tiny_llama.get_input_embeddings().weight[5].clone()
        tiny_llama.get_input_embeddings().weight[start] = shared
        tiny_llama.get_input_embeddings().weight[end] = shared
    found = untrained_template_tokens(tiny_llama, tiny_tokenizer, chatml)
    assert {t.token for t in found} == {"<|im_start|>", "<|im_end|>"}
    assert all(t.reason == "equal to 2 other row(s)" for t in found)


def test_untied_output_rows_are_checked_too(tiny_tokenizer, chatml):
    import torch

    from tests.helpers import tiny_from_config
    from tuneforge.models import build_model
    from tuneforge.models.untrained import untrained_template_tokens

    torch.manual_seed(0)
    model = build_model(tiny_from_config("llama").model_copy(update={"tie_word_embeddings": False}), tiny_tokenizer)
    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        model.get_output_embeddings().weight[end] = 0.0
    found = untrained_template_tokens(model, tiny_tokenizer, chatml)
    assert [(t.token, t.where) for t in found] == [("<|im_end|>", "output")]


def test_refuse_names_tokens_and_option(tiny_llama, tiny_tokenizer, chatml):
    import torch

    from tuneforge.models.untrained import apply_untrained_policy

    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    with pytest.raises(UserError, match=r"'<\|im_end\|>' \(id \d+, input row: norm 0.*model.untrained_tokens: train"):
        apply_untrained_policy(tiny_llama, tiny_tokenizer, chatml, "refuse")
    with pytest.raises(UserError, match="model.untrained_tokens: 'maybe' is not one of train, refuse, ignore"):
        apply_untrained_policy(tiny_llama, tiny_tokenizer, chatml, "maybe")


def test_train_policy_makes_exactly_those_rows_trainable_under_lora(tiny_llama, tiny_tokenizer, chatml):
    import torch

    from tuneforge.config.methods import LoraMethodConfig
    from tuneforge.methods import get_method
    from tuneforge.models.untrained import apply_untrained_policy
    from tuneforge.models.vocab import NEW_TOKENS_ATTR

    start, end = _ids(tiny_tokenizer, "<|im_start|>", "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[[start, end]] = 0.0
    lines: list[str] = []
    found = apply_untrained_policy(tiny_llama, tiny_tokenizer, chatml, "train", echo=lines.append)
    assert {t.id for t in found} == {start, end}
    assert getattr(tiny_llama, NEW_TOKENS_ATTR) == sorted([start, end])
    assert lines and lines[0].startswith("untrained chat-template token rows will train")

    peft_model = get_method("lora").apply(tiny_llama, LoraMethodConfig(name="lora", r=4, target_modules="attention"))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    token_params = [p for n, p in trainable.items() if "trainable_tokens" in n]
    assert token_params and all(p.shape[0] == 2 for p in token_params)  # the two rows, nothing more
    # a step moves the rows: the model can learn to produce <|im_end|>
    ids = torch.tensor([[start, 5, 6, end]])
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in token_params)


def test_ignore_reports_and_changes_nothing(tiny_llama, tiny_tokenizer, chatml):
    import torch

    from tuneforge.models.untrained import apply_untrained_policy
    from tuneforge.models.vocab import NEW_TOKENS_ATTR

    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    lines: list[str] = []
    assert len(apply_untrained_policy(tiny_llama, tiny_tokenizer, chatml, "ignore", echo=lines.append)) == 1
    assert not hasattr(tiny_llama, NEW_TOKENS_ATTR) and lines[0].startswith("warning:")


def test_preview_lines_read_only_the_embedding_matrix(tiny_llama, tiny_tokenizer, chatml, tmp_path):
    import torch

    from tests.helpers import save_base
    from tuneforge.models.untrained import preview_lines

    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    lines = preview_lines(str(base), tiny_tokenizer, chatml)
    assert len(lines) == 1 and "'<|im_end|>'" in lines[0] and "input row" in lines[0]
    assert preview_lines("org/hub-model", tiny_tokenizer, chatml) == []


def test_data_preview_reports_untrained_rows(tiny_llama, tiny_tokenizer, tmp_path):
    import io

    import torch
    import yaml

    from tests.helpers import save_base, write_chat_items
    from tuneforge.commands.preview import run_preview

    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    write_chat_items(tmp_path, 6, seed=0)
    config = {"run_name": "p", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(base)},
              "method": {"name": "lora"}, "data": {"train": [str(tmp_path / "train.jsonl")], "max_length": 128}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = io.StringIO()
    assert run_preview(str(tmp_path / "run.yaml"), n=1, out=out) == 0
    assert "untrained chat-template token row: '<|im_end|>'" in out.getvalue()
    assert "model.untrained_tokens: train" in out.getvalue()


def test_training_trains_untrained_rows_and_refuse_stops_before_the_run(tiny_llama, tiny_tokenizer, tmp_path):
    """Through the train front door: the zeroed <|im_end|> row moves under LoRA (and loads back); refuse writes
    nothing; the run records what it found."""
    import json

    import torch

    from tests.helpers import save_base, tiny_run_config, write_chat_items
    from tuneforge.config import validate_config
    from tuneforge.console import silenced
    from tuneforge.models.reference import load_for_inference
    from tuneforge.train import train

    (end,) = _ids(tiny_tokenizer, "<|im_end|>")
    with torch.no_grad():
        tiny_llama.get_input_embeddings().weight[end] = 0.0
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    write_chat_items(tmp_path, 16, seed=0)
    raw = tiny_run_config(tmp_path / "run", tmp_path / "train.jsonl", train={"max_steps": 4, "batch_size": 4,
                                                                              "lr": 1e-2, "report_to": ["none"]})
    raw["model"] = {"name_or_path": str(base), "untrained_tokens": "refuse"}
    with pytest.raises(UserError, match="untrained embedding rows: '<\\|im_end\\|>'"):
        train(validate_config(raw))
    assert not (tmp_path / "run").exists()

    raw["model"]["untrained_tokens"] = "train"
    with silenced():
        train(validate_config(raw))
    manifest = json.loads((tmp_path / "run" / "tuneforge_run.json").read_text())
    assert [t["token"] for t in manifest["untrained_tokens"]] == ["<|im_end|>"]
    loaded = load_for_inference(tmp_path / "run", device="cpu", dtype=torch.float32)
    assert float(loaded.model.get_input_embeddings()(torch.tensor([end])).norm()) > 0  # the row trained
