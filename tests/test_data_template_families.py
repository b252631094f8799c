"""Masks on the chat templates real model families ship (tests/fixtures/templates, with provenance).

For every family, with a local tokenizer carrying the family's special tokens: each assistant answer (with its
reasoning) and the token that ends it are supervised, nothing of system, user or tool turns; every turn is
trained exactly once; and the prompt ids in front of each trained answer are exactly the ids the generation path
builds for that history (train/serve parity).
"""

from __future__ import annotations

import json

import pytest

from tests.fixtures.templates.families import FAMILIES, family_tokenizer
from tuneforge.data.templates import ChatTemplate, resolve_template
from tuneforge.data.tokenize import IGNORE, encode_chat_samples
from tuneforge.errors import UserError

SYSTEM, Q1, Q2 = "Be brief.", "What is two plus two?", "And three plus three?"
R1, A1, R2, A2 = "Add them.", "Four.", "Add again.", "Six."


def conversation(reasoning: bool) -> list[dict]:
    def answer(r, a):
        return f"<think>\n{r}\n</think>\n\n{a}" if reasoning else a

    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": answer(R1, A1)}, {"role": "user", "content": Q2},
            {"role": "assistant", "content": answer(R2, A2)}]


CASES = [(name, kwargs) for name, entry in FAMILIES.items() for kwargs in entry.get("kwargs_variants", [{}])]


def supervised_runs(sample: dict, tokenizer) -> list[tuple[int, str]]:
    """(index of the first token, decoded text) of each run of consecutive supervised tokens."""
    runs, start = [], None
    labels = sample["labels"] + [IGNORE]
    for k, label in enumerate(labels):
        if label != IGNORE and start is None:
            start = k
        elif label == IGNORE and start is not None:
            assert sample["labels"][start:k] == sample["input_ids"][start:k]  # unshifted copies of the ids
            runs.append((start, tokenizer.decode(sample["input_ids"][start:k])))
            start = None
    return runs


def prompt_ids(template, tokenizer, messages, tools=None) -> list[int]:
    """The ids the generation path builds for a history (models/generation.py: render, then tokenize as-is)."""
    text = template.render(messages, add_generation_prompt=True, tokenizer=tokenizer, tools=tools)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}{'-' + json.dumps(k) if k else ''}" for n, k in CASES])
def test_family_masks_supervise_exactly_each_answer_and_its_end(name, kwargs):
    entry = FAMILIES[name]
    tok = family_tokenizer(name)
    template = resolve_template("auto", tok, kwargs)
    reasoning = bool(entry.get("reasoning"))
    messages = conversation(reasoning)
    samples = encode_chat_samples({"messages": messages, "source": "t.jsonl:1"}, tok, template, 4096)
    ends = template.end_markers(tok)
    trained = {}
    assert template.accepts_system(tok) != bool(entry.get("refuses_system"))
    answer_turns = [2, 4]
    for sample in samples:
        runs = supervised_runs(sample, tok)
        assert len(runs) == len(sample["turns"]), (sample["rule"], runs)
        for turn, (start, text) in zip(sample["turns"], runs, strict=True):
            assert turn not in trained, f"turn {turn} trained twice"
            trained[turn] = text
            # Parity: what precedes the answer is exactly what generation feeds the model for this history.
            assert sample["input_ids"][:start] == prompt_ids(template, tok, messages[:turn]), (name, turn)
    assert sorted(trained) == answer_turns
    for turn, (r, a) in zip(answer_turns, [(R1, A1), (R2, A2)], strict=True):
        text = trained[turn]
        # The answer, then (after at most a space) the token that ends it: nothing else is supervised after it.
        assert any(text.endswith(a + e) or text.endswith(f"{a} {e}") for e in ends), (name, text)
        if reasoning:
            assert r in text, (name, text)  # the trained turn's reasoning is kept and supervised
        for foreign in (SYSTEM, Q1, Q2, "user", "system"):
            assert foreign not in text, (name, foreign, text)


def test_qwen3_trains_the_earlier_turn_alone_with_its_reasoning_and_says_what_it_costs():
    tok = family_tokenizer("qwen3")
    template = resolve_template("auto", tok)
    samples = encode_chat_samples({"messages": conversation(True)}, tok, template, 4096)
    by_rule = {s["rule"]: s for s in samples}
    assert set(by_rule) == {"prefix", "per-turn/prefix"}
    # In the whole conversation Qwen3 strips the first answer's reasoning; trained alone, it keeps it.
    whole = by_rule["prefix"]
    assert R1 not in whole["text"] and [t for _, t in supervised_runs(whole, tok)] == [
        f"<think>\n{R2}\n</think>\n\n{A2}<|im_end|>"]
    alone = by_rule["per-turn/prefix"]
    assert [t for _, t in supervised_runs(alone, tok)] == [f"<think>\n{R1}\n</think>\n\n{A1}<|im_end|>"]
    first = supervised_runs(alone, tok)[0][0]
    assert alone["extra_tokens"] == first  # the re-encoded history is the whole extra cost


def test_deepseek_r1_answer_continues_the_think_block_the_prompt_opens():
    tok = family_tokenizer("deepseek_r1")
    template = resolve_template("auto", tok)
    samples = encode_chat_samples({"messages": conversation(True)}, tok, template, 4096)
    assert {s["rule"] for s in samples} == {"per-turn/rebuilt"}
    last = next(s for s in samples if s["turns"] == [4])
    assert last["text"].endswith(f"<｜Assistant｜><think>\n{R2}\n</think>\n\n{A2}<｜end▁of▁sentence｜>")
    assert [t for _, t in supervised_runs(last, tok)] == [f"{R2}\n</think>\n\n{A2}<｜end▁of▁sentence｜>"]


@pytest.mark.parametrize("name", ["glm4", "baichuan2"])
def test_template_without_end_marker_trains_eos_and_generation_stops_on_it(name):
    tok = family_tokenizer(name)
    template = resolve_template("auto", tok)
    assert template.turn_end == tok.eos_token
    assert tok.eos_token_id in template.stop_token_ids(tok)
    samples = encode_chat_samples({"messages": conversation(False)}, tok, template, 4096)
    assert all(s["stop_appended"] for s in samples)
    texts = sorted(t for s in samples for _, t in supervised_runs(s, tok))
    assert all(t.endswith(tok.eos_token) for t in texts) and len(texts) == 2
    restored = ChatTemplate.from_dict(json.loads(json.dumps(template.to_dict())))
    assert restored.turn_end == tok.eos_token  # persisted with the run's template


def test_template_that_refuses_system_folds_drops_or_errors_naming_the_record(tmp_path):
    tok = family_tokenizer("gemma2")
    record = {"messages": conversation(False), "source": "data/chat.jsonl:7"}
    fold = resolve_template("auto", tok)
    assert not fold.accepts_system(tok) and fold.system_message == "fold"
    folded = encode_chat_samples(record, tok, fold, 4096)[0]["text"]
    assert f"<start_of_turn>user\n{SYSTEM}\n\n{Q1}<end_of_turn>" in folded
    # The policy travels with the template: a served run folds a request's system prompt the same way.
    fold.save(tmp_path)
    served = ChatTemplate.load(tmp_path).render(conversation(False)[:2], add_generation_prompt=True, tokenizer=tok)
    assert folded.startswith(served)
    dropped = encode_chat_samples(record, tok, resolve_template("auto", tok, system_message="drop"), 4096)[0]["text"]
    assert SYSTEM not in dropped and f"<start_of_turn>user\n{Q1}<end_of_turn>" in dropped
    with pytest.raises(UserError, match=r"data/chat.jsonl:7: .*does not accept a system message.*system_message"):
        encode_chat_samples(record, tok, resolve_template("auto", tok, system_message="error"), 4096)
    with pytest.raises(UserError, match="data.system_message 'merge' is not known"):
        resolve_template("auto", tok, system_message="merge")


def test_template_exception_is_a_user_error_naming_the_record():
    tok = family_tokenizer("mistral_v0_1")
    template = resolve_template("auto", tok)
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                           {"role": "assistant", "content": "c"}], "source": "data/chat.jsonl:3"}
    with pytest.raises(UserError, match=r"^data/chat.jsonl:3: chat template 'tokenizer' failed .*alternate"):
        encode_chat_samples(record, tok, template, 4096)


def test_chat_template_kwargs_reach_every_rendering_and_persist(tmp_path):
    tok = family_tokenizer("qwen3")
    template = resolve_template("auto", tok, {"enable_thinking": False})
    history = [{"role": "user", "content": Q1}]
    prompt = template.render(history, add_generation_prompt=True, tokenizer=tok)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    template.save(tmp_path)
    loaded = ChatTemplate.load(tmp_path)
    assert loaded.kwargs == {"enable_thinking": False}
    # The generation path calls render(messages, add_generation_prompt=True, tokenizer=...) and knows no kwargs.
    assert loaded.render(history, add_generation_prompt=True, tokenizer=tok) == prompt
    plain = resolve_template("auto", tok).render(history, add_generation_prompt=True, tokenizer=tok)
    assert plain.endswith("<|im_start|>assistant\n")
    # Training without reasoning data under enable_thinking=False: the answer follows the empty think block.
    record = {"messages": [*history, {"role": "assistant", "content": A1}]}
    (sample,) = encode_chat_samples(record, tok, template, 4096)
    assert sample["rule"] == "prefix" and sample["text"].startswith(prompt)
    assert [t for _, t in supervised_runs(sample, tok)] == [f"{A1}<|im_end|>"]


@pytest.mark.parametrize("name", ["qwen3_training", "smollm3", "lfm2_5"])
def test_generation_markers_are_used_where_the_template_has_them(name):
    tok = family_tokenizer(name)
    template = resolve_template("auto", tok)
    assert template.has_generation_markers
    samples = encode_chat_samples({"messages": conversation(True)}, tok, template, 4096)
    assert all(s["rule"].removeprefix("per-turn/") == "markers" for s in samples)
    # The marked block may include the turn header; only what generation produces after the prompt is trained.
    for sample in samples:
        for _, text in supervised_runs(sample, tok):
            assert not text.startswith("<|im_start|>") and text.endswith("<|im_end|>")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def tool_conversation(string_arguments: bool) -> list[dict]:
    arguments = json.dumps({"city": "Paris"}) if string_arguments else {"city": "Paris"}
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "sunny, 18 degrees"},
            {"role": "assistant", "content": "It is sunny."}]


@pytest.mark.parametrize("name", [n for n, e in FAMILIES.items() if e.get("tools") and n != "lfm2"])
def test_tool_calls_supervised_tool_results_and_schemas_not(name):
    entry = FAMILIES[name]
    tok = family_tokenizer(name)
    template = resolve_template("auto", tok)
    messages = tool_conversation(bool(entry.get("string_arguments")))
    samples = encode_chat_samples({"messages": messages, "tools": TOOLS}, tok, template, 4096)
    texts = {turn: text for s in samples for turn, (_, text) in zip(s["turns"], supervised_runs(s, tok), strict=True)}
    assert sorted(texts) == [1, 3], name
    assert "get_weather" in texts[1] and "Paris" in texts[1], (name, texts[1])
    assert "It is sunny." in texts[3]
    rendered = "".join(s["text"] for s in samples)
    if "tools" in template.jinja.replace("tool_calls", ""):  # DeepSeek's templates take no tool list
        assert "Weather of a city" in rendered  # the record's tools reached the template
    for text in texts.values():
        assert "sunny, 18 degrees" not in text and "Weather of a city" not in text and "Weather in Paris" not in text
    for sample in samples:  # parity holds with tools too
        for turn, (start, _) in zip(sample["turns"], supervised_runs(sample, tok), strict=True):
            assert sample["input_ids"][:start] == prompt_ids(template, tok, messages[:turn], TOOLS)


def test_template_that_ignores_tool_calls_refuses_them_instead_of_losing_them():
    # LFM2's original template never reads tool_calls (TRL notes it): training on it would silently drop calls.
    tok = family_tokenizer("lfm2")
    template = resolve_template("auto", tok)
    record = {"messages": tool_conversation(False), "tools": TOOLS, "source": "tools.jsonl:2"}
    with pytest.raises(UserError, match=r"^tools.jsonl:2: .*does not render tool_calls"):
        encode_chat_samples(record, tok, template, 4096)


# --------------------------------------------------------------------------- through `tuneforge train` and back


def _chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"<think>\nAdd {i} and {i}.\n</think>\n\n{2 * i}."},
                          {"role": "user", "content": "And twice that?"},
                          {"role": "assistant", "content": f"{4 * i}."}]} for i in range(n)]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_builds_training_data_with_its_own_template(name, tmp_path):
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.build import build_datasets

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(6)), encoding="utf-8")
    tok = family_tokenizer(name)
    template = resolve_template("auto", tok)
    bundle = build_datasets(DataConfig(train=[str(data)], max_length=1024), "sft", tok, template, seed=0)
    stats = bundle.stats
    assert stats["dropped_no_supervised"] == 0 and stats["truncated"] == 0
    assert sum(stats["mask_rules"].values()) == 12  # two answers per conversation, each trained once
    assert stats["extra_tokens"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs"), [("qwen3", {"enable_thinking": False}), ("deepseek_r1", {}),
                                              ("glm4", {}), ("gemma2", {}), ("smollm3", {})])
def test_family_trains_through_run_training_and_generation_matches_and_stops(name, kwargs, tmp_path):
    import torch

    from tuneforge.config import validate_config
    from tuneforge.models.generation import GenerationSettings, complete, render_prompt
    from tuneforge.models.reference import load_for_inference
    from tuneforge.train.run import run_training

    tok_dir = tmp_path / "tokenizer"
    tok = family_tokenizer(name)
    tok.save_pretrained(tok_dir)
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8)), encoding="utf-8")
    raw = {"run_name": name, "output_dir": str(tmp_path / "run"), "seed": 1, "stage": "sft",
           "model": {"from_config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 600,
                                     "tokenizer": str(tok_dir)}, "chat_template_kwargs": kwargs},
           "method": {"name": "lora", "r": 2, "alpha": 4},
           "data": {"train": [str(data)], "max_length": 512},
           "train": {"max_steps": 1, "batch_size": 4, "save_steps": None, "eval_steps": None, "report_to": ["none"]}}
    result = run_training(validate_config(raw), echo=lambda *_: None)
    assert sum(result.summary["data"]["mask_rules"].values()) == 16

    loaded = load_for_inference(str(tmp_path / "run"), device="cpu")
    template, tokenizer = loaded.template, loaded.tokenizer
    assert template.kwargs == kwargs and template.turn_end == resolve_template("auto", tok, kwargs).turn_end
    # Parity on the saved run: the ids generation builds for each history are the ids training used for it.
    record = {"messages": _chat_rows(1)[0]["messages"]}
    samples = encode_chat_samples(record, tokenizer, resolve_template("auto", tok, kwargs), 512)
    for sample in samples:
        for turn, (start, _) in zip(sample["turns"], supervised_runs(sample, tokenizer), strict=True):
            text, add_special = render_prompt(tokenizer, template, record["messages"][:turn])
            assert tokenizer(text, add_special_tokens=add_special)["input_ids"] == sample["input_ids"][:start]
    # Generation stops on the token that ends a trained answer (forced here: the tiny model never learned it).
    end = template.turn_end or template.end_markers(tokenizer)[0]
    end_id = tokenizer.convert_tokens_to_ids(end)
    handle = loaded.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: out.index_fill(-1, torch.tensor([end_id]), 1e4))
    try:
        (done,) = complete(loaded.model, tokenizer, template, [record["messages"][:2]],
                           GenerationSettings(max_new_tokens=5))
    finally:
        handle.remove()
    assert done.text == "" and done.token_ids == () and done.finish_reason == "stop"

