"""Continuous batching (models.decoding.ContinuousBatch and the scheduler's continuous worker): rows join and leave at
every step and still get exactly their unbatched answer (greedy tokens, seeded samples, stop strings, streamed text,
log-probs); rows of different LoRA adapters share forward passes without changing each other's answers; a cached
prefix changes no answer; a failed step is recovered row by row; a short request overtakes a long one."""

from __future__ import annotations

import threading
import time

import pytest

from tuneforge.models.sampling import GenerationSettings

PROMPTS = ["The for statement", "A list is", "import", "Exceptions are raised when the",
           "The with statement is used to wrap the execution of a block with methods defined by"]


@pytest.fixture(scope="module")
def lm(tiny_tokenizer):
    import torch

    from tests.helpers import tiny_from_config
    from tuneforge.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_from_config("llama"), tiny_tokenizer).eval(), tiny_tokenizer


def ids(tok, text):
    return tok(text)["input_ids"]


def run_staggered(batch, joinings, every: int = 2) -> dict:
    """Feed ``joinings`` one every ``every`` steps; step until all ended; ``{handle: result}``."""
    results, pending, step = {}, list(joinings), 0
    while pending or len(batch):
        if pending and step % every == 0:
            results.update(batch.add([pending.pop(0)]))
        results.update(batch.step())
        step += 1
    return results


def alone(model, tok, row_ids, settings, **row_kwargs):
    from tuneforge.models.decoding import DecodeRow, decode_rows

    return decode_rows(model, tok, None, [DecodeRow(row_ids, settings, **row_kwargs)])[0]


def test_rows_joining_and_leaving_get_their_unbatched_answers(lm):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    settings = [GenerationSettings(max_new_tokens=b) for b in (20, 6, 30, 12)]
    settings.append(GenerationSettings(max_new_tokens=15, temperature=1.3, top_k=40, top_p=0.9, seed=5))
    free = alone(model, tok, ids(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=16))
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 2]
    settings[1] = GenerationSettings(max_new_tokens=16, stop=(stop,))
    events: dict[int, list[str]] = {i: [] for i in range(5)}
    joinings = [Joining(DecodeRow(ids(tok, p), s, top_logprobs=2, on_event=lambda e, i=i: events[i].append(e.text)),
                        tok, None, None, i) for i, (p, s) in enumerate(zip(PROMPTS, settings, strict=True))]
    batch = ContinuousBatch(model, prefix_entries=0)
    widths = []
    original_step = batch.step

    def step():
        widths.append((len(batch), batch.mask.shape[1] if batch.mask is not None else 0))
        return original_step()

    batch.step = step
    got = run_staggered(batch, joinings)
    for i, (prompt, s) in enumerate(zip(PROMPTS, settings, strict=True)):
        want = alone(model, tok, ids(tok, prompt), s, top_logprobs=2)
        assert got[i].token_ids == want.token_ids and got[i].text == want.text, i
        assert got[i].finish_reason == want.finish_reason
        assert "".join(events[i]) == got[i].text
        for a, b in zip(got[i].logprobs, want.logprobs, strict=True):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
    assert got[1].finish_reason == "stop" and got[1].text == free.text[:free.text.index(stop)]
    assert max(rows for rows, _ in widths) >= 3  # rows really ran together
    assert len(batch) == 0 and batch.cache is None  # every slot freed


def test_finished_rows_leave_at_once_and_their_columns_are_trimmed(lm):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    batch = ContinuousBatch(model, prefix_entries=0)
    long_prompt = ids(tok, PROMPTS[4] * 3)
    batch.add([Joining(DecodeRow(long_prompt, GenerationSettings(max_new_tokens=3)), tok, None, None, "long"),
               Joining(DecodeRow(ids(tok, PROMPTS[2]), GenerationSettings(max_new_tokens=30)), tok, None, None, "s")])
    assert len(batch) == 2 and batch.mask.shape[1] == len(long_prompt)
    done = []
    while len(batch) == 2:
        done += batch.step()
    assert [h for h, _ in done] == ["long"]
    # the remaining row's cache is as wide as its own tokens: the long prompt's columns are gone
    (slot,) = batch.slots
    assert batch.mask.shape[1] == slot.length == len(ids(tok, PROMPTS[2])) + 2 and bool(batch.mask.all())


def test_the_store_is_sized_at_admission_and_rows_move_without_changing_answers(lm):
    """More rows join than the store first holds, rows of different budgets, rows leaving from the middle (the last
    row takes their place): every answer is still the unbatched one, log-probs included (the tiny random model
    repeats a token whatever its context: the log-probs are what would show a wrong cache). The store is what
    serve's bill prices, at every step: its token slots never exceed ``kv_store_tokens`` of the batch's billed cost
    (rows x the longest prompt + max new tokens) — no doubling — and it is reallocated only when rows join, never
    by a decoding step."""
    from tuneforge.models import decoding
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining
    from tuneforge.models.memory import kv_store_columns, kv_store_tokens

    model, tok = lm
    budgets = [70, 5, 90, 9, 3, 75, 12, 80, 4, 66, 7, 85]  # short ones leave from the middle of the batch
    joinings = [Joining(DecodeRow(ids(tok, PROMPTS[i % 5]), GenerationSettings(max_new_tokens=b), top_logprobs=0),
                        tok, None, None, i) for i, b in enumerate(budgets)]
    allocations, phase = [], ["add"]
    original = decoding._KVStore._allocate

    def counting(self, *args, **kwargs):
        allocations.append((phase[0], *args[:2]))
        return original(self, *args, **kwargs)

    batch = ContinuousBatch(model, prefix_entries=0)
    sizes = []

    def check():
        if batch.store is not None:
            store = batch.store
            assert store.columns == kv_store_columns(store.longest)
            assert store.longest <= max(slot.cost for slot in batch.slots) or store.rows > len(batch)
            assert store.rows * store.columns <= kv_store_tokens(batch.cost(), store.rows)
            sizes.append(store.rows * store.columns)

    decoding._KVStore._allocate = counting
    try:
        got, pending, steps = {}, list(joinings), 0
        while pending or len(batch):
            if pending and steps % 3 == 0:
                phase[0] = "add"
                got.update(batch.add(pending[:2] if steps < 6 else pending[:1]))
                del pending[:2 if steps < 6 else 1]
                check()
            phase[0] = "step"
            got.update(batch.step())
            check()
            steps += 1
    finally:
        decoding._KVStore._allocate = original
    for i, b in enumerate(budgets):
        want = alone(model, tok, ids(tok, PROMPTS[i % 5]), GenerationSettings(max_new_tokens=b), top_logprobs=0)
        assert got[i].token_ids == want.token_ids, i
        assert max(abs(a.logprob - w.logprob) for a, w in zip(got[i].logprobs, want.logprobs, strict=True)) < 1e-4, i
    assert len(allocations) >= 2 and all(when == "add" for when, *_ in allocations)  # steps never reallocate
    assert max(rows for _, rows, _ in allocations) >= 3  # rows really ran together
    assert len(allocations) < len(budgets) < steps
    assert len(batch) == 0 and batch.store is None


def test_rows_joining_together_get_a_store_of_exactly_their_billed_tokens(lm):
    """Eight rows admitted together: the store holds eight rows of the longest prompt + max new tokens plus the
    spare quarter (what ``models.memory.kv_store_tokens`` bills), and the decoding never reallocates it."""
    from tuneforge.models import decoding
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining
    from tuneforge.models.memory import kv_store_columns, kv_store_tokens

    model, tok = lm
    rows = [ids(tok, PROMPTS[i % 5]) for i in range(8)]
    longest = max(len(r) for r in rows) + 40
    allocations = []
    original = decoding._KVStore._allocate
    decoding._KVStore._allocate = lambda self, *a, **k: allocations.append(a[:2]) or original(self, *a, **k)
    try:
        batch = ContinuousBatch(model, prefix_entries=0)
        batch.add([Joining(DecodeRow(r, GenerationSettings(max_new_tokens=40)), tok, None, None, i)
                   for i, r in enumerate(rows)])
        store = batch.store
        assert (store.rows, store.columns) == (8, kv_store_columns(longest))
        assert store.rows * store.columns <= kv_store_tokens(8 * longest, 8)
        while len(batch):
            batch.step()
    finally:
        decoding._KVStore._allocate = original
    assert allocations == [(8, kv_store_columns(longest))]


def test_growing_the_store_frees_each_old_tensor_before_the_next_is_allocated(lm):
    """A reallocation never holds the old store and the new one at once: when its k-th new tensor is allocated, the
    k old tensors copied before it are gone (peak: the new store + one old layer's keys or values)."""
    import weakref

    import torch

    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    batch = ContinuousBatch(model, prefix_entries=0)
    batch.add([Joining(DecodeRow(ids(tok, PROMPTS[0]), GenerationSettings(max_new_tokens=30)), tok, None, None, 0)])
    batch.step()
    old = [weakref.ref(t) for layer in batch.store.buffers for t in layer]
    alive_at_each_allocation = []
    zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        alive_at_each_allocation.append(sum(ref() is not None for ref in old))
        return zeros(*args, **kwargs)

    torch.zeros = counting_zeros
    try:  # more rows than the store holds: it is reallocated
        batch.add([Joining(DecodeRow(ids(tok, PROMPTS[1]), GenerationSettings(max_new_tokens=30)), tok, None, None,
                           1)])
    finally:
        torch.zeros = zeros
    assert batch.store.rows == 2
    allocations = alive_at_each_allocation[-len(old):]
    assert allocations == [len(old) - k for k in range(len(old))]
    assert all(ref() is None for ref in old)


def test_the_prefix_store_holds_at_most_its_token_budget(lm):
    """``prefix_tokens`` bounds the prefix-reuse store (what serve's bill prices as its share of the token budget):
    the oldest entries leave first, a prompt longer than the bound is not kept, and a hit still reuses a prefix."""
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    system = ids(tok, PROMPTS[4] + " " + PROMPTS[3])
    prompts = [system + ids(tok, " " + p) for p in PROMPTS[:4]]
    bound = 2 * max(len(p) for p in prompts) + 1  # two entries at most
    batch = ContinuousBatch(model, prefix_entries=8, min_prefix=8, prefix_tokens=bound)
    held = []
    pending, results, step = [Joining(DecodeRow(p, GenerationSettings(max_new_tokens=4)), tok, None, None, i)
                              for i, p in enumerate(prompts)], {}, 0
    while pending or len(batch):
        if pending and step % 2 == 0:
            results.update(batch.add([pending.pop(0)]))
            held.append((batch.prefix_held, len(batch._prefixes)))
        results.update(batch.step())
        step += 1
    assert max(tokens for tokens, _ in held) <= bound and max(n for _, n in held) == 2
    assert batch.prefix_hits >= 2 and len(results) == 4
    too_long = ContinuousBatch(model, prefix_entries=8, min_prefix=8, prefix_tokens=len(prompts[0]) - 1)
    too_long.add([Joining(DecodeRow(prompts[0], GenerationSettings(max_new_tokens=2)), tok, None, None, 0)])
    assert too_long.prefix_held == 0


def test_a_narrow_window_moves_within_the_buffers_without_changing_answers(lm):
    """A wide row leaves, a narrow one goes on until the window reaches the buffers' end: the window moves back
    within the same buffers (no reallocation) and the row keeps its unbatched tokens and log-probs."""
    from tuneforge.models import decoding
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    wide, narrow = ids(tok, PROMPTS[4] * 3), ids(tok, PROMPTS[2])
    settings = {"wide": GenerationSettings(max_new_tokens=2), "narrow": GenerationSettings(max_new_tokens=100)}
    shifts, allocations = [], []
    shift, allocate = decoding._KVStore._shift, decoding._KVStore._allocate
    decoding._KVStore._shift = lambda self, start: shifts.append(start) or shift(self, start)
    decoding._KVStore._allocate = lambda self, *a, **k: allocations.append(a[1:3]) or allocate(self, *a, **k)
    try:
        batch = ContinuousBatch(model, prefix_entries=0)
        got = dict(batch.add([Joining(DecodeRow(p, settings[name], top_logprobs=0), tok, None, None, name)
                              for name, p in (("wide", wide), ("narrow", narrow))]))
        while len(batch):
            got.update(batch.step())
    finally:
        decoding._KVStore._shift, decoding._KVStore._allocate = shift, allocate
    assert shifts and len(allocations) == 1  # moved within the first buffers, never reallocated
    for name, p in (("wide", wide), ("narrow", narrow)):
        want = alone(model, tok, p, settings[name], top_logprobs=0)
        assert got[name].token_ids == want.token_ids
        assert max(abs(a.logprob - w.logprob) for a, w in zip(got[name].logprobs, want.logprobs, strict=True)) < 1e-4


def test_a_cancelled_row_leaves_at_the_next_step(lm):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    batch = ContinuousBatch(model)
    row = DecodeRow(ids(tok, PROMPTS[0]), GenerationSettings(max_new_tokens=50))
    batch.add([Joining(row, tok, None, None, "x")])
    batch.step()
    row.cancelled.set()
    (handle, result), = batch.step()
    assert handle == "x" and result.finish_reason == "cancelled" and len(batch) == 0


def test_a_cached_prefix_changes_no_answer(lm):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    system = ids(tok, PROMPTS[4] + " " + PROMPTS[3])
    prompts = [system + ids(tok, " " + p) for p in PROMPTS[:4]]
    settings = GenerationSettings(max_new_tokens=12)
    batch = ContinuousBatch(model, prefix_entries=4, min_prefix=8)
    got = run_staggered(batch, [Joining(DecodeRow(p, settings), tok, None, None, i) for i, p in enumerate(prompts)],
                        every=3)
    assert batch.prefix_hits >= 3  # every prompt after the first reused the shared part
    for i, p in enumerate(prompts):
        assert got[i].token_ids == alone(model, tok, p, settings).token_ids


def test_a_failed_step_is_recovered_row_by_row(lm):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = lm
    failed = []

    def fail_once(module, args, kwargs):
        step = kwargs["input_ids"]
        if not failed and step.shape == (3, 1):  # the first decoding step of all three rows
            failed.append(1)
            raise RuntimeError("simulated out of memory")

    handle = model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        settings = GenerationSettings(max_new_tokens=10)
        batch = ContinuousBatch(model, prefix_entries=0)
        got = run_staggered(batch, [Joining(DecodeRow(ids(tok, p), settings), tok, None, None, i)
                                    for i, p in enumerate(PROMPTS[:3])], every=1)
    finally:
        handle.remove()
    assert failed
    for i, p in enumerate(PROMPTS[:3]):
        assert got[i].token_ids == alone(model, tok, ids(tok, p), settings).token_ids


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_tokenizer):
    """One peft model holding two LoRA adapters of one base (as serve loads runs of one base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_adapter
    from tests.helpers_serve import tiny_base

    root = tmp_path_factory.mktemp("mixed")
    base = tiny_base(root / "base", tiny_tokenizer)
    a = make_adapter(base, root / "a", seed=1, scale=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    b = make_adapter(base, root / "b", seed=2, scale=8.0, target_modules=("q_proj", "v_proj", "down_proj"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(a),
                                      adapter_name="a")
    model.load_adapter(str(b), adapter_name="b")
    return model.eval(), tiny_tokenizer


def test_rows_of_different_adapters_share_forward_passes_and_keep_their_answers(adapters):
    from tuneforge.models.decoding import ContinuousBatch, DecodeRow, Joining

    model, tok = adapters
    settings = GenerationSettings(max_new_tokens=12)
    expected = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        expected[name] = [alone(model, tok, ids(tok, p), settings).token_ids for p in PROMPTS[:4]]
    assert expected["a"] != expected["b"]  # the adapters really answer differently
    forwards = []
    handle = model.get_base_model().register_forward_pre_hook(lambda *a: forwards.append(1))
    try:
        model.set_adapter("a")  # the active adapter must not matter: every row names its own
        batch = ContinuousBatch(model, mixed_adapters=True, prefix_entries=0)
        mix = [Joining(DecodeRow(ids(tok, p), settings), tok, None, name, (name, i))
               for i, p in enumerate(PROMPTS[:4]) for name in ("a", "b")]
        got = run_staggered(batch, mix, every=1)
    finally:
        handle.remove()
    for (name, i), result in got.items():
        assert result.token_ids == expected[name][i], (name, i)
    assert len(forwards) < 8 * 12 / 2  # 8 rows of 12 tokens: far fewer passes than one row at a time


def test_scheduler_lets_a_short_request_overtake_a_long_one(lm):
    """A 4-token request sent while a 200-token one runs ends long before it (dynamic batching made it wait)."""
    from types import SimpleNamespace

    from tuneforge.models.decoding import DecodeRow
    from tuneforge.serve.scheduler import Scheduler, Work

    model, tok = lm
    served = SimpleNamespace(model=model, adapter_name=None, tokenizer=tok, template=None, context_length=256,
                             activate=lambda: None)
    scheduler = Scheduler(max_batch_size=8, max_queue=8)
    ended: dict[str, float] = {}
    both = threading.Event()

    def done(name):
        def record(result):
            ended[name] = time.monotonic()
            if len(ended) == 2:
                both.set()
        return record

    never = GenerationSettings(max_new_tokens=200, stop=())
    try:
        long_row = DecodeRow(ids(tok, PROMPTS[0]), never)
        scheduler.submit([Work(served, done("long"), row=long_row)])
        time.sleep(0.3)
        scheduler.submit([Work(served, done("short"), row=DecodeRow(ids(tok, PROMPTS[1]),
                                                                    GenerationSettings(max_new_tokens=4)))])
        assert both.wait(120)
    finally:
        scheduler.close()
    assert ended["short"] < ended["long"]
