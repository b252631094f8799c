"""Instruction-data augmentation with a teacher model (``tuneforge data augment``).

For each single-turn instruction record of the input (Alpaca, chat or ShareGPT, read by
:func:`tuneforge.data.readers.read_records`), the teacher is asked ``n`` times for a new record:

* ``backtranslate``: back-translation as the guide (chapter 003 §5.1) defines it, a round trip through another
  language: one call translates the user turn (instruction, plus an Alpaca ``input``, which the readers fold into
  it) into a pivot language, a second call translates that back into the record's language. The new record is the
  round-tripped instruction with the **original** answer: only the wording changed, so the answer still fits;
* ``rewrite``: the instruction said in other words, and the teacher's answer to it;
* ``cot``: the same instruction with a chain-of-thought answer (steps that work out the original answer, then the
  final answer);
* ``reverse``: the instruction the record's answer would answer (instruction back-translation, Li et al. 2023,
  "Self-Alignment with Instruction Backtranslation"), paired with the original answer.

A new record is kept only if its ROUGE-L F1 to every existing record — the input's records and the ones kept so far
— is below ``max_rouge`` (0.7, Self-Instruct's filter, which the guide follows). The text compared is the user
instruction for ``backtranslate``, ``rewrite`` and ``reverse`` (a round trip that came back nearly unchanged is
dropped), and the answer for ``cot`` (whose instruction is the input's by design). ROUGE-L is the ``rouge-score``
library's, on :class:`tuneforge.text.UnicodeTokenizer` tokens (those of ``tuneforge eval``'s ``rougeL``).

Replies the prompts' format cannot be read from, or that hit the token budget, are counted and skipped. The output
is appended record by record; a state file beside it (``OUT.augment-state``) records how many inputs are done and
how many bytes of OUT they account for, so a rerun with the same arguments continues where the last one stopped
and a different one is refused. The teacher is anything with ``name``, ``probe()`` and ``ask()``
(:class:`Teacher`): ``tuneforge.data.teacher`` has the HTTP and the local-model teachers. This module loads no
model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tuneforge.errors import UserError, did_you_mean

DEFAULT_MAX_ROUGE = 0.7
STATE_SUFFIX = ".augment-state"
# Bumped when the prompts or the output change: a resume across versions would mix two kinds of records.
# 2: ``backtranslate`` became the guide's round trip through a pivot language (the old one is ``reverse``).
FORMAT_VERSION = 2
# --pivot auto: the guide's pair (中文 → English → 中文) — English, unless the instruction is itself mostly
# Latin-script (English, French...), which goes through Chinese instead.
AUTO_PIVOT = "auto"
DEFAULT_PIVOT = "English"
LATIN_PIVOT = "Chinese"

PROMPTS = {
    "rewrite": (
        "Rewrite the instruction below so that it asks for the same thing in different words: change the wording "
        "and the sentence structure, keep the task, its details and its language. Then answer the rewritten "
        "instruction.\n\n"
        "Instruction:\n{instruction}\n\n"
        "Reply in exactly this format and nothing else:\n"
        "INSTRUCTION: <the rewritten instruction>\n"
        "ANSWER: <your answer to it>"
    ),
    "reverse": (
        "Below is a response written by an AI assistant. Write the instruction a user would have typed to get "
        "exactly this response: a natural request, in the language of the response, that the response answers "
        "completely. Do not mention the response itself.\n\n"
        "Response:\n{answer}\n\n"
        "Reply in exactly this format and nothing else:\n"
        "INSTRUCTION: <the instruction>"
    ),
    "cot": (
        "Here is a question and its correct answer. Explain step by step how to work out the answer, then state "
        "the final answer. Write in the language of the question.\n\n"
        "Question:\n{instruction}\n\n"
        "Correct answer:\n{answer}\n\n"
        "Reply in exactly this format and nothing else:\n"
        "REASONING: <the steps, one per line>\n"
        "ANSWER: <the final answer>"
    ),
}
# backtranslate's two legs. The text is the whole user turn (an Alpaca ``input`` included): it is translated, never
# answered. The first leg also asks which language the text is in, so that the second knows where to go back to
# (a script does not say it: Latin letters may be English, French, Vietnamese...).
PIVOT_PROMPT = (
    "Translate the text below into {pivot}. It is a request someone wrote to an AI assistant: translate it, do "
    "not answer it or carry it out. Translate all of it, including any input text that follows the request; "
    "keep line breaks, code, names and numbers as they are. Also name the language the text is written in.\n\n"
    "Text:\n{text}\n\n"
    "Reply in exactly this format and nothing else:\n"
    "LANGUAGE: <the language of the text, named in English, e.g. Chinese>\n"
    "TRANSLATION: <the text in {pivot}>"
)
RETURN_PROMPT = (
    "Translate the text below from {pivot} into {language}, as a native {language} speaker would naturally write "
    "it (not word for word). It is a request someone wrote to an AI assistant: translate it, do not answer it or "
    "carry it out. Translate all of it; keep line breaks, code, names and numbers as they are.\n\n"
    "Text:\n{text}\n\n"
    "Reply in exactly this format and nothing else:\n"
    "TRANSLATION: <the text in {language}>"
)
# The label that opens a section of a reply: "ANSWER:", "**Answer:**", "## Instruction：", "- answer:" ...
_LABEL_RE = re.compile(
    r"^[ \t>#*_-]*(instruction|reasoning|answer)[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE
)
_THINK_RE = re.compile(r"^\s*<think>.*?</think>", re.DOTALL)
# The labels of a translation reply. The translation runs from its label to the end of the reply: the text may
# hold lines of its own that look like labels ("Answer: ...", "Language: Python").
_LANGUAGE_RE = re.compile(r"^[ \t>#*_-]*language[ \t*_]*[:：][ \t*_]*(.*)$", re.IGNORECASE | re.MULTILINE)
_TRANSLATION_RE = re.compile(r"^[ \t>#*_-]*translation[ \t*_]*[:：][ \t*_]*", re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------- the mode registry


@dataclass(frozen=True)
class AugmentMode:
    """One ``--mode`` of ``tuneforge data augment``.

    Attributes:
        name: the ``--mode`` value.
        help: one line for ``--mode``'s help and docs/data.md.
        prompt: the one request per new record (``{instruction}`` and ``{answer}`` filled from the input); ``None``
            for a mode that drafts its own way (backtranslate's round trip through ``--pivot``).
        reply: the sections a usable reply has (``instruction``, ``reasoning``, ``answer``; see
            :func:`parse_reply`).
        bare_reply: the section a reply without any label is taken as (``None``: such a reply is unusable).
        keeps_answer: the input's answer is the new record's answer (only its instruction is new).
        reasoned: the new answer is the reply's reasoning and final answer, kept only when the final answer agrees
            with the input's (:func:`answer_agrees`).
        compare: the role whose last turn the ROUGE-L filter compares (``user`` or ``assistant``).
        pivots: takes ``--pivot`` (the languages of a round trip).
    """

    name: str
    help: str
    prompt: str | None = None
    reply: tuple[str, ...] = ()
    bare_reply: str | None = None
    keeps_answer: bool = False
    reasoned: bool = False
    compare: str = "user"
    pivots: bool = False


AUGMENT_MODES: dict[str, AugmentMode] = {}


def register_mode(mode: AugmentMode) -> AugmentMode:
    """Make ``mode`` available as ``--mode <name>`` (``--mode`` help, checks and docs read the registry)."""
    if mode.name in AUGMENT_MODES:
        raise ValueError(f"augment mode {mode.name!r} is registered twice")
    if (mode.prompt is None) != mode.pivots:
        raise ValueError(f"augment mode {mode.name!r}: a prompt, or the pivot round trip, not both or neither")
    AUGMENT_MODES[mode.name] = mode
    return mode


register_mode(AugmentMode(
    "backtranslate", "the instruction round-tripped through --pivot (translated there and back: 2 teacher calls), "
    "original answer kept", keeps_answer=True, pivots=True))
register_mode(AugmentMode(
    "rewrite", "the instruction reworded, answered by the teacher", PROMPTS["rewrite"], ("instruction", "answer")))
register_mode(AugmentMode(
    "cot", "the answer worked out step by step (kept when its final answer agrees with the original)",
    PROMPTS["cot"], ("reasoning", "answer"), reasoned=True, compare="assistant"))
register_mode(AugmentMode(
    "reverse", "an instruction written for the answer (Li et al. 2023), original answer kept", PROMPTS["reverse"],
    ("instruction",), bare_reply="instruction", keeps_answer=True))

#: every ``--mode``, in registration order
MODES = tuple(AUGMENT_MODES)


# --------------------------------------------------------------------------- teacher interface


@dataclass(frozen=True)
class Reply:
    """One answer of the teacher.

    Attributes:
        text: the reply's text; ``None`` when the request failed (``error`` says why).
        truncated: the reply stopped at the token budget (it is not used: an answer cut short is not data).
        error: why the request failed (a rejected request; the run goes on without it).
    """

    text: str | None
    truncated: bool = False
    error: str | None = None


class TeacherUnavailable(Exception):
    """The teacher stopped answering (unreachable, refusing the key...): the run stops and can be resumed."""


class Teacher(Protocol):
    """What augmentation needs of a teacher.

    ``name`` identifies it in provenance and in the resume check. ``probe()`` makes one small request and raises
    ``UserError`` saying what is wrong when the teacher cannot answer. ``ask(messages, count, seed)`` returns
    ``count`` replies to one chat prompt (sampled with seeds ``seed, seed + 1, ...`` when ``seed`` is not
    ``None``); it raises :class:`TeacherUnavailable` when the teacher stops answering.
    """

    name: str

    def probe(self) -> None: ...

    def ask(self, messages: list[dict], count: int, seed: int | None) -> list[Reply]: ...


# --------------------------------------------------------------------------- records, prompts, replies


@dataclass(frozen=True)
class Seed:
    """A single-turn instruction record of the input: what the teacher is asked about."""

    source: str
    instruction: str
    answer: str
    system: str | None = None
    task: str | None = None


def seed_of(record: dict) -> Seed | None:
    """The record as a :class:`Seed`, or ``None`` when it is not one user turn + one plain assistant answer
    (after an optional system message): multi-turn, tool-calling and text records are not augmented."""
    messages = record.get("messages")
    if not messages or record.get("tools"):
        return None
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if [m["role"] for m in messages] != ["user", "assistant"] or messages[1].get("tool_calls"):
        return None
    instruction, answer = messages[0]["content"].strip(), messages[1]["content"].strip()
    if not instruction or not answer:
        return None
    return Seed(record["source"], instruction, answer, system or None, record.get("task"))


def build_prompt(mode: str, seed: Seed) -> list[dict]:
    """The chat prompt (one user message) asking the teacher for one new record of ``mode`` from ``seed``
    (``rewrite``, ``cot``, ``reverse``; ``backtranslate`` asks :func:`pivot_prompt` then :func:`return_prompt`)."""
    return [
        {"role": "user",
         "content": AUGMENT_MODES[mode].prompt.format(instruction=seed.instruction, answer=seed.answer)}
    ]


def pivot_prompt(text: str, pivot: str) -> list[dict]:
    """backtranslate's first call: ``text`` (a whole user turn) into ``pivot``, and the name of its language."""
    return [{"role": "user", "content": PIVOT_PROMPT.format(pivot=pivot, text=text)}]


def return_prompt(text: str, pivot: str, language: str) -> list[dict]:
    """backtranslate's second call: ``text`` (the first call's translation) from ``pivot`` back into ``language``."""
    return [{"role": "user", "content": RETURN_PROMPT.format(pivot=pivot, language=language, text=text)}]


def check_pivots(mode: str, spec: str | None) -> tuple[str, ...]:
    """``--pivot`` as the pivot languages of round trips 1, 2, ... (repeated in turn); ``()`` means ``auto``.

    Raises:
        UserError: ``--pivot`` with a mode other than ``backtranslate``, an empty name, ``auto`` in a list, or a
            language named twice.
    """
    if spec is None:
        return ()
    if not AUGMENT_MODES[mode].pivots:
        raise UserError(
            f"--pivot is the language a backtranslate round trip goes through; --mode {mode} has none (drop --pivot)"
        )
    names = [name.strip() for name in str(spec).split(",")]
    if [name.lower() for name in names] == [AUTO_PIVOT]:
        return ()
    lowered = [name.lower() for name in names]
    if not all(names) or AUTO_PIVOT in lowered or len(set(lowered)) != len(lowered):
        raise UserError(
            f"--pivot {spec!r}: give 'auto' or different language names separated by commas, "
            "e.g. --pivot English or --pivot English,Japanese,French"
        )
    return tuple(names)


def auto_pivot(text: str) -> str:
    """``--pivot auto``'s language for one instruction: ``Chinese`` when more than half of its word tokens are
    Latin-script (English, French...), else ``English`` (the guide's 中文 → English → 中文).

    Word tokens are :class:`tuneforge.text.UnicodeTokenizer`'s with a letter in them: one per Han/kana/Thai
    character, one per run of letters of any other script; digits, code symbols and punctuation do not count.
    """
    from tuneforge.text import UnicodeTokenizer

    words = [token for token in UnicodeTokenizer().tokenize(text) if any(c.isalpha() for c in token)]
    latin = sum(
        unicodedata.name(next(c for c in word if c.isalpha()), "").startswith("LATIN") for word in words
    )
    return LATIN_PIVOT if 2 * latin > len(words) else DEFAULT_PIVOT


def pivot_for(seed: Seed, pivots: Sequence[str], variant: int) -> str:
    """The pivot of round trip ``variant`` (1-based): the ``pivots`` in turn, or :func:`auto_pivot` when none."""
    return pivots[(variant - 1) % len(pivots)] if pivots else auto_pivot(seed.instruction)


def parse_translation(text: str, *, with_language: bool) -> dict | None:
    """The translation in a reply to :func:`pivot_prompt` (``with_language``) or :func:`return_prompt`.

    A leading ``<think>...</think>`` block is dropped. ``LANGUAGE:`` takes the rest of its line (at most 40
    characters: it goes into the next prompt); the translation is everything after the first ``TRANSLATION:``
    (after ``LANGUAGE:``) to the end of the reply, so lines of the text that look like labels stay in it. A reply to
    the return prompt may also be the bare translation.

    Returns:
        ``{"language", "translation"}`` or ``{"translation"}``, every value non-empty; ``None`` when not usable.
    """
    text = _THINK_RE.sub("", text or "")
    if "<think>" in text:
        return None
    parsed, start = {}, 0
    if with_language:
        label = _LANGUAGE_RE.search(text)
        language = _clean(label.group(1)) if label else ""
        if not language or len(language) > 40:
            return None
        parsed["language"], start = language, label.end()
    label = _TRANSLATION_RE.search(text, start)
    if label is None and with_language:
        return None
    parsed["translation"] = _clean(text[label.end() :] if label else text)
    return parsed if parsed["translation"] else None


def parse_reply(mode: str, text: str) -> dict | None:
    """The new instruction and answer in a teacher's reply, or ``None`` when the reply is not usable.

    A leading ``<think>...</think>`` block is dropped. Sections start at a line beginning with ``INSTRUCTION:``,
    ``REASONING:`` or ``ANSWER:`` (any case; markdown emphasis, a heading mark or a full-width colon allowed);
    the first of each label counts. ``reverse`` also accepts a bare reply without labels.

    Returns:
        ``{"instruction": ...}`` (reverse, and backtranslate's round trip), ``{"instruction", "answer"}`` (rewrite) or
        ``{"reasoning", "answer"}`` (cot), every value non-empty.
    """
    text = _THINK_RE.sub("", text or "")
    if "<think>" in text:  # an unfinished reasoning block: the reply never got to the answer
        return None
    sections: dict[str, str] = {}
    labels = list(_LABEL_RE.finditer(text))
    for i, label in enumerate(labels):
        end = labels[i + 1].start() if i + 1 < len(labels) else len(text)
        sections.setdefault(label.group(1).lower(), _clean(text[label.end() : end]))
    spec = AUGMENT_MODES[mode]
    if spec.bare_reply and not labels:
        sections[spec.bare_reply] = _clean(text)
    wanted = spec.reply
    if not all(sections.get(key) for key in wanted):
        return None
    return {key: sections[key] for key in wanted}


#: ``cot``: answers of at most this many words must reappear whole in the reasoned reply's final answer
SHORT_ANSWER_WORDS = 8


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def answer_agrees(final: str, original: str) -> bool:
    """Whether a chain-of-thought reply's final answer keeps the original answer: one contains the other once case,
    punctuation and spacing are ignored ("8" in "The result is 8."), or, for answers longer than
    :data:`SHORT_ANSWER_WORDS` words, at least half of the original's words (``tuneforge.text`` tokens, counted
    with repeats) are in the final one. A short answer must be kept as it is: "Red, green and blue" does not keep
    "Red, blue and yellow" although three of its four words do."""
    a, b = _normalised(final), _normalised(original)
    if not a or not b:
        return False
    if b in a or a in b:
        return True
    from tuneforge.text import UnicodeTokenizer

    tokenizer = UnicodeTokenizer()
    final_words, original_words = Counter(tokenizer.tokenize(a)), Counter(tokenizer.tokenize(b))
    total = sum(original_words.values())
    if total <= SHORT_ANSWER_WORDS:
        return False
    return sum((final_words & original_words).values()) >= 0.5 * total


def _clean(text: str) -> str:
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    elif len(text) >= 2 and text[0] == "“" and text[-1] == "”":
        text = text[1:-1].strip()
    return text


def new_messages(mode: str, seed: Seed, parsed: dict) -> list[dict]:
    """The new record's messages: the seed's system message (if any), the user turn (the reply's instruction, else
    the seed's) and the answer (the seed's own for modes that keep it, reasoning + final answer for reasoned ones,
    else the reply's)."""
    spec = AUGMENT_MODES[mode]
    user = parsed.get("instruction") or seed.instruction
    if spec.keeps_answer:
        answer = seed.answer
    elif spec.reasoned:
        answer = f"{parsed['reasoning']}\n\n{parsed['answer']}"
    else:
        answer = parsed["answer"]
    system = [{"role": "system", "content": seed.system}] if seed.system else []
    return [*system, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def compared_text(mode: str, messages: Sequence[dict]) -> str:
    """The text the ROUGE-L filter compares: the last turn of the mode's ``compare`` role (the answer for ``cot``,
    else the user turn)."""
    role = AUGMENT_MODES[mode].compare
    return next((m["content"] for m in reversed(messages) if m["role"] == role and m.get("content")), "")


@dataclass(frozen=True)
class Draft:
    """One new record asked of the teacher for an input, before the ROUGE-L filter.

    Attributes:
        variant: which of the input's ``n`` requests it is (1-based).
        messages: the new record's messages; ``None`` when the teacher gave nothing usable.
        dropped: why there is no record: ``teacher_error``, ``truncated`` or ``bad_reply`` (a count key).
        provenance: more provenance for the record (``backtranslate``: ``pivot``, ``source_language``,
            ``pivot_text``).
    """

    variant: int
    messages: list[dict] | None = None
    dropped: str | None = None
    provenance: dict = field(default_factory=dict)


def ask_drafts(
    teacher: Teacher, mode: str, seed: Seed, n: int, first_seed: int | None, pivots: Sequence[str] = ()
) -> list[Draft]:
    """The ``n`` drafts of one input, in variant order.

    ``rewrite``, ``cot`` and ``reverse`` make one ``ask`` of ``n`` replies (seeded ``first_seed + variant - 1``).
    ``backtranslate`` makes two calls per round trip, in order — :func:`pivot_prompt` into
    :func:`pivot_for`'s language, then :func:`return_prompt` back into the language the first reply named —
    both seeded ``first_seed + variant - 1``; a failed first call skips the second.

    Raises:
        TeacherUnavailable: the teacher stopped answering.
    """
    if AUGMENT_MODES[mode].pivots:
        return [
            _round_trip(
                teacher,
                seed,
                variant,
                pivot_for(seed, pivots, variant),
                None if first_seed is None else first_seed + variant - 1,
            )
            for variant in range(1, n + 1)
        ]
    replies = teacher.ask(build_prompt(mode, seed), n, first_seed)
    drafts = []
    for variant in range(1, n + 1):
        reply = replies[variant - 1] if variant <= len(replies) else None  # a reply not given is a failure
        failure = _failure(reply)
        parsed = None if failure else parse_reply(mode, reply.text)
        if parsed is None:
            drafts.append(Draft(variant, dropped=failure or "bad_reply"))
        elif AUGMENT_MODES[mode].reasoned and not answer_agrees(parsed["answer"], seed.answer):
            drafts.append(Draft(variant, dropped="answer_changed"))
        else:
            drafts.append(Draft(variant, new_messages(mode, seed, parsed)))
    return drafts


def _round_trip(teacher: Teacher, seed: Seed, variant: int, pivot: str, request_seed: int | None) -> Draft:
    there = teacher.ask(pivot_prompt(seed.instruction, pivot), 1, request_seed)
    failure = _failure(there[0] if there else None)
    forth = None if failure else parse_translation(there[0].text, with_language=True)
    if forth is None:
        return Draft(variant, dropped=failure or "bad_reply")
    back = teacher.ask(return_prompt(forth["translation"], pivot, forth["language"]), 1, request_seed)
    failure = _failure(back[0] if back else None)
    home = None if failure else parse_translation(back[0].text, with_language=False)
    if home is None:
        return Draft(variant, dropped=failure or "bad_reply")
    # The answer is the seed's own: a faithful round trip changes the wording of the request, not what it asks.
    messages = new_messages("backtranslate", seed, {"instruction": home["translation"]})
    provenance = {"pivot": pivot, "source_language": forth["language"], "pivot_text": forth["translation"]}
    return Draft(variant, messages, provenance=provenance)


def _failure(reply: Reply | None) -> str | None:
    """The count key of a reply that cannot be used whatever it says, or ``None``."""
    if reply is None or reply.text is None:
        return "teacher_error"
    return "truncated" if reply.truncated else None


# --------------------------------------------------------------------------- the ROUGE-L filter


class _CachedTokens:
    """``UnicodeTokenizer`` with memory: pool texts are compared again and again."""

    def __init__(self) -> None:
        from tuneforge.text import UnicodeTokenizer

        self.tokenizer, self.cache = UnicodeTokenizer(), {}

    def tokenize(self, text: str) -> list[str]:
        tokens = self.cache.get(text)
        if tokens is None:
            tokens = self.cache[text] = self.tokenizer.tokenize(text)
        return tokens


class RougePool:
    """The texts a new record is compared with, and its highest ROUGE-L F1 to them (0-1).

    Exact, and fast on large pools: ROUGE-L F1 = 2·LCS / (len a + len b), and the LCS is at most the number of
    tokens the two texts share. Shared counts against the whole pool come from an inverted index (numpy, one pass
    over the postings of the new text's tokens); ``rouge-score``'s ROUGE-L is then computed in order of that
    upper bound, and the search ends when the bound falls to the best score found (or the score reaches
    ``stop_at``).
    """

    def __init__(self, texts: Sequence[str] = ()) -> None:
        from rouge_score import rouge_scorer

        self.tokens = _CachedTokens()
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=self.tokens)
        self.texts: list[str] = []
        self.sizes: list[int] = []
        # token → [pool ids, counts of the token there, the two as numpy arrays (rebuilt after an add)]
        self.postings: dict[str, list] = {}
        for text in texts:
            self.add(text)

    def __len__(self) -> int:
        return len(self.texts)

    def add(self, text: str) -> None:
        index = len(self.texts)
        tokens = self.tokens.tokenize(text)
        self.texts.append(text)
        self.sizes.append(len(tokens))
        for token, count in Counter(tokens).items():
            posting = self.postings.setdefault(token, [[], [], None, None])
            posting[0].append(index)
            posting[1].append(count)
            posting[2] = posting[3] = None

    def max_rouge_l(self, text: str, stop_at: float = 1.0) -> float:
        """The highest ROUGE-L F1 of ``text`` to a pooled text; the search stops once it reaches ``stop_at``."""
        import numpy as np

        tokens = self.tokens.tokenize(text)
        if not tokens or not self.texts:
            return 0.0
        shared = np.zeros(len(self.texts))
        for token, count in Counter(tokens).items():
            posting = self.postings.get(token)
            if posting is None:
                continue
            if posting[2] is None:
                posting[2], posting[3] = np.asarray(posting[0]), np.asarray(posting[1])
            shared[posting[2]] += np.minimum(posting[3], count)  # ids are unique within one posting
        bound = 2 * shared / (len(tokens) + np.asarray(self.sizes))
        best = 0.0
        for index in np.argsort(-bound, kind="stable"):
            if bound[index] <= best:
                break
            best = max(best, self.scorer.score(self.texts[index], text)["rougeL"].fmeasure)
            if best >= stop_at:
                break
        return best


# --------------------------------------------------------------------------- the plan (every check, nothing written)


@dataclass
class AugmentOptions:
    """What ``tuneforge data augment`` was asked to do.

    Attributes:
        input: the input data (a file or directory :func:`read_records` reads).
        out: the output JSON-lines file (appended; resumable).
        mode: one of :data:`MODES`.
        n: new records asked of the teacher per input record.
        max_rouge: keep a new record only when its ROUGE-L F1 to every existing one is below this (0-1].
        format: the input's format (``auto``, ``alpaca``, ``chat``).
        overwrite: replace an existing ``out`` (and its state) instead of resuming.
        generation: the sampling settings as a dict (part of what a resume must match).
        seed: the first request's sampling seed (request *i* uses ``seed + i``; both calls of a ``backtranslate``
            round trip use its request's seed); ``None`` = unseeded.
        pivots: ``backtranslate``'s pivot languages, taken in turn by the round trips of each input (from
            :func:`check_pivots`); empty = ``auto`` (:func:`auto_pivot`, per input).
    """

    input: Path
    out: Path
    mode: str
    n: int = 1
    max_rouge: float = DEFAULT_MAX_ROUGE
    format: str = "auto"
    overwrite: bool = False
    generation: dict = field(default_factory=dict)
    seed: int | None = 0
    pivots: tuple[str, ...] = ()


@dataclass
class Plan:
    """Everything a run needs, checked: the seeds, the pool, where to resume. Built by :func:`prepare`."""

    options: AugmentOptions
    identity: dict
    seeds: list[Seed]
    pool_texts: list[str]
    skipped_inputs: list[str]
    done: int = 0
    out_bytes: int = 0
    counts: dict = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return state_path(self.options.out)

    @property
    def resuming(self) -> bool:
        return self.done > 0 or self.out_bytes > 0


COUNT_KEYS = ("inputs", "requests", "kept", "near_duplicate", "bad_reply", "answer_changed", "truncated",
              "teacher_error")


def state_path(out: Path) -> Path:
    """Where the state of an augmentation into ``out`` is kept: ``<out>.augment-state`` (not a data suffix, so
    a directory of data files holding ``out`` is still read as before)."""
    return out.with_name(out.name + STATE_SUFFIX)


def check_options(mode: str, n: Any, max_rouge: Any) -> tuple[str, int, float]:
    """``mode``, ``n`` and ``max_rouge`` validated (``n`` and ``max_rouge`` may be strings from the command line).

    Raises:
        UserError: an unknown mode (with the known ones), ``n`` not a positive integer, ``max_rouge`` outside (0, 1].
    """
    if mode not in MODES:
        hint = did_you_mean(str(mode), MODES)
        raise UserError(f"--mode {mode!r} is not known{hint}; expected one of {', '.join(MODES)}")
    try:
        count = int(n)
    except (TypeError, ValueError):
        raise UserError(f"--n {n!r} must be a positive whole number (new records per input record)") from None
    if count < 1:
        raise UserError(f"--n {n} must be at least 1 (new records per input record)")
    try:
        limit = float(max_rouge)
    except (TypeError, ValueError):
        raise UserError(f"--max-rouge {max_rouge!r} must be a number in (0, 1], e.g. 0.7") from None
    if not 0 < limit <= 1:
        raise UserError(f"--max-rouge {max_rouge} must be in (0, 1] (ROUGE-L F1; the guide's filter is 0.7)")
    return mode, count, limit


def prepare(options: AugmentOptions, teacher_name: str) -> Plan:
    """Read the input, check the output and its state: every check of a run, nothing written.

    Raises:
        UserError: options out of range (``pivots`` without ``backtranslate``), an unreadable input (file:line named by the readers), an input with no
            single-turn instruction record, ``out`` equal to or inside the input, an existing ``out`` that is not
            this augmentation's (without ``overwrite``), a state whose arguments differ (each key listed).
    """
    from tuneforge.data.readers import read_records

    check_options(options.mode, options.n, options.max_rouge)
    if options.pivots and not AUGMENT_MODES[options.mode].pivots:
        check_pivots(options.mode, ",".join(options.pivots))  # raises: pivots are backtranslate's
    _check_paths(options.input, options.out)
    records = read_records(options.input, options.format)
    seeds, skipped = [], []
    for record in records:
        seed = seed_of(record)
        if seed is None:
            skipped.append(record.get("source", "?"))
        else:
            seeds.append(seed)
    if not seeds:
        raise UserError(
            f"{options.input}: no record to augment: augmentation needs instruction records (Alpaca "
            "instruction/output, or chat/ShareGPT with one user turn and one assistant answer); "
            f"the first record is {records[0].get('source')}"
        )
    pool = [compared_text(options.mode, r["messages"]) for r in records if r.get("messages")]
    identity = {
        "format_version": FORMAT_VERSION,
        "input": str(Path(os.path.realpath(options.input))),
        "input_sha256": _fingerprint(Path(options.input)),
        "format": options.format,
        "mode": options.mode,
        "pivot": (",".join(options.pivots) or AUTO_PIVOT) if AUGMENT_MODES[options.mode].pivots else None,
        "n": options.n,
        "max_rouge": options.max_rouge,
        "teacher": teacher_name,
        "generation": options.generation,
        "seed": options.seed,
    }
    plan = Plan(
        options, identity, seeds, [t for t in pool if t], skipped, counts=dict.fromkeys(COUNT_KEYS, 0)
    )
    _resume_point(plan)
    return plan


def _check_paths(input_path: Path, out: Path) -> None:
    if not os.path.lexists(input_path):
        return  # the readers report a missing input (or read a hub dataset of that name)
    source, target = Path(os.path.realpath(input_path)), Path(os.path.realpath(out))
    if target == source or source in target.parents:
        where = "is the input" if target == source else f"lies inside the input directory {input_path}"
        raise UserError(f"--out {out} {where}; choose another output file (nothing was written)")
    if target.is_dir():
        raise UserError(
            f"--out {out} is a directory; give the output file's name, e.g. {out}/augmented.jsonl"
        )


def _fingerprint(path: Path) -> str:
    """sha256 of the input's bytes (a directory: of its files' names and bytes); a hub name stands for itself."""
    digest = hashlib.sha256()
    if path.is_dir():  # the files the readers read: the directory's own, sorted
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        digest.update(str(path).encode())
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _resume_point(plan: Plan) -> None:
    """Fill ``plan.done / out_bytes / counts`` from an earlier run into the same ``out``, or refuse."""
    out, state_file = plan.options.out, plan.state_path
    if plan.options.overwrite or not (out.exists() or state_file.exists()):
        return
    if not state_file.exists():
        raise UserError(
            f"--out {out} exists and is not an augmentation in progress (no {state_file.name} beside "
            "it); pass --overwrite to replace it, or choose another output file (nothing was written)"
        )
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        done, out_bytes, counts, before = (
            int(state["done"]),
            int(state["out_bytes"]),
            state["counts"],
            state["identity"],
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"{state_file}: unreadable augmentation state ({exc}); pass --overwrite to start over"
        ) from None
    changed = [
        key for key in sorted(set(before) | set(plan.identity)) if before.get(key) != plan.identity.get(key)
    ]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} → {plan.identity.get(k)!r}" for k in changed)
        raise UserError(
            f"--out {out} holds an augmentation made with other arguments ({shown}); rerun with the "
            "same arguments to continue it, pass --overwrite to replace it, or choose another output "
            "file (nothing was written)"
        )
    data = out.read_bytes() if out.exists() else b""
    if len(data) < out_bytes:
        raise UserError(
            f"--out {out} is shorter than the {out_bytes} bytes its state records (was it edited?); "
            "pass --overwrite to start over (nothing was written)"
        )
    kept = _own_lines(data[:out_bytes], out, complete=True)
    _own_lines(data[out_bytes:], out, complete=False)  # what a killed run left after its last finished input
    plan.done, plan.out_bytes, plan.counts = done, out_bytes, {**plan.counts, **counts}
    plan.pool_texts.extend(compared_text(plan.options.mode, r["messages"]) for r in kept)


def _own_lines(data: bytes, out: Path, *, complete: bool) -> list[dict]:
    """The records in ``data``, each checked to be one this command wrote (a partial last line is allowed
    when ``complete`` is false: a run killed while writing)."""
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" when the data ends with one
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and "augment" in record and isinstance(record.get("messages"), list)
        except ValueError:
            ok = False
        if not ok:
            where = f"line {number}" if complete else f"line {number} after the last finished input"
            raise UserError(
                f"{out}: {where} was not written by this augmentation (edited?); pass --overwrite to "
                "start over, or choose another output file (nothing was written)"
            )
        records.append(record)
    if tail and complete:
        raise UserError(f"{out}: ends inside a record its state says is complete (edited?); pass --overwrite")
    return records


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class AugmentResult:
    """What a run did: the counts (cumulative over resumed runs) and where the records are."""

    out: Path
    counts: dict
    skipped_inputs: list[str]
    total_inputs: int


def run_augment(
    plan: Plan, teacher: Teacher, *, progress: bool = True, concurrency: int = 1
) -> AugmentResult:
    """Ask the teacher for new records, filter them and append the kept ones to ``out`` (resumable).

    Call after :func:`prepare` and ``teacher.probe()``. Each input's records are appended in one write (flushed
    and fsynced), then the state is replaced atomically; a run killed in between leaves bytes the next run
    trims. An existing ``out`` is truncated only now (``overwrite``), after every check passed.

    Args:
        concurrency: inputs whose requests are in flight at once (threads; only for a thread-safe teacher such
            as the HTTP one). Requests are seeded by position and replies are filtered and written in input
            order, so the output does not depend on it.

    Raises:
        UserError: another process is augmenting into ``out``; the teacher stopped answering (what was done is
            kept: rerun the same command to continue).
    """
    options = plan.options
    pool = RougePool(plan.pool_texts)
    counts = {**dict.fromkeys(COUNT_KEYS, 0), **plan.counts}
    options.out.parent.mkdir(parents=True, exist_ok=True)
    with open(options.out, "ab") as handle:
        _lock(handle, options.out)
        _check_unchanged(plan)
        if not plan.resuming and plan.state_path.exists():
            plan.state_path.unlink()  # --overwrite: the old run's state goes with its records
        handle.truncate(plan.out_bytes)  # a fresh start, or the bytes of an input the last run did not finish
        size = plan.out_bytes
        _save_state(plan, plan.done, size, counts)
        with (
            _Progress(progress, len(plan.seeds), plan.done, options.mode) as bar,
            _Requests(plan, teacher, concurrency) as requests,
        ):
            for position in range(plan.done, len(plan.seeds)):
                seed = plan.seeds[position]
                try:
                    drafts = requests.drafts(position)
                except TeacherUnavailable as exc:
                    raise UserError(
                        f"the teacher stopped answering at {seed.source} ({exc}); {position} of {len(plan.seeds)} "
                        f"inputs are done and saved in {options.out}: rerun the same command to continue"
                    ) from None
                lines = _filter(plan, teacher.name, pool, seed, drafts, counts)
                data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
                size += len(data)
                counts["inputs"] += 1
                _save_state(plan, position + 1, size, counts)
                bar.advance(counts)
    return AugmentResult(options.out, counts, plan.skipped_inputs, len(plan.seeds))


class _Requests:
    """The teacher's drafts for each input position, asked ``concurrency`` inputs ahead in threads.

    The threads are daemon threads, one per input in flight (at most ``concurrency``): on Ctrl-C the process exits
    at once and abandons their requests (a rerun asks them again, with the same seeds). A ``ThreadPoolExecutor``'s
    workers are joined at interpreter exit, which made Ctrl-C wait for every in-flight request (minutes).
    """

    def __init__(self, plan: Plan, teacher: Teacher, concurrency: int) -> None:
        self.plan, self.teacher, self.concurrency = plan, teacher, max(1, concurrency)
        self.pending: dict = {}

    def _ask(self, position: int) -> list[Draft]:
        options = self.plan.options
        first_seed = None if options.seed is None else options.seed + position * options.n
        return ask_drafts(
            self.teacher, options.mode, self.plan.seeds[position], options.n, first_seed, options.pivots
        )

    def drafts(self, position: int) -> list[Draft]:
        if self.concurrency == 1:
            return self._ask(position)
        last = min(position + self.concurrency, len(self.plan.seeds))
        for ahead in range(position, last):
            if ahead not in self.pending:
                self.pending[ahead] = self._start(ahead)
        return self.pending.pop(position).result()

    def _start(self, position: int):
        import threading
        from concurrent.futures import Future

        future: Future = Future()

        def run() -> None:
            try:
                future.set_result(self._ask(position))
            except BaseException as exc:  # handed to the main thread by result()
                future.set_exception(exc)

        threading.Thread(target=run, name=f"augment-teacher-{position}", daemon=True).start()
        return future

    def __enter__(self) -> _Requests:
        return self

    def __exit__(self, *exc) -> None:
        # Requests still in flight are abandoned: their daemon threads end with the process.
        self.pending.clear()


def _filter(
    plan: Plan, teacher_name: str, pool: RougePool, seed: Seed, drafts: list[Draft], counts: dict
) -> list:
    """The new records of one input that pass: readable, not cut off, ROUGE-L below ``max_rouge`` (counted)."""
    options = plan.options
    kept = []
    counts["requests"] += options.n
    for draft in drafts:
        if draft.dropped:
            counts[draft.dropped] += 1
            continue
        messages = draft.messages
        text = compared_text(options.mode, messages)
        if not text or not pool.tokens.tokenize(text):
            counts["bad_reply"] += 1
            continue
        score = pool.max_rouge_l(text, stop_at=options.max_rouge)
        if score >= options.max_rouge:
            counts["near_duplicate"] += 1
            continue
        pool.add(text)
        counts["kept"] += 1
        record: dict = {"messages": messages}
        if seed.task is not None:
            record["task"] = seed.task
        record["augment"] = {
            "mode": options.mode,
            "teacher": teacher_name,
            "source": seed.source,
            "n": options.n,
            "variant": draft.variant,
            **draft.provenance,
            "rouge_l_max": round(score, 4),
        }
        kept.append(record)
    return kept


def _lock(handle, out: Path) -> None:
    """One augmentation per output file: an exclusive ``flock`` on the open file (released when the process
    ends, however it ends)."""
    from tuneforge.utils import try_flock

    if not try_flock(handle.fileno()):
        raise UserError(f"--out {out} is being written by another tuneforge data augment; wait for it to finish "
                        "or stop it")


def _check_unchanged(plan: Plan) -> None:
    """Under the lock: the state is still the one :func:`prepare` read (no other run moved it on meanwhile)."""
    if plan.options.overwrite or not plan.state_path.exists():
        return
    try:
        state = json.loads(plan.state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if (state.get("done"), state.get("out_bytes")) != (plan.done, plan.out_bytes):
        raise UserError(
            f"--out {plan.options.out} changed while this run was starting (another augment run?); "
            "run the command again"
        )


def _save_state(plan: Plan, done: int, out_bytes: int, counts: dict) -> None:
    from tuneforge.utils import atomic_write_json

    atomic_write_json(
        plan.state_path,
        {
            "identity": plan.identity,
            "done": done,
            "total": len(plan.seeds),
            "out_bytes": out_bytes,
            "counts": counts,
        },
    )


class _Progress:
    """A rich progress bar on stderr (inputs done of all, ETA, kept / dropped so far); silent when disabled."""

    def __init__(self, enabled: bool, total: int, done: int, mode: str) -> None:
        self.enabled, self.total, self.done, self.mode = enabled, total, done, mode
        self.bar = self.task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            from tuneforge.console import err

            self.bar = Progress(
                TextColumn("[bold]augment {task.fields[mode]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[shown]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=err(),
            )
            self.task = self.bar.add_task(
                "augment", total=self.total, completed=self.done, mode=self.mode, shown=""
            )
            self.bar.start()
        return self

    def advance(self, counts: dict) -> None:
        if self.bar is not None:
            dropped = (
                counts["near_duplicate"] + counts["bad_reply"] + counts["answer_changed"] + counts["truncated"]
                + counts["teacher_error"]
            )
            self.bar.update(self.task, advance=1, shown=f"kept {counts['kept']}, dropped {dropped}")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
