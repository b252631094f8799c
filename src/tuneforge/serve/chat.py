"""Interactive terminal chat with a run: streamed answers, conversation history, ``/reset`` and ``/exit``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO

HELP = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits, /help shows this"


def chat_loop(model: Any, tokenizer: Any, template: Any, settings: Any = None, *, system: str | None = None,
              read: Callable[[str], str] | None = None, out: TextIO | None = None, stream=None) -> list[dict]:
    """Run the chat until ``/exit`` or end of input; return the final conversation (without the system prompt).

    Args:
        model, tokenizer, template: as returned by ``load_for_inference``.
        settings: a ``GenerationSettings`` (default: greedy, 128 new tokens).
        system: an optional system message sent first in every prompt.
        read: reads one line of user input given a prompt string (``input`` by default; raises EOFError at end).
        out: where answers are written (stdout by default), flushed piece by piece as they are generated.
        stream: the streaming generator (default ``tuneforge.models.generation.stream_generate``).
    """
    from tuneforge.models.generation import GenerationSettings

    if stream is None:
        from tuneforge.models.generation import stream_generate as stream
    settings = settings or GenerationSettings()
    out = out or sys.stdout
    read = read or input  # looked up at call time, so tests and wrappers can replace builtins.input
    history: list[dict] = []
    out.write(HELP + "\n")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            out.write("(conversation cleared)\n")
            continue
        if text == "/help":
            out.write(HELP + "\n")
            continue
        if text.startswith("/"):
            out.write(f"unknown command {text.split()[0]!r}; {HELP}\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + [
            {"role": "user", "content": text}]
        out.write("assistant> ")
        out.flush()
        answer = ""
        for piece in stream(model, tokenizer, template, messages, settings):
            answer += piece
            out.write(piece)
            out.flush()
        out.write("\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]
    return history
