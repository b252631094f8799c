"""Prepared data (data/prepared.py, data/cache.py): the same rows, masks and statistics as the in-memory reference
pipeline on every record format and template family; the cache key, a killed build, two concurrent builders;
``tuneforge data prepare``."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.templates.families import FAMILIES, family_tokenizer
from tuneforge.config.schema import DataConfig
from tuneforge.data.build import build_in_memory
from tuneforge.data.prepared import PackedRows, SampleRows, cache_key, prepare
from tuneforge.data.templates import get_template, resolve_template
from tuneforge.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def alpaca_rows(n: int, long_every: int = 0) -> list[dict]:
    rows = []
    for i in range(n):
        instruction = f"What is {i} plus {i}?" + (" Think about it very carefully." * 12 if long_every and
                                                   i % long_every == 0 else "")
        rows.append({"instruction": instruction, "input": "Show the sum." if i % 3 == 0 else "",
                     "output": f"The answer is <b>{2 * i}</b>." if i % 4 == 0 else f"The answer is {2 * i}."})
    return rows


def sharegpt_rows(n: int) -> list[dict]:
    return [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Hi {i}"},
                               {"from": "gpt", "value": f"Hello {i}."}, {"from": "human", "value": "And now?"},
                               {"from": "gpt", "value": f"Still {i}."}]} for i in range(n)]


def tool_rows(n: int) -> list[dict]:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    return [{"messages": [{"role": "user", "content": f"Add {i} and 1"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "add", "arguments": {"a": i, "b": 1}}}]},
                          {"role": "tool", "content": str(i + 1)},
                          {"role": "assistant", "content": f"It is {i + 1}."}], "tools": tools} for i in range(n)]


def compare(data_cfg: DataConfig, stage: str, tokenizer, template, tmp_path: Path, seed: int = 0, **kw):
    """The prepared bundle equals the in-memory one: every row, eval row, per-task row and statistic."""
    ref = build_in_memory(data_cfg, stage, tokenizer, template, seed, batch_size=3)
    got = prepare(data_cfg, stage, tokenizer, template, seed, batch_size=3, cache_dir=tmp_path / "cache", **kw)
    assert got.stats == ref.stats
    assert got.packed == ref.packed
    assert len(got.train) == len(ref.train) and list(got.train) == ref.train
    assert (list(got.eval) if got.eval is not None else None) == ref.eval
    if ref.eval_by_task is None:
        assert got.eval_by_task is None
    else:
        assert {k: list(v) for k, v in got.eval_by_task.items()} == ref.eval_by_task
    return ref, got


# --------------------------------------------------------------------------- same rows as the reference


@pytest.mark.parametrize("packing", [True, False])
def test_alpaca_jsonl_with_cleaning_dedup_truncation_and_eval_split(tmp_path, tiny_tokenizer, packing):
    rows = alpaca_rows(60, long_every=7)
    rows += [rows[5], rows[6], {"instruction": "Too short", "output": ""}]  # two duplicates, one dropped answer
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    ref, got = compare(DataConfig(train=[str(f)], max_length=48, packing=packing, eval_split=0.15), "sft",
                       tiny_tokenizer, get_template("chatml"), tmp_path)
    cleaning = ref.stats["cleaning"]
    assert cleaning["dropped_duplicate"] == 2 and cleaning["dropped_min_length"] == 1 and cleaning["html_changed"]
    assert ref.stats["truncated"] > 0 or ref.stats["dropped_no_supervised"] > 0
    assert isinstance(got.train, PackedRows if packing else SampleRows)


def test_every_file_format_and_a_directory(tmp_path, tiny_tokenizer):
    import pandas as pd

    folder = tmp_path / "dir"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", sharegpt_rows(8))
    (folder / "b.json").write_text(json.dumps(alpaca_rows(6)), encoding="utf-8")
    pd.DataFrame(alpaca_rows(5)).to_csv(folder / "c.csv", index=False)
    pd.DataFrame(alpaca_rows(4)).to_parquet(folder / "d.parquet")
    tools = write_jsonl(tmp_path / "tools.jsonl", tool_rows(5))
    evalf = write_jsonl(tmp_path / "eval.jsonl", sharegpt_rows(3))
    template = resolve_template("auto", family_tokenizer("qwen2_5"))
    compare(DataConfig(train=[str(folder), str(tools)], eval=str(evalf), max_length=256, system_prompt="Be kind."),
            "sft", family_tokenizer("qwen2_5"), template, tmp_path)


def test_train_on_prompt_max_samples_and_explicit_format(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    compare(DataConfig(train=[str(f)], format="alpaca", max_samples=20, train_on_prompt=True, packing=False,
                       clean={"dedup": False, "strip_html": False}), "sft", tiny_tokenizer, get_template("plain"),
            tmp_path)


def test_pretraining_blocks_from_text_and_chat_files(tmp_path, tiny_tokenizer):
    from tests.helpers import stdlib_texts

    txt = tmp_path / "docs.txt"
    txt.write_text("\n\n\n".join(stdlib_texts(40)), encoding="utf-8")
    chat = write_jsonl(tmp_path / "c.jsonl", sharegpt_rows(20))
    text_jsonl = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in stdlib_texts(30)])
    compare(DataConfig(train=[str(txt), str(chat), str(text_jsonl)], max_length=64, eval_split=0.1), "pt",
            tiny_tokenizer, None, tmp_path)


def test_multi_task_prefix_weights_and_replay_mix(tmp_path, tiny_tokenizer):
    rows = [{**r, "task": "add" if i % 2 else "say"} for i, r in enumerate(alpaca_rows(30))]
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    evalf = write_jsonl(tmp_path / "e.jsonl", rows[:6])
    general = write_jsonl(tmp_path / "g.jsonl", [{"text": f"General text number {i}."} for i in range(10)])
    ref, _ = compare(DataConfig(train=[str(f)], eval=str(evalf), max_length=64, task_prefix=True,
                                task_weights={"add": 1.5}, mix=[{"path": str(general), "weight": 0.1}]),
                     "sft", tiny_tokenizer, get_template("chatml"), tmp_path)
    assert ref.stats["tasks"]["train"] == {"say": 15, "add": 23} and "mix" in ref.stats
    assert set(ref.eval_by_task) == {"add", "say"}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_template_family_gives_the_reference_rows(name, tmp_path):
    tok = family_tokenizer(name)
    entry = FAMILIES[name]
    messages = sharegpt_rows(6) if not entry.get("reasoning") else [
        {"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                      {"role": "assistant", "content": f"<think>\nAdd.\n</think>\n\n{2 * i}."},
                      {"role": "user", "content": "Twice?"}, {"role": "assistant", "content": f"{4 * i}."}]}
        for i in range(6)]
    f = write_jsonl(tmp_path / "c.jsonl", messages)
    compare(DataConfig(train=[str(f)], max_length=1024), "sft", tok, resolve_template("auto", tok), tmp_path,
            use_cache=False)


@pytest.mark.slow  # worker processes
def test_workers_give_the_same_rows_as_one_process(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2500))
    ref, got = compare(DataConfig(train=[str(f)], max_length=64, eval_split=0.05), "sft", tiny_tokenizer,
                       get_template("chatml"), tmp_path, num_proc=2)
    assert len(list(Path(got.cache).glob("samples-train_*_of_00002.arrow"))) == 2  # two workers wrote shards


# --------------------------------------------------------------------------- errors, as the reader reports them


def test_bad_lines_are_reported_like_the_reader(tmp_path, tiny_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: malformed JSON line"):
        prepare(DataConfig(train=[str(f)]), "sft", tiny_tokenizer, get_template("chatml"), 0, use_cache=False)
    f.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    from tuneforge.data.readers import read_records

    with pytest.raises(UserError) as reader:
        read_records(f)
    with pytest.raises(UserError, match=r"not UTF-8 text: byte 53 \(line 2\)") as ours:
        prepare(DataConfig(train=[str(f)]), "sft", tiny_tokenizer, get_template("chatml"), 0, use_cache=False)
    assert str(ours.value) == str(reader.value)
    f.write_text('{"instruction": "a", "output": "b"}\n{"messages": []}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: record has no 'instruction'.*detected from the first record"):
        prepare(DataConfig(train=[str(f)]), "sft", tiny_tokenizer, get_template("chatml"), 0, use_cache=False)
    f.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl: file is empty"):
        prepare(DataConfig(train=[str(f)]), "sft", tiny_tokenizer, get_template("chatml"), 0, use_cache=False)


# --------------------------------------------------------------------------- the cache


def test_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path, tiny_tokenizer, monkeypatch):
    import tuneforge.data.prepared as prepared

    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(20))
    cfg = DataConfig(train=[str(f)], max_length=64, cache_dir=str(tmp_path / "cache"))
    template = get_template("chatml")
    first = prepare(cfg, "sft", tiny_tokenizer, template, 0)
    builds = []
    real = prepared._build
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: builds.append(1) or real(*a, **k))
    again = prepare(cfg, "sft", tiny_tokenizer, template, 0)
    assert again.cache == first.cache and not builds and list(again.train) == list(first.train)
    key = cache_key(cfg, "sft", tiny_tokenizer, template, 0, True)
    # what decides the rows changes the key; what does not (seed without a split, batch size, workers) does not
    assert cache_key(cfg, "sft", tiny_tokenizer, template, 1, True) == key
    assert cache_key(cfg.model_copy(update={"num_proc": 2}), "sft", tiny_tokenizer, template, 0, True) == key
    assert cache_key(cfg.model_copy(update={"max_length": 65}), "sft", tiny_tokenizer, template, 0, True) != key
    assert cache_key(cfg, "sft", tiny_tokenizer, template, 0, False) != key
    assert cache_key(cfg, "sft", tiny_tokenizer, get_template("plain"), 0, True) != key
    assert cache_key(cfg.model_copy(update={"eval_split": 0.1}), "sft", tiny_tokenizer, template, 0, True) != \
        cache_key(cfg.model_copy(update={"eval_split": 0.1}), "sft", tiny_tokenizer, template, 1, True)
    changed_clean = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"min_length": 3})})
    assert cache_key(changed_clean, "sft", tiny_tokenizer, template, 0, True) != key
    other_tok = family_tokenizer("qwen2_5")
    assert cache_key(cfg, "sft", other_tok, template, 0, True) != key
    # the same size, another content: rebuilt, with the new rows
    size = f.stat().st_size
    rows = alpaca_rows(20)
    rows[3]["output"] = "The answer is 9."  # same length as "The answer is 6."
    write_jsonl(f, rows)
    assert f.stat().st_size == size
    changed = prepare(cfg, "sft", tiny_tokenizer, template, 0)
    assert builds and changed.cache != first.cache
    assert list(changed.train) == build_in_memory(cfg, "sft", tiny_tokenizer, template, 0).train
    # --no-cache: nothing is written into the cache directory
    before = sorted(p.name for p in (tmp_path / "cache").iterdir())
    prepare(cfg, "sft", tiny_tokenizer, template, 0, use_cache=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before


def test_large_files_are_hashed_from_samples(tmp_path, monkeypatch):
    from tuneforge.data import cache

    f = tmp_path / "big.jsonl"
    f.write_bytes(b"x" * 5000)
    monkeypatch.setattr(cache, "FULL_HASH_LIMIT", 1000)
    monkeypatch.setattr(cache, "_SAMPLE_SIZE", 100)
    digest = cache.file_digest(f)
    assert "sampled-sha256" in digest and digest["size"] == 5000
    f.write_bytes(b"x" * 2000 + b"y" + b"x" * 2999)  # a change inside a sample changes the digest
    assert cache.file_digest(f)["sampled-sha256"] != digest["sampled-sha256"]


def test_rows_pickle_as_paths(tmp_path, tiny_tokenizer):
    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    bundle = prepare(DataConfig(train=[str(f)], max_length=64), "sft", tiny_tokenizer, get_template("chatml"), 0,
                     cache_dir=tmp_path / "cache")
    assert bundle.records[0]["messages"][0]["content"] == "What is 0 plus 0?\n\nShow the sum."  # loaded, still small
    blob = pickle.dumps(bundle)
    assert len(blob) < 20_000  # file paths, not the rows
    back = pickle.loads(blob)
    assert list(back.train) == list(bundle.train) and back.stats == bundle.stats
    assert back.train[1:3] == [bundle.train[1], bundle.train[2]] and back.train[-1] == bundle.train[len(bundle.train) - 1]
    assert back.records[0]["messages"][0]["content"] == "What is 0 plus 0?\n\nShow the sum."


SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    from transformers import AutoTokenizer
    import tuneforge.data.prepared as prepared
    from tuneforge.data.cache import Entry
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.templates import get_template

    tok_dir, data, cache, mode, log = sys.argv[1:6]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    real_build, real_publish = prepared._build, Entry.publish

    def slow_build(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"build {os.getpid()}\\n")
        time.sleep(1.5)
        return real_build(*args, **kwargs)

    def killed_publish(self, folder, meta):
        os.kill(os.getpid(), signal.SIGKILL)  # everything built, nothing published

    prepared._build = slow_build
    if mode == "kill":
        Entry.publish = killed_publish
    bundle = prepared.prepare(DataConfig(train=[data], max_length=64, cache_dir=cache), "sft", tok,
                              get_template("chatml"), 0)
    print(json.dumps({"cache": bundle.cache, "rows": len(bundle.train), "first": bundle.train[0]}))
""")


def _run(tmp_path, tokenizer_dir, data, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "RANK": "0"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tokenizer_dir), str(data), str(tmp_path / "cache"),
                             mode, str(tmp_path / "log")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.mark.slow  # three interpreters importing transformers
def test_killed_build_leaves_nothing_usable_and_two_builders_build_once(tmp_path, tiny_tokenizer):
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(40))
    killed = _run(tmp_path, tok_dir, data, "kill")
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.iterdir() if p.name.startswith(".build-")]
    assert leftovers and not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # two builders at once: one builds (removing the killed build's leftovers), the other waits and reuses it
    (tmp_path / "log").unlink()
    first, second = _run(tmp_path, tok_dir, data, "ok"), _run(tmp_path, tok_dir, data, "ok")
    outs = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert len((tmp_path / "log").read_text().splitlines()) == 1  # one build
    assert outs[0] == outs[1]
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]
    ref = build_in_memory(DataConfig(train=[str(data)], max_length=64), "sft", tiny_tokenizer,
                          get_template("chatml"), 0)
    assert outs[0]["rows"] == len(ref.train) and outs[0]["first"] == ref.train[0]


def test_other_ranks_wait_for_rank_0(tmp_path, tiny_tokenizer, monkeypatch):
    import threading

    import tuneforge.data.prepared as prepared

    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(10))
    cfg = DataConfig(train=[str(f)], max_length=64, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "1")
    calls = []
    monkeypatch.setattr(prepared, "_build", lambda *a, **k: calls.append(1) / 0)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("b", prepare(cfg, "sft", tiny_tokenizer,
                                                                           get_template("chatml"), 0)))
    thread.start()
    thread.join(1.5)
    assert thread.is_alive() and not calls  # rank 1 waits; it never builds
    monkeypatch.undo()
    built = prepare(cfg, "sft", tiny_tokenizer, get_template("chatml"), 0)  # "rank 0"
    thread.join(30)
    assert not thread.is_alive() and result["b"].cache == built.cache


# --------------------------------------------------------------------------- tuneforge data prepare


def test_cli_data_prepare_builds_then_reuses(tmp_path, capsys):
    from tuneforge.cli import main

    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(30))
    config = {"run_name": "p", "model": {"from_config": {"architecture": "llama", "hidden_size": 64, "num_layers": 2,
                                                          "num_heads": 4, "vocab_size": 400}},
              "data": {"train": [str(f)], "max_length": 64}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    cache = tmp_path / "cache"
    assert main(["data", "prepare", str(path), "--cache-dir", str(cache), "--json"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not first["reused"] and first["records"] == 30 and Path(first["cache"]).parent == cache
    assert main(["data", "prepare", str(path), "data.max_length=64", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("reused 30 records") and "samples  30" in out
    assert main(["data", "prepare", str(path), "data.max_length=80", "--cache-dir", str(cache), "--json"]) == 0
    assert not json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reused"]
    with pytest.raises(SystemExit) as bad:
        main(["data", "prepare", str(path), "--bogus"])
    assert bad.value.code == 2


def test_interrupted_build_publishes_nothing_and_the_next_one_builds(tmp_path, tiny_tokenizer, monkeypatch):
    """In-process twin of the SIGKILL test (slow tier): Ctrl-C inside a build leaves no entry, no temp dir."""
    from tuneforge.data.cache import Entry

    f = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(12))
    cfg = DataConfig(train=[str(f)], max_length=64, cache_dir=str(tmp_path / "cache"))

    def interrupted(self, folder, meta):
        assert (folder / "meta.json").exists() is False and any(folder.iterdir())  # files written, not published
        raise KeyboardInterrupt

    monkeypatch.setattr(Entry, "publish", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, "sft", tiny_tokenizer, get_template("chatml"), 0)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    bundle = prepare(cfg, "sft", tiny_tokenizer, get_template("chatml"), 0)
    assert list(bundle.train) == build_in_memory(cfg, "sft", tiny_tokenizer, get_template("chatml"), 0).train


# --------------------------------------------------------------------------- one read of the training files


def test_from_config_preview_reads_and_cleans_the_train_files_once(tmp_path, monkeypatch, capsys):
    """The tokenizer of a from-config model trains on the records the prepared build then reuses."""
    import tuneforge.data.build as build
    import tuneforge.data.clean as clean
    import tuneforge.data.prepared as prepared
    import tuneforge.data.readers as readers
    from tuneforge.cli import main

    rows = alpaca_rows(30)
    f = write_jsonl(tmp_path / "a.jsonl", rows)
    g = write_jsonl(tmp_path / "b.jsonl", sharegpt_rows(5))
    reads, normalized = [], []
    real_scan, real_read, real_normalize = prepared._scan, readers.read_records, clean.normalize_text
    monkeypatch.setattr(prepared, "_scan", lambda sources, *a, **k: reads.extend(sources) or real_scan(sources, *a, **k))
    counted = lambda path, *a, **k: reads.append(str(path)) or real_read(path, *a, **k)  # noqa: E731
    monkeypatch.setattr(readers, "read_records", counted)
    monkeypatch.setattr(build, "read_records", counted)  # imported by name there
    monkeypatch.setattr(clean, "normalize_text", lambda text: normalized.append(text) or real_normalize(text))
    config = {"run_name": "p", "model": {"from_config": {"architecture": "llama", "hidden_size": 64, "num_layers": 2,
                                                          "num_heads": 4, "vocab_size": 400}},
              "data": {"train": [str(f), str(g)], "max_length": 64, "cache_dir": str(tmp_path / "cache")}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    assert main(["data", "preview", str(path), "-n", "1"]) == 0
    assert "samples  35" in capsys.readouterr().out
    assert sorted(reads) == [str(f), str(g)]  # each file read once: for the tokenizer, reused by the build
    messages = sum(len(r["messages"]) for r in readers.rows_to_records(
        [(f"x{i}", r) for i, r in enumerate(rows)])) + 5 * 5
    assert len(normalized) == messages  # each text cleaned once

    # the tokenizer's texts are the cleaned records, in order (those the in-memory reading gives)
    from tuneforge.data.build import tokenizer_texts

    cfg = DataConfig(train=[str(f), str(g)], cache_dir=str(tmp_path / "cache"))
    expected = [m["content"] for p in (f, g)
                for r in clean.clean_records(real_read(p), cfg.clean)[0] for m in r["messages"]]
    reads.clear()
    assert tokenizer_texts(cfg) == expected and reads == []  # from the cache
    nocache = cfg.model_copy(update={"cache": False})
    assert tokenizer_texts(nocache) == expected and reads == [str(f), str(g)]
    # without a cache, the build in the same process reuses the tokenizer's read too
    tok = train_tok(expected)
    prepare(nocache, "sft", tok, get_template("chatml"), 0)
    assert reads == [str(f), str(g)]


def train_tok(texts):
    from tuneforge.models import train_tokenizer

    return train_tokenizer(texts, vocab_size=400)
