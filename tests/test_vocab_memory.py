"""The vocabulary terms of ``tuneforge.models.memory``'s phase bills: measured on three vocabularies (8,192 and 32,768
entries trained on the standard library, SmolLM2's 49,152), a fixed part + a per-entry part where the small
vocabulary showed one (``benchmarks/phase_memory.py --vocab``)."""

from __future__ import annotations

from tuneforge.models import memory

MIB = 2 ** 20
#: (entries, resident MiB after ``load_tokenizer``, its load peak MiB, the GGUF reload's part above the weight terms
#: MiB, the GGUF tokenizer conversion's peak MiB), AMD EPYC, fresh processes, libraries imported
MEASURED = [(8192, 7.6, 10.0, 37.4, 27.3), (32768, 25.0, 38.5, 132.1, 109.8), (49152, 31.6, 58.8, 193.9, 165.9)]


def test_each_vocabulary_term_is_within_15_percent_of_its_measurement_on_every_vocabulary():
    for vocab, resident, load, reload, conversion in MEASURED:
        for billed, measured in ((memory.tokenizer_bytes(vocab), resident),
                                 (memory.tokenizer_load_bytes(vocab), load),
                                 (memory.gguf_reload_vocab_bytes(vocab), reload),
                                 (memory.GGUF_TOKENIZER_CONVERSION_BYTES_PER_TOKEN * vocab, conversion)):
            assert abs(billed / MIB / measured - 1) <= 0.15, (vocab, billed / MIB, measured)


def test_a_proportional_tokenizer_term_would_miss_the_small_vocabulary():
    """Why the resident tokenizer and the GGUF reload have a fixed part: SmolLM2's per-entry figure alone (31.6 MiB /
    49,152 entries) bills the 8,192-entry tokenizer 30% low."""
    per_entry = 31.6 * MIB / 49152
    assert per_entry * 8192 / MIB < 0.75 * 7.6
    assert memory.tokenizer_bytes(8192) - memory.TOKENIZER_BYTES_PER_TOKEN * 8192 == memory.TOKENIZER_FIXED_BYTES
    assert memory.gguf_reload_vocab_bytes(8192) - memory.GGUF_RELOAD_BYTES_PER_TOKEN * 8192 \
        == memory.GGUF_RELOAD_FIXED_BYTES


def test_a_second_tokenizer_copy_costs_its_entries_only():
    """Serve's two copies per served name: the fixed part once, no tokenizer when the vocabulary is unknown. Two
    loads in one process keep 11.5, 40.8 and 47.6 MiB (8,192, 32,768, 49,152 entries): the bill is an upper bound
    of each (the second load reuses memory the first one's peak freed, most on the largest vocabulary)."""
    one, two = memory.tokenizer_bytes(8192), memory.tokenizer_bytes(8192, 2)
    assert two - one == memory.TOKENIZER_BYTES_PER_TOKEN * 8192
    for vocab, measured in ((8192, 11.5), (32768, 40.8), (49152, 47.6)):
        assert measured <= memory.tokenizer_bytes(vocab, 2) / MIB <= 1.35 * measured
    assert memory.tokenizer_bytes(0, 2) == 0
    serve = memory.serve_components(0, 0, token_budget=8, rows=1, vocab=8192)
    assert serve["tokenizers (2)"] == two
