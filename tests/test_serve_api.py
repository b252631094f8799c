"""The HTTP API against a real uvicorn server on localhost, driven by the official openai client (and httpx for
malformed requests): models, chat/completions (streamed and not), the guide's /chat, adapters sharing one base,
API key, limits, validation errors, and concurrent requests that must not mix."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_merge_lora import make_run, save_base

KEY = "secret-key"
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    import torch

    from tests.conftest import _from_config
    from tuneforge.models import build_model

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    base = save_base(build_model(_from_config("llama"), tiny_tokenizer), tiny_tokenizer, root / "base")
    # scaled-up adapters so that the two runs answer differently
    a = make_run(root / "a", base, seed=1, scale=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    b = make_run(root / "b", base, seed=2, scale=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def server(runs):
    import uvicorn

    from tuneforge.serve.app import create_app
    from tuneforge.serve.engine import Engine

    engine = Engine([str(runs["a"]), str(runs["b"])], device="cpu")
    app = create_app(engine, api_key=KEY, max_tokens_limit=64, max_prompt_tokens=60)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine}
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(runs):
    """What each run answers in process (load_for_inference + generate), the ground truth for the server."""
    from tuneforge.models.generation import GenerationSettings, generate
    from tuneforge.models.reference import load_for_inference

    cache = {}

    def answer(name: str, messages: list[dict], max_tokens: int = 12) -> str:
        if name not in cache:
            cache[name] = load_for_inference(str(runs[name]), device="cpu")
        loaded = cache[name]
        return generate(loaded.model, loaded.tokenizer, loaded.template, [messages],
                        GenerationSettings(max_new_tokens=max_tokens))[0]

    return answer


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_are_listed_and_adapters_share_one_base(client, server):
    assert [m.id for m in client.models.list().data] == ["a", "b"]
    engine = server["engine"]
    assert engine.get("a").model is engine.get("b").model  # one base in memory, two adapters on it
    assert engine.get("a").adapter_name != engine.get("b").adapter_name


def test_chat_completion_matches_in_process_generation_per_adapter(client, expected):
    answers = {}
    for name in ("a", "b"):
        reply = client.chat.completions.create(model=name, messages=ask("What is a list?"), **GREEDY)
        answers[name] = reply.choices[0].message.content
        assert answers[name] == expected(name, ask("What is a list?"))
        assert reply.model == name and reply.object == "chat.completion"
        assert reply.usage.prompt_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
    assert answers["a"] != answers["b"]  # the request's model field chose the adapter


def test_streaming_chat_equals_non_streaming(client):
    messages = [{"role": "system", "content": "Be brief."}, *ask("Explain the with statement.")]
    whole = client.chat.completions.create(model="b", messages=messages, **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(model="b", messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert sum(1 for c in chunks if c.choices[0].delta.content) >= 2  # really streamed, piece by piece


def test_sse_wire_format_ends_with_done(server):
    import httpx

    body = {"model": "a", "messages": ask("hi"), "stream": True, **GREEDY}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_stream_and_not(client):
    whole = client.completions.create(model="a", prompt="The for statement", **GREEDY)
    assert whole.object == "text_completion" and whole.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a", prompt="The for statement", stream=True, **GREEDY))
    assert streamed == whole.choices[0].text


def test_guide_chat_endpoint_with_history(server, expected):
    import httpx

    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    response = httpx.post(server["url"] + "/chat", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": "a", "message": "What is a dict?", "history": history,
                                "temperature": 0, "max_length": 12})
    assert response.status_code == 200
    assert response.json() == {"response": expected("a", [*history, *ask("What is a dict?")]), "model": "a"}


def test_concurrent_requests_each_get_their_own_answer(client, expected):
    jobs = [("a", "What is a tuple?", False), ("b", "What is a set?", True), ("a", "Define a class.", True),
            ("b", "What does import do?", False), ("a", "What is a set?", False), ("b", "What is a tuple?", True)]
    want = [expected(model, ask(text)) for model, text, _ in jobs]

    def call(job):
        model, text, stream = job
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=ask(text), stream=True, **GREEDY))
        return client.chat.completions.create(model=model, messages=ask(text), **GREEDY).choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    assert got == want
    assert len(set(want)) > 1  # the prompts/models really lead to different answers


def test_api_key_is_required(server):
    import httpx
    import openai

    wrong = openai.OpenAI(base_url=server["url"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    response = httpx.get(server["url"] + "/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server["url"] + "/health").status_code == 200


def test_unknown_model_is_404_listing_the_served_ones(client):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=ask("hi"), **GREEDY)
    assert "available: a, b" in info.value.body["message"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "not valid JSON"),
    ({"model": "a"}, 400, "messages: required"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "a", "messages": [{"role": "user"}], "temperature": 7}, 400, "temperature"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, 400, "limit of 64"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
    ({"model": "a", "messages": [{"role": "user", "content": "word " * 80}]}, 400, "limit of 60"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "'model' is required"),
    ({"model": "zzz", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
])
def test_bad_requests_get_4xx_with_an_openai_error_body(server, body, status, needle):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]


def test_json_body_is_read_whatever_the_content_type(server):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded; the JSON body must still be understood."""
    import json

    import httpx

    body = json.dumps({"model": "a", "message": "hi", "temperature": 0, "max_length": 4})
    response = httpx.post(server["url"] + "/chat", content=body, timeout=60, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["model"] == "a"


def test_bad_simple_chat_and_completion_requests(server):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server["url"] + "/chat", headers=headers, json={"model": "a", "message": ""})
    assert r.status_code == 400 and "message" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/chat", headers=headers, json=["not", "an", "object"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/completions", headers=headers, json={"model": "a", "prompt": ["x", "y"]})
    assert r.status_code == 400 and "one string" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/nothing", headers=headers, json={})
    assert r.status_code == 404 and "error" in r.json()
