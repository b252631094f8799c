"""Readers and cleaning: every format becomes a canonical record; every bad input is a UserError naming where."""

from __future__ import annotations

import json

import pytest

from tuneforge.data.clean import clean_records, normalize_text, strip_html
from tuneforge.data.readers import read_records
from tuneforge.errors import UserError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats


def test_txt_split_on_configurable_separator(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("first doc\nline two\n\n\nsecond doc\n\n\n\n\n", encoding="utf-8")
    records = read_records(f)
    assert [r["text"] for r in records] == ["first doc\nline two", "second doc"]
    assert records[1]["source"] == f"{f}#2"
    f.write_text("a\n---\nb\n---\nc", encoding="utf-8")
    assert [r["text"] for r in read_records(f, text_separator="\n---\n")] == ["a", "b", "c"]


def test_jsonl_text_and_source_lines(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "one"}\n\n{"text": "two"}\n', encoding="utf-8")
    records = read_records(f)
    assert records == [{"text": "one", "source": f"{f}:1"}, {"text": "two", "source": f"{f}:3"}]


def test_alpaca_json_array_with_input_system_history(tmp_path):
    f = tmp_path / "alpaca.json"
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be kind.",
         "history": [["Q1", "A1"]]},
    ]
    f.write_text(json.dumps(rows), encoding="utf-8")
    first, second = read_records(f)
    assert first["messages"] == [{"role": "user", "content": "Add\n\n2 and 3"},
                                 {"role": "assistant", "content": "5"}]
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert second["messages"][1:3] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    assert first["source"] == f"{f}#1"


def test_chat_messages_and_sharegpt_roles(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    assert read_records(f)[0]["messages"][1] == {"role": "assistant", "content": "b"}
    g = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "a"}]},
    ])
    assert [m["role"] for m in read_records(g)[0]["messages"]] == ["system", "user", "assistant"]


def test_json_file_holding_json_lines(tmp_path):
    f = tmp_path / "lines.json"
    f.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [r["text"] for r in read_records(f)] == ["a", "b"]


def test_csv_and_parquet(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": ["Say hi", "Count"], "input": ["", "to 3"], "output": ["hi", "1 2 3"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        records = read_records(tmp_path / name)
        assert records[1]["messages"][0]["content"] == "Count\n\nto 3", name
        assert records[0]["messages"] == [{"role": "user", "content": "Say hi"},
                                          {"role": "assistant", "content": "hi"}], name


def test_forced_format_and_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "instruction": "i", "output": "o"}])
    (tmp_path / "b.txt").write_text("doc", encoding="utf-8")
    assert read_records(tmp_path / "a.jsonl")[0]["messages"][0]["content"] == "i"  # auto: alpaca wins
    assert read_records(tmp_path / "a.jsonl", format="text")[0]["text"] == "x"
    assert len(read_records(tmp_path, format="text")) == 2


# --------------------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "broken"\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{f}:2: malformed JSON"):
        read_records(f)


def test_malformed_json_array_names_line(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{f}:3: malformed JSON"):
        read_records(f)


def test_missing_field_names_field_and_record(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "outptu": "d"}])
    with pytest.raises(UserError, match=rf"{f}:2: record has no 'output' field"):
        read_records(f)
    g = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(UserError, match=r"c.jsonl:1: messages\[0\] has no 'content'"):
        read_records(g)


def test_unknown_format_keys(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"question": "a", "reply": "b"}])
    with pytest.raises(UserError, match="cannot tell the data format.*'question', 'reply'"):
        read_records(f)


def test_unknown_role_names_role_place_and_allowed(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
    ])
    with pytest.raises(UserError) as info:
        read_records(f)
    message = str(info.value)
    assert f"{f}:1: conversations[1]" in message and "'robot'" in message
    assert "allowed roles: system, user, human, assistant, gpt" in message


def test_empty_files(tmp_path):
    for name, content in [("e.txt", "  \n"), ("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "")]:
        f = tmp_path / name
        f.write_text(content, encoding="utf-8")
        with pytest.raises(UserError, match="empty"):
            read_records(f)


def test_non_utf8_names_byte_offset_and_line(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=rf"{f}: not UTF-8 text: byte 28 \(line 2\)"):
        read_records(f)


def test_file_not_found(tmp_path):
    with pytest.raises(UserError, match="data file not found: .*nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")


def test_hub_unreachable_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub may be unreachable.*give a local"):
        read_records("nobody-here/no-such-dataset")


# --------------------------------------------------------------------------- cleaning


def test_strip_html_keeps_code_and_chat_markers():
    assert strip_html("<p>Hello <b>world</b></p>&amp; more") == "\nHello world\n& more"
    assert strip_html("if a<b and c>d: <|im_end|>") == "if a<b and c>d: <|im_end|>"
    assert strip_html("x<script>alert(1)</script>y<!-- c -->z") == "xyz"


def test_normalize_nfkc_whitespace_keeps_indentation():
    assert normalize_text("ﬁne\u200b  \r\n\n\n\n    indented\t \n") == "fine\n\n    indented"


def test_clean_records_counts_each_rule():
    records = [
        {"text": "<i>hello</i>", "source": "f#1"},
        {"text": "hello", "source": "f#2"},          # duplicate of #1 after HTML stripping
        {"text": "  ", "source": "f#3"},             # empty after normalisation → min_length
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"}], "source": "f#4"},
        {"text": "ｆｕｌｌ width", "source": "f#5"},
    ]
    kept, report = clean_records(records, {"min_length": 2})
    assert [r["source"] for r in kept] == ["f#1", "f#4", "f#5"]
    assert kept[2]["text"] == "full width"
    assert (report.html_changed, report.dropped_duplicate, report.dropped_min_length) == (1, 1, 1)
    assert report.normalize_changed == 2 and report.records_out == 3
    assert report.examples == {"dedup": "f#2", "min_length": "f#3"}
    # a too-short assistant answer drops the conversation
    kept, report = clean_records(records, {"min_length": 3})
    assert "f#4" not in [r["source"] for r in kept]
    # rules can be switched off
    kept, report = clean_records(records, {"min_length": 0, "dedup": False, "strip_html": False})
    assert len(kept) == 5 and kept[0]["text"] == "<i>hello</i>"


def test_nothing_left_after_cleaning_names_rules():
    records = [{"text": "a", "source": "f#1"}, {"text": "a", "source": "f#2"}, {"text": "", "source": "f#3"}]
    with pytest.raises(UserError, match="nothing left after cleaning 3 records: min_length .* dropped 3, dedup dropped 0"):
        clean_records(records, {"min_length": 5})


# --------------------------------------------------------------------------- issue 10: readers that lose nothing


def test_jsonl_line_with_unicode_line_separators_reads(tmp_path):
    # JSON allows U+2028/U+2029 unescaped inside strings; str.splitlines() would cut the line there.
    f = tmp_path / "sep.jsonl"
    rows = [{"text": "first\u2028line"}, {"text": "para\u2029graph \x85 and \x1c"}]
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    records = read_records(f)
    assert [r["text"] for r in records] == [rows[0]["text"], rows[1]["text"]]
    assert [r["source"] for r in records] == [f"{f}:1", f"{f}:2"]


def test_html_cleaner_is_linear_on_unclosed_blocks():
    # Many unclosed <script>/<!-- openers made the old regex rescan to the end from each one (quadratic: minutes
    # for 1 MB). Run in a subprocess with a generous timeout: the fixed cleaner needs milliseconds.
    import subprocess
    import sys

    code = (
        "from tuneforge.data.clean import strip_html\n"
        "doc = ('<p>kept</p>' + '<script>x ' * 50_000 + '<!-- c' * 50_000).ljust(1_000_000, 'y')\n"
        "assert len(doc) == 1_000_000\n"
        "out = strip_html(doc)\n"
        "assert out.strip() == 'kept', out[:80]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_html_cleaner_drops_blocks_case_insensitively_and_unclosed_to_the_end():
    assert strip_html("a<SCRIPT type='x'>bad()</script >b<!-- note -->c<style>p{}</STYLE>d") == "abcd"
    assert strip_html("keep<script>never closed") == "keep"
    assert strip_html("keep<!-- never closed") == "keep"


def test_missing_local_directory_is_never_read_from_the_hub(tmp_path, monkeypatch):
    import tuneforge.data.readers as readers

    calls = []
    monkeypatch.setattr(readers, "_read_hub", lambda name, fmt: calls.append(name) or [])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("data/train", "data/train/", "./corpus", "data/sub/dir", "data/x.jsonl"):
        with pytest.raises(UserError, match="data file not found"):
            read_records(missing)
    assert calls == []
    # An owner/name whose owner is not a local directory is a hub id; hf: forces the hub.
    read_records("someone/dataset")
    read_records("hf:data/train")
    assert calls == ["someone/dataset", "data/train"]


# --------------------------------------------------------------------------- tools and reasoning


def test_openai_tool_calls_tool_role_and_record_tools(tmp_path):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    call = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    f = write_jsonl(tmp_path / "tools.jsonl", [{"tools": tools, "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."}]}])
    (record,) = clean_records(read_records(f))[0]  # a tool call with no text survives min_length
    assert record["tools"] == tools
    assert record["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert record["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call00001",
                                     "name": "get_weather"}


def test_sharegpt_function_call_and_observation(tmp_path):
    f = write_jsonl(tmp_path / "sg.jsonl", [{"tools": json.dumps([{"name": "get_weather"}]), "conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}]}])
    (record,) = read_records(f)
    assert record["tools"] == [{"name": "get_weather"}]
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert record["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "function_call", "value": "get_weather"}]}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: conversations\[0\]: a function_call value must be JSON"):
        read_records(bad)


def test_reasoning_field_is_folded_into_content_as_think_block(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [{"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "add"}]}])
    (record,) = read_records(f)
    assert record["messages"][1] == {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"}
