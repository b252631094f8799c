"""The metric registry of ``tuneforge eval`` and the report, and the text metrics it registers.

Each metric is registered once (:func:`register`) with its name, its function, what it needs (the model's own
log-likelihood, or generations compared with references), its direction, how it is shown and its aliases. The
``--metrics`` parsing and help, the eval table and the report's columns are derived from :data:`METRICS`.

Text metrics: BLEU, ROUGE-1/2/L, exact match, contains-match. Every score is on a 0-100 scale (BLEU as sacrebleu reports it; ROUGE F1, exact and contains as percentages).

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.errors import UserError, did_you_mean
from tuneforge.text import HAN as _HAN
from tuneforge.text import OTHER_UNSEGMENTED as _OTHER_UNSEGMENTED
from tuneforge.text import UnicodeTokenizer

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# The script classes and the ROUGE tokenizer live in tuneforge.text (shared with data.augment's filter).
_HAN_RE = re.compile(f"[{_HAN}]")
_OTHER_RE = re.compile(f"[{_OTHER_UNSEGMENTED}]")
_UNSEGMENTED_RE = re.compile(f"[{_HAN}{_OTHER_UNSEGMENTED}]")


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


# --------------------------------------------------------------------------- the registry

GENERATION = "generation"  # score(predictions, references) -> value | dict; the model generates an answer per record
MODEL = "model"            # score(loaded, records, **options) -> dict; the model scores the records itself


@dataclass(frozen=True)
class Metric:
    """One registered metric.

    Attributes:
        name: the ``--metrics`` name and the result key.
        needs: :data:`GENERATION` (``score(predictions, references)``, references from each record's last
            assistant message) or :data:`MODEL` (``score(loaded, records, max_length=, stride=, batch_size=)`` with
            the ``Loaded`` model of ``tuneforge.models.reference``; records as the data readers return them).
        score: returns the value, or a dict holding ``name`` and any side values (e.g. ``tokens``).
        higher_is_better: the direction (the table marks the best model by it).
        fmt: format spec of the value; ``unit`` is appended (``"%"``).
        help: one line for ``--metrics`` help.
        aliases: other ``--metrics`` names that select it; several metrics may share one (``rouge``).
        shown_with: side values shown in their own columns after it (``ppl`` → ``tokens``).
        check: ``check(records)`` raises ``UserError`` naming the first record the metric cannot score; called
            before any model is loaded (``tuneforge eval``) or any trial trains (``tuneforge search``).
    """

    name: str
    needs: str
    score: Callable[..., Any]
    higher_is_better: bool = True
    fmt: str = ".2f"
    unit: str = ""
    help: str = ""
    aliases: tuple[str, ...] = ()
    shown_with: tuple[str, ...] = ()
    check: Callable[[list[dict]], None] | None = None

    def result(self, *args, **kwargs) -> dict:
        """``score`` as result-row entries."""
        value = self.score(*args, **kwargs)
        return dict(value) if isinstance(value, dict) else {self.name: value}

    @property
    def label(self) -> str:
        """Column header: the name with its direction."""
        return f"{self.name} {'↑' if self.higher_is_better else '↓'}"


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add ``metric`` to :data:`METRICS` (names and aliases must be new)."""
    taken = {*METRICS, *aliases()}
    if metric.needs not in (GENERATION, MODEL):
        raise ValueError(f"metric {metric.name}: needs must be {GENERATION!r} or {MODEL!r}")
    if metric.name in taken or metric.name in metric.aliases or set(metric.aliases) & set(METRICS):
        raise ValueError(f"metric {metric.name}: name or alias already registered")
    METRICS[metric.name] = metric
    return metric


def aliases() -> dict[str, list[str]]:
    """``{alias: [metric names]}`` in registration order."""
    out: dict[str, list[str]] = {}
    for metric in METRICS.values():
        for alias in metric.aliases:
            out.setdefault(alias, []).append(metric.name)
    return out


def parse_metrics(spec: str) -> list[Metric]:
    """``"ppl,bleu,rouge"`` → the metrics ppl, bleu, rouge1, rouge2, rougeL (order kept, no duplicates).

    Raises:
        UserError: an unknown name (with the closest known one), or an empty list.
    """
    groups = aliases()
    names: list[str] = []
    for raw in filter(None, (s.strip() for s in spec.split(","))):
        if raw not in METRICS and raw not in groups:
            known = [*METRICS, *groups]
            raise UserError(f"--metrics: unknown metric {raw!r}{did_you_mean(raw, known)}; known: {', '.join(known)}")
        names.extend(groups.get(raw, [raw]))
    if not names:
        raise UserError(f"--metrics is empty; e.g. --metrics {','.join(METRICS)}")
    return [METRICS[name] for name in dict.fromkeys(names)]


def metrics_help() -> str:
    """The ``--metrics`` help text."""
    parts = [f"{m.name} = {m.help} ({'higher' if m.higher_is_better else 'lower'} is better)"
             for m in METRICS.values()]
    groups = "; ".join(f"{alias} = {','.join(names)}" for alias, names in aliases().items())
    return f"comma list of: {'; '.join(parts)}. Aliases: {groups}"


def columns(metrics: list[Metric]) -> list[str]:
    """Result keys shown as columns, in the order the metrics were asked for."""
    return [key for m in metrics for key in (m.name, *m.shown_with)]


def format_value(key: str, value: Any) -> str:
    """A result value as shown in the eval table and the report (the metric's format; other numbers plainly)."""
    metric = METRICS.get(key)
    if value is None:
        return "-"
    if metric is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:{metric.fmt}}{metric.unit}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _perplexity(loaded: Any, records: list[dict], *, max_length: int | None = None, stride: int | None = None,
                batch_size: int = 4, **_) -> dict:
    from tuneforge.evaluate.perplexity import perplexity

    try:
        result = perplexity(loaded.model, loaded.tokenizer, records, template=loaded.template,
                            max_length=max_length, stride=stride, batch_size=batch_size)
    except ValueError as exc:
        raise UserError(f"perplexity: {exc}") from None
    row = {"ppl": result.ppl, "tokens": result.tokens, "nll": result.nll}
    return {**row, "ppl_skipped": result.skipped} if result.skipped else row


def _reward_acc(loaded: Any, records: list[dict], *, max_length: int | None = None, batch_size: int = 4, **_) -> dict:
    from tuneforge.evaluate.preference import reward_acc_metric

    return reward_acc_metric(loaded, records, max_length=max_length, batch_size=batch_size)


def _pairs_only(records: list[dict]) -> None:
    for record in records:
        if "chosen" not in record:
            raise UserError(f"{record.get('source', '?')}: reward_acc needs preference pairs ({{prompt, chosen, "
                            "rejected}}); this record is not one (docs/preference.md has the formats)")


def _rouge(kind: str) -> Callable[[list[str], list[str]], float]:
    return lambda predictions, references: rouge(predictions, references, (kind,))[kind]


register(Metric("ppl", MODEL, _perplexity, higher_is_better=False, fmt=".3f", aliases=("perplexity",),
                shown_with=("tokens",), help="token-weighted perplexity, answers only on chat data"))
register(Metric("bleu", GENERATION, bleu, help="corpus BLEU, 0-100"))
for _kind in ROUGE_TYPES:
    register(Metric(_kind, GENERATION, _rouge(_kind), aliases=("rouge",), help=f"ROUGE-{_kind[5:]} F1, 0-100"))
register(Metric("exact", GENERATION, exact_match, unit="%", aliases=("em",), help="normalised exact match"))
register(Metric("contains", GENERATION, contains_match, unit="%", help="reference contained in the answer"))
register(Metric("reward_acc", MODEL, _reward_acc, fmt=".1f", unit="%", shown_with=("reward_margin",), check=_pairs_only,
                help="preference pairs: chosen answer scored above the rejected one (adapters: against the adapter "
                     "disabled)"))
