"""Chat templates: Jinja strings rendered exactly like ``tokenizer.apply_chat_template``, plus what rendering needs.

A :class:`ChatTemplate` is what training, generation and serving share: its Jinja, stop strings, template
variables (``model.chat_template_kwargs``), the token appended to answers of templates without an end-of-turn
marker (``turn_end``) and the system-role policy (``data.system_message``). The run directory stores it
(``template.json`` + ``chat_template.jinja``) so that every later command renders prompts as training did.
Built-ins: ``chatml``, ``llama3``, ``alpaca``, ``plain``. ``auto`` means the tokenizer's own template when it has
one, else ``chatml`` when the tokenizer has ``<|im_start|>``/``<|im_end|>`` as single tokens, else ``plain``.
Every template ends each trained assistant turn with an end-of-turn marker or EOS, so the model learns to stop.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError, did_you_mean

#: the files a saved template is (``ChatTemplate.save``): the run directory's names (``models.reference.RUN_TEMPLATE``)
TEMPLATE_FILE = "template.json"
TEMPLATE_JINJA = "chat_template.jinja"

CHATML = (
    r"{% for message in messages %}"
    r"{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    r"{{ bos_token }}"
    r"{% for message in messages %}"
    r"{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ALPACA = (
    r"{% if messages and messages[0]['role'] == 'system' %}"
    r"{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = messages[1:] %}"
    r"{% else %}"
    r"{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}"
    r"{% set loop_messages = messages %}"
    r"{% endif %}"
    r"{% for message in loop_messages %}"
    r"{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

# The generation prompt ends with "Assistant:" (no space): the answer's first token then carries its own leading
# space, exactly as the model will produce it at inference.
PLAIN = (
    r"{% for message in messages %}"
    r"{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    r"{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    r"{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    r"{% endif %}"
    r"{% endfor %}"
    r"{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# End-of-turn markers looked for in a tokenizer's own template (its stop strings).
KNOWN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eot|>")
# Stands in for an answer when probing how a template wraps a turn (private-use characters: never real text).
SENTINEL = "\ue000tuneforge-answer\ue001"
SYSTEM_SENTINEL = "\ue000tuneforge-system\ue001"
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
SYSTEM_MESSAGE_POLICIES = ("fold", "drop", "error")
# Message keys passed to templates (others, e.g. a reader's bookkeeping, are not).
MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")


@dataclass
class ChatTemplate:
    """A named Jinja chat template plus everything rendering and stopping need.

    Attributes:
        name: a built-in name, ``tokenizer`` (the tokenizer's own) or ``file``.
        jinja: the template source.
        stop: end-of-turn strings generation stops at (besides EOS).
        kwargs: extra template variables (``model.chat_template_kwargs``, e.g. ``enable_thinking``), passed on
            every render: training, generate, eval and serve see the same prompt.
        turn_end: for templates that end an assistant turn with no marker at all (GLM-4, Baichuan2): the token
            appended to every trained answer (the tokenizer's EOS), so the model learns to stop where generation
            stops. None when the template ends turns itself.
        system_message: ``fold`` | ``drop`` | ``error``: what :meth:`render` does with system messages when the
            template refuses (or silently drops) the system role (``data.system_message``); applied at every
            rendering, so a served run treats a system prompt exactly as training did.
    """

    name: str
    jinja: str
    stop: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    turn_end: str | None = None
    system_message: str = "fold"

    @property
    def has_generation_markers(self) -> bool:
        """True when the template marks assistant output with ``{% generation %}`` blocks."""
        return bool(_GENERATION_MARKER.search(self.jinja))

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tokenizer: Any = None,
               tools: list[dict] | None = None) -> str:
        """Render ``messages`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

        ``bos_token``/``eos_token`` (and the tokenizer's other special tokens) come from ``tokenizer``; without a
        tokenizer they are undefined and render as empty strings. :attr:`kwargs` are passed as template
        variables; ``tools`` (OpenAI-style function schemas) as the ``tools`` variable.

        Raises:
            UserError: when the template fails on these messages (naming the template and the failure).
        """
        messages = self.prepare(messages, tokenizer)
        return self._render(messages, add_generation_prompt, tokenizer, tools, spans=False)[0]

    def render_with_spans(self, messages: list[dict], tokenizer: Any = None,
                          tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
        """Render (no generation prompt) and return the character spans of the ``{% generation %}`` blocks."""
        return self._render(self.prepare(messages, tokenizer), False, tokenizer, tools, spans=True)

    def prepare(self, messages: list[dict], tokenizer: Any = None) -> list[dict]:
        """``messages`` as this template renders them: system messages kept when the template accepts them,
        else (:attr:`system_message`) folded in front of the first user message (blank line between), dropped,
        or refused with a UserError."""
        if not any(m["role"] == "system" for m in messages) or self.accepts_system(tokenizer):
            return list(messages)
        if self.system_message == "error":
            raise UserError(
                f"chat template {self.name!r} does not accept a system message; set data.system_message: fold "
                "(prepend it to the first user message) or drop"
            )
        rest = [m for m in messages if m["role"] != "system"]
        if self.system_message == "drop":
            return rest
        text = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        for i, message in enumerate(rest):
            if message["role"] == "user":
                folded = f"{text}\n\n{message['content']}" if text else message["content"]
                return [*rest[:i], {**message, "content": folded}, *rest[i + 1:]]
        return rest  # no user turn to fold into yet (a history of only the system prompt): nothing to show

    def _render(self, messages, add_generation_prompt, tokenizer, tools, spans):
        variables = {k: v for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
        variables.update(self.kwargs)
        msgs = [_template_message(m) for m in messages]
        try:
            compiled = _compile(self.jinja)
            if spans:
                return _render_tracked(compiled, msgs, tools, variables)
            text = compiled.render(messages=msgs, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
            return text, []
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - raise_exception(), a TypeError in the template, a syntax error
            raise UserError(
                f"chat template {self.name!r} failed to render a conversation with roles "
                f"{[m['role'] for m in msgs]}: {type(exc).__name__}: {exc}"
            ) from None

    def end_markers(self, tokenizer: Any) -> list[str]:
        """Strings that end an assistant turn: the stop strings, then the tokenizer's EOS (no duplicates)."""
        eos = getattr(tokenizer, "eos_token", None)
        return [m for m in dict.fromkeys([*self.stop, *([eos] if isinstance(eos, str) else [])]) if m]

    def accepts_system(self, tokenizer: Any) -> bool:
        """Whether the template renders a system message (False when it raises on one or silently drops it)."""
        key = (self.jinja, tuple(sorted(self.kwargs.items(), key=str)), getattr(tokenizer, "name_or_path", None))
        if key not in _SYSTEM_CACHE:
            probe = [{"role": "system", "content": SYSTEM_SENTINEL}, {"role": "user", "content": "Hi"}]
            try:
                _SYSTEM_CACHE[key] = SYSTEM_SENTINEL in self._render(probe, True, tokenizer, None, False)[0]
            except UserError:
                _SYSTEM_CACHE[key] = False
        return _SYSTEM_CACHE[key]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids generation stops at: each stop string that is a single token, plus the EOS id (no duplicates)."""
        ids: list[int] = []
        for text in self.stop:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1:
                ids.append(int(encoded[0]))
        eos = tokenizer.eos_token_id
        for value in eos if isinstance(eos, list) else [eos]:
            if value is not None:
                ids.append(int(value))
        return list(dict.fromkeys(ids))

    def to_dict(self) -> dict:
        """``{"name", "jinja", "stop", "kwargs", "turn_end", "system_message"}`` (JSON-serialisable)."""
        return {"name": self.name, "jinja": self.jinja, "stop": list(self.stop), "kwargs": dict(self.kwargs),
                "turn_end": self.turn_end, "system_message": self.system_message}

    @classmethod
    def from_dict(cls, data: dict) -> ChatTemplate:
        """Inverse of :meth:`to_dict` (files written before the newer fields existed load with their defaults)."""
        return cls(name=str(data["name"]), jinja=str(data["jinja"]), stop=list(data.get("stop") or []),
                   kwargs=dict(data.get("kwargs") or {}), turn_end=data.get("turn_end"),
                   system_message=str(data.get("system_message") or "fold"))

    def save(self, directory: str | Path) -> None:
        """Write ``template.json`` and ``chat_template.jinja`` into ``directory`` (each atomically)."""
        from tuneforge.utils import atomic_write_json, atomic_write_text

        directory = Path(directory)
        atomic_write_json(directory / TEMPLATE_FILE, self.to_dict())
        atomic_write_text(directory / TEMPLATE_JINJA, self.jinja)

    @classmethod
    def load(cls, directory: str | Path) -> ChatTemplate | None:
        """Read a template saved by :meth:`save`; a bare ``chat_template.jinja`` also works. None if neither."""
        directory = Path(directory)
        meta = directory / TEMPLATE_FILE
        if meta.is_file():
            try:
                return cls.from_dict(json.loads(meta.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{meta}: not a valid template file ({exc})") from None
        jinja_file = directory / TEMPLATE_JINJA
        if jinja_file.is_file():
            jinja = jinja_file.read_text(encoding="utf-8")
            return cls(name="file", jinja=jinja, stop=_guess_stop(jinja))
        return None


_SYSTEM_CACHE: dict[Any, bool] = {}

BUILTIN = {
    "chatml": ChatTemplate("chatml", CHATML, ["<|im_end|>"]),
    "llama3": ChatTemplate("llama3", LLAMA3, ["<|eot_id|>"]),
    "alpaca": ChatTemplate("alpaca", ALPACA, []),
    "plain": ChatTemplate("plain", PLAIN, []),
}
TEMPLATE_NAMES = ("auto", *BUILTIN)


def get_template(name: str, kwargs: dict | None = None, system_message: str = "fold") -> ChatTemplate:
    """A fresh copy of a built-in template (with ``kwargs``). Raises UserError listing the known names."""
    if name not in BUILTIN:
        raise UserError(
            f"model.chat_template: unknown template {name!r}{did_you_mean(name, TEMPLATE_NAMES)}; "
            f"known: {', '.join(TEMPLATE_NAMES)}"
        )
    template = ChatTemplate.from_dict(BUILTIN[name].to_dict())
    template.kwargs = dict(kwargs or {})
    template.system_message = _policy(system_message)
    return template


def _policy(system_message: str) -> str:
    if system_message not in SYSTEM_MESSAGE_POLICIES:
        raise UserError(f"data.system_message {system_message!r} is not known; expected fold, drop or error")
    return system_message


def resolve_template(name: str, tokenizer: Any, kwargs: dict | None = None,
                     system_message: str = "fold") -> ChatTemplate:
    """The template a run uses.

    ``auto``: the tokenizer's own ``chat_template`` when it has one; else ``chatml`` when ``<|im_start|>`` and
    ``<|im_end|>`` are single tokens of the tokenizer; else ``plain``. Any other name is a built-in.
    ``kwargs`` (``model.chat_template_kwargs``) and ``system_message`` (``data.system_message``) travel with the
    template: every rendering applies them, in training and at inference.

    A tokenizer template's stop strings are the known end-of-turn markers it contains plus the special token
    that follows an answer in its rendering (``<|end|>``, ``<end_of_turn>``...). When nothing follows an answer
    (GLM-4, Baichuan2), answers are trained to end with the tokenizer's EOS (:attr:`ChatTemplate.turn_end`).

    Raises:
        UserError: unknown name (listing the known ones), a template that fails to render a simple
            conversation, or a marker-less template on a tokenizer without an EOS token.
    """
    if name != "auto":
        return get_template(name, kwargs, system_message)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if isinstance(own, str) and own.strip():
        template = ChatTemplate("tokenizer", own, _guess_stop(own), dict(kwargs or {}),
                                system_message=_policy(system_message))
        _complete_turn_end(template, tokenizer)
        return template
    if all(_is_single_token(tokenizer, t) for t in ("<|im_start|>", "<|im_end|>")):
        return get_template("chatml", kwargs, system_message)
    return get_template("plain", kwargs, system_message)


def turn_suffix(template: ChatTemplate, tokenizer: Any) -> str:
    """What the template writes right after an assistant answer (a one-turn conversation, leading spaces kept)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    text = template.render(messages, tokenizer=tokenizer)
    index = text.find(SENTINEL)
    return text[index + len(SENTINEL):] if index >= 0 else ""


def _complete_turn_end(template: ChatTemplate, tokenizer: Any) -> None:
    """Add the special token that closes an answer to ``stop``; set ``turn_end`` when there is none."""
    suffix = turn_suffix(template, tokenizer).lstrip()
    markers = template.end_markers(tokenizer)
    if any(suffix.startswith(m) for m in markers):
        return
    special = sorted((t for t in _special_tokens(tokenizer) if t and suffix.startswith(t)), key=len, reverse=True)
    if special:
        template.stop.append(special[0])
        return
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise UserError(
            f"chat template {template.name!r} ends an assistant turn with no end-of-turn marker and the tokenizer "
            "has no eos_token, so a model trained on it would never learn to stop. Give the tokenizer an "
            "eos_token or set model.chat_template to a built-in (chatml, llama3, alpaca, plain)"
        )
    template.turn_end = eos


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = list(getattr(tokenizer, "all_special_tokens", None) or [])
    tokens += [str(t) for t in (getattr(tokenizer, "added_tokens_encoder", None) or {})]
    return list(dict.fromkeys(tokens))


def _template_message(message: dict) -> dict:
    """The keys a template may read, without None values (many templates render a literal 'None')."""
    return {k: message[k] for k in MESSAGE_KEYS if k in message and message[k] is not None}


def _render_tracked(compiled, messages, tools, variables) -> tuple[str, list[tuple[int, int]]]:
    from transformers.utils.chat_template_utils import _render_with_assistant_indices

    text, indices = _render_with_assistant_indices(compiled, messages, tools, None, False, **variables)
    return text, [(int(s), int(e)) for s, e in indices]


def _is_single_token(tokenizer: Any, text: str) -> bool:
    try:
        return len(tokenizer.encode(text, add_special_tokens=False)) == 1
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode it does not have it
        return False


def _guess_stop(jinja: str) -> list[str]:
    return [marker for marker in KNOWN_END_MARKERS if marker in jinja]


def _compile(jinja: str):
    """The compiled template, in transformers' own sandboxed environment when transformers is importable."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - transformers is a dependency; keep a faithful fallback
        return _fallback_compile(jinja)
    return _compile_jinja_template(jinja)


_FALLBACK_CACHE: dict[str, Any] = {}


def _fallback_compile(jinja: str):
    """The same settings transformers uses (sandbox, trim_blocks, lstrip_blocks, loopcontrols, tojson)."""
    if jinja not in _FALLBACK_CACHE:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )
        env.globals["raise_exception"] = raise_exception
        _FALLBACK_CACHE[jinja] = env.from_string(jinja)
    return _FALLBACK_CACHE[jinja]
