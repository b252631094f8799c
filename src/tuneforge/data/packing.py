"""Packing several SFT samples into one row, collators, and the padding share of what is trained.

A packed row carries ``position_ids`` restarting at 0 for every sample and *no* attention mask: transformers then
builds a block-diagonal causal mask from the position ids (``masking_utils.find_packed_sequence_indices``), so no
token attends across a sample boundary. This only holds when the model runs without a KV cache
(``use_cache=False``) — with a cache, packed samples attend to each other (ENVIRONMENT.md measured it). The first
label of every packed sample is -100 so that no token is trained to predict the next sample's first token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import UserError


def pack_rows(samples: Sequence[dict], max_length: int) -> list[dict]:
    """First-fit-decreasing packing of samples into rows of at most ``max_length`` tokens.

    Args:
        samples: dicts with ``input_ids`` and ``labels`` (same length, at most ``max_length``).
        max_length: the row capacity in tokens.

    Returns:
        Rows ``{"input_ids", "labels", "position_ids", "lengths"}``; ``position_ids`` restart at 0 for each
        sample, the first label of each sample is -100, ``lengths`` lists the packed samples' lengths.
    """
    plan = pack_plan([len(s["input_ids"]) for s in samples], max_length)
    return [build_row([samples[i] for i in members]) for members in plan]


def pack_plan(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """The rows :func:`pack_rows` builds, as lists of sample indices (in the order each row packs them).

    Samples are placed longest first (ties in index order) into the first row with room; empty samples are
    skipped. The prepared (Arrow) pipeline stores this plan and assembles rows on access.

    Raises:
        UserError: a sample longer than ``max_length``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    capacity = _FirstFit(len(lengths), max_length)
    rows: list[list[int]] = []
    for index in order:
        length = lengths[index]
        if length > max_length:
            raise UserError(f"a sample of {length} tokens does not fit data.max_length={max_length}; truncate first")
        if length == 0:
            continue
        row = capacity.place(length)
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
    return rows


def build_row(members: Sequence[dict]) -> dict:
    """One packed row from its samples (positions restart, first label of each sample -100)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in members:
        ids = list(sample["input_ids"])
        input_ids.extend(ids)
        labels.append(IGNORE)
        labels.extend(sample["labels"][1:])
        position_ids.extend(range(len(ids)))
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "lengths": [len(s["input_ids"]) for s in members],
    }


class _FirstFit:
    """Segment tree over rows' free capacity: the first row with room for ``length`` in O(log n)."""

    def __init__(self, max_rows: int, capacity: int):
        self.size = 1
        while self.size < max(1, max_rows):
            self.size *= 2
        self.free = [capacity] * (2 * self.size)  # untouched rows are empty rows

    def place(self, length: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        row = node - self.size
        self.free[node] -= length
        node //= 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row


def _pad(seqs: list[list[int]], value: int, width: int) -> list[list[int]]:
    return [list(s) + [value] * (width - len(s)) for s in seqs]


class PackedCollator:
    """Collate packed rows: ``input_ids``, ``labels``, ``position_ids``, right-padded to the longest row.

    No ``attention_mask`` is returned on purpose (transformers derives per-sample masks from ``position_ids``);
    the model must run with ``use_cache=False``. Padding gets label -100 and positions counting from 0 (a
    separate pseudo-sample, so real tokens never see it).
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        positions = []
        for r in rows:
            pos = list(r.get("position_ids") or range(len(r["input_ids"])))
            positions.append(pos + list(range(width - len(pos))))
        return {
            "input_ids": torch.tensor(_pad([r["input_ids"] for r in rows], self.pad_id, width), dtype=torch.long),
            "labels": torch.tensor(_pad([r["labels"] for r in rows], IGNORE, width), dtype=torch.long),
            "position_ids": torch.tensor(positions, dtype=torch.long),
        }


class PaddingCollator:
    """Collate unpacked samples: ``input_ids``, ``attention_mask``, ``labels`` with dynamic right padding.

    Labels of padding are -100 by position (never by comparing ids with the pad id), so an EOS label survives
    even when pad == eos.
    """

    def __init__(self, pad_id: int):
        self.pad_id = int(pad_id)

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        return {
            "input_ids": torch.tensor(_pad([r["input_ids"] for r in rows], self.pad_id, width), dtype=torch.long),
            "attention_mask": torch.tensor(_pad([[1] * len(r["input_ids"]) for r in rows], 0, width), dtype=torch.long),
            "labels": torch.tensor(_pad([r["labels"] for r in rows], IGNORE, width), dtype=torch.long),
        }


def padding_share(rows: Sequence[dict], batch_size: int, order: Sequence[int] | None = None) -> float:
    """Share of computed positions that are padding when ``rows`` are batched in ``order`` (default: as given).

    Each batch is padded to its longest row (dynamic padding, as both collators do).
    """
    return padding_share_of_lengths([len(r["input_ids"]) for r in rows], batch_size, order)


def padding_share_of_lengths(lengths: Sequence[int], batch_size: int, order: Sequence[int] | None = None) -> float:
    """:func:`padding_share` from the rows' lengths alone."""
    lengths = list(lengths)
    order = list(range(len(lengths))) if order is None else list(order)
    real = computed = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        real += sum(batch)
        computed += max(batch) * len(batch)
    return 1.0 - real / computed if computed else 0.0


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, mega_batches: int = 50) -> list[int]:
    """A seeded order of indices whose consecutive batches hold samples of similar length.

    Indices are shuffled, cut into groups of ``batch_size * mega_batches``, each group sorted by length, cut into
    batches, and the batches shuffled (so long and short batches alternate randomly). Every index appears once.
    """
    rng = random.Random(seed)
    indices = list(range(len(lengths)))
    rng.shuffle(indices)
    group = max(1, batch_size * mega_batches)
    batches = []
    for start in range(0, len(indices), group):
        chunk = sorted(indices[start : start + group], key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def packing_supported(model: Any, atol: float = 1e-4) -> bool:
    """Whether ``model`` keeps packed samples apart when given only ``position_ids`` (and ``use_cache=False``).

    Runs two short random sequences packed in one row and each alone, and compares the second one's logits.
    Use it to choose packing or the length-grouped fallback for an architecture/attention backend.
    """
    import torch

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        vocab = int(getattr(model.config, "vocab_size", 256))
        gen = torch.Generator().manual_seed(0)
        first = torch.randint(0, vocab, (1, 6), generator=gen).to(device)
        second = torch.randint(0, vocab, (1, 5), generator=gen).to(device)
        ids = torch.cat([first, second], dim=1)
        positions = torch.tensor([list(range(6)) + list(range(5))], device=device)
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 6:].float()
            alone = model(input_ids=second, use_cache=False).logits[0].float()
        return bool((packed - alone).abs().max().item() <= atol * max(1.0, alone.abs().max().item()))
    finally:
        model.train(was_training)
