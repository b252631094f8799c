"""Real clients against ``tuneforge serve`` on 127.0.0.1: lm-evaluation-harness's ``local-completions`` model gives
the same results as lm-eval's own Hugging Face backend on the same weights (loglikelihood, rolling perplexity,
generation: the tiny tasks in ``tests/serve_tasks``), and schemathesis fuzzing of the served OpenAPI schema finds
no server error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers_serve import running_server, tiny_base

TASKS = Path(__file__).parent / "serve_tasks"
TASK_NAMES = ("tf_choice", "tf_perplexity", "tf_generate")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return tiny_base(tmp_path_factory.mktemp("clients") / "tiny", tiny_tokenizer)


@pytest.fixture(scope="module")
def server(model_dir):
    import torch

    with running_server([f"tiny={model_dir}"], engine_options={"dtype": torch.float32}, max_tokens_limit=16,
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
def test_lm_eval_local_completions_equals_its_hf_backend(server, model_dir):
    pytest.importorskip("lm_eval")
    # The same rolling windows on both sides: the API model keeps 2 tokens of max_length for the generated token
    # it asks for (its windows are max_length - 2 long), the HF backend uses max_length itself.
    served = lm_eval_results("local-completions", {"model": "tiny", "base_url": f"{server}/v1/completions",
                                                   "tokenizer": str(model_dir), "tokenizer_backend": "huggingface",
                                                   "max_length": 256, "num_concurrent": 1, "max_retries": 1,
                                                   "timeout": 60})
    local = lm_eval_results("hf", {"pretrained": str(model_dir), "tokenizer": str(model_dir), "max_length": 254,
                                   "device": "cpu", "dtype": "float32"})
    # loglikelihood: (logprob, is_greedy) per choice, equal to float32 rounding
    for ours, theirs in zip(served["tf_choice"], local["tf_choice"], strict=True):
        for (lp, greedy), (lp_ref, greedy_ref) in zip(ours, theirs, strict=True):
            assert math.isclose(lp, lp_ref, abs_tol=1e-3) and greedy == greedy_ref
    # rolling perplexity over windows (one document spans several 256-token windows)
    for ours, theirs in zip(served["tf_perplexity"], local["tf_perplexity"], strict=True):
        assert math.isclose(ours[0] if isinstance(ours, list) else ours,
                            theirs[0] if isinstance(theirs, list) else theirs, rel_tol=1e-4)
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
