"""Text metrics equal sacrebleu / rouge-score on fixed strings; unsegmented scripts are scored per character."""

from __future__ import annotations

import pytest

from tuneforge.evaluate import metrics as tm

PREDS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello world"]
REFS = ["the cat is sitting on the mat", "the quick brown fox jumped over the lazy dog", "goodbye world"]


def test_bleu_equals_sacrebleu():
    import sacrebleu

    expected = sacrebleu.corpus_bleu(PREDS, [REFS]).score
    result = tm.bleu(PREDS, REFS)
    assert result["bleu"] == pytest.approx(expected)
    assert result["bleu_tokenize"] == "13a"
    assert 0 < result["bleu"] < 100
    assert tm.bleu(REFS, REFS)["bleu"] == pytest.approx(100.0)


def test_rouge_equals_rouge_score():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(PREDS, REFS, strict=True)]
    result = tm.rouge(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert result[key] == pytest.approx(100 * sum(s[key].fmeasure for s in scores) / len(scores))
    assert result["rouge1"] > result["rouge2"] > 0


def test_unicode_tokenizer_matches_rouge_default_on_ascii():
    from rouge_score import tokenize

    text = "The Quick-brown fox, 42 times! (don't) stop"
    assert tm.UnicodeTokenizer().tokenize(text) == tokenize.tokenize(text, None)


def test_chinese_bleu_uses_zh_tokenizer():
    import sacrebleu

    preds, refs = ["我喜欢机器学习"], ["我喜欢深度学习"]
    result = tm.bleu(preds, refs)
    assert result["bleu_tokenize"] == "zh"
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score)
    # Unsegmented, 13a sees one "word" per sentence and scores 0; per-character matching gives partial credit.
    assert sacrebleu.corpus_bleu(preds, [refs]).score == 0
    assert result["bleu"] > 0
    assert tm.bleu(["今日は晴れです"], ["今日は雨です"])["bleu_tokenize"] == "char"


def test_chinese_rouge_is_character_level():
    from rouge_score import rouge_scorer

    # rouge-score's default tokenizer drops every non-ASCII character: the pair would score 0.
    default = rouge_scorer.RougeScorer(["rouge1"]).score("我喜欢深度学习", "我喜欢机器学习")["rouge1"].fmeasure
    assert default == 0
    result = tm.rouge(["我喜欢机器学习"], ["我喜欢深度学习"], ("rouge1", "rouge2"))
    # 7 characters each, 5 shared unigrams (我 喜 欢 学 习); bigrams: 我喜 喜欢 学习 shared of 6 → 3/6.
    assert result["rouge1"] == pytest.approx(100 * 5 / 7)
    assert result["rouge2"] == pytest.approx(100 * 3 / 6)
    mixed = tm.UnicodeTokenizer().tokenize("用Python写代码 café")
    assert mixed == ["用", "python", "写", "代", "码", "café"]


def test_exact_and_contains_are_normalised():
    preds = ["Paris.", "  the answer is 42 ", "北京 ", "no"]
    refs = ["paris", "42", "北 京", "yes"]
    assert tm.exact_match(preds, refs) == pytest.approx(100 * 2 / 4)  # Paris, 北京
    assert tm.contains_match(preds, refs) == pytest.approx(100 * 3 / 4)  # + "42" inside the second
    assert tm.contains_match(["anything"], [""]) == 0  # an empty reference matches nothing
    with pytest.raises(ValueError):
        tm.exact_match(["a"], ["a", "b"])
