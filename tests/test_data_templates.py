"""Chat templates and SFT label masks: hand-checked spans, pad == eos, train_on_prompt, truncation."""

from __future__ import annotations

import pytest

from tuneforge.data.packing import PaddingCollator
from tuneforge.data.templates import ChatTemplate, get_template, resolve_template
from tuneforge.data.tokenize import IGNORE, encode_chat, encode_chat_samples, supervised_spans
from tuneforge.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


@pytest.fixture(scope="module")
def gpt2_like_tokenizer():
    """A byte-level BPE tokenizer like GPT-2's: one special token, pad == eos, no chat markers, no template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import stdlib_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_texts(100), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", clean_up_tokenization_spaces=False)


def supervised_pieces(sample: dict, tokenizer) -> list[str]:
    """Decode each run of consecutive supervised tokens (what a person checks in `data preview`)."""
    pieces, run = [], []
    for token, label in zip(sample["input_ids"], sample["labels"], strict=True):
        if label != IGNORE:
            assert label == token  # labels are unshifted copies of the ids
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    if run:
        pieces.append(tokenizer.decode(run))
    return pieces


def test_chatml_multi_turn_mask_matches_hand_check(tiny_tokenizer):
    template = get_template("chatml")
    sample = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, template, max_length=512)
    assert tiny_tokenizer.decode(sample["input_ids"]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\nSee you.<|im_end|>\n"
    )
    # Written by hand: every answer plus its end-of-turn token, nothing of the prompts or the newlines after.
    assert supervised_pieces(sample, tiny_tokenizer) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sample["labels"].count(im_end) == 2 and sample["input_ids"].count(im_end) == 5
    assert sample["truncated"] is False


def test_llama3_and_alpaca_spans_end_with_turn_marker(tiny_tokenizer):
    sample = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, get_template("llama3"), 512)
    assert supervised_pieces(sample, tiny_tokenizer) == ["Hello!<|eot_id|>", "See you.<|eot_id|>"]
    sample = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, get_template("alpaca"), 512)
    assert supervised_pieces(sample, tiny_tokenizer) == ["Hello!<|endoftext|>", "See you.<|endoftext|>"]


def test_plain_template_with_pad_equal_eos_keeps_eos_label(gpt2_like_tokenizer):
    tok = gpt2_like_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    template = resolve_template("auto", tok)
    assert template.name == "plain"  # no chat template, no <|im_start|> token
    short = encode_chat({"messages": CONVERSATION[1:3]}, tok, template, 512)
    long = encode_chat({"messages": CONVERSATION}, tok, template, 512)
    assert tok.decode(short["input_ids"]) == "User: Hi\nAssistant: Hello!<|endoftext|>\n"
    assert supervised_pieces(short, tok) == [" Hello!<|endoftext|>"]
    batch = PaddingCollator(tok.pad_token_id)([short, long])
    eos_at = short["input_ids"].index(tok.eos_token_id)
    n = len(short["input_ids"])
    assert batch["labels"][0, eos_at].item() == tok.eos_token_id  # EOS is trained although pad == eos
    assert (batch["labels"][0, n:] == IGNORE).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"][0].sum().item() == n
    assert batch["labels"][1].tolist() == long["labels"]


def test_train_on_prompt_supervises_everything(tiny_tokenizer):
    sample = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, get_template("chatml"), 512,
                         train_on_prompt=True)
    assert sample["labels"] == sample["input_ids"]


def test_truncation_keeps_partial_answer_or_drops(tiny_tokenizer):
    template = get_template("chatml")
    full = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, template, 512)
    n = len(full["input_ids"])
    cut = encode_chat({"messages": CONVERSATION}, tiny_tokenizer, template, n - 3)
    assert cut["truncated"] and len(cut["input_ids"]) == n - 3
    assert cut["labels"] == full["labels"][: n - 3]
    first_supervised = next(i for i, label in enumerate(full["labels"]) if label != IGNORE)
    assert encode_chat({"messages": CONVERSATION}, tiny_tokenizer, template, first_supervised) is None
    assert encode_chat({"messages": CONVERSATION[:2]}, tiny_tokenizer, template, 512) is None  # no answer


def test_resolve_auto_prefers_tokenizer_template_then_chatml(tiny_tokenizer, gpt2_like_tokenizer):
    assert resolve_template("auto", tiny_tokenizer).name == "chatml"  # has <|im_start|>/<|im_end|> tokens
    tok = gpt2_like_tokenizer
    try:
        tok.chat_template = get_template("chatml").jinja.replace("assistant\\n", "assistant:\\n")
        own = resolve_template("auto", tok)
        assert own.name == "tokenizer" and own.stop == ["<|im_end|>"]
        assert "assistant:\n" in own.render(CONVERSATION, add_generation_prompt=True, tokenizer=tok)
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # never ends a turn
        marker_less = resolve_template("auto", tok)
        assert marker_less.turn_end == tok.eos_token  # answers are trained to end with EOS, generation stops on it
        tok.eos_token = None
        with pytest.raises(UserError, match="never learn to stop"):
            resolve_template("auto", tok)
    finally:
        tok.eos_token = "<|endoftext|>"
        tok.chat_template = None


def test_unknown_template_lists_known_names(tiny_tokenizer):
    with pytest.raises(UserError, match=r"unknown template 'chatlm' — did you mean 'chatml'\?; known: auto, chatml"):
        resolve_template("chatlm", tiny_tokenizer)


def test_render_matches_transformers_apply_chat_template(tiny_tokenizer):
    for name in ("chatml", "llama3", "alpaca", "plain"):
        template = get_template(name)
        for gen in (False, True):
            expected = tiny_tokenizer.apply_chat_template(CONVERSATION[:4], chat_template=template.jinja,
                                                          tokenize=False, add_generation_prompt=gen)
            assert template.render(CONVERSATION[:4], gen, tiny_tokenizer) == expected, name


def test_non_prefix_template_trains_each_turn_as_rendered_at_inference(tiny_tokenizer):
    # Marks the *last* message: a history renders differently once more turns follow it.
    jinja = ("{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['role'] + ': ' + m['content'] + "
             "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    template = ChatTemplate("lastmark", jinja, ["<|im_end|>"])
    full, spans = supervised_spans(CONVERSATION, template, tiny_tokenizer)
    assert [full[s:e] for s, e in spans] == []  # no turn keeps its inference-time history inside the whole
    samples = encode_chat_samples({"messages": CONVERSATION}, tiny_tokenizer, template, 512)
    assert [s["rule"] for s in samples] == ["per-turn/rebuilt", "per-turn/rebuilt"]
    for sample, turn in zip(samples, (2, 4), strict=True):
        prompt = template.render(CONVERSATION[:turn], add_generation_prompt=True, tokenizer=tiny_tokenizer)
        assert sample["text"].startswith(prompt)
        assert supervised_pieces(sample, tiny_tokenizer) == [CONVERSATION[turn]["content"] + "<|im_end|>"]


def test_stop_token_ids_and_save_load(tiny_tokenizer, tmp_path):
    template = get_template("chatml")
    ids = template.stop_token_ids(tiny_tokenizer)
    assert ids == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>"), tiny_tokenizer.eos_token_id]
    assert ChatTemplate.load(tmp_path) is None
    template.save(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == template.jinja
    assert ChatTemplate.load(tmp_path) == template
    (tmp_path / "template.json").unlink()
    bare = ChatTemplate.load(tmp_path)
    assert bare.jinja == template.jinja and bare.stop == ["<|im_end|>"]
