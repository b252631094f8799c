"""Terminal chat: streamed answers, history carried between turns, /reset, /exit, end of input; the CLI command."""

from __future__ import annotations

import io

import pytest

from tests.helpers import make_run, save_base


@pytest.fixture()
def run(tmp_path, tiny_llama, tiny_tokenizer):
    base = save_base(tiny_llama, tiny_tokenizer, tmp_path / "base")
    return make_run(tmp_path / "run", base, scale=4.0)


def feeder(lines):
    pending = list(lines)

    def read(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read


def test_chat_loop_streams_keeps_history_and_resets(run):
    from tuneforge.models.generation import GenerationSettings, generate, stream_generate
    from tuneforge.models.reference import load_for_inference
    from tuneforge.serve.chat import chat_loop

    loaded = load_for_inference(str(run), device="cpu")
    seen, pieces = [], []

    def spy(model, tokenizer, template, messages, settings):
        seen.append([dict(m) for m in messages])
        for piece in stream_generate(model, tokenizer, template, messages, settings):
            pieces.append(piece)
            yield piece

    out = io.StringIO()
    history = chat_loop(loaded.model, loaded.tokenizer, loaded.template, GenerationSettings(max_new_tokens=10),
                        system="Be brief.", read=feeder(["hello", "", "/bogus", "and then?", "/reset", "again", "/exit",
                                                      "never read"]), out=out, stream=spy)
    first = generate(loaded.model, loaded.tokenizer, loaded.template,
                     [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]],
                     GenerationSettings(max_new_tokens=10))[0]
    assert len(seen) == 3  # empty line and unknown command generate nothing; nothing after /exit is read
    assert [m["content"] for m in seen[0]] == ["Be brief.", "hello"]
    # the second turn carries the first exchange
    assert [m["content"] for m in seen[1]] == ["Be brief.", "hello", first.strip(), "and then?"]
    # after /reset the history is gone
    assert [m["content"] for m in seen[2]] == ["Be brief.", "again"]
    text = out.getvalue()
    assert f"assistant> {first}\n" in text  # the streamed pieces printed add up to the answer
    assert "unknown command '/bogus'" in text and "(conversation cleared)" in text
    assert len(pieces) > 3
    assert [m["content"] for m in history] == ["again", history[1]["content"]]


def test_chat_command_reads_stdin_until_eof(run, monkeypatch, capsys):
    from tuneforge.cli import main

    monkeypatch.setattr("builtins.input", feeder(["What is a list?"]))
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "6", "--system", "hi"]) == 0
    out = capsys.readouterr().out
    assert "/reset" in out and "assistant> " in out


def test_chat_and_serve_flags_are_checked(run, capsys):
    from tuneforge.cli import main

    assert main(["chat", str(run), "--temperature", "-1"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert main(["serve", str(run), "--max-tokens-limit", "0"]) == 2
    assert "--max-tokens-limit" in capsys.readouterr().err
    assert main(["chat", str(run.parent / "missing")]) == 2
