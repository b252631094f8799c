"""Text generation with a chat template: batched (left-padded) and streaming.

Generation stops at the tokenizer's EOS and at the template's stop tokens; the returned text is only the newly
generated part, cut before the first stop string. ``template`` is a ``tuneforge.data.templates.ChatTemplate``
(anything with ``render(messages, add_generation_prompt)``, ``stop`` and ``stop_token_ids(tokenizer)``), or
``None`` to use the tokenizer's own chat template for message lists.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuneforge.errors import UserError

Prompt = str | Sequence[dict]


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: the one settings type of generate, eval, abtest, report, the monitor, serve and chat.

    Attributes:
        max_new_tokens: generation budget per prompt.
        temperature: 0 = greedy (deterministic, the default); > 0 samples with ``top_p`` / ``top_k``.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        repetition_penalty: 1.0 = none.
        seed: seeds torch's RNG before sampling (``None``: do not reseed). Irrelevant when greedy.
        stop: extra stop strings (besides the template's end-of-turn and EOS).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_args(cls, args: Any, **overrides) -> GenerationSettings:
        """Settings from the flags :func:`add_generation_args` declared (``overrides`` win).

        Raises:
            UserError: a flag out of range, named as the user typed it.
        """
        values = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
        values.update(overrides)
        settings = cls(**values)
        problem = settings.problem()
        if problem:
            raise UserError(f"--{problem[0].replace('_', '-')} {problem[1]}")
        return settings

    def problem(self) -> tuple[str, str] | None:
        """``(field, what is wrong)`` for the first out-of-range value, or ``None`` when every value is valid."""
        checks = (
            ("max_new_tokens", self.max_new_tokens > 0, "must be a positive number of tokens"),
            ("temperature", self.temperature >= 0, "must be >= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 = off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1.0 = none)"),
        )
        return next(((name, why) for name, ok, why in checks if not ok), None)


_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def add_generation_args(parser: Any, *, max_new_tokens: int = GenerationSettings.max_new_tokens) -> None:
    """Declare the generation flags every command shares (same names, same defaults)."""
    defaults = GenerationSettings(max_new_tokens=max_new_tokens)
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                       help=f"tokens to generate per answer (default {defaults.max_new_tokens})")
    group.add_argument("--temperature", type=float, default=defaults.temperature,
                       help="0 = greedy (default); > 0 samples")
    group.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling mass (default 1.0 = off)")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="top-k sampling (default 0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty,
                       help="default 1.0 = none")
    group.add_argument("--seed", type=int, default=defaults.seed,
                       help=f"sampling seed (default {defaults.seed}: the same command gives the same answers)")


def render_prompt(tokenizer: Any, template: Any, prompt: Prompt) -> tuple[str, bool]:
    """The text to feed the model for one prompt, and whether the tokenizer should add its special tokens.

    A plain string is used as-is (special tokens such as BOS added by the tokenizer); a list of chat messages is
    rendered with ``add_generation_prompt=True`` (the template writes BOS itself).
    """
    if isinstance(prompt, str):
        return prompt, True
    messages = list(prompt)
    if template is not None:
        # The tokenizer supplies bos_token/eos_token to the template, exactly as in training (data.tokenize).
        return template.render(messages, add_generation_prompt=True, tokenizer=tokenizer), False
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    raise UserError("chat messages were given but there is no chat template (model.chat_template) to render them")


def stop_strings(tokenizer: Any, template: Any, extra: Sequence[str] = ()) -> list[str]:
    """Strings at which generated text is cut: the template's stop strings, the EOS token text and ``extra``."""
    stops = [*(getattr(template, "stop", None) or []), *extra]
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return [s for s in stops if s]


def stop_token_ids(tokenizer: Any, template: Any, model: Any = None) -> list[int]:
    """Token ids that end generation: EOS (tokenizer's and the model's generation config) and template stops."""
    ids: list[int] = []

    def add(value):
        if value is None:
            return
        for item in value if isinstance(value, (list, tuple, set)) else [value]:
            if item is not None and int(item) not in ids:
                ids.append(int(item))

    add(tokenizer.eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        add(generation_config.eos_token_id)
    if template is not None and hasattr(template, "stop_token_ids"):
        add(template.stop_token_ids(tokenizer))
    return ids


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for stop in stops:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut]


# Below this temperature, logits / T overflows float32 and sampling raises: such a request is greedy in effect.
MIN_SAMPLING_TEMPERATURE = 1e-4


def _generation_config(stop_ids, pad_id, settings: GenerationSettings):
    from transformers import GenerationConfig

    sampling = settings.temperature >= MIN_SAMPLING_TEMPERATURE
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=sampling, eos_token_id=stop_ids or None,
                  pad_token_id=pad_id, repetition_penalty=settings.repetition_penalty, use_cache=True)
    if sampling:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or 0)
    else:
        # Explicit neutral values: the model's own generation_config may carry sampling defaults.
        kwargs.update(temperature=1.0, top_p=1.0, top_k=None)
    return GenerationConfig(**kwargs)


def _setup(model, tokenizer, template, settings: GenerationSettings):
    """Stop strings, stop ids, pad id and the generation config shared by :func:`generate` and streaming."""
    stops = stop_strings(tokenizer, template, settings.stop)
    stop_ids = stop_token_ids(tokenizer, template, model)
    pad_id = _pad_id(tokenizer, stop_ids)
    return stops, stop_ids, pad_id, _generation_config(stop_ids, pad_id, settings)


def _encode(tokenizer, template, prompts: Sequence[Prompt]) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
        text, add_special = render_prompt(tokenizer, template, prompt)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        encoded.append(ids)
    return encoded


def _left_pad(rows: list[list[int]], pad_id: int, device):
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[i, width - len(row):] = 1
    return input_ids.to(device), attention.to(device)


def _pad_id(tokenizer, stop_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop_ids[0] if stop_ids else 0


def _device(model):
    return next(model.parameters()).device


class _EvalMode:
    """Put the model in eval mode for the block (no dropout) and restore its previous mode after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


@dataclass(frozen=True)
class Completion:
    """One generated answer.

    Attributes:
        text: the new text only, cut before the first stop string.
        token_ids: the generated token ids up to (not including) the stop token; never more than
            ``max_new_tokens``.
        finish_reason: ``"stop"`` (a stop token or stop string ended it) or ``"length"`` (the budget ran out).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


def complete(model: Any, tokenizer: Any, template: Any, messages_or_prompts: Sequence[Prompt],
             settings: GenerationSettings | None = None, *, batch_size: int = 8) -> list[Completion]:
    """Generate a :class:`Completion` for each prompt, ``batch_size`` prompts per left-padded batch.

    Args:
        model: a causal LM (or peft model); its train/eval mode is restored afterwards.
        tokenizer: its tokenizer.
        template: a ``ChatTemplate`` for message lists, or ``None`` (tokenizer's own template).
        messages_or_prompts: each item a plain string (used as-is) or a list of ``{"role", "content"}`` dicts.
        settings: how to generate (default: greedy, 128 new tokens).
        batch_size: prompts per batch.
    """
    import torch

    if isinstance(messages_or_prompts, str):
        raise TypeError("messages_or_prompts must be a list of prompts or of message lists, not one string")
    settings = settings or GenerationSettings()
    stops, stop_ids, pad_id, config = _setup(model, tokenizer, template, settings)
    if settings.seed is not None and settings.sampling:
        torch.manual_seed(settings.seed)
    encoded = _encode(tokenizer, template, list(messages_or_prompts))
    device = _device(model)
    results: list[Completion] = []
    with _EvalMode(model), torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            rows = encoded[start:start + batch_size]
            input_ids, attention = _left_pad(rows, pad_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
            for row in output[:, input_ids.shape[1]:].tolist():
                results.append(_completion(tokenizer, row, stop_ids, stops, settings.max_new_tokens))
    return results


def generate(model: Any, tokenizer: Any, template: Any, messages_or_prompts: Sequence[Prompt],
             settings: GenerationSettings | None = None, *, batch_size: int = 8) -> list[str]:
    """The text of :func:`complete` for each prompt: only the new text, cut before the first stop string
    (template stops, EOS or ``settings.stop``); whitespace is kept as generated."""
    return [c.text for c in complete(model, tokenizer, template, messages_or_prompts, settings,
                                     batch_size=batch_size)]


def _completion(tokenizer, ids: list[int], stop_ids: list[int], stops: list[str], budget: int) -> Completion:
    stopped = False
    for index, token in enumerate(ids):
        if token in stop_ids:
            ids, stopped = ids[:index], True
            break
    else:
        ids = ids[:budget]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    text = cut_at_stop(decoded, stops)
    # token_ids stay the tokens actually generated (a stop string's own tokens included): usage counts them.
    stopped = stopped or len(text) < len(decoded)
    return Completion(text, tuple(ids), "stop" if stopped or len(ids) < budget else "length")


def stream_generate(model: Any, tokenizer: Any, template: Any, prompt: Prompt,
                    settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece as it is generated (for serve and chat).

    Same arguments and stopping rules as :func:`generate`; the concatenated pieces equal what :func:`generate`
    returns for the same prompt and settings. Text that might be the start of a stop string is held back until
    it is known not to be one. Breaking out of the loop (or closing the generator) stops the generation thread at
    its next token.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    settings = settings or GenerationSettings()
    stops, stop_ids, pad_id, config = _setup(model, tokenizer, template, settings)
    input_ids, attention = _left_pad(_encode(tokenizer, template, [prompt]), pad_id, _device(model))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    cancelled = threading.Event()
    failure: list[BaseException] = []

    class _Cancel(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            return torch.full((ids.shape[0],), cancelled.is_set(), dtype=torch.bool, device=ids.device)

    def run():
        try:
            if settings.seed is not None and settings.sampling:
                torch.manual_seed(settings.seed)
            with _EvalMode(model), torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                               streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancel()]))
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    emitted = ""
    text = ""
    finished = False
    try:
        for piece in streamer:
            text += piece
            cut = cut_at_stop(text, stops)
            if len(cut) < len(text):  # a stop string appeared: emit up to it and stop
                if len(cut) > len(emitted):
                    yield cut[len(emitted):]
                return
            safe = len(text) - held_back(text, stops)
            if safe > len(emitted):
                yield text[len(emitted):safe]
                emitted = text[:safe]
        finished = True
        if len(text) > len(emitted):
            yield text[len(emitted):]
    finally:
        cancelled.set()
        if not finished:  # drain until the thread's end signal (a finished streamer would block forever)
            for _ in streamer:
                pass
        thread.join()
    if failure:
        raise failure[0]


def held_back(text: str, stops: Sequence[str]) -> int:
    """Trailing characters of ``text`` not to show yet: the start of a possible stop string, or an incomplete
    character (the replacement character a partial UTF-8 sequence decodes to)."""
    longest = len(text) - len(text.rstrip("\ufffd"))
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest
