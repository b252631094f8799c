"""The models a server holds.

Several runs that are adapters of the same base share one copy of the base: the first is loaded with
``load_for_inference``, the others are added with ``PeftModel.load_adapter`` and chosen per batch with
``set_adapter`` (the scheduler only batches work of one model and adapter together). Runs on different bases (or
full models) get a model each. Names are checked at start: two names that peft would store under the same adapter
key (``x-1`` and ``x_1``) are refused.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError
from tuneforge.serve.scheduler import Scheduler


@dataclass(eq=False)
class Served:
    """One servable name: its model (possibly shared with other adapters), adapter name, tokenizer, template.

    ``tokenizer`` is used by the generating thread only; request handlers encode with ``encode`` (their own copy of
    the tokenizer under a lock: a Rust tokenizer used from two threads at once can fail with "Already borrowed").
    """

    name: str
    source: str
    model: Any
    tokenizer: Any
    template: Any
    adapter_name: str | None = None
    base: str | None = None
    _encoder: Any = field(default=None, repr=False)
    _encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int | None:
        config = getattr(self.model, "config", None)
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def pad_id(self) -> int:
        from tuneforge.models.generation import stop_token_ids

        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        stops = stop_token_ids(self.tokenizer, self.template, self.model)
        return stops[0] if stops else 0

    def activate(self) -> None:
        """Make this name's adapter the active one (generating thread only)."""
        if self.adapter_name is not None:
            self.model.set_adapter(self.adapter_name)

    def prompt_ids(self, prompt: str | list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids the model sees for a text prompt (as-is) or chat messages (rendered with the run's template)."""
        from tuneforge.models.generation import render_prompt

        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            if tools and not isinstance(prompt, str):
                text, add_special = self.template.render(prompt, add_generation_prompt=True,
                                                         tokenizer=self._encoder, tools=tools), False
            else:
                text, add_special = render_prompt(self._encoder, self.template, prompt)
            return self._encoder(text, add_special_tokens=add_special)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (request handlers' side)."""
        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            return self._encoder.decode(ids, skip_special_tokens=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        """The text of each token on its own (for log-prob listings)."""
        with self._encode_lock:
            if self._encoder is None:
                self._encoder = copy.deepcopy(self.tokenizer)
            return [self._encoder.decode([i], skip_special_tokens=False) for i in ids]


def adapter_key(name: str) -> str:
    """The peft adapter name a served name is stored under (module attribute keys: letters, digits, ``_``)."""
    return "tf_" + "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def served_names(specs: list[str]) -> list[tuple[str, str]]:
    """``(name, path)`` per ``NAME=PATH`` or ``PATH`` argument (the name defaults to the run's folder name; repeated
    folder names get ``-2``, ``-3``...).

    Raises:
        UserError: an empty name, a name given twice, or two names that collide once normalised to adapter keys.
    """
    pairs: list[tuple[str, str]] = []
    taken: set[str] = set()
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, path = spec.split("=", 1)
            if not name:
                raise UserError(f"{spec!r}: empty model name before '='")
            if name in taken:
                raise UserError(f"model name {name!r} is given twice")
        else:
            path = spec
            folder = Path(spec)
            base = folder.parent.name if folder.name == "final" else (folder.name or folder.resolve().name)
            name, number = base, 2
            while name in taken:
                name, number = f"{base}-{number}", number + 1
        taken.add(name)
        pairs.append((name, path))
    keys: dict[str, str] = {}
    for name, _ in pairs:
        other = keys.setdefault(adapter_key(name), name)
        if other != name:
            raise UserError(f"served names {other!r} and {name!r} collide (both become adapter {adapter_key(name)!r}); "
                            "rename one with NAME=PATH using letters, digits and '_' or '-' differently")
    return pairs


class Engine:
    """Holds the served models and the scheduler that batches work on them.

    Args:
        specs: run directories / adapter dirs / model dirs (optionally ``NAME=PATH``).
        device: passed to ``load_for_inference``.
        dtype: a ``torch.dtype`` (default: ``load_for_inference``'s choice for the device).
        max_batch_size: most generations run together.
        max_queue: most generations waiting before requests are answered 429.
    """

    def __init__(self, specs: list[str], device: str = "auto", *, dtype: Any = None, max_batch_size: int = 16,
                 max_queue: int = 64):
        from tuneforge.models.reference import load_for_inference, load_template, load_tokenizer_of, resolve

        if not specs:
            raise UserError("give at least one run, adapter or model directory to serve")
        self.models: dict[str, Served] = {}
        shared: dict[str, Any] = {}  # base → PeftModel already holding adapters of that base
        for name, path in served_names(specs):
            ref = resolve(path)
            if ref.adapter is not None and ref.base in shared:
                model = shared[ref.base]
                model.load_adapter(ref.adapter, adapter_name=adapter_key(name))
                model.eval()
                tokenizer = load_tokenizer_of(ref)
                self.models[name] = Served(name, path, model, tokenizer, load_template(ref.template_dir, tokenizer),
                                           adapter_key(name), ref.base)
                continue
            loaded = load_for_inference(ref, device=device, dtype=dtype)
            adapter_name = None
            if ref.adapter is not None:
                adapter_name = loaded.model.active_adapter
                shared[ref.base] = loaded.model
            self.models[name] = Served(name, path, loaded.model, loaded.tokenizer, loaded.template, adapter_name,
                                       ref.base)
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_queue=max_queue)

    def names(self) -> list[str]:
        return list(self.models)

    def get(self, name: str) -> Served:
        """The served model ``name``; KeyError when unknown."""
        return self.models[name]
