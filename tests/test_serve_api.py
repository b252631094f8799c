"""The HTTP API against a real uvicorn server on 127.0.0.1, driven by the official openai client (and httpx for
malformed requests): models, chat/completions (streamed and not), the guide's /chat, adapters sharing one base,
API key, limits, validation errors, token-id prompts, log-probs, n, usage, and requests that must not mix."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import make_run, save_base

KEY = "secret-key"
GREEDY = {"temperature": 0, "max_tokens": 12}
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    import torch

    from tests.helpers import tiny_from_config as _from_config
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
    from tuneforge.serve.app import create_app
    from tuneforge.serve.background import serve_in_thread
    from tuneforge.serve.engine import Engine

    engine = Engine([str(runs["a"]), str(runs["b"])], device="cpu")
    app = create_app(engine, api_key=KEY, max_tokens_limit=64, max_prompt_tokens=60, max_body_bytes=20_000,
                     max_scored_tokens=400)
    with serve_in_thread(app) as url:
        yield {"url": url, "engine": engine}
    engine.scheduler.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def loaded(runs):
    from tuneforge.models.reference import load_for_inference

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_for_inference(str(runs[name]), device="cpu")
        return cache[name]

    return get


@pytest.fixture(scope="module")
def expected(loaded):
    """What each run answers in process (load_for_inference + complete), the ground truth for the server."""
    from tuneforge.models.generation import GenerationSettings, complete

    def answer(name: str, prompt, max_tokens: int = 12):
        model = loaded(name)
        return complete(model.model, model.tokenizer, model.template, [prompt],
                        GenerationSettings(max_new_tokens=max_tokens))[0]

    return answer


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(server, path, body, **kwargs):
    import httpx

    return httpx.post(server["url"] + path, json=body, headers={**AUTH, **kwargs.pop("headers", {})}, timeout=60,
                      **kwargs)


def sse_events(response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_are_listed_and_adapters_share_one_base(client, server):
    assert [m.id for m in client.models.list().data] == ["a", "b"]
    engine = server["engine"]
    assert engine.get("a").model is engine.get("b").model  # one base in memory, two adapters on it
    assert engine.get("a").adapter_name != engine.get("b").adapter_name


def test_chat_completion_matches_in_process_generation_per_adapter(client, expected):
    answers = {}
    for name in ("a", "b"):
        reply = client.chat.completions.create(model=name, messages=ask("What is a list?"), **GREEDY)
        want = expected(name, ask("What is a list?"))
        answers[name] = reply.choices[0].message.content
        assert answers[name] == want.text
        assert reply.model == name and reply.object == "chat.completion"
        assert reply.choices[0].finish_reason == want.finish_reason
        # usage counts the tokens generated (not a re-tokenisation of the text), never above max_tokens
        assert reply.usage.completion_tokens == len(want.token_ids) <= GREEDY["max_tokens"]
    assert answers["a"] != answers["b"]  # the request's model field chose the adapter


def test_streaming_chat_equals_non_streaming_with_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, *ask("Explain the with statement.")]
    whole = client.chat.completions.create(model="b", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model="b", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == whole.choices[0].message.content
    assert content[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert sum(1 for c in content if c.choices[0].delta.content) >= 2  # really streamed, piece by piece
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_wire_format_ends_with_done(server):
    import httpx

    body = {"model": "a", "messages": ask("hi"), "stream": True, **GREEDY}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=AUTH,
                      timeout=60) as response:
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


def test_token_id_prompts_batches_and_n(server, loaded, expected):
    tok = loaded("a").tokenizer
    texts = ["The for statement", "A dict is"]
    ids = [tok(t)["input_ids"] for t in texts]
    single = post(server, "/v1/completions", {"model": "a", "prompt": ids[0], **GREEDY}).json()
    assert single["choices"][0]["text"] == expected("a", texts[0]).text
    batch = post(server, "/v1/completions", {"model": "a", "prompt": ids, "n": 2, **GREEDY}).json()
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in batch["choices"]] == [expected("a", t).text for t in texts for _ in range(2)]
    assert batch["usage"]["prompt_tokens"] == sum(map(len, ids))
    assert batch["usage"]["completion_tokens"] == 2 * sum(len(expected("a", t).token_ids) for t in texts)
    bad = post(server, "/v1/completions", {"model": "a", "prompt": [10**6]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_seeded_sampling_reproducible_and_n_samples_differ(server):
    body = {"model": "a", "prompt": "Lists are", "max_tokens": 10, "temperature": 1.5, "seed": 11, "n": 3}
    first = [c["text"] for c in post(server, "/v1/completions", body).json()["choices"]]
    again = [c["text"] for c in post(server, "/v1/completions", body).json()["choices"]]
    assert first == again
    assert len(set(first)) > 1


def test_echo_logprobs_are_the_prompt_scores(server, loaded):
    """What lm-evaluation-harness sends for loglikelihood: token ids, echo, logprobs=1, max_tokens=1."""
    import torch

    run = loaded("a")
    ids = run.tokenizer("The with statement is used")["input_ids"]
    body = {"model": "a", "prompt": [ids], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0,
            "seed": 1234}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        logits = run.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for position in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][position], float(logits[position - 1, ids[position]]), abs_tol=1e-4)
        (alternative_lp,) = lp["top_logprobs"][position].values()
        assert math.isclose(alternative_lp, float(logits[position - 1].max()), abs_tol=1e-4)
    assert choice["text"].startswith(run.tokenizer.decode(ids, skip_special_tokens=False))
    zero = post(server, "/v1/completions", {**body, "max_tokens": 0}).json()["choices"][0]
    assert zero["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model="a", messages=ask("What is a list?"), logprobs=True,
                                           top_logprobs=2, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-6) for t in content)  # greedy


def test_guide_chat_endpoint_with_history(server, expected):
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    response = post(server, "/chat", {"model": "a", "message": "What is a dict?", "history": history,
                                      "temperature": 0, "max_length": 12})
    assert response.status_code == 200
    assert response.json() == {"response": expected("a", [*history, *ask("What is a dict?")]).text, "model": "a"}


def test_concurrent_requests_each_get_their_own_answer(client, expected):
    jobs = [("a", "What is a tuple?", False), ("b", "What is a set?", True), ("a", "Define a class.", True),
            ("b", "What does import do?", False), ("a", "What is a set?", False), ("b", "What is a tuple?", True)]
    want = [expected(model, ask(text)).text for model, text, _ in jobs]

    def call(job):
        model, text, stream = job
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=model, messages=ask(text), stream=True, **GREEDY) if c.choices)
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


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ("{not json", 400, "JSON"),
    ("[1, 2]", 400, "JSON object"),
    ({"model": "a"}, 400, "messages: required"),
    ({"model": "a", "messages": []}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "a", "messages": HI, "temperature": 7}, 400, "temperature"),
    ({"model": "a", "messages": HI, "temperature": None}, 400, "temperature"),
    ({"model": "a", "messages": HI, "temperature": False}, 400, "temperature"),
    ({"model": "a", "messages": HI, "max_tokens": 65}, 400, "limit of 64"),
    ({"model": "a", "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "messages": HI, "n": 17}, 400, "n"),
    ({"model": "a", "messages": HI, "seed": 2**64}, 400, "seed"),
    ({"model": "a", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "a", "messages": HI, "stop": "x" * 129}, 400, "stop"),
    ({"model": "a", "messages": HI * 257}, 400, "messages"),
    ({"model": "a", "messages": [{"role": "user", "content": "word " * 80}]}, 400, "limit of 60"),
    ({"model": "a", "messages": HI, "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"model": "a", "messages": HI, "presence_penalty": -3}, 400, "presence_penalty"),
    ({"model": "a", "messages": HI, "repetition_penalty": 1e-30}, 400, "repetition_penalty"),
    ({"model": "a", "messages": HI, "repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"model": "a", "messages": HI, "repetition_penalty": 11}, 400, "repetition_penalty"),
    ({"model": "a", "messages": HI, "top_k": -1}, 400, "top_k"),
    ({"model": "a", "messages": HI, "top_p": 0}, 400, "top_p"),
    ({"model": "a", "messages": HI, "temperature": 2.5}, 400, "temperature"),
    ({"model": "a", "messages": HI, "logit_bias": {"1": 5}, "suffix": "x"}, 400, "logit_bias, suffix"),
    ({"messages": HI}, 400, "'model' is required"),
    ({"model": "zzz", "messages": HI}, 404, "does not exist"),
])
def test_bad_requests_get_4xx_with_an_openai_error_body(server, body, status, needle):
    import httpx

    headers = {**AUTH, "Content-Type": "application/json"}
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    response = httpx.post(server["url"] + "/v1/chat/completions", headers=headers, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["type"]


def test_a_request_larger_than_the_queue_is_413_not_429(server):
    """80 rows (5 prompts x n 16) can never fit a queue of 64: waiting would not help, so no 429."""
    response = post(server, "/v1/completions", {"model": "a", "prompt": ["a", "b", "c", "d", "e"], "n": 16,
                                                "max_tokens": 2})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert "--max-queue" in error["message"] and "80 rows" in error["message"] and "Retry-After" not in response.headers


def test_scoring_more_tokens_than_the_cap_is_413_naming_it(server):
    prompts = [[5] * 50] * 9  # 450 scored tokens > 400
    body = {"model": "a", "prompt": prompts, "echo": True, "logprobs": 20, "max_tokens": 0}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 413 and "--max-scored-tokens" in response.json()["error"]["message"]
    assert post(server, "/v1/completions", {**body, "prompt": prompts[:8]}).status_code == 200
    assert post(server, "/v1/completions", {**body, "echo": False, "max_tokens": 1}
                ).status_code == 200  # generation alone scores nothing


def test_extreme_sampling_values_in_range_answer_200(server):
    body = {"model": "a", "prompt": "The for statement", "max_tokens": 6, "temperature": 1e-4, "seed": 3,
            "repetition_penalty": 0.1, "presence_penalty": 2, "frequency_penalty": -2, "top_k": 1_000_000}
    assert post(server, "/v1/completions", body).status_code == 200
    assert post(server, "/v1/completions", {**body, "temperature": 2, "repetition_penalty": 10}).status_code == 200


def test_tiny_positive_temperature_is_greedy_not_a_500(server, expected):
    for temperature in (5e-324, 1e-45):
        body = {"model": "a", "messages": ask("What is a list?"), "temperature": temperature, "max_tokens": 12}
        response = post(server, "/v1/chat/completions", body)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == expected("a", ask("What is a list?")).text
        import httpx

        with httpx.stream("POST", server["url"] + "/v1/chat/completions", json={**body, "stream": True},
                          headers=AUTH, timeout=60) as streamed:
            events = sse_events(streamed)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]


def test_only_json_post_bodies_are_accepted(server):
    """A cross-site form or text/plain POST (no CORS preflight) never reaches the model."""
    import httpx

    body = json.dumps({"model": "a", "message": "hi", "temperature": 0, "max_length": 4})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        response = httpx.post(server["url"] + "/chat", content=body, timeout=60, headers=headers)
        assert response.status_code == 415 and "application/json" in response.json()["error"]["message"]
    ok = httpx.post(server["url"] + "/chat", content=body, timeout=60,
                    headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_oversized_body_is_413(server):
    import httpx

    big = {"model": "a", "messages": [{"role": "user", "content": "x" * 30_000}]}
    response = post(server, "/v1/chat/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while the body streams in
        data = json.dumps(big).encode()
        for start in range(0, len(data), 4096):
            yield data[start:start + 4096]

    response = httpx.post(server["url"] + "/v1/chat/completions", content=chunks(), timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413


def test_bad_simple_chat_and_completion_requests(server):
    r = post(server, "/chat", {"model": "a", "message": ""})
    assert r.status_code == 400 and "message" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and "echo" in r.json()["error"]["message"]
    r = post(server, "/v1/completions", {"model": "a", "prompt": [[]]})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = post(server, "/v1/nothing", {})
    assert r.status_code == 404 and "error" in r.json()


def test_error_mid_stream_is_an_sse_error_event_then_done(server):
    import httpx

    served = server["engine"].get("a")
    calls = []

    def fail_after_three(module, args):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("simulated failure")

    hook = served.model.get_base_model().register_forward_pre_hook(fail_after_three)
    try:
        body = {"model": "a", "prompt": "The for statement", "max_tokens": 20, "temperature": 0, "stop": [],
                "stream": True}
        with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=AUTH,
                          timeout=60) as response:
            events = sse_events(response)
        calls.clear()
        whole = post(server, "/v1/completions", {**body, "stream": False})
    finally:
        hook.remove()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "simulated" not in error["message"]
    assert any("choices" in json.loads(e) for e in events[:-2])  # it failed mid-stream, after some tokens
    assert whole.status_code == 500 and whole.headers["content-type"] == "application/json"
    assert whole.json()["error"]["type"] == "server_error"
    assert post(server, "/v1/completions", {**body, "stream": False}).status_code == 200  # the server recovered


def test_openapi_declares_typed_bodies_every_status_and_event_stream(server):
    import httpx

    schema = httpx.get(server["url"] + "/openapi.json", headers=AUTH).json()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                        ("/chat", "SimpleChatRequest")):
        operation = schema["paths"][path]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"200", "400", "401", "403", "404", "413", "415", "429", "500"} <= set(operation["responses"])
        assert "422" not in operation["responses"]
    assert "text/event-stream" in schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    properties = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "echo", "logprobs", "n", "stream_options", "seed"} <= set(properties)
