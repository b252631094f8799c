"""Serving a per-task run (``method.per_task``): every task's adapter on one base, routed by the request's ``model``
(``<run>/<task>`` or the bare task) or, with ``--route prefix``, by the ``[task]`` prefix of the first user message.
Each routed answer equals the task run loaded alone (``load_for_inference`` + greedy ``complete``); an unknown or
missing prefix is a 400 naming the tasks; name clashes are refused at start."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers import make_run
from tests.helpers_serve import make_per_task_run, running_server, tiny_base

TOKENS = 10
# Two tasks with clearly different (scaled-up) adapters; `sum` was trained with `[sum] ` on its first user turn,
# `qa` without (its prefix is only a routing tag and is removed before the model sees it).
TASKS = {
    "sum": {
        "seed": 1,
        "scale": 8.0,
        "task_prefix": True,
        "target_modules": ("q_proj", "v_proj", "down_proj"),
    },
    "qa": {
        "seed": 2,
        "scale": 8.0,
        "task_prefix": False,
        "target_modules": ("q_proj", "v_proj", "down_proj"),
    },
}


@pytest.fixture(scope="module")
def layout(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("routing")
    base = tiny_base(root / "base", tiny_tokenizer)
    mt = make_per_task_run(root / "mt", base, TASKS)
    other = make_run(root / "other", base, seed=3, scale=8.0)
    return {"base": base, "mt": mt, "other": other}


@pytest.fixture(scope="module")
def server(layout):
    """The per-task run and an ordinary run of the same base, routed by prefix."""
    with running_server([str(layout["mt"]), f"solo={layout['other']}"], route="prefix") as (url, engine):
        yield {"url": url, "engine": engine}


@pytest.fixture(scope="module")
def expected(layout):
    """What a task run answers loaded alone (load_for_inference + greedy complete): the ground truth."""
    from tuneforge.models.generation import GenerationSettings, complete
    from tuneforge.models.reference import load_for_inference

    cache = {}

    def answer(task: str, prompt) -> str:
        if task not in cache:
            cache[task] = load_for_inference(str(layout["mt"] / "tasks" / task), device="cpu")
        loaded = cache[task]
        return complete(
            loaded.model,
            loaded.tokenizer,
            loaded.template,
            [prompt],
            GenerationSettings(max_new_tokens=TOKENS),
        )[0].text

    return answer


def chat(url: str, model: str | None, messages: list[dict]) -> httpx.Response:
    body = {"messages": messages, "max_tokens": TOKENS, "temperature": 0}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_every_task_is_served_on_one_base(server):
    engine = server["engine"]
    names = [m["id"] for m in httpx.get(server["url"] + "/v1/models", timeout=10).json()["data"]]
    assert sorted(names) == ["mt", "mt/qa", "mt/sum", "qa", "solo", "sum"]
    assert engine.get("sum") is engine.get("mt/sum") and engine.get("qa") is engine.get("mt/qa")
    # one base model object holds both task adapters (and the other run of the same base)
    assert len({id(served.model) for served in engine.models.values()}) == 1
    assert engine.get("mt/sum").adapter_name != engine.get("mt/qa").adapter_name
    assert engine.per_task["mt"].prefixed == {"qa": False, "sum": True}


def test_routing_by_name_equals_the_task_run_alone(server, expected):
    messages = user("[sum] The for statement")
    answers = {}
    for model in ("mt/sum", "sum", "mt/qa", "qa"):
        response = chat(server["url"], model, messages)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "mt/" + model.removeprefix("mt/")
        answers[model] = response.json()["choices"][0]["message"]["content"]
    # by name the messages go as sent: the adapter is the only difference
    assert answers["mt/sum"] == answers["sum"] == expected("sum", messages)
    assert answers["mt/qa"] == answers["qa"] == expected("qa", messages)
    assert answers["sum"] != answers["qa"]  # the adapters differ: a wrong route would show


def test_routing_by_prefix_keeps_the_prefix_as_trained(server, expected):
    url = server["url"]
    summed = chat(url, "mt", user("[sum] The for statement")).json()
    assert summed["model"] == "mt/sum"
    assert summed["choices"][0]["message"]["content"] == expected("sum", user("[sum] The for statement"))
    # qa was trained without the prefix: the model sees the message without it
    asked = chat(url, "mt", user("[qa] The for statement")).json()
    assert asked["model"] == "mt/qa"
    assert asked["choices"][0]["message"]["content"] == expected("qa", user("The for statement"))
    # the first user turn routes (training put the prefix there); later turns are left alone
    history = [
        {"role": "system", "content": "Be brief."},
        *user("[qa] What is a list?"),
        {"role": "assistant", "content": "A sequence."},
        *user("[sum] And a tuple?"),
    ]
    answer = chat(url, "mt", history).json()
    want = [history[0], *user("What is a list?"), history[2], history[3]]
    assert answer["model"] == "mt/qa" and answer["choices"][0]["message"]["content"] == expected("qa", want)
    # streamed: the same routing, every chunk names the adapter that answers
    body = {
        "model": "mt",
        "messages": user("[qa] The for statement"),
        "max_tokens": TOKENS,
        "temperature": 0,
        "stream": True,
    }
    chunks = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: ") :]))
    assert {c["model"] for c in chunks} == {"mt/qa"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected("qa", user("The for statement"))


def test_completions_and_simple_chat_route_by_prefix(server, expected):
    url = server["url"]
    raw = httpx.post(
        url + "/v1/completions",
        json={"model": "mt", "prompt": "[sum] The while loop", "max_tokens": TOKENS, "temperature": 0},
        timeout=60,
    ).json()
    assert raw["model"] == "mt/sum" and raw["choices"][0]["text"] == expected("sum", "[sum] The while loop")
    raw = httpx.post(
        url + "/v1/completions",
        json={"model": "mt", "prompt": ["[qa] The while loop"] * 2, "max_tokens": TOKENS, "temperature": 0},
        timeout=60,
    ).json()
    assert raw["model"] == "mt/qa"
    assert [c["text"] for c in raw["choices"]] == [expected("qa", "The while loop")] * 2
    simple = httpx.post(
        url + "/chat", json={"model": "mt", "message": "[qa] Hello", "max_new_tokens": TOKENS}, timeout=60
    ).json()
    assert simple == {"response": expected("qa", user("Hello")), "model": "mt/qa"}


def test_unknown_or_missing_prefix_is_a_400_naming_the_tasks(server):
    url = server["url"]
    cases = [
        ("unknown_task", chat(url, "mt", user("[nope] hi"))),
        ("missing_task_prefix", chat(url, "mt", user("hi [sum]"))),
        ("missing_task_prefix", chat(url, "mt", [{"role": "system", "content": "[sum] x"}])),
        (
            "missing_task_prefix",
            chat(url, "mt", [*user("hi"), {"role": "assistant", "content": "yes"}, *user("[sum] hi")]),
        ),
        (
            "unknown_task",
            httpx.post(url + "/v1/completions", json={"model": "mt", "prompt": "[Sum] x"}, timeout=30),
        ),
        (
            "missing_task_prefix",
            httpx.post(url + "/v1/completions", json={"model": "mt", "prompt": [1, 2, 3]}, timeout=30),
        ),
        ("unknown_task", httpx.post(url + "/chat", json={"model": "mt", "message": "[x] hi"}, timeout=30)),
    ]
    for code, response in cases:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == code, error
        assert "[qa]" in error["message"] or "'mt/qa'" in error["message"], error
    mixed = httpx.post(
        url + "/v1/completions", json={"model": "mt", "prompt": ["[sum] a", "[qa] b"]}, timeout=30
    )
    assert mixed.status_code == 400 and "different tasks" in mixed.json()["error"]["message"]
    streamed = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "mt", "messages": user("[zz] hi"), "stream": True},
        timeout=30,
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "unknown_task"
    # several models served: a request without `model` is not guessed
    assert chat(url, None, user("[sum] hi")).status_code == 400


def test_only_per_task_run_routes_without_model_and_name_routing_refuses_the_run_name(layout, expected):
    with running_server([str(layout["mt"])], route="prefix") as (url, engine):
        answer = httpx.post(
            url + "/chat", json={"message": "[sum] Hello", "max_new_tokens": TOKENS}, timeout=60
        )
        assert answer.json() == {"response": expected("sum", user("[sum] Hello")), "model": "mt/sum"}
        with running_server([], engine=engine) as (by_name, _):  # same models, --route name (the default)
            names = [m["id"] for m in httpx.get(by_name + "/v1/models", timeout=10).json()["data"]]
            assert sorted(names) == ["mt/qa", "mt/sum", "qa", "sum"]
            refused = chat(by_name, "mt", user("[sum] hi"))
            assert refused.status_code == 404 and "--route prefix" in refused.json()["error"]["message"]
            assert chat(by_name, "sum", user("[sum] Hello")).json()["choices"][0]["message"][
                "content"
            ] == expected("sum", user("[sum] Hello"))


def test_name_clashes_and_bad_routes_are_refused_at_start(layout):
    from tuneforge.errors import UserError
    from tuneforge.serve.app import create_app
    from tuneforge.serve.engine import Engine, expand_per_task, served_names

    mt, other = str(layout["mt"]), str(layout["other"])
    with pytest.raises(UserError, match="'mt/sum' is given twice"):
        expand_per_task(served_names([mt, f"mt/sum={other}"]))
    with pytest.raises(UserError, match="collide"):
        expand_per_task(served_names([mt, f"mt_sum={other}"]))
    with pytest.raises(
        UserError, match="task 'sum' of the per-task run 'mt'.*rename that one with NAME=PATH"
    ):
        Engine([mt, f"sum={other}"], device="cpu")
    # two per-task runs: only <run>/<task> names (the bare task names would be ambiguous)
    pairs, groups = expand_per_task(served_names([mt, f"mt2={mt}"]))
    assert [name for name, _ in pairs] == ["mt/qa", "mt/sum", "mt2/qa", "mt2/sum"]
    assert [g.name for g in groups] == ["mt", "mt2"]
    engine = Engine([other], device="cpu")
    with pytest.raises(UserError, match="--route prefix chooses among the tasks of a per-task run"):
        create_app(engine, route="prefix")
    (layout["base"].parent / "empty" / "tasks").mkdir(parents=True)
    with pytest.raises(UserError, match="per-task run with no finished task run"):
        expand_per_task([("empty", str(layout["base"].parent / "empty"))])


def test_prefix_matching_is_literal_and_longest_first():
    from types import SimpleNamespace

    from tuneforge.data.mix import prefix_task
    from tuneforge.serve.engine import PerTaskRun, UnknownTask

    assert prefix_task("[a b] hi", ["a", "a b"]) == "a b"
    assert prefix_task("[a]] hi", ["a]", "a"]) == "a]"
    assert prefix_task(" [a] hi", ["a"]) is None and prefix_task("[A] hi", ["a"]) is None
    kept, tag = SimpleNamespace(name="mt/kept"), SimpleNamespace(name="mt/tag")
    run = PerTaskRun("mt", "runs/mt", {"kept": kept, "tag": tag}, {"kept": True, "tag": False})
    assert run.route("[kept] x") == (kept, "[kept] x")
    assert run.route("[tag] x y") == (tag, "x y")
    assert run.route("[tag]x") == (tag, "x")
    assert run.route("[tag]") == (tag, "")
    with pytest.raises(
        UnknownTask,
        match=r"'\[other\]' is not a task of the per-task run 'mt'; its tasks are "
        r"\[kept\], \[tag\]",
    ):
        run.route("[other] x")


def test_serve_command_routes_by_prefix_and_refuses_it_without_a_per_task_run(layout, monkeypatch, capsys):
    from tuneforge.cli import main

    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, host, port, log_level: apps.append(app))
    assert main(["serve", str(layout["mt"]), "--route", "prefix", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "serving mt/qa, mt/sum, qa, sum, mt on" in out, out
    assert len(apps) == 1
    assert main(["serve", str(layout["other"]), "--route", "prefix", "--device", "cpu"]) == 2
    assert "--route prefix chooses among the tasks of a per-task run" in " ".join(
        capsys.readouterr().err.split()
    )
    assert main(["serve", f"qa={layout['mt']}", "--device", "cpu"]) == 2
    assert "name the run with NAME=PATH" in " ".join(capsys.readouterr().err.split())
