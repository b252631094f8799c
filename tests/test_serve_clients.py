"""Real clients against ``tuneforge serve`` on 127.0.0.1: lm-evaluation-harness's ``local-completions`` model gives
the same results as lm-eval's own Hugging Face backend on the same weights (loglikelihood, rolling perplexity,
generation: the tiny tasks in ``tests/serve_tasks``), and schemathesis fuzzing of the served OpenAPI schema finds
no server error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import make_run
from tests.helpers_serve import running_server, tiny_base

TASKS = Path(__file__).parent / "serve_tasks"
TASK_NAMES = ("tf_choice", "tf_perplexity", "tf_generate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return tiny_base(tmp_path_factory.mktemp("clients") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="module")
def run_dir(model_dir, tiny_tokenizer):
    """A run: a LoRA adapter (q, v, down) on the base, as lm-eval's ``peft=`` loads it; the base's output head is
    then made to end texts with EOS now and then."""
    run = make_run(model_dir.parent / "run", model_dir, seed=3, scale=4.0,
                   target_modules=("q_proj", "v_proj", "down_proj"))
    eos_prone(model_dir, run / "final", tiny_tokenizer)
    return run


def eos_prone(folder: Path, adapter: Path, tokenizer, share: float = 0.4) -> None:
    """Make EOS the greedy next token after about ``share`` of the multiple-choice texts (and at some positions of
    the perplexity texts): the EOS row of an untied output head points along the mean last hidden state of base +
    adapter, scaled to win there. lm-eval drops the last listed token of an ``echo`` answer as the generated one, so
    answers that stop on EOS must be part of what the comparison sees."""
    import json as _json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plain.get_output_embeddings().weight = torch.nn.Parameter(plain.get_input_embeddings().weight.clone())
    plain.config.tie_word_embeddings = False  # a head of its own (the tiny model ties it to the embeddings)
    adapted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    decoder = PeftModel.from_pretrained(adapted, str(adapter)).eval().get_base_model().get_decoder()
    ends, inner = [], []
    with torch.no_grad():
        for line in (TASKS / "choice.jsonl").read_text().splitlines():
            item = _json.loads(line)
            for choice in item["choices"]:
                ids = tokenizer(f"Question: {item['question']}\nAnswer: {choice}", return_tensors="pt")
                ends.append(decoder(**ids).last_hidden_state[0, -1])
        for line in (TASKS / "text.jsonl").read_text().splitlines():
            ids = tokenizer(_json.loads(line)["text"], return_tensors="pt")["input_ids"][:, :250]
            inner.append(decoder(input_ids=ids).last_hidden_state[0])
        ends = torch.stack(ends)
        hidden = torch.cat([ends, *inner])
        head = plain.get_output_embeddings().weight
        direction = hidden.mean(0) / hidden.mean(0).norm()
        needed = (ends @ head.T).max(-1).values / (ends @ direction).clamp(min=1e-6)  # scale at which EOS wins
        head[tokenizer.eos_token_id] = direction * float(needed.quantile(share)) * 1.001
    plain.save_pretrained(folder)


@pytest.fixture(scope="module")
def server(run_dir):
    import torch

    with running_server([f"tiny={run_dir}"], engine_options={"dtype": torch.float32}, max_tokens_limit=16,
                        local_only=True) as (url, _):
        yield url


def task_configs() -> list[dict]:
    import yaml

    configs = []
    for name in TASK_NAMES:
        config = yaml.safe_load((TASKS / f"{name}.yaml").read_text())
        files = config["dataset_kwargs"]["data_files"]
        files["test"] = files["test"].replace("{{TASK_DIR}}", str(TASKS))
        configs.append(config)
    return configs


def lm_eval_results(model: str, model_args: dict) -> dict:
    from lm_eval import evaluator

    out = evaluator.simple_evaluate(model=model, model_args=model_args, tasks=task_configs(), batch_size=4,
                                   log_samples=True, bootstrap_iters=0, random_seed=0)
    return {name: [sample["filtered_resps"] for sample in sorted(out["samples"][name], key=lambda s: s["doc_id"])]
            for name in TASK_NAMES} | {"results": out["results"]}


@pytest.mark.slow
def test_lm_eval_local_completions_equals_its_hf_backend(server, model_dir, run_dir):
    """Per item within 1e-3 on base + adapter. It used to differ where the model's greedy next token after a scored
    text is EOS: lm-eval drops the last listed token as the generated one, and the server listed no stop token, so a
    token of the text was dropped (5.9 nats on one of 80 items; rolling perplexity 3,582 vs 4,011)."""
    pytest.importorskip("lm_eval")
    # The same rolling windows on both sides: the API model keeps 2 tokens of max_length for the generated token
    # it asks for (its windows are max_length - 2 long), the HF backend uses max_length itself.
    served = lm_eval_results("local-completions", {"model": "tiny", "base_url": f"{server}/v1/completions",
                                                   "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
                                                   "max_length": 256, "num_concurrent": 1, "max_retries": 1,
                                                   "timeout": 60})
    local = lm_eval_results("hf", {"pretrained": str(model_dir), "peft": str(run_dir / "final"),
                                   "tokenizer": str(model_dir), "max_length": 254, "device": "cpu",
                                   "dtype": "float32"})
    # loglikelihood: (logprob, is_greedy) per choice, equal to float32 rounding
    for ours, theirs in zip(served["tf_choice"], local["tf_choice"], strict=True):
        for (lp, greedy), (lp_ref, greedy_ref) in zip(ours, theirs, strict=True):
            assert math.isclose(lp, lp_ref, abs_tol=1e-3) and greedy == greedy_ref
    # rolling perplexity over windows (one document spans several 256-token windows)
    for ours, theirs in zip(served["tf_perplexity"], local["tf_perplexity"], strict=True):
        assert math.isclose(ours[0] if isinstance(ours, list) else ours,
                            theirs[0] if isinstance(theirs, list) else theirs, abs_tol=1e-3)
    # greedy generation with stop strings: the same text
    assert served["tf_generate"] == local["tf_generate"]
    assert any(str(text).strip("[]' ") for text in served["tf_generate"])  # not all empty: something was compared
    for name in TASK_NAMES:
        ours, theirs = served["results"][name], local["results"][name]
        for key, value in theirs.items():
            if isinstance(value, float) and not key.endswith("_stderr,none"):
                assert math.isclose(ours[key], value, rel_tol=1e-4), (name, key)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzing_the_schema_finds_no_server_error(server, mode):
    """Schemathesis generates requests from the served schema (valid ones, then invalid ones) for every operation:
    no 5xx, every status and content type documented, invalid data refused with a 4xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_headers_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance]
    if mode == "negative":
        checks.append(negative_data_rejection)
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 6
    if mode == "negative":  # operations with something to make invalid (a body; any string is a valid name)
        operations = [op for op in operations if op.method.upper() == "POST"]
    calls = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case):
            calls.append(case.call_and_validate(timeout=60, checks=checks).status_code)

        run()
    assert len(calls) >= 3 * 20 and all(status < 500 for status in calls)
