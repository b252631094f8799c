"""Blind A/B: the sheet hides the mapping, votes map back to models, Wilson intervals, tampering is refused."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import pytest

from tuneforge.cli import main
from tuneforge.errors import UserError
from tuneforge.evaluate import abtest

PROMPTS = [f"prompt number {i}" for i in range(6)]
ANS_A = [f"answer from MODEL_ALPHA {i}" for i in range(6)]
ANS_B = [f"answer from MODEL_BETA {i}" for i in range(6)]


@pytest.fixture()
def sheet(tmp_path):
    items = abtest.make_items(PROMPTS, ANS_A, ANS_B, seed=7)
    path, key = abtest.write_sheet(tmp_path / "sheet.html", items, "runs/alpha", "runs/beta", 7,
                                   {"max_new_tokens": 8})
    return path, key, json.loads(key.read_text())


def _write_votes(path, key, choose):
    """``choose(item_key)`` → "left" | "right" | "tie" | None (unanswered)."""
    rows = []
    for it in key["items"]:
        vote = choose(it)
        if vote is not None:
            rows.append({"sheet_id": key["sheet_id"], "item": it["id"], "vote": vote})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _vote_for(model):
    return lambda it: "left" if it["left"] == model else "right"


def test_sheet_is_blind_and_key_holds_the_mapping(sheet):
    path, key_path, key = sheet
    page = path.read_text()
    assert "runs/alpha" not in page and "runs/beta" not in page and '"A"' not in page
    assert all(it["id"] in page for it in key["items"])
    assert key["models"] == {"A": "runs/alpha", "B": "runs/beta"}
    assert key_path.name == "sheet.key.json"
    sides = [it["left"] for it in key["items"]]
    assert set(sides) == {"A", "B"}  # seeded shuffle puts each model on both sides
    assert sides == [it["left_model"] for it in abtest.make_items(PROMPTS, ANS_A, ANS_B, seed=7)]
    for it in key["items"]:  # the left answer really is the left model's answer
        assert ("ALPHA" in it["answer_left"]) == (it["left"] == "A")


def test_votes_map_back_to_models(sheet, tmp_path):
    _, key_path, key = sheet
    ids = [it["id"] for it in key["items"]]
    # A wins items 0-2, item 3 a tie, B wins items 4-5.
    def choose(it):
        i = ids.index(it["id"])
        if i == 3:
            return "tie"
        return _vote_for("A" if i < 3 else "B")(it)

    votes = _write_votes(tmp_path / "votes.jsonl", key, choose)
    result = abtest.score_files(key_path, [votes])
    assert (result.wins, result.ties, result.losses) == (3, 1, 2)
    data = result.to_dict()
    assert data["win_rate"] == pytest.approx(0.5)
    assert data["a_win_rate_decisive"] == pytest.approx(0.6)
    assert data["win_ci"] == pytest.approx(list(abtest.wilson_interval(3, 6)))
    # two raters: counts add up; the sheet path works in place of the key path
    both = abtest.score_files(key_path.with_name("sheet.html"), [votes, votes])
    assert (both.wins, both.ties, both.losses, both.raters) == (6, 2, 4, 2)


def test_wilson_interval_matches_the_quadratic_solution():
    z = NormalDist().inv_cdf(0.975)
    for k, n in [(8, 10), (0, 5), (5, 5), (37, 120)]:
        # Wilson bounds are the roots p of (k/n - p)^2 = z^2 p (1 - p) / n.
        phat = k / n
        a = 1 + z * z / n
        b = -(2 * phat + z * z / n)
        c = phat * phat
        disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
        expected = ((-b - disc) / (2 * a), (-b + disc) / (2 * a))
        assert abtest.wilson_interval(k, n) == pytest.approx(expected, abs=1e-9)
    lo, hi = abtest.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_tampered_sheet_is_rejected(sheet, tmp_path, capsys):
    path, key_path, key = sheet
    votes = _write_votes(tmp_path / "votes.jsonl", key, _vote_for("A"))
    path.write_text(path.read_text().replace("prompt number 1", "prompt number one"))
    with pytest.raises(UserError, match="modified"):
        abtest.score_files(key_path, [votes])
    assert main(["abtest", "score", str(key_path), str(votes)]) == 2
    assert "modified" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: rows[:-2], "partial votes"),
        (lambda rows: [*rows[:-1], {**rows[-1], "item": "q999"}], "unknown item"),
        (lambda rows: [*rows, rows[0]], "voted twice"),
        (lambda rows: [{**r, "sheet_id": "0000"} for r in rows], "belongs to sheet"),
        (lambda rows: [{**rows[0], "vote": "A"}, *rows[1:]], "must be one of"),
    ],
)
def test_bad_votes_are_rejected(sheet, tmp_path, capsys, mutate, message):
    _, key_path, key = sheet
    rows = [{"sheet_id": key["sheet_id"], "item": it["id"], "vote": "tie"} for it in key["items"]]
    votes = tmp_path / "votes.jsonl"
    votes.write_text("".join(json.dumps(r) + "\n" for r in mutate(rows)))
    assert main(["abtest", "score", str(key_path), str(votes)]) == 2
    assert message in capsys.readouterr().err


def test_partial_votes_allowed_on_request(sheet, tmp_path):
    _, key_path, key = sheet
    votes = _write_votes(tmp_path / "v.jsonl", key, lambda it: "tie" if it["id"] != key["items"][0]["id"] else None)
    result = abtest.score_files(key_path, [votes], allow_partial=True)
    assert result.ties == len(PROMPTS) - 1
    assert main(["abtest", "score", str(key_path), str(votes), "--allow-partial", "--json"]) == 0


def test_terminal_votes():
    items = abtest.make_items(PROMPTS[:3], ANS_A[:3], ANS_B[:3], seed=1)
    answers = iter(["x", "l", "t", "q"])
    rows = abtest.terminal_votes(items, "abc", ask=lambda _: next(answers), say=lambda _: None)
    assert [(r["item"], r["vote"]) for r in rows] == [(items[0]["id"], "left"), (items[1]["id"], "tie")]
    assert all(r["sheet_id"] == "abc" for r in rows)


def test_missing_key_and_usage_errors(tmp_path, capsys):
    assert main(["abtest", "score", str(tmp_path / "nope.key.json"), str(tmp_path / "v.jsonl")]) == 2
    assert "key file not found" in capsys.readouterr().err
    assert main(["abtest", "only_one_model", "--prompts", "p.jsonl"]) == 2
    assert main(["abtest", "a", "b"]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_judge_with_position_swapping(sheet):
    _, _, key = sheet

    def fair(prompt, first, second):  # prefers MODEL_ALPHA's answer wherever it is shown
        return 1.0 if "ALPHA" in first else -1.0

    votes = abtest.judge_votes(key, fair)
    result = abtest.score(key, [{v["item"]: v["vote"] for v in votes}])
    assert (result.wins, result.ties, result.losses) == (len(PROMPTS), 0, 0)

    def biased(prompt, first, second):  # always prefers whatever is shown first
        return 1.0

    votes = abtest.judge_votes(key, biased)
    assert {v["vote"] for v in votes} == {"tie"}  # the swap exposes the position bias
