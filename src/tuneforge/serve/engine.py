"""The models a server holds, and generation on them one request at a time.

Several runs that are adapters of the same base share one copy of the base: the first is loaded with
``load_for_inference``, the others are added with ``PeftModel.load_adapter`` and chosen per request with
``set_adapter``. Runs on different bases (or full models) get a model each. Every generation, streamed or not,
holds one lock from ``set_adapter`` to its last token, so concurrent requests never mix adapters or outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tuneforge.errors import UserError


@dataclass
class Settings:
    """Generation settings of one request."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Served:
    """One servable name: its model (possibly shared with other adapters), adapter name, tokenizer, template."""

    name: str
    source: str
    model: Any
    tokenizer: Any
    template: Any
    adapter_name: str | None = None
    base: str | None = None

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def served_name(spec: str, taken: set[str]) -> tuple[str, str]:
    """``(name, path)`` for a ``NAME=PATH`` or ``PATH`` argument; the name defaults to the run's folder name."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if not name:
            raise UserError(f"{spec!r}: empty model name before '='")
        if name in taken:
            raise UserError(f"model name {name!r} is given twice")
        return name, path
    path = Path(spec)
    name = path.parent.name if path.name == "final" else (path.name or path.resolve().name)
    base, number = name, 2
    while name in taken:
        name, number = f"{base}-{number}", number + 1
    return name, spec


class Engine:
    """Holds the served models and runs generation under one lock.

    Args:
        specs: run directories / adapter dirs / model dirs (optionally ``NAME=PATH``).
        device: passed to ``load_for_inference``.
    """

    def __init__(self, specs: list[str], device: str = "auto"):
        from tuneforge.models.load import load_tokenizer
        from tuneforge.models.reference import load_for_inference, load_template, resolve

        if not specs:
            raise UserError("give at least one run, adapter or model directory to serve")
        self.lock = threading.Lock()
        self.models: dict[str, Served] = {}
        shared: dict[str, Any] = {}  # base → PeftModel already holding adapters of that base
        for spec in specs:
            name, path = served_name(spec, set(self.models))
            resolved = resolve(path)
            if resolved.adapter is not None and resolved.base in shared:
                model = shared[resolved.base]
                adapter_name = _adapter_key(name)
                model.load_adapter(resolved.adapter, adapter_name=adapter_name)
                model.eval()
                tokenizer = load_tokenizer(resolved.tokenizer, what=path)
                template = load_template(resolved.template_dir, tokenizer)
                self.models[name] = Served(name, path, model, tokenizer, template, adapter_name, resolved.base)
                continue
            loaded = load_for_inference(path, device=device)
            adapter_name = None
            if loaded.adapter is not None:
                adapter_name = loaded.model.active_adapter
                shared[loaded.base] = loaded.model
            self.models[name] = Served(name, path, loaded.model, loaded.tokenizer, loaded.template, adapter_name,
                                       loaded.base)

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> Served:
        """The served model ``name``; KeyError when unknown."""
        return self.models[name]

    # ------------------------------------------------------------------ prompts

    def prompt_ids(self, served: Served, prompt: str | list[dict]) -> list[int]:
        """Token ids the model will see for ``prompt`` (messages rendered with the run's template)."""
        from tuneforge.models.generation import render_prompt

        text, add_special = render_prompt(served.tokenizer, served.template, prompt)
        return served.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def count_tokens(self, served: Served, text: str) -> int:
        return len(served.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ generation

    def generate(self, served: Served, prompt: str | list[dict], settings: Settings) -> str:
        """The whole completion (blocking; one request at a time)."""
        from tuneforge.models.generation import generate

        with self.lock:
            self._activate(served)
            return generate(served.model, served.tokenizer, self._template(served, settings), [prompt],
                            _settings(settings))[0]

    def stream(self, served: Served, prompt: str | list[dict], settings: Settings,
               cancelled: threading.Event | None = None) -> Iterator[str]:
        """Yield the completion piece by piece.

        The generation runs in its own thread holding the lock from start to end; setting ``cancelled`` (e.g. the
        client went away) stops it at the next piece and frees the lock. Errors are re-raised to the consumer.
        """
        from tuneforge.models.generation import stream_generate

        pieces: queue.Queue = queue.Queue()
        cancelled = cancelled or threading.Event()
        end = object()

        def produce():
            try:
                with self.lock:
                    self._activate(served)
                    # closing(): stop the generation thread at once when cancelled, before the lock is released
                    with contextlib.closing(stream_generate(served.model, served.tokenizer,
                                                            self._template(served, settings), prompt,
                                                            _settings(settings))) as stream:
                        for piece in stream:
                            if cancelled.is_set():
                                break
                            pieces.put(piece)
            except BaseException as exc:  # handed to the consumer
                pieces.put(exc)
            finally:
                pieces.put(end)

        worker = threading.Thread(target=produce, daemon=True, name=f"generate-{served.name}")
        worker.start()
        try:
            while True:
                item = pieces.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()

    def _activate(self, served: Served) -> None:
        if served.adapter_name is not None:
            served.model.set_adapter(served.adapter_name)

    @staticmethod
    def _template(served: Served, settings: Settings):
        """The run's template, with the request's extra stop strings added."""
        if not settings.stop:
            return served.template
        if served.template is None:
            return SimpleNamespace(stop=list(settings.stop))
        return dataclasses.replace(served.template, stop=[*served.template.stop, *settings.stop])


def _settings(settings: Settings):
    from tuneforge.models.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              top_p=settings.top_p, top_k=settings.top_k,
                              repetition_penalty=settings.repetition_penalty, seed=settings.seed)


def _adapter_key(name: str) -> str:
    # peft adapter names become module attribute keys: no dots
    return "tf_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)
