"""The model-side parts of serving: batched per-row decoding (models.decoding) and token scoring (models.scoring)."""

from __future__ import annotations

import threading

import pytest

from tuneforge.models.generation import GenerationSettings

PROMPTS = ["The for statement", "A list is", "import", "Exceptions are raised when the"]


@pytest.fixture(scope="module")
def lm():
    import torch

    from tests.helpers import stdlib_texts
    from tests.helpers import tiny_from_config as _from_config
    from tuneforge.models import build_model, train_tokenizer

    tokenizer = train_tokenizer(stdlib_texts(), vocab_size=512)
    torch.manual_seed(0)
    model = build_model(_from_config("llama"), tokenizer).eval()
    return model, tokenizer


def ids_of(tokenizer, text):
    return tokenizer(text)["input_ids"]


def test_greedy_batch_equals_complete_row_by_row(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows
    from tuneforge.models.generation import complete

    model, tok = lm
    budgets = [3, 9, 6, 12]
    rows = [DecodeRow(ids_of(tok, p), GenerationSettings(max_new_tokens=b)) for p, b in zip(PROMPTS, budgets, strict=True)]
    got = decode_rows(model, tok, None, rows)
    for prompt, budget, result in zip(PROMPTS, budgets, got, strict=True):
        want = complete(model, tok, None, [prompt], GenerationSettings(max_new_tokens=budget))[0]
        assert result.text == want.text
        assert result.token_ids == want.token_ids[:len(result.token_ids)]
        assert len(result.token_ids) <= budget
        assert result.finish_reason == want.finish_reason


def test_stop_string_ends_only_its_row_and_streamed_text_adds_up(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows

    model, tok = lm
    free = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=16))])[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    assert stop.strip()
    events: list[str] = []
    rows = [DecodeRow(ids_of(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=16, stop=(stop,)),
                      on_event=lambda e: events.append(e.text)),
            DecodeRow(ids_of(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=16))]
    stopped, other = decode_rows(model, tok, None, rows)
    assert stopped.text == free.text[:free.text.index(stop)]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
    assert "".join(events) == stopped.text  # held-back text never leaks the stop string
    assert other.text == free.text


def test_seeded_sampling_does_not_depend_on_the_batch(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows

    model, tok = lm
    sampled = GenerationSettings(max_new_tokens=10, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    alone = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[0]), sampled)])[0]
    mixed = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[2]), GenerationSettings(max_new_tokens=4)),
                                           DecodeRow(ids_of(tok, PROMPTS[0]), sampled)])[1]
    assert alone.token_ids == mixed.token_ids
    other_seed = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[0]),
                                                          GenerationSettings(max_new_tokens=10, temperature=1.5,
                                                                             top_p=0.95, top_k=50, seed=8))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_tiny_temperature_is_greedy_not_an_error(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows

    model, tok = lm
    greedy = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[3]), GenerationSettings(max_new_tokens=6))])
    tiny = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[3]),
                                                    GenerationSettings(max_new_tokens=6, temperature=5e-324))])
    assert tiny[0].token_ids == greedy[0].token_ids


def test_cancelling_a_row_stops_it_within_a_token(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows

    model, tok = lm
    cancel = threading.Event()
    seen = []

    def on_event(event):
        seen.append(event)
        if len(seen) == 2:
            cancel.set()

    rows = [DecodeRow(ids_of(tok, PROMPTS[0]), GenerationSettings(max_new_tokens=200, stop=()), cancelled=cancel,
                      on_event=on_event)]
    result = decode_rows(model, tok, None, rows)[0]
    assert result.finish_reason == "cancelled"
    assert len(result.token_ids) <= 3 and len(seen) == 2


def test_generated_logprobs_match_scoring_the_whole_sequence(lm):
    import math

    from tuneforge.models.decoding import DecodeRow, decode_rows
    from tuneforge.models.scoring import score_tokens

    model, tok = lm
    prompt = ids_of(tok, PROMPTS[0])
    result = decode_rows(model, tok, None, [DecodeRow(prompt, GenerationSettings(max_new_tokens=5),
                                                      top_logprobs=3)])[0]
    scored = score_tokens(model, [prompt + list(result.token_ids), prompt[:2]], top_logprobs=3, pad_id=0)
    assert scored[0][0].logprob is None and len(scored[0]) == len(prompt) + len(result.token_ids)
    assert len(scored[1]) == 2  # a shorter row in the same batch: padding never adds positions
    for generated, rescored in zip(result.logprobs, scored[0][len(prompt):], strict=True):
        assert generated.token_id == rescored.token_id
        assert math.isclose(generated.logprob, rescored.logprob, abs_tol=1e-4)
        assert generated.top[0][0] == generated.token_id  # greedy: the chosen token is the most likely
        assert len(generated.top) == 3 and generated.top[0][1] >= generated.top[1][1] >= generated.top[2][1]
    total = sum(math.exp(lp) for _, lp in scored[0][1].top)
    assert 0 < total <= 1.0 + 1e-5


def test_complete_and_stream_are_a_row_of_a_batched_decode_including_stop_strings(lm):
    """complete/stream_generate run decode_rows: one prompt gives exactly the row a mixed batch gives it."""
    from tuneforge.models.decoding import DecodeRow, decode_rows
    from tuneforge.models.generation import complete, stream_generate

    model, tok = lm
    free = complete(model, tok, None, [PROMPTS[3]], GenerationSettings(max_new_tokens=14, repetition_penalty=1.3))[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    assert stop.strip()
    for settings in (GenerationSettings(max_new_tokens=14, repetition_penalty=1.3),
                     GenerationSettings(max_new_tokens=14, repetition_penalty=1.3, stop=(stop,))):
        rows = [DecodeRow(ids_of(tok, PROMPTS[0]), GenerationSettings(max_new_tokens=3)),
                DecodeRow(ids_of(tok, PROMPTS[3]), settings),
                DecodeRow(ids_of(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=20))]
        batched = decode_rows(model, tok, None, rows)[1]
        alone = complete(model, tok, None, [PROMPTS[3]], settings)[0]
        assert (alone.text, alone.token_ids, alone.finish_reason) == (batched.text, batched.token_ids,
                                                                       batched.finish_reason)
        assert "".join(stream_generate(model, tok, None, PROMPTS[3], settings)) == alone.text
    assert alone.text == free.text[:free.text.index(stop)] and alone.finish_reason == "stop"
    assert len(alone.token_ids) < len(free.token_ids)  # decoding ended at the stop string


def test_sampled_complete_is_seeded_per_prompt_and_ignores_batch_size(lm):
    from tuneforge.models.decoding import DecodeRow, decode_rows
    from tuneforge.models.generation import complete, stream_generate

    model, tok = lm
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=3)
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    by_one = complete(model, tok, None, prompts, sampled, batch_size=1)
    together = complete(model, tok, None, prompts, sampled, batch_size=8)
    assert [c.token_ids for c in by_one] == [c.token_ids for c in together]
    assert by_one[0].token_ids != by_one[1].token_ids  # a repeated prompt draws with seed + its index
    row = decode_rows(model, tok, None, [DecodeRow(ids_of(tok, PROMPTS[0]), sampled)])[0]
    assert by_one[0].token_ids == row.token_ids
    assert "".join(stream_generate(model, tok, None, PROMPTS[0], sampled)) == by_one[0].text


def test_stream_generate_closed_early_cancels_its_decoding_thread(lm):
    from tuneforge.models.generation import stream_generate

    model, tok = lm
    before = threading.active_count()
    stream = stream_generate(model, tok, None, PROMPTS[0], GenerationSettings(max_new_tokens=500))
    first = next(stream)
    stream.close()  # joins the thread, which the cancelled row lets end at its next token
    assert first and threading.active_count() == before


def test_scoring_a_row_gives_what_scoring_it_alone_gives_whatever_shares_its_batch(lm):
    """Right padding with explicit positions: a short row beside long ones, any chunk size, the same log-probs and
    alternatives as the row alone (and as a plain forward pass with log_softmax)."""
    import math

    import torch

    from tuneforge.models.scoring import score_tokens

    model, tok = lm
    rows = [ids_of(tok, p) for p in PROMPTS] + [ids_of(tok, " ".join(PROMPTS) * 3)]
    batched = score_tokens(model, rows, top_logprobs=4, pad_id=0, batch_size=8, chunk=7)
    for row, scored in zip(rows, batched, strict=True):
        alone = score_tokens(model, [row], top_logprobs=4, pad_id=0, batch_size=1, chunk=1024)[0]
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([row])).logits[0].float().log_softmax(-1)
        assert [t.token_id for t in scored] == row and scored[0].logprob is None
        for position in range(1, len(row)):
            assert math.isclose(scored[position].logprob, alone[position].logprob, abs_tol=1e-5)
            assert math.isclose(scored[position].logprob, float(reference[position - 1, row[position]]),
                                abs_tol=1e-4)
            assert [i for i, _ in scored[position].top] == [i for i, _ in alone[position].top]
            assert scored[position].top[0][0] == int(reference[position - 1].argmax())


def test_scoring_never_holds_full_float32_logits(lm, monkeypatch):
    """The head runs on chunks of positions: no [rows, length, vocab] block reaches the log-softmax."""
    from tuneforge.models import scoring

    model, tok = lm
    shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        row = ids_of(tok, " ".join(PROMPTS) * 4)
        scoring.score_tokens(model, [row, row[:10]], top_logprobs=2, chunk=16)
    finally:
        handle.remove()
    assert len(row) > 40 and shapes and all(shape[1] <= 16 for shape in shapes)
