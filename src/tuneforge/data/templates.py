"""Chat templates: Jinja strings rendered exactly like ``tokenizer.apply_chat_template``, plus stop strings.

A :class:`ChatTemplate` is what training, generation and serving share: the run directory stores it
(``template.json`` + ``chat_template.jinja``) so that every later command renders prompts as training did.
Built-ins: ``chatml``, ``llama3``, ``alpaca``, ``plain``. ``auto`` means the tokenizer's own template when it has
one, else ``chatml`` when the tokenizer has ``<|im_start|>``/``<|im_end|>`` as single tokens, else ``plain``.
Every built-in ends each assistant turn with an end-of-turn marker or the EOS token, so the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError, did_you_mean

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


@dataclass
class ChatTemplate:
    """A named Jinja chat template and the end-of-turn strings generation stops at (besides EOS)."""

    name: str
    jinja: str
    stop: list[str] = field(default_factory=list)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tokenizer: Any = None) -> str:
        """Render ``messages`` as ``tokenizer.apply_chat_template(..., tokenize=False)`` would.

        ``bos_token``/``eos_token`` (and the tokenizer's other special tokens) come from ``tokenizer``; without a
        tokenizer they are undefined and render as empty strings.

        Raises:
            UserError: when the template fails on these messages (naming the template).
        """
        variables = dict(getattr(tokenizer, "special_tokens_map", None) or {})
        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return _compile(self.jinja).render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as exc:  # jinja2 TemplateError / UndefinedError raised by the template itself
            if type(exc).__module__.startswith("jinja2") or type(exc).__name__ == "TemplateError":
                raise UserError(
                    f"chat template {self.name!r} failed to render a conversation with roles "
                    f"{[m['role'] for m in msgs]}: {exc}. Choose another model.chat_template (e.g. chatml)"
                ) from None
            raise

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
        """``{"name", "jinja", "stop"}`` (JSON-serialisable)."""
        return {"name": self.name, "jinja": self.jinja, "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict) -> ChatTemplate:
        """Inverse of :meth:`to_dict`."""
        return cls(name=str(data["name"]), jinja=str(data["jinja"]), stop=list(data.get("stop") or []))

    def save(self, directory: str | Path) -> None:
        """Write ``template.json`` and ``chat_template.jinja`` into ``directory`` (each atomically)."""
        from tuneforge.utils import atomic_write_json, atomic_write_text

        directory = Path(directory)
        atomic_write_json(directory / "template.json", self.to_dict())
        atomic_write_text(directory / "chat_template.jinja", self.jinja)

    @classmethod
    def load(cls, directory: str | Path) -> ChatTemplate | None:
        """Read a template saved by :meth:`save`; a bare ``chat_template.jinja`` also works. None if neither."""
        directory = Path(directory)
        meta = directory / "template.json"
        if meta.is_file():
            try:
                return cls.from_dict(json.loads(meta.read_text(encoding="utf-8")))
            except (json.JSONDecodeError, KeyError) as exc:
                raise UserError(f"{meta}: not a valid template file ({exc})") from None
        jinja_file = directory / "chat_template.jinja"
        if jinja_file.is_file():
            jinja = jinja_file.read_text(encoding="utf-8")
            return cls(name="file", jinja=jinja, stop=_guess_stop(jinja))
        return None


BUILTIN = {
    "chatml": ChatTemplate("chatml", CHATML, ["<|im_end|>"]),
    "llama3": ChatTemplate("llama3", LLAMA3, ["<|eot_id|>"]),
    "alpaca": ChatTemplate("alpaca", ALPACA, []),
    "plain": ChatTemplate("plain", PLAIN, []),
}
TEMPLATE_NAMES = ("auto", *BUILTIN)


def get_template(name: str) -> ChatTemplate:
    """A fresh copy of a built-in template. Raises UserError listing the known names."""
    if name not in BUILTIN:
        raise UserError(
            f"model.chat_template: unknown template {name!r}{did_you_mean(name, TEMPLATE_NAMES)}; "
            f"known: {', '.join(TEMPLATE_NAMES)}"
        )
    return ChatTemplate.from_dict(BUILTIN[name].to_dict())


def resolve_template(name: str, tokenizer: Any) -> ChatTemplate:
    """The template a run uses.

    ``auto``: the tokenizer's own ``chat_template`` when it has one; else ``chatml`` when ``<|im_start|>`` and
    ``<|im_end|>`` are single tokens of the tokenizer; else ``plain``. Any other name is a built-in.

    Raises:
        UserError: unknown name (listing the known ones), or a tokenizer template whose assistant turns do not end
            with an end-of-turn marker or EOS.
    """
    if name != "auto":
        return get_template(name)
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if isinstance(own, str) and own.strip():
        template = ChatTemplate("tokenizer", own, _guess_stop(own))
        check_turn_end(template, tokenizer)
        return template
    if all(_is_single_token(tokenizer, t) for t in ("<|im_start|>", "<|im_end|>")):
        return get_template("chatml")
    return get_template("plain")


def check_turn_end(template: ChatTemplate, tokenizer: Any) -> None:
    """Raise UserError unless an assistant turn rendered by ``template`` ends with a stop string or EOS."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    full = template.render(messages, tokenizer=tokenizer).rstrip()
    endings = [*template.stop, *([tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else [])]
    if not any(full.endswith(end) for end in endings if end):
        raise UserError(
            f"chat template {template.name!r} does not end an assistant turn with an end-of-turn marker or EOS "
            f"(rendered: {full[-60:]!r}), so a model trained on it would never learn to stop. "
            "Set model.chat_template to a built-in (chatml, llama3, alpaca, plain)"
        )


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
