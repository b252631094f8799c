"""What ``tuneforge serve`` (and chat / generate) refuse before any model loads: a reward model (it scores, it does
not generate: ``tuneforge score`` is named as the fix), and models that do not fit the memory budget (the preflight
names both numbers; a KV token budget that does not fit is lowered and said; a budget that fits serves)."""

from __future__ import annotations

import pytest
import yaml

from tuneforge.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """A tiny base with a chat run (LoRA) and a reward-model run (stage: rm) on it."""
    from tests.helpers import make_run
    from tests.helpers_serve import tiny_base

    root = tmp_path_factory.mktemp("refusals")
    base = tiny_base(root / "base", tiny_tokenizer)
    chat = make_run(root / "chat", base, seed=1)
    rm = make_run(root / "rm", base, seed=2)
    config = yaml.safe_load((rm / "config.yaml").read_text())
    (rm / "config.yaml").write_text(yaml.safe_dump({**config, "stage": "rm"}))
    return {"base": base, "chat": chat, "rm": rm}


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if any model is loaded (the refusals must come first)."""
    from tuneforge.models import reference

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(reference, "load_for_inference", refuse)


def _refused(capsys, argv: list[str], run) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert str(run) in err and "reward model" in err and f"tuneforge score {run}" in err
    return err


def test_serve_refuses_a_reward_model_naming_it_and_tuneforge_score(runs, capsys, no_loading):
    err = _refused(capsys, ["serve", f"chat={runs['chat']}", f"judge={runs['rm']}", "--port", "8123"], runs["rm"])
    assert "tuneforge serve" in err


def test_serve_with_another_engine_refuses_a_reward_model_too(runs, capsys, no_loading):
    _refused(capsys, ["serve", str(runs["rm"]), "--engine", "vllm", "--dry-run"], runs["rm"])


def test_chat_refuses_a_reward_model(runs, capsys, no_loading):
    err = _refused(capsys, ["chat", str(runs["rm"])], runs["rm"])
    assert "tuneforge chat" in err


def test_generate_refuses_a_reward_model(runs, capsys, no_loading):
    err = _refused(capsys, ["generate", str(runs["rm"]), "--prompt", "hello"], runs["rm"])
    assert "tuneforge generate" in err


def test_the_engine_refuses_a_reward_model_for_programmatic_callers(runs, no_loading):
    from tuneforge.errors import UserError
    from tuneforge.serve.engine import Engine

    with pytest.raises(UserError, match="reward model"):
        Engine([str(runs["rm"])])


# --------------------------------------------------------------------------- memory preflight

LONGEST = 4096 + 64  # the default prompt cap + the --max-tokens-limit the tests give


def _bill(runs, tokens: int) -> int:
    """The preflight's own estimate at a KV budget of ``tokens`` (computed with an ample budget)."""
    from tuneforge.models.reference import resolve
    from tuneforge.serve.preflight import plan_serve

    plan = plan_serve([resolve(str(runs["chat"]))], token_budget=tokens, longest_row=LONGEST, rows=16, device="cpu",
                      max_memory=1 << 40, report=lambda line: None)
    assert plan.token_budget == tokens
    return plan.total


def test_serve_refuses_what_does_not_fit_with_both_numbers(runs, capsys, no_loading):
    from tuneforge.serve.preflight import _gib

    need = _bill(runs, LONGEST)
    budget = need - 1024
    assert main(["serve", str(runs["chat"]), "--device", "cpu", "--max-tokens-limit", "64",
                 "--max-memory", str(budget)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"need about {_gib(need)}" in err and f"the budget is {_gib(budget)} (--max-memory)" in err
    assert "--max-memory" in err


def _serve_once(monkeypatch, argv: list[str]) -> dict:
    """Run ``serve`` in-process; instead of listening, answer one completion through the app; return what it saw."""
    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}

    def run(app, **kwargs):
        seen["token_budget"] = app.state.engine.token_budget
        seen["prefix_tokens"] = app.state.engine.scheduler.prefix_tokens
        with TestClient(app, base_url="http://127.0.0.1") as client:
            seen["response"] = client.post("/v1/completions", json={"model": "chat", "prompt": "The for statement",
                                                                     "max_tokens": 4})

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(argv) == 0
    return seen


def test_a_token_budget_that_does_not_fit_is_lowered_and_said(runs, capsys, monkeypatch):
    budget = _bill(runs, LONGEST + 5000)  # room for 5,000 tokens more than one longest row
    seen = _serve_once(monkeypatch, ["serve", f"chat={runs['chat']}", "--device", "cpu", "--max-tokens-limit", "64",
                                     "--token-budget", "1000000", "--max-memory", str(budget)])
    err = capsys.readouterr().err
    assert "serve preflight" in err and "1,000,000" in err and "lowered to" in err
    assert LONGEST + 4000 < seen["token_budget"] <= LONGEST + 5000  # the engine runs with the lowered budget
    assert seen["response"].status_code == 200 and seen["response"].json()["choices"][0]["text"] is not None


def test_a_budget_that_fits_serves_with_the_estimate_printed(runs, capsys, monkeypatch):
    seen = _serve_once(monkeypatch, ["serve", f"chat={runs['chat']}", "--device", "cpu", "--max-tokens-limit", "64",
                                     "--token-budget", "20000", "--max-memory", "8GB"])
    err = capsys.readouterr().err
    assert "serve preflight" in err and "KV budget 20,000 tokens" in err and "lowered" not in err
    assert seen["token_budget"] == 20000 and seen["response"].status_code == 200
    assert seen["prefix_tokens"] == 2500  # one running batch: the prefix store's whole bound (20,000 / 8)


def test_running_batches_share_the_prefix_stores_bound():
    """The bill prices one prefix-reuse store of token budget / 8; with several running batches (several bases, or
    adapters peft cannot mix) each holds its share, so together they stay within it."""
    from types import SimpleNamespace

    from tuneforge.serve.scheduler import Scheduler, pool_count

    lora = SimpleNamespace(peft_type="LORA", use_dora=False)
    shared = SimpleNamespace(peft_config={"a": lora, "b": lora})  # LoRA adapters of one base mix in one batch
    dora = SimpleNamespace(peft_config={"a": SimpleNamespace(peft_type="LORA", use_dora=True)})
    assert pool_count([SimpleNamespace(model=shared, adapter_name=n) for n in "ab"]) == 1
    assert pool_count([SimpleNamespace(model=dora, adapter_name=n) for n in "ab"]) == 2
    assert pool_count([SimpleNamespace(model=shared, adapter_name="a"), SimpleNamespace(model=object(),
                                                                                        adapter_name=None)]) == 2
    assert Scheduler(token_budget=8000).prefix_tokens == 1000
    assert Scheduler(token_budget=8000, prefix_pools=2).prefix_tokens == 500


def test_the_preflight_bills_what_the_engine_holds_beside_the_kv_budget(runs):
    """The bill at a KV budget holds the KV store with its spare columns, the prefix-reuse store's bound (an eighth of
    the budget) and two tokenizers per served name (the generating thread's and the request handlers' copy):
    leaving one of them out would under-bill the server (benchmarks/phase_memory.py measured each)."""
    from tuneforge.models import memory
    from tuneforge.models.reference import resolve
    from tuneforge.serve.preflight import plan_serve

    refs = [resolve(str(runs["chat"]))]
    plan = plan_serve(refs, token_budget=20000, longest_row=LONGEST, rows=16, device="cpu", max_memory=1 << 40,
                      report=lambda line: None)
    numbers = memory.model_numbers(refs[0])
    kv = numbers.kv_per_token(4)
    assert plan.components["prefix-reuse store"] == kv * memory.prefix_budget(20000) == kv * 2500
    assert plan.components["kv store (token budget + spare columns)"] == kv * (20000 + 5000 + 16)
    assert plan.components["tokenizers (2)"] == memory.tokenizer_bytes(numbers.vocab, 2)
    # the per-token price the budget is sized with is the bill's own: one more budget token costs exactly that
    more = plan_serve(refs, token_budget=20008, longest_row=LONGEST, rows=16, device="cpu", max_memory=1 << 40,
                      report=lambda line: None)
    assert more.total - plan.total == 8 * memory.serve_bytes_per_token(kv, numbers.hidden, 4)
