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


# ----------------------------------------------------------------------------- the registry


@pytest.fixture()
def extra_metric():
    """A model-scored metric registered for one test (as another package would register reward_acc)."""
    calls = []

    def first_token_logit(loaded, records, **options):
        calls.append((len(records), options["batch_size"]))
        return {"first_logit": 0.125, "first_logit_records": len(records)}

    metric = tm.register(tm.Metric("first_logit", tm.MODEL, first_token_logit, higher_is_better=False, fmt=".4f",
                                   aliases=("fl",), shown_with=("first_logit_records",), help="test metric"))
    yield metric, calls
    del tm.METRICS["first_logit"]


def test_parse_metrics_expands_aliases_in_order_without_duplicates():
    names = [m.name for m in tm.parse_metrics("em, rouge,perplexity,rouge2,,exact")]
    assert names == ["exact", "rouge1", "rouge2", "rougeL", "ppl"]
    from tuneforge.errors import UserError

    with pytest.raises(UserError, match="did you mean 'contains'"):
        tm.parse_metrics("ppl,contain")
    with pytest.raises(UserError, match="empty"):
        tm.parse_metrics(" , ")
    with pytest.raises(ValueError, match="already registered"):
        tm.register(tm.Metric("exact", tm.GENERATION, tm.exact_match))
    with pytest.raises(ValueError, match="already registered"):
        tm.register(tm.Metric("rouge", tm.GENERATION, tm.exact_match))  # an alias of rouge1/2/L


def test_registry_shapes_results_and_display():
    assert tm.columns(tm.parse_metrics("ppl,exact")) == ["ppl", "tokens", "exact"]
    assert tm.format_value("ppl", 12.5) == "12.500" and tm.format_value("exact", 50.0) == "50.00%"
    assert tm.format_value("tokens", 12345) == "12,345" and tm.format_value("ppl", None) == "-"
    assert tm.METRICS["ppl"].label == "ppl ↓" and tm.METRICS["bleu"].label == "bleu ↑"
    # generation metrics: a plain value becomes {name: value}; a dict (BLEU's tokenizer) is kept whole
    assert tm.METRICS["exact"].result(["a"], ["A."]) == {"exact": 100.0}
    assert set(tm.METRICS["bleu"].result(["a b c d"], ["a b c d"])) == {"bleu", "bleu_tokenize"}
    assert tm.METRICS["rougeL"].result(PREDS, REFS) == {"rougeL": tm.rouge(PREDS, REFS)["rougeL"]}


def test_a_registered_metric_reaches_cli_eval_and_report(tmp_path, tiny_llama, tiny_tokenizer, extra_metric, capsys):
    """One registration: --metrics accepts it (and its alias), --help lists it, eval computes it through the
    runner unchanged, and the report shows its columns."""
    import json

    from tuneforge.cli import main
    from tuneforge.evaluate.report import render_report

    metric, calls = extra_metric
    model = tmp_path / "m"
    tiny_llama.save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of text"}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "first_logit = test metric (lower is better)" in " ".join(capsys.readouterr().out.split())  # any wrap
    assert main(["eval", str(model), "--data", str(data), "--metrics", "fl,ppl", "--json", "--batch-size", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["first_logit"] == 0.125 and row["first_logit_records"] == 3 and "ppl" in row
    assert calls == [(3, 2)]
    assert main(["eval", str(model), "--data", str(data), "--metrics", "first_logit"]) == 0
    assert "0.1250" in capsys.readouterr().out
    page = render_report("r", [], None, [{"model": "m", "data": "d", **row}], None, [], None)
    assert "first_logit ↓" in page and "0.1250" in page and "first_logit_records" in page
