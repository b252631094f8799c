"""Text generation with a chat template: settings, prompt rendering, stop rules, and the calls every command uses.

:func:`complete`, :func:`generate` and :func:`stream_generate` render and tokenise prompts, then run the one decoding
loop, :func:`tuneforge.models.decoding.decode_rows` (which serve calls directly for its per-row batches). Generation
stops at the tokenizer's EOS and at the template's stop tokens; the returned text is only the newly
generated part, cut before the first stop string. ``template`` is a ``tuneforge.data.templates.ChatTemplate``
(anything with ``render(messages, add_generation_prompt)``, ``stop`` and ``stop_token_ids(tokenizer)``), or
``None`` to use the tokenizer's own chat template for message lists.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tuneforge.errors import UserError
from tuneforge.models.decoding import DecodeRow, decode_rows

# The settings type and the stop rules live in models.sampling (under decoding); re-exported: commands import
# them from here.
from tuneforge.models.sampling import (  # noqa: F401
    MIN_SAMPLING_TEMPERATURE,
    GenerationSettings,
    cut_at_stop,
    held_back,
    stop_strings,
    stop_token_ids,
)

Prompt = str | Sequence[dict]


def refuse_reward_model(model: Any, command: str) -> None:
    """Stop ``command`` (serve, chat, generate) before it loads a reward model: it scores text, it cannot write any.

    Args:
        model: the run / model reference as the user gave it (a path, or a resolved ``ModelRef``).
        command: the command that was asked for, named in the message.

    Raises:
        UserError: ``model`` is a reward model (a ``stage: rm`` run, a SEQ_CLS adapter, a one-output
            sequence-classification directory), naming it and ``tuneforge score`` as the command for it.
    """
    from tuneforge.models.reference import resolve

    ref = model if hasattr(model, "head") else resolve(str(model))
    if ref.head == "reward":
        raise UserError(f"{ref.given}: is a reward model (stage: rm, a score head with one output): it scores "
                        f"answers and cannot generate text, so `tuneforge {command}` cannot use it. Score records "
                        f"with it: tuneforge score {ref.given} --data FILE --out scores.jsonl (or use it as a GRPO "
                        "reward: rewards: [{model: RUN}])")

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


def _encode(tokenizer, template, prompts: Sequence[Prompt]) -> list[list[int]]:
    encoded = []
    for prompt in prompts:
        text, add_special = render_prompt(tokenizer, template, prompt)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
        encoded.append(ids)
    return encoded


def _row_settings(settings: GenerationSettings, index: int) -> GenerationSettings:
    """Prompt ``index``'s settings: a seeded sampling call gives each prompt its own seed (``seed + index``), so
    repeated prompts differ from each other yet every answer is reproducible (serve does the same for ``n``)."""
    if index == 0 or settings.seed is None or not settings.sampling:
        return settings
    return replace(settings, seed=settings.seed + index)


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
        token_ids: the generated token ids up to (not including) the stop token, or up to the token that
            completed a stop string; never more than ``max_new_tokens``.
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

    The decoding itself is :func:`tuneforge.models.decoding.decode_rows` (the one decoding loop, also serve's):
    greedy answers are the arg-max of the raw (repetition-penalised) logits and do not depend on ``batch_size``;
    sampled answers draw from a generator per prompt seeded with ``settings.seed + index`` (OS entropy when
    ``seed`` is ``None``), so the same call gives the same answers whatever ``batch_size`` is.

    Args:
        model: a causal LM (or peft model); its train/eval mode is restored afterwards.
        tokenizer: its tokenizer.
        template: a ``ChatTemplate`` for message lists, or ``None`` (tokenizer's own template).
        messages_or_prompts: each item a plain string (used as-is) or a list of ``{"role", "content"}`` dicts.
        settings: how to generate (default: greedy, 128 new tokens).
        batch_size: prompts per batch.
    """
    if isinstance(messages_or_prompts, str):
        raise TypeError("messages_or_prompts must be a list of prompts or of message lists, not one string")
    settings = settings or GenerationSettings()
    rows = [DecodeRow(ids, _row_settings(settings, i))
            for i, ids in enumerate(_encode(tokenizer, template, list(messages_or_prompts)))]
    results: list[Completion] = []
    with _EvalMode(model):
        for start in range(0, len(rows), batch_size):
            for row in decode_rows(model, tokenizer, template, rows[start:start + batch_size]):
                results.append(Completion(row.text, row.token_ids, row.finish_reason))
    return results


def generate(model: Any, tokenizer: Any, template: Any, messages_or_prompts: Sequence[Prompt],
             settings: GenerationSettings | None = None, *, batch_size: int = 8) -> list[str]:
    """The text of :func:`complete` for each prompt: only the new text, cut before the first stop string
    (template stops, EOS or ``settings.stop``); whitespace is kept as generated."""
    return [c.text for c in complete(model, tokenizer, template, messages_or_prompts, settings,
                                     batch_size=batch_size)]


_END = object()  # the decoding thread's last queue item


def stream_generate(model: Any, tokenizer: Any, template: Any, prompt: Prompt,
                    settings: GenerationSettings | None = None) -> Iterator[str]:
    """Yield the completion of one prompt piece by piece as it is generated (for serve and chat).

    Same arguments and stopping rules as :func:`generate`; the concatenated pieces equal what :func:`generate`
    returns for the same prompt and settings (sampled ones included: same seed). Text that might be the start of
    a stop string is held back until it is known not to be one. Breaking out of the loop (or closing the
    generator) stops the generation thread at its next token.
    """
    settings = settings or GenerationSettings()
    pieces: queue.SimpleQueue = queue.SimpleQueue()
    row = DecodeRow(_encode(tokenizer, template, [prompt])[0], settings,
                    on_event=lambda event: pieces.put(event.text))
    failure: list[BaseException] = []

    def run():
        try:
            with _EvalMode(model):
                decode_rows(model, tokenizer, template, [row])
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
        finally:
            pieces.put(_END)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        while (piece := pieces.get()) is not _END:
            if piece:
                yield piece
    finally:
        row.cancelled.set()  # a consumer that stopped early ends the row at its next token
        thread.join()
    if failure:
        raise failure[0]
