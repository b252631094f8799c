"""Packing, collators, pretraining blocks, and the two model-level checks: one label shift, no cross-sample attention."""

from __future__ import annotations

import random

import pytest

from tests.helpers import stdlib_texts
from tuneforge.data.packing import (
    PackedCollator,
    PaddingCollator,
    length_grouped_order,
    pack_rows,
    padding_share,
)
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import IGNORE, encode_chat, pretrain_blocks


def fake_samples(lengths, seed=0):
    rng = random.Random(seed)
    samples = []
    for n in lengths:
        ids = [rng.randrange(10, 500) for _ in range(n)]
        labels = [IGNORE] * (n // 2) + ids[n // 2:]
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def test_pack_rows_first_fit_decreasing_with_per_sample_positions():
    rng = random.Random(1)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    samples = fake_samples(lengths)
    rows = pack_rows(samples, max_length=128)
    assert all(len(r["input_ids"]) <= 128 for r in rows)
    assert sorted(n for r in rows for n in r["lengths"]) == sorted(lengths)
    assert len(rows) <= sum(lengths) / 128 * 1.15 + 1  # FFD packs tightly
    # every packed sample is intact, positions restart at 0, its first label is masked
    originals = {tuple(s["input_ids"]): s for s in samples}
    for row in rows:
        start = 0
        for n in row["lengths"]:
            ids = tuple(row["input_ids"][start:start + n])
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["labels"][start] == IGNORE
            assert row["labels"][start + 1:start + n] == originals[ids]["labels"][1:]
            start += n
        assert start == len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"])


def test_pack_rows_first_fit_order():
    rows = pack_rows(fake_samples([6, 5, 4, 3, 2]), max_length=10)
    assert [r["lengths"] for r in rows] == [[6, 4], [5, 3, 2]]


def test_packed_collator_pads_right_without_attention_mask():
    rows = pack_rows(fake_samples([7, 3, 9]), max_length=10)
    batch = PackedCollator(pad_id=1)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == (len(rows), width)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][i, n:] == 1).all() and (batch["labels"][i, n:] == IGNORE).all()
        assert batch["position_ids"][i, n:].tolist() == list(range(width - n))


def test_padding_collator_masks_by_position_not_by_id():
    samples = fake_samples([4, 6])
    samples[0]["labels"][-1] = 0  # a supervised token whose id equals the pad id
    samples[0]["input_ids"][-1] = 0
    batch = PaddingCollator(pad_id=0)(samples)
    assert batch["labels"][0].tolist() == samples[0]["labels"] + [IGNORE, IGNORE]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]


def test_padding_share_and_length_grouping():
    rows = [{"input_ids": [0] * n} for n in (10, 2, 10, 2)]
    assert padding_share(rows, 2) == pytest.approx(1 - 24 / 40)
    order = length_grouped_order([10, 2, 10, 2], batch_size=2, seed=0)
    assert sorted(order) == [0, 1, 2, 3]
    assert padding_share(rows, 2, order) == 0.0
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(400)]
    grouped = length_grouped_order(lengths, 8, seed=3)
    rows = [{"input_ids": [0] * n} for n in lengths]
    assert padding_share(rows, 8, grouped) < padding_share(rows, 8) / 3


def test_pretrain_blocks_are_full_and_labels_equal_ids(tiny_tokenizer):
    texts = stdlib_texts(30)
    blocks = pretrain_blocks(texts, tiny_tokenizer, block_size=64)
    stream = []
    for text in texts:
        stream += tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(blocks) == len(stream) // 64 > 3
    assert all(len(b["input_ids"]) == 64 and b["labels"] == b["input_ids"] for b in blocks)
    assert [t for b in blocks for t in b["input_ids"]] == stream[: len(blocks) * 64]
    assert tiny_tokenizer.pad_token_id not in stream


def test_labels_are_shifted_exactly_once(tiny_llama, tiny_tokenizer):
    """Would catch a double shift: the model's loss on collated labels equals CE(logits[:, :-1], ids[:, 1:])."""
    import torch
    import torch.nn.functional as F

    blocks = pretrain_blocks(stdlib_texts(30), tiny_tokenizer, block_size=32)[:2]
    batch = PaddingCollator(tiny_tokenizer.pad_token_id)(blocks)
    tiny_llama.eval()
    with torch.no_grad():
        out = tiny_llama(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        logits = out.logits
        by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1))
        shifted_twice = F.cross_entropy(logits[:, :-2].reshape(-1, logits.size(-1)),
                                        batch["input_ids"][:, 2:].reshape(-1))
    assert out.loss.item() == pytest.approx(by_hand.item(), abs=1e-5)
    assert abs(out.loss.item() - shifted_twice.item()) > 1e-3  # the check can tell the two apart


def test_packed_rows_give_same_logits_as_separate_samples(tiny_llama, tiny_tokenizer):
    import torch

    template = get_template("chatml")
    records = [
        [{"role": "user", "content": "What is a tuple?"}, {"role": "assistant", "content": "An immutable sequence."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        [{"role": "user", "content": "Name a loop keyword in Python, please."},
         {"role": "assistant", "content": "for"}],
    ]
    samples = [encode_chat({"messages": m}, tiny_tokenizer, template, 256) for m in records]
    rows = pack_rows(samples, max_length=256)
    assert len(rows) == 1 and len(rows[0]["lengths"]) == 3
    batch = PackedCollator(tiny_tokenizer.pad_token_id)(rows)
    tiny_llama.eval()
    with torch.no_grad():
        packed = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        full_mask = tiny_llama(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"]),
                               use_cache=False).logits
        start, worst, leak = 0, 0.0, 0.0
        for n in rows[0]["lengths"]:
            ids = torch.tensor([rows[0]["input_ids"][start:start + n]])
            alone = tiny_llama(input_ids=ids, use_cache=False).logits[0]
            worst = max(worst, (packed[0, start:start + n] - alone).abs().max().item())
            leak = max(leak, (full_mask[0, start:start + n] - alone).abs().max().item())
            start += n
    assert worst < 1e-4
    assert leak > 1e-2  # without per-sample masks the samples would see each other: the test can fail


def test_packing_supported_detects_models_that_ignore_position_masks(tiny_llama, tiny_gpt2):
    from tuneforge.data.packing import packing_supported

    assert packing_supported(tiny_llama) and packing_supported(tiny_gpt2)

    class IgnoresPositions:
        """Forwards without position_ids: packed samples would attend to each other."""

        def __init__(self, model):
            self.model, self.config, self.training = model, model.config, False

        def parameters(self):
            return self.model.parameters()

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def __call__(self, input_ids, position_ids=None, use_cache=False):
            return self.model(input_ids=input_ids, use_cache=use_cache)

    assert not packing_supported(IgnoresPositions(tiny_llama))
