"""Perplexity: token-weighted over the set, answer-only on chat data, sliding windows count each token once."""

from __future__ import annotations

import math

import pytest

from tuneforge.evaluate.perplexity import IGNORE, perplexity, sliding_windows


def _independent_nll(model, ids, labels):
    """Summed NLL and token count of one whole sequence, computed directly (no batching, no windows)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logp = F.log_softmax(logits.float(), dim=-1)
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE:
            total -= float(logp[t - 1, labels[t]])
            count += 1
    return total, count


@pytest.fixture()
def peaky_llama(tiny_llama):
    """The tiny Llama with large output weights: an untrained model predicts every token at about log(vocab),
    which would make every per-sequence mean equal; this one's losses differ from sequence to sequence."""
    import torch

    with torch.no_grad():
        tiny_llama.get_output_embeddings().weight.normal_(0, 2.0)
    return tiny_llama


TEXTS = [
    "A list is a mutable sequence.",
    "The for statement is used to iterate over the elements of a sequence (such as a string, tuple or list) "
    "or other iterable object. It is executed once for each item.",
    "Tuples are immutable sequences, typically used to store collections of heterogeneous data.",
]


def test_text_ppl_is_token_weighted_over_the_whole_set(peaky_llama, tiny_tokenizer):
    tiny_llama = peaky_llama
    records = [{"text": t} for t in TEXTS]
    result = perplexity(tiny_llama, tiny_tokenizer, records, batch_size=2, max_length=256)
    sums = [_independent_nll(tiny_llama, ids, ids) for ids in (tiny_tokenizer(t)["input_ids"] for t in TEXTS)]
    nll, tokens = sum(s for s, _ in sums), sum(c for _, c in sums)
    assert result.tokens == tokens == sum(len(tiny_tokenizer(t)["input_ids"]) - 1 for t in TEXTS)
    assert result.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    # The batches (longest first, two per batch) have different token counts, so a mean of batch means differs:
    # the test would catch that mistake.
    order = sorted(sums, key=lambda s: -s[1])
    batch_means = [sum(s for s, _ in order[:2]) / sum(c for _, c in order[:2]), order[2][0] / order[2][1]]
    assert abs(math.exp(sum(batch_means) / 2) - result.ppl) > 0.05 * result.ppl


def test_chat_ppl_scores_only_the_answers(peaky_llama, tiny_tokenizer):
    tiny_llama = peaky_llama
    from tuneforge.data.templates import get_template
    from tuneforge.data.tokenize import encode_chat

    template = get_template("chatml")
    records = [
        {"messages": [{"role": "user", "content": "What is a list?"},
                      {"role": "assistant", "content": "A mutable sequence."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And a tuple?"},
                      {"role": "assistant", "content": "An immutable sequence of items, often heterogeneous."}]},
        {"messages": [{"role": "user", "content": "no answer here"}]},
    ]
    result = perplexity(tiny_llama, tiny_tokenizer, records, template=template, batch_size=2)
    nll = tokens = 0
    for record in records[:2]:
        enc = encode_chat(record, tiny_tokenizer, template, 10_000, False)
        s, c = _independent_nll(tiny_llama, enc["input_ids"], enc["labels"])
        nll, tokens = nll + s, tokens + c
        assert c < len(enc["input_ids"]) - 1  # prompt tokens were not scored
    assert result.skipped == 1 and result.sequences == 2
    assert result.tokens == tokens
    assert result.ppl == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_sliding_window_equals_full_when_text_fits(tiny_llama, tiny_tokenizer):
    records = [{"text": TEXTS[1]}]
    n = len(tiny_tokenizer(TEXTS[1])["input_ids"])
    full = perplexity(tiny_llama, tiny_tokenizer, records, max_length=n, stride=8)
    big = perplexity(tiny_llama, tiny_tokenizer, records, max_length=256)
    assert full.tokens == big.tokens == n - 1
    assert full.ppl == pytest.approx(big.ppl, rel=1e-6)


def test_sliding_window_counts_each_token_once(tiny_llama, tiny_tokenizer):
    ids = tiny_tokenizer(TEXTS[1])["input_ids"]
    windows = sliding_windows(ids, ids, max_length=12, stride=5)
    scored = [sum(1 for v in labels[1:] if v != IGNORE) for _, labels in windows]
    assert sum(scored) == len(ids) - 1
    assert all(len(w) <= 12 for w, _ in windows) and len(windows) > 2
    # The windowed value is a real perplexity of the same tokens (shorter context, so close but not equal).
    windowed = perplexity(tiny_llama, tiny_tokenizer, [{"text": TEXTS[1]}], max_length=12, stride=5)
    assert windowed.tokens == len(ids) - 1
    with pytest.raises(ValueError):
        sliding_windows(ids, ids, max_length=4, stride=5)
