"""One request cannot fail another: token choice never hands NaN/inf to ``torch.multinomial``, a failing batch is
retried row by row (only the row that fails alone gets the error), and work that can never fit is refused up front
(the scheduler's ``TooLarge``, answered 413) instead of a 429 the client would retry forever."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from tuneforge.models.sampling import GenerationSettings


def test_sampling_survives_non_finite_and_extreme_scores():
    import torch

    from tuneforge.models.sampling import choose_token, sample_token

    generator = torch.Generator().manual_seed(0)
    hot = GenerationSettings(temperature=1e-4, repetition_penalty=0.1, presence_penalty=2.0, frequency_penalty=2.0)
    logits = torch.tensor([1e38, -1e38, 3.0, float("inf"), float("nan"), 0.0])
    for settings in (hot, GenerationSettings(temperature=2.0, top_p=1e-9, top_k=1), GenerationSettings()):
        token = choose_token(logits, settings, generator, prompt_ids=[0, 1, 2], generated=[3, 3, 5])
        assert 0 <= token < 6
    # nothing usable at all: the arg-max (here: the first of equal scores), not an exception
    nothing = torch.full((4,), float("nan"))
    assert sample_token(nothing, GenerationSettings(temperature=1.0), generator) == 0
    masked = torch.full((4,), float("-inf"))
    assert sample_token(masked, GenerationSettings(temperature=1.0), generator) in range(4)
    # what used to reach multinomial as NaN: penalty 1e-40 with temperature 1e-4
    raw = torch.randn(50) * 5
    old = GenerationSettings(temperature=1e-4, repetition_penalty=1e-40)
    assert 0 <= choose_token(raw, old, generator, [1, 2, 3], [4]) < 50


def test_out_of_range_settings_are_named():
    assert GenerationSettings(repetition_penalty=1e-30).problem()[0] == "repetition_penalty"
    assert GenerationSettings(presence_penalty=-2.5).problem()[0] == "presence_penalty"
    assert GenerationSettings(temperature=float("nan")).problem()[0] == "temperature"
    assert GenerationSettings(top_p=1.0, top_k=0, repetition_penalty=10.0).problem() is None


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    import torch

    from tests.helpers import tiny_from_config
    from tuneforge.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_from_config("llama"), tiny_tokenizer).eval()
    return model, tiny_tokenizer


POISON = 7  # a prompt holding this token id makes the model's forward raise (a stand-in for a bad row / OOM)


@pytest.fixture()
def poisoned(lm):
    model, tok = lm

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > 1 and bool((ids == POISON).any()):
            raise RuntimeError("simulated failure of one row")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    yield SimpleNamespace(model=model, adapter_name=None, context_length=256, tokenizer=tok, template=None,
                          activate=lambda: None)
    handle.remove()


@pytest.mark.parametrize("batching", ["dynamic", "continuous"])
def test_a_failing_row_fails_alone_and_the_rows_beside_it_answer(poisoned, batching):
    from tuneforge.models.decoding import DecodeRow, decode_rows
    from tuneforge.serve.scheduler import Scheduler, Work

    settings = GenerationSettings(max_new_tokens=5)
    prompts = [[5, 9, 11, 12], [5, POISON, 11], [20, 21, 22, 23, 24]]
    alone = [decode_rows(poisoned.model, poisoned.tokenizer, None, [DecodeRow(p, settings)])[0]
             for p in (prompts[0], prompts[2])]
    scheduler = Scheduler(max_batch_size=8, max_queue=8, batching=batching)
    results: dict[int, object] = {}
    finished = threading.Event()

    def done(index):
        def record(result):
            results[index] = result
            if len(results) == len(prompts):
                finished.set()
        return record

    try:
        scheduler.submit([Work(poisoned, done(i), row=DecodeRow(p, settings)) for i, p in enumerate(prompts)])
        assert finished.wait(120)
    finally:
        scheduler.close()
    assert isinstance(results[1], RuntimeError)
    assert results[0].token_ids == alone[0].token_ids and results[2].token_ids == alone[1].token_ids


def test_work_that_can_never_fit_is_too_large_not_queue_full():
    from tuneforge.models.decoding import DecodeRow
    from tuneforge.serve.scheduler import QueueFull, Scheduler, TooLarge, Work

    served = SimpleNamespace(model=object(), adapter_name=None, context_length=4096)
    scheduler = Scheduler(max_batch_size=4, max_queue=3, token_budget=100)

    def work(prompt, budget):
        return Work(served, lambda result: None, row=DecodeRow([1] * prompt, GenerationSettings(max_new_tokens=budget)))

    with pytest.raises(TooLarge, match="--max-queue"):
        scheduler.submit([work(2, 2) for _ in range(4)])
    with pytest.raises(TooLarge, match="token budget"):
        scheduler.submit([work(90, 20)])
    scheduler._closed = True  # keep the worker from starting: only the queue's bookkeeping is under test
    scheduler._thread = threading.current_thread()
    scheduler.submit([work(2, 2) for _ in range(3)])
    with pytest.raises(QueueFull):
        scheduler.submit([work(2, 2)])
