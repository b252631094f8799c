"""`tuneforge eval --data` through the prepared-data cache: the second evaluation of a file reuses the encoded
records (nothing is encoded again) and every score equals the direct encoding's."""

from __future__ import annotations

import json

import pytest

from tuneforge.cli import main

ROWS = [
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
    {"messages": [{"role": "user", "content": "Name a loop statement."}, {"role": "assistant", "content": "for"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "And a tuple?"},
                  {"role": "assistant", "content": "An immutable sequence."}, {"role": "user", "content": "A set?"},
                  {"role": "assistant", "content": "Unique items, <b>unordered</b>."}]},
    {"messages": [{"role": "user", "content": "No answer here"}]},  # nothing to score: skipped by both paths
    {"messages": [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]},
]


@pytest.fixture()
def reads(monkeypatch):
    """Every read of a data file (the readers' and the prepared scan's)."""
    import tuneforge.data.prepared as prepared
    import tuneforge.data.readers as readers

    calls = []
    real_scan, real_read = prepared._scan, readers.read_records
    monkeypatch.setattr(prepared, "_scan", lambda sources, *a, **k: calls.extend(sources) or real_scan(sources, *a, **k))
    monkeypatch.setattr(readers, "read_records", lambda path, *a, **k: calls.append(str(path)) or real_read(path, *a, **k))
    return calls


@pytest.fixture()
def encode_calls(monkeypatch):
    """Counts every record rendered and masked (prepared build or direct encoding)."""
    import tuneforge.data.tokenize as tokenize

    calls = []
    original = tokenize.encode_chat_samples

    def counting(record, *args, **kwargs):
        calls.append(record.get("source"))
        return original(record, *args, **kwargs)

    monkeypatch.setattr(tokenize, "encode_chat_samples", counting)
    return calls


def _entries(cache) -> list:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


def _eval(tiny_llama_dir, data, capsys) -> tuple[dict, str]:
    code = main(["eval", str(tiny_llama_dir), "--data", str(data), "--metrics", "ppl", "--json", "--no-save"])
    assert code == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


def test_second_eval_reuses_the_prepared_records_and_scores_the_same(tmp_path, tiny_llama_dir, monkeypatch, capsys,
                                                                     encode_calls, reads):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TUNEFORGE_DATA_CACHE", str(cache))
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    first, err = _eval(tiny_llama_dir, data, capsys)
    assert "eval data: preparing" in err and "records (train)" not in err  # no progress bars
    assert len(encode_calls) == len(ROWS)  # each record encoded once, by the prepared build
    assert reads == [str(data)]  # the file read once: its records entry serves the checks and the build
    entries = _entries(cache)
    assert len(entries) == 2  # the file's cleaned records, and their samples for this tokenizer and template
    built = [(e / "meta.json").stat().st_mtime_ns for e in entries]

    encode_calls.clear()
    reads.clear()
    second, err = _eval(tiny_llama_dir, data, capsys)
    assert "eval data: reusing" in err
    assert encode_calls == [] and reads == []  # nothing read, rendered, tokenized or masked again
    assert [(e / "meta.json").stat().st_mtime_ns for e in entries] == built
    assert _entries(cache) == entries

    # The uncached scores: the direct encoding of the same records (a plain list has no source to cache).
    from tuneforge.evaluate.perplexity import perplexity
    from tuneforge.evaluate.runner import load_eval_records
    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(str(tiny_llama_dir), device="cpu")
    direct = perplexity(loaded.model, loaded.tokenizer, list(load_eval_records(str(data))), template=loaded.template)
    assert direct.skipped == 1
    for row in (first, second):
        assert row["tokens"] == direct.tokens
        assert row["nll"] == pytest.approx(direct.nll, rel=1e-6)
        assert row["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
        assert row["ppl_skipped"] == 1
    assert second["ppl"] == first["ppl"]


def test_limit_and_changed_file_key_the_entry(tmp_path, tiny_tokenizer, monkeypatch):
    from tuneforge.data.evalset import read_eval_records
    from tuneforge.data.templates import resolve_template
    from tuneforge.evaluate.perplexity import encode_records

    monkeypatch.setenv("TUNEFORGE_DATA_CACHE", str(tmp_path / "cache"))
    template = resolve_template("chatml", tiny_tokenizer)
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    lines: list[str] = []
    records = read_eval_records(str(data), limit=2, echo=lines.append)
    assert len(records) == 2
    assert encode_records(records, tiny_tokenizer, template) == encode_records(list(records), tiny_tokenizer, template)
    assert records.last_entry["hit"] is False
    again = read_eval_records(str(data), limit=2, echo=lines.append)
    encode_records(again, tiny_tokenizer, template)
    assert again.last_entry == {"path": records.last_entry["path"], "hit": True}
    everything = read_eval_records(str(data), echo=lines.append)  # another limit: another entry
    assert encode_records(everything, tiny_tokenizer, template) == encode_records(list(everything), tiny_tokenizer,
                                                                                  template)
    assert everything.last_entry["path"] != records.last_entry["path"]
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))  # the file changed: rebuilt
    changed = read_eval_records(str(data), echo=lines.append)
    encode_records(changed, tiny_tokenizer, template)
    assert changed.last_entry["hit"] is False and changed.last_entry["path"] != everything.last_entry["path"]


def test_text_records_and_copies_take_the_direct_path(tmp_path, tiny_tokenizer, monkeypatch):
    from tuneforge.data.evalset import read_eval_records
    from tuneforge.data.templates import resolve_template

    monkeypatch.setenv("TUNEFORGE_DATA_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "docs.jsonl"
    text.write_text(json.dumps({"text": "A document about lists."}) + "\n")
    records = read_eval_records(str(text), echo=lambda line: None)
    assert records.encode_prepared(tiny_tokenizer, resolve_template("chatml", tiny_tokenizer)) is None
    kinds = [json.loads((e / "meta.json").read_text()).get("kind") for e in _entries(tmp_path / "cache")]
    assert kinds == ["records"]  # read through the cache, but no samples built
    assert type(records[:1]) is list  # a slice is not the file's records any more
