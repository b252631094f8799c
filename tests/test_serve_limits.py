"""Behaviour under ordinary client misbehaviour and load, against a real server on 127.0.0.1 whose model is slowed
down (a forward hook sleeps): disconnects free the engine, a full queue answers 429 with Retry-After while /health
answers at once, loopback-only Host/Origin checks, colliding served names, the API key from a file or the
environment."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers_serve import running_server, tiny_base

STEP_SECONDS = 0.05


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return tiny_base(tmp_path_factory.mktemp("limits") / "m", tiny_tokenizer)


@pytest.fixture(scope="module")
def slow(model_dir):
    """A server (no key, loopback-only checks on) whose every forward pass takes STEP_SECONDS; ``calls`` counts
    forward passes."""
    from tuneforge.serve.engine import Engine

    engine = Engine([f"m={model_dir}"], device="cpu", max_batch_size=1, max_queue=2)
    calls = []

    def slow_forward(module, args):
        calls.append(time.monotonic())
        time.sleep(STEP_SECONDS)

    hook = engine.get("m").model.register_forward_pre_hook(slow_forward)
    try:
        with running_server([], engine=engine, max_tokens_limit=200, local_only=True) as (url, _):
            yield {"url": url, "engine": engine, "calls": calls}
    finally:
        hook.remove()
        engine.scheduler.close()


def wait_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while engine.scheduler.running or engine.scheduler.waiting():
        assert time.monotonic() < deadline, "the engine stayed busy"
        time.sleep(0.01)


LONG = {"model": "m", "prompt": "The for statement", "max_tokens": 150, "temperature": 0, "stop": []}


def test_stream_disconnect_stops_generation_within_a_few_tokens(slow):
    import httpx

    wait_idle(slow["engine"])
    with httpx.stream("POST", slow["url"] + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as response:
        assert response.status_code == 200
        for received, _ in enumerate(response.iter_lines()):
            if received >= 3:
                break
    closed = time.monotonic()
    wait_idle(slow["engine"])
    after = sum(1 for t in slow["calls"] if t > closed)
    assert after <= 5, f"{after} forward passes after the client closed the stream"


def test_non_stream_disconnect_stops_generation(slow):
    import httpx

    wait_idle(slow["engine"])
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow["url"] + "/v1/completions", json=LONG, timeout=httpx.Timeout(30, read=0.5))
    closed = time.monotonic()
    wait_idle(slow["engine"])
    assert time.monotonic() - closed < 2  # 150 tokens would take 7.5 s
    assert sum(1 for t in slow["calls"] if t > closed) <= 5
    assert sum(1 for t in slow["calls"] if t > started) < 30


def test_full_queue_answers_429_with_retry_after_while_health_answers_at_once(slow):
    import httpx

    wait_idle(slow["engine"])
    body = {**LONG, "max_tokens": 40}  # ≥ 2 s each (40 × STEP_SECONDS): three of them keep the engine busy ≥ 6 s

    def call(_):
        return httpx.post(slow["url"] + "/v1/completions", json=body, timeout=60)

    health_times = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        time.sleep(0.3)  # the first request is generating, the queue is full
        for _ in range(5):
            started = time.monotonic()
            health = httpx.get(slow["url"] + "/health", timeout=5)
            models = httpx.get(slow["url"] + "/v1/models", timeout=5)
            health_times.append(time.monotonic() - started)
            assert health.status_code == 200 and models.status_code == 200
        responses = [f.result() for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    # waiting behind the model would take seconds; the bounds leave room for a machine shared by other processes
    assert max(health_times) < 1.0 and sorted(health_times)[2] < 0.5, health_times


def test_loopback_bind_without_key_refuses_foreign_host_and_origin(slow):
    import httpx

    url = slow["url"]
    assert httpx.get(url + "/v1/models", headers={"Host": "evil.example:80"}).status_code == 403
    refused = httpx.get(url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin"
    assert httpx.get(url + "/v1/models", headers={"Origin": "http://localhost:3000"}).status_code == 200
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/health").status_code == 200


def test_colliding_served_names_are_refused_at_start(model_dir):
    from tuneforge.errors import UserError
    from tuneforge.serve.engine import Engine, served_names

    with pytest.raises(UserError, match="'x-1' and 'x_1' collide"):
        Engine([f"x-1={model_dir}", f"x_1={model_dir}"], device="cpu")
    with pytest.raises(UserError, match="given twice"):
        served_names([f"x={model_dir}", f"x={model_dir}"])
    assert [n for n, _ in served_names([str(model_dir), str(model_dir)])] == ["m", "m-2"]


def test_api_key_from_file_or_environment(tmp_path, monkeypatch):
    import argparse

    from tuneforge.errors import UserError
    from tuneforge.serve.cli import is_loopback, read_api_key

    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("TUNEFORGE_API_KEY", "from-env")
    assert read_api_key(argparse.Namespace(api_key_file=key_file, api_key=None)) == "from-file"
    assert read_api_key(argparse.Namespace(api_key_file=None, api_key=None)) == "from-env"
    assert read_api_key(argparse.Namespace(api_key_file=None, api_key="flag")) == "flag"
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        read_api_key(argparse.Namespace(api_key_file=tmp_path / "empty", api_key=None))
    with pytest.raises(UserError, match="cannot read"):
        read_api_key(argparse.Namespace(api_key_file=tmp_path / "missing", api_key=None))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_serving_a_public_address_without_key_warns(model_dir, monkeypatch, capsys):
    from tuneforge.cli import main

    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    started = threading.Event()

    def fake_run(app, host, port, log_level):  # never bind a public address in a test
        started.set()

    monkeypatch.setattr("uvicorn.run", fake_run)
    assert main(["serve", str(model_dir), "--host", "0.0.0.0", "--device", "cpu"]) == 0
    assert started.is_set()
    assert "without an API key" in " ".join(capsys.readouterr().err.split())


def test_batches_never_outgrow_the_context():
    """A long prompt with a short answer and a short prompt with a long answer fit the context alone, not together
    (the padded width plus the longest budget would exceed it): they run in separate batches."""
    from types import SimpleNamespace

    from tuneforge.models.decoding import DecodeRow
    from tuneforge.models.generation import GenerationSettings
    from tuneforge.serve.scheduler import Work, _fitting

    served = SimpleNamespace(model=object(), adapter_name=None, context_length=100)

    def work(prompt_len, budget):
        return Work(served, done=lambda result: None,
                    row=DecodeRow([1] * prompt_len, GenerationSettings(max_new_tokens=budget)))

    long_prompt, long_answer, small, other = work(90, 5), work(5, 90), work(10, 10), work(20, 20)
    assert _fitting([long_prompt, long_answer, small, other], 16) == [long_prompt, small]
    assert _fitting([long_answer, other], 16) == [long_answer]
    assert _fitting([small, other, work(3, 3)], 2) == [small, other]  # max_batch_size
