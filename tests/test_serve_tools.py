"""Tool calling through the API: ``tools`` reach the model through the run's own chat template (Qwen2.5's, from
tests/fixtures), the answer's ``<tool_call>`` blocks come back as OpenAI ``tool_calls`` (streamed and not), a
template that cannot present tools is refused. The model's answer is fixed by replacing the decoder (a tiny random
model never writes a tool call)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import save_base

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_parse_tool_calls_formats():
    from tuneforge.serve.tools import parse_tool_calls

    content, calls = parse_tool_calls(f"Let me check.\n{CALL}", {"get_weather"})
    assert content == "Let me check." and len(calls) == 1
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', {"get_weather"})
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert parse_tool_calls(CALL, {"other"}) == (CALL, [])  # not an offered tool: plain text
    broken = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(broken, {"get_weather"}) == (broken, [])
    assert parse_tool_calls("It is sunny.", {"get_weather"}) == ("It is sunny.", [])


@pytest.mark.parametrize("text", ['{"name": ["get_weather"], "arguments": {}}', '{"name": {"a": 1}}',
                                  '<tool_call>{"name": ["get_weather"]}</tool_call>', '{"name": null}',
                                  '<tool_call>{"name": 3, "arguments": {}}</tool_call>', '[1, 2]'])
def test_malformed_tool_call_json_is_returned_as_text(text):
    """A model writing a call whose name is not a string used to raise TypeError (a 500): it is plain text."""
    from tuneforge.serve.tools import parse_tool_calls

    assert parse_tool_calls(text, {"get_weather"}) == (text, [])


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    import torch

    from tests.helpers import tiny_from_config as _from_config
    from tuneforge.data.templates import ChatTemplate, get_template
    from tuneforge.models import build_model
    from tuneforge.serve.app import create_app
    from tuneforge.serve.background import serve_in_thread
    from tuneforge.serve.engine import Engine

    root = tmp_path_factory.mktemp("tools")
    torch.manual_seed(0)
    # the Qwen2.5 template's tool preamble alone is ~350 tokens of this tokenizer: a longer context than usual
    model = build_model(_from_config("llama").model_copy(update={"max_position_embeddings": 1024}), tiny_tokenizer)
    qwen = save_base(model, tiny_tokenizer, root / "qwen")
    jinja = (Path(__file__).parent / "fixtures" / "templates" / "qwen2_5.jinja").read_text()
    ChatTemplate("qwen2_5", jinja, ["<|im_end|>"]).save(qwen)
    plain = save_base(model, tiny_tokenizer, root / "plain")
    get_template("chatml").save(plain)
    # the dynamic batcher runs models.decoding.decode_rows, which the `answer` fixture replaces by a scripted answer
    engine = Engine([str(qwen), str(plain)], device="cpu", batching="dynamic")
    with serve_in_thread(create_app(engine, max_tokens_limit=32)) as url:
        yield url
    engine.scheduler.close()


@pytest.fixture()
def answer(monkeypatch):
    """Make the decoder answer ``answer.text``; ``answer.prompts`` collects the decoded prompts it was given."""
    import tuneforge.models.decoding as decoding

    class Answer:
        text = CALL
        prompts: list[str] = []

    def fake(model, tokenizer, template, rows):
        results = []
        for row in rows:
            Answer.prompts.append(tokenizer.decode(list(row.prompt_ids)))
            if row.on_event is not None:
                row.on_event(decoding.TokenEvent(decoding.TokenLogprob(1, None), Answer.text))
            results.append(decoding.RowResult(Answer.text, (1, 2, 3), "stop"))
        return results

    monkeypatch.setattr(decoding, "decode_rows", fake)
    Answer.prompts = []
    return Answer


def test_tools_are_rendered_and_tool_calls_returned(server, answer):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat.completions.create(model="qwen", messages=messages, tools=[WEATHER], max_tokens=16)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "get_weather" in answer.prompts[-1] and "<tools>" in answer.prompts[-1]  # the template showed them

    # the conversation continues with the call and its result, rendered by the same template
    follow = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer.text = "It is sunny."
    reply = client.chat.completions.create(model="qwen", messages=follow, tools=[WEATHER], max_tokens=16)
    assert reply.choices[0].message.content == "It is sunny." and reply.choices[0].finish_reason == "stop"
    assert "sunny, 21 C" in answer.prompts[-1]


def test_streamed_tool_calls(server, answer):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Paris?"}],
                                                 tools=[WEATHER], max_tokens=16, stream=True))
    calls = [call for c in chunks for call in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_templates_without_tools(server, answer):
    import httpx

    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "max_tokens": 4}
    refused = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert refused.status_code == 400 and "does not present tools" in refused.json()["error"]["message"]
    answer.text = CALL
    ok = httpx.post(server + "/v1/chat/completions", json={**body, "tool_choice": "none"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == CALL
    assert "get_weather" not in answer.prompts[-1]
