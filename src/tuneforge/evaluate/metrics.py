"""Text metrics of generations against references: BLEU, ROUGE-1/2/L, exact match, contains-match.

Every score is on a 0-100 scale (BLEU as sacrebleu reports it; ROUGE F1, exact and contains as percentages).

Unsegmented scripts (Chinese, Japanese, Thai, ...) have no spaces between words, so word-level scores would compare
whole sentences as single "words". When such characters appear in the predictions or references:

* BLEU uses sacrebleu's ``zh`` tokenizer (each Han character a token) for Chinese, or its ``char`` tokenizer when
  other unsegmented scripts (kana, Thai, ...) appear;
* ROUGE tokenizes each unsegmented character as one token and other words as lower-cased letter/digit runs
  (rouge-score's own tokenizer keeps only ``[a-z0-9]``, so it would silently drop every non-ASCII character);
* exact/contains matching ignores whitespace entirely.

Plain ASCII text is scored with each library's defaults, so results equal what sacrebleu / rouge-score report.
"""

from __future__ import annotations

import re
import unicodedata

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# Han (CJK unified ideographs + extension A + compatibility), and scripts written without spaces.
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_OTHER_UNSEGMENTED = (
    r"\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff"  # hiragana, katakana
    r"\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff"  # thai, lao, myanmar, khmer
)
_HAN_RE = re.compile(f"[{_HAN}]")
_OTHER_RE = re.compile(f"[{_OTHER_UNSEGMENTED}]")
_UNSEGMENTED_RE = re.compile(f"[{_HAN}{_OTHER_UNSEGMENTED}]")
# One unsegmented character, or a run of letters/digits of any other script.
_TOKEN_RE = re.compile(f"[{_HAN}{_OTHER_UNSEGMENTED}]|[^\\W_{_HAN}{_OTHER_UNSEGMENTED}]+")


def has_unsegmented(texts: list[str] | str) -> bool:
    """Whether any text contains characters of a script written without spaces (Han, kana, Thai, ...)."""
    texts = [texts] if isinstance(texts, str) else texts
    return any(_UNSEGMENTED_RE.search(t or "") for t in texts)


def bleu_tokenizer(texts: list[str]) -> str:
    """The sacrebleu tokenizer for this corpus: ``13a`` (default), ``zh`` (Chinese) or ``char`` (other scripts)."""
    if any(_OTHER_RE.search(t or "") for t in texts):
        return "char"
    if any(_HAN_RE.search(t or "") for t in texts):
        return "zh"
    return "13a"


def bleu(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu) of ``predictions`` against one reference each.

    Returns:
        ``{"bleu": score 0-100, "bleu_tokenize": tokenizer used}``.
    """
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    tokenize = bleu_tokenizer(list(predictions) + list(references))
    score = BLEU(tokenize=tokenize).corpus_score(list(predictions), [list(references)])
    return {"bleu": float(score.score), "bleu_tokenize": tokenize}


class UnicodeTokenizer:
    """A rouge-score tokenizer that keeps every script.

    Lower-cases, then yields each unsegmented character (Han, kana, Thai...) as a token and every other run of
    letters/digits as a token. On ASCII text it yields exactly rouge-score's default tokens (no stemming).
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())


def rouge(predictions: list[str], references: list[str], types: tuple[str, ...] = ROUGE_TYPES) -> dict:
    """Mean ROUGE F1 (rouge-score) over prediction/reference pairs, 0-100.

    ASCII-only corpora use rouge-score's default tokenizer; any non-ASCII character switches to
    :class:`UnicodeTokenizer` for the whole corpus (so scores within one call are comparable).

    Returns:
        ``{type: score}`` for each requested type.
    """
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    texts = list(predictions) + list(references)
    tokenizer = None if all(t.isascii() for t in texts) else UnicodeTokenizer()
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=False, tokenizer=tokenizer)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score's order: (target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: 100.0 * totals[t] / n for t in types}


def normalize(text: str) -> str:
    """Normalised form for matching: NFKC, case-folded, punctuation removed, whitespace collapsed.

    Whitespace is removed entirely when the text contains unsegmented script (spaces carry no meaning there).
    """
    text = unicodedata.normalize("NFKC", text or "").casefold()
    text = "".join(" " if unicodedata.category(c).startswith(("P", "S")) else c for c in text)
    if has_unsegmented(text):
        return re.sub(r"\s+", "", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after :func:`normalize`."""
    _check_lengths(predictions, references)
    hits = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / max(len(predictions), 1)


def contains_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions that contain their (non-empty) normalised reference."""
    _check_lengths(predictions, references)
    hits = 0
    for p, r in zip(predictions, references, strict=True):
        ref = normalize(r)
        hits += bool(ref) and ref in normalize(p)
    return 100.0 * hits / max(len(predictions), 1)


def _check_lengths(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
