"""How one token is chosen, and when a row stops: the settings type, the sane ranges of its values, stop rules, and
the per-row token choice (penalties, temperature, top-k, top-p, a seeded draw).

This module sits under both :mod:`tuneforge.models.decoding` (the batched decoding loop) and
:mod:`tuneforge.models.generation` (prompt rendering and the calls commands use); it imports neither, so the two
never import each other in a circle. ``generation`` re-exports the names that commands have always imported from it.

Token choice is robust by construction: it computes in float32, clamps the scores to finite values, and falls back to
the arg-max when a row's distribution is not finite or sums to zero, so no NaN or inf ever reaches
``torch.multinomial`` (one request with extreme settings cannot fail the batch it shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tuneforge.errors import UserError

# Below this temperature, logits / T overflows float32 and sampling raises: such a request is greedy in effect.
MIN_SAMPLING_TEMPERATURE = 1e-4

# The sane range of every sampling value: what the server's schema and GenerationSettings.problem() accept.
# (low, high, low_inclusive). The repetition penalty multiplies/divides logits: 1e-30 turns them into 0 or inf in
# float32, values near 0 make degenerate text ("ststst"); 0.1..10 covers every useful setting.
BOUNDS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1_000_000, True),
    "repetition_penalty": (0.1, 10.0, True),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
}

# Scores are clamped to this magnitude before sampling: softmax stays finite whatever the penalties and temperature.
_SCORE_LIMIT = 1e4


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: the one settings type of generate, eval, abtest, report, the monitor, serve and chat.

    Attributes:
        max_new_tokens: generation budget per prompt.
        temperature: 0 = greedy (deterministic, the default); > 0 samples with ``top_p`` / ``top_k``.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        repetition_penalty: 1.0 = none (CTRL's penalty over the prompt and the generated tokens).
        seed: seeds the sampler: a generator of its own per answer, so a seeded answer does not depend on what
            shares its batch (``None``: a fresh random seed). Irrelevant when greedy.
        stop: extra stop strings (besides the template's end-of-turn and EOS).
        presence_penalty: subtracted once from the logit of every token already generated (OpenAI's; 0 = none).
        frequency_penalty: subtracted from a token's logit per time it was generated (OpenAI's; 0 = none).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn (a temperature below ``MIN_SAMPLING_TEMPERATURE`` is greedy in effect)."""
        return self.temperature >= MIN_SAMPLING_TEMPERATURE

    def to_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_args(cls, args: Any, **overrides) -> GenerationSettings:
        """Settings from the flags ``generation.add_generation_args`` declared (``overrides`` win).

        Raises:
            UserError: a flag out of range, named as the user typed it.
        """
        values = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
        values.update(overrides)
        settings = cls(**values)
        problem = settings.problem()
        if problem:
            raise UserError(f"--{problem[0].replace('_', '-')} {problem[1]}")
        return settings

    def problem(self) -> tuple[str, str] | None:
        """``(field, what is wrong)`` for the first out-of-range value, or ``None`` when every value is valid."""
        if not self.max_new_tokens > 0:
            return "max_new_tokens", "must be a positive number of tokens"
        for name, (low, high, inclusive) in BOUNDS.items():
            value = getattr(self, name)
            above_low = value >= low if inclusive else value > low
            if not (above_low and value <= high):  # NaN fails both
                return name, f"must be in {'[' if inclusive else '('}{low:g}, {high:g}] (got {value})"
        return None


FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


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


# --------------------------------------------------------------------------- token choice


def penalise(logits: Any, settings: GenerationSettings, prompt_ids: Sequence[int], generated: Sequence[int]) -> Any:
    """The row's logits (float32, one row) after its repetition penalty (CTRL's, as transformers applies it, over the
    prompt and generated ids) and OpenAI's presence / frequency penalties (over the generated ids)."""
    import torch

    scores = logits.float()
    if settings.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*prompt_ids, *generated}), dtype=torch.long, device=scores.device)
        values = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(values < 0, values * settings.repetition_penalty,
                                   values / settings.repetition_penalty)
    if generated and (settings.presence_penalty or settings.frequency_penalty):
        ids = torch.tensor(list(generated), dtype=torch.long, device=scores.device)
        counts = torch.zeros_like(scores).scatter_add_(0, ids, torch.ones_like(ids, dtype=scores.dtype))
        scores = scores - settings.frequency_penalty * counts - settings.presence_penalty * (counts > 0).float()
    return scores


def greedy_token(scores: Any) -> int:
    """The arg-max of one row's scores, NaN counted as the lowest score."""
    import torch

    return int(torch.argmax(torch.nan_to_num(scores.float(), nan=float("-inf"))))


def sample_token(scores: Any, settings: GenerationSettings, generator: Any) -> int:
    """Draw a token with temperature, top-k and top-p (nucleus), as transformers' warpers define them.

    Computed in float32 on scores clamped to finite values; a row whose distribution is still not usable (all
    masked, NaN) takes the arg-max instead of failing.
    """
    import torch

    scores = torch.nan_to_num(scores.float(), nan=float("-inf"))
    fallback = greedy_token(scores)
    finite = torch.isfinite(scores)
    scores = scores.clamp(-_SCORE_LIMIT, _SCORE_LIMIT).masked_fill(~finite & (scores < 0), float("-inf"))
    scores = scores / max(settings.temperature, MIN_SAMPLING_TEMPERATURE)
    if settings.top_k and settings.top_k < scores.shape[-1]:
        threshold = torch.topk(scores, settings.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if settings.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - settings.top_p)
        remove[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        return fallback
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def choose_token(logits: Any, settings: GenerationSettings, generator: Any, prompt_ids: Sequence[int],
                 generated: Sequence[int]) -> int:
    """The next token of one row from its raw logits: penalties, then the arg-max (greedy) or a seeded draw."""
    scores = penalise(logits, settings, prompt_ids, generated)
    if settings.sampling:
        return sample_token(scores, settings, generator)
    return greedy_token(scores)
