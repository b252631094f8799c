"""Blind pairwise (A/B) comparison of two models by human raters.

Making a sheet: both models answer the same prompts with the same generation settings; for every item a seeded
coin decides which model is shown on the left. Two files are written:

* ``sheet.html`` — offline page with the prompts and the two anonymous answers ("left" / "right"), radio buttons
  (left better / tie / right better) and a button that downloads ``votes.jsonl``. It does **not** contain which
  model is which.
* ``sheet.key.json`` — the hidden mapping (item → which model is left), the model names, the generation settings,
  a random ``sheet_id`` and the SHA-256 of the sheet file. Keep it away from the raters.

Scoring (``tuneforge abtest score sheet.key.json votes.jsonl [more votes ...]``) checks that the sheet still has
its recorded hash, that every vote carries the sheet's id and a known item id, that no item is voted twice in one
file and that every item is voted (partial files are refused unless ``allow_partial``), then maps left/right back
to the models and counts wins, ties and losses of model A. A judge model can vote too
(``tuneforge abtest judge KEY --judge MODEL``): each pair is judged in both orders, and only a verdict that
survives the swap counts (otherwise a tie). The 95% confidence intervals are **Wilson score
intervals** for each proportion (wins / ties / losses over all votes, and A's win rate over decisive votes).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from tuneforge.errors import UserError

VOTES = ("left", "right", "tie")
KEY_VERSION = 1


# --------------------------------------------------------------------------- statistics


Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...


def wilson_interval(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k/n`` (95% by default). ``(0, 0)`` when ``n`` is 0."""
    if n <= 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class ABResult:
    """Outcome counts from model A's point of view, with 95% Wilson intervals (fractions 0-1)."""

    model_a: str
    model_b: str
    wins: int
    ties: int
    losses: int
    raters: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def to_dict(self) -> dict:
        n = self.n
        decisive = self.wins + self.losses
        out: dict[str, Any] = {"model_a": self.model_a, "model_b": self.model_b, "votes": n, "raters": self.raters,
                               "interval": "wilson 95%"}
        for name, k in (("win", self.wins), ("tie", self.ties), ("loss", self.losses)):
            out[name] = k
            out[f"{name}_rate"] = k / n if n else 0.0
            out[f"{name}_ci"] = list(wilson_interval(k, n))
        out["a_win_rate_decisive"] = self.wins / decisive if decisive else None
        out["a_win_rate_decisive_ci"] = list(wilson_interval(self.wins, decisive)) if decisive else None
        return out


# --------------------------------------------------------------------------- items and files


def make_items(prompts: list[Any], answers_a: list[str], answers_b: list[str], seed: int) -> list[dict]:
    """One item per prompt: ``{"id", "prompt", "left", "right", "left_model"}`` with the side chosen by ``seed``."""
    if not len(prompts) == len(answers_a) == len(answers_b):
        raise ValueError("prompts and both answer lists must have the same length")
    rng = random.Random(seed)
    items = []
    width = max(3, len(str(len(prompts))))
    for i, (prompt, a, b) in enumerate(zip(prompts, answers_a, answers_b, strict=True)):
        a_left = rng.random() < 0.5
        items.append({"id": f"q{i + 1:0{width}d}", "prompt": prompt_text(prompt),
                      "left": a if a_left else b, "right": b if a_left else a, "left_model": "A" if a_left else "B"})
    return items


def prompt_text(prompt: Any) -> str:
    """A readable prompt: a raw string as is, a conversation as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0]["role"] == "user":
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def key_path_for(sheet: str | Path) -> Path:
    """``sheet.html`` → ``sheet.key.json`` (next to it)."""
    sheet = Path(sheet)
    return sheet.with_name(sheet.stem + ".key.json")


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_key(items: list[dict], model_a: str, model_b: str, sheet_id: str, sheet_file: str | None,
              sheet_sha256: str | None, seed: int, generation: dict) -> dict:
    """The private key of a sheet (see the module docstring)."""
    return {
        "version": KEY_VERSION,
        "sheet_id": sheet_id,
        "sheet_file": sheet_file,
        "sheet_sha256": sheet_sha256,
        "models": {"A": model_a, "B": model_b},
        "seed": seed,
        "generation": generation,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "items": [{"id": it["id"], "left": it["left_model"], "prompt": it["prompt"],
                   "answer_left": it["left"], "answer_right": it["right"]} for it in items],
    }


def refuse_existing(paths: list[str | Path], force: bool = False) -> None:
    """Refuse to replace an earlier sheet, key or votes file unless ``force``: a replaced key can no longer score
    the votes raters send back for the old sheet.

    Raises:
        UserError: naming the existing files and the fix.
    """
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        raise UserError(f"abtest: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (an earlier "
                        "sheet: votes on it are scored with its key); choose another --out, or pass --force to "
                        "replace them")


def write_sheet(out: str | Path, items: list[dict], model_a: str, model_b: str, seed: int,
                generation: dict, title: str = "Blind comparison", force: bool = False) -> tuple[Path, Path]:
    """Write ``out`` (the HTML sheet) and its key file; returns ``(sheet_path, key_path)``.

    Raises:
        UserError: the sheet or its key exists already and ``force`` is not set (:func:`refuse_existing`).
    """
    from tuneforge.utils import atomic_write_json, atomic_write_text

    out = Path(out)
    refuse_existing([out, key_path_for(out)], force)
    sheet_id = secrets.token_hex(8)
    atomic_write_text(out, render_sheet(items, sheet_id, title))
    key_path = key_path_for(out)
    atomic_write_json(key_path, build_key(items, model_a, model_b, sheet_id, out.name, sha256_file(out), seed,
                                          generation))
    return out, key_path


def load_key(path: str | Path) -> tuple[dict, Path]:
    """Read a key file (or find it next to a given ``sheet.html``) and verify the sheet's hash.

    Raises:
        UserError: missing/invalid key, or a sheet whose content no longer matches the recorded hash.
    """
    path = Path(path)
    if path.suffix.lower() in (".html", ".htm"):
        path = key_path_for(path)
    if not path.is_file():
        raise UserError(f"A/B key file not found: {path} (it is written next to the sheet as <sheet>.key.json)")
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
        items = key["items"]
        key["sheet_id"], key["models"]["A"], key["models"]["B"]  # noqa: B018 - presence check
        {it["id"]: it["left"] for it in items}  # noqa: B018
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: not an A/B key file ({exc})") from None
    if key.get("sheet_file") and key.get("sheet_sha256"):
        sheet = path.parent / key["sheet_file"]
        if not sheet.is_file():
            raise UserError(f"{path}: its sheet {sheet} is missing; keep the sheet next to its key file")
        if sha256_file(sheet) != key["sheet_sha256"]:
            raise UserError(f"{sheet} was modified after it was made (SHA-256 differs from {path.name}); "
                            "votes on a changed sheet cannot be trusted — make a new sheet")
    return key, path


def read_votes(path: str | Path, key: dict, allow_partial: bool = False) -> dict[str, str]:
    """Votes of one rater file: ``{item_id: "left"|"right"|"tie"}``, validated against ``key``.

    Raises:
        UserError: unreadable line, a vote for another sheet, an unknown item id, a duplicate item, an invalid
            choice, or (unless ``allow_partial``) unanswered items — each naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"votes file not found: {path}")
    known = {it["id"] for it in key["items"]}
    votes: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object like {{\"sheet_id\", \"item\", \"vote\"}}")
        if row.get("sheet_id") != key["sheet_id"]:
            raise UserError(f"{where}: vote belongs to sheet {row.get('sheet_id')!r}, not to this key's sheet "
                            f"{key['sheet_id']!r} — wrong key file or tampered votes")
        item = row.get("item")
        if item not in known:
            raise UserError(f"{where}: unknown item id {item!r} — the votes do not match this sheet (tampered?)")
        if item in votes:
            raise UserError(f"{where}: item {item!r} is voted twice in one file")
        if row.get("vote") not in VOTES:
            raise UserError(f"{where}: vote {row.get('vote')!r} for {item} must be one of {', '.join(VOTES)}")
        votes[item] = row["vote"]
    missing = [it["id"] for it in key["items"] if it["id"] not in votes]
    if missing and not allow_partial:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise UserError(f"{path}: partial votes — {len(missing)} of {len(known)} items unanswered ({shown}); "
                        "finish the sheet, or pass --allow-partial to score the answered items only")
    if not votes:
        raise UserError(f"{path}: no votes in the file")
    return votes


def score(key: dict, vote_files: list[dict[str, str]]) -> ABResult:
    """Map every rater's left/right votes back to models and count A's wins, ties and losses."""
    left_of = {it["id"]: it["left"] for it in key["items"]}
    wins = ties = losses = 0
    for votes in vote_files:
        for item, vote in votes.items():
            if vote == "tie":
                ties += 1
                continue
            winner = left_of[item] if vote == "left" else ("B" if left_of[item] == "A" else "A")
            if winner == "A":
                wins += 1
            else:
                losses += 1
    return ABResult(key["models"]["A"], key["models"]["B"], wins, ties, losses, raters=len(vote_files))


def score_files(key_or_sheet: str | Path, votes_paths: list[str | Path], allow_partial: bool = False) -> ABResult:
    """Load + verify the key, read every votes file, and score."""
    key, _ = load_key(key_or_sheet)
    return score(key, [read_votes(p, key, allow_partial) for p in votes_paths])


# --------------------------------------------------------------------------- terminal mode


def terminal_votes(items: list[dict], sheet_id: str, ask: Callable[[str], str] | None = None,
                   say: Callable[[str], None] | None = None) -> list[dict]:
    """Ask a rater for each item in the terminal; returns vote rows (``sheet_id``, ``item``, ``vote``).

    Answers: ``l`` (left better), ``r`` (right better), ``t`` (tie), ``s`` (skip), ``q`` (stop here; end of
    input counts as ``q``). ``ask``/``say`` default to ``input``/``print``.
    """
    ask = ask or input
    say = say or print
    choices = {"l": "left", "r": "right", "t": "tie"}
    rows = []
    for n, item in enumerate(items, 1):
        say(f"\n=== {item['id']} ({n}/{len(items)}) ===\n{item['prompt']}\n")
        say(f"--- LEFT ---\n{item['left']}\n")
        say(f"--- RIGHT ---\n{item['right']}\n")
        while True:
            try:
                answer = ask("better? [l]eft / [r]ight / [t]ie / [s]kip / [q]uit: ").strip().lower()[:1]
            except EOFError:
                answer = "q"
            if answer in choices or answer in ("s", "q"):
                break
            say("please answer l, r, t, s or q")
        if answer == "q":
            break
        if answer in choices:
            rows.append({"sheet_id": sheet_id, "item": item["id"], "vote": choices[answer]})
    return rows


def write_votes(path: str | Path, rows: list[dict]) -> None:
    from tuneforge.utils import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------- judge model

JUDGE_PROMPT = (
    "You are comparing two answers to the same request. Pick the answer that is more helpful, correct and "
    "clear.\n\n[Request]\n{prompt}\n\n[Answer 1]\n{first}\n\n[Answer 2]\n{second}\n\n"
    "Which answer is better? Reply with 1 or 2 only."
)


def judge_votes(key: dict, prefers_first: Callable[[str, str, str], float], rater: str = "judge") -> list[dict]:
    """Votes of a judge with position swapping, in the votes-file format (scored like a human rater's).

    Each item is judged twice, with the sheet's left answer shown first and then second.
    ``prefers_first(prompt, first, second)`` returns a score > 0 when the judge prefers the first answer.
    The item's vote is the side both orders agree on; a disagreement (position bias) counts as a tie.
    """
    rows = []
    for it in key["items"]:
        left_first = prefers_first(it["prompt"], it["answer_left"], it["answer_right"]) > 0
        left_second = prefers_first(it["prompt"], it["answer_right"], it["answer_left"]) <= 0
        vote = ("left" if left_first else "right") if left_first == left_second else "tie"
        rows.append({"sheet_id": key["sheet_id"], "item": it["id"], "vote": vote, "rater": rater})
    return rows


def logit_judge(loaded: Any) -> Callable[[str, str, str], float]:
    """``prefers_first`` for :func:`judge_votes` from a loaded chat model: the log-probability margin of
    answering "1" over "2" as the first token of its reply (no sampling, so it is deterministic)."""
    import torch

    from tuneforge.models.generation import render_prompt

    tokenizer, model = loaded.tokenizer, loaded.model
    one = tokenizer.encode("1", add_special_tokens=False)[0]
    two = tokenizer.encode("2", add_special_tokens=False)[0]
    device = next(model.parameters()).device

    def prefers_first(prompt: str, first: str, second: str) -> float:
        messages = [{"role": "user", "content": JUDGE_PROMPT.format(prompt=prompt, first=first, second=second)}]
        text, special = render_prompt(tokenizer, loaded.template, messages)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=special)["input_ids"].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        return float(logits[one] - logits[two])

    return prefers_first


# --------------------------------------------------------------------------- HTML


def render_sheet(items: list[dict], sheet_id: str, title: str = "Blind comparison") -> str:
    """The offline rating page. Contains the answers by side only, never which model gave them."""
    blocks = []
    for it in items:
        iid = html.escape(it["id"])
        radios = "".join(
            f'<label><input type="radio" name="{iid}" value="{v}"> {label}</label>'
            for v, label in (("left", "left is better"), ("tie", "tie"), ("right", "right is better"))
        )
        blocks.append(
            f'<section class="item" data-id="{iid}"><h2>{iid}</h2>'
            f'<div class="prompt">{html.escape(it["prompt"])}</div>'
            f'<div class="pair"><div class="ans"><h3>left</h3><pre>{html.escape(it["left"])}</pre></div>'
            f'<div class="ans"><h3>right</h3><pre>{html.escape(it["right"])}</pre></div></div>'
            f'<div class="vote">{radios}</div></section>'
        )
    return _SHEET.format(title=html.escape(title), sheet_id=html.escape(sheet_id), count=len(items),
                         items="\n".join(blocks))


_SHEET = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; }}
.item {{ border: 1px solid #ccc; border-radius: 6px; padding: 1em; margin: 1em 0; }}
.prompt {{ white-space: pre-wrap; background: #f4f4f4; padding: .6em; border-radius: 4px; }}
.pair {{ display: flex; gap: 1em; }} .ans {{ flex: 1; min-width: 0; }}
pre {{ white-space: pre-wrap; word-wrap: break-word; background: #fafafa; padding: .6em; border: 1px solid #eee; }}
.vote label {{ margin-right: 1.5em; }} #bar {{ position: sticky; bottom: 0; background: #fff; padding: .8em 0; }}
</style></head><body>
<h1>{title}</h1>
<p>{count} items. For each prompt, pick the better answer (or tie). The two sides are shuffled per item.
When done, press <b>Download votes</b> and send the <code>votes.jsonl</code> file back.</p>
<p>Rater (optional): <input id="rater" size="20"></p>
{items}
<div id="bar"><button id="dl">Download votes</button> <span id="status"></span></div>
<script>
const SHEET_ID = "{sheet_id}";
function collect() {{
  const rater = document.getElementById("rater").value;
  const rows = [], missing = [];
  document.querySelectorAll("section.item").forEach(s => {{
    const id = s.dataset.id, c = s.querySelector("input:checked");
    if (c) rows.push({{sheet_id: SHEET_ID, item: id, vote: c.value, rater: rater}}); else missing.push(id);
  }});
  return [rows, missing];
}}
document.addEventListener("change", () => {{
  const [rows, missing] = collect();
  document.getElementById("status").textContent = rows.length + " voted, " + missing.length + " left";
}});
document.getElementById("dl").onclick = () => {{
  const [rows, missing] = collect();
  if (missing.length && !confirm(missing.length + " items unanswered (" + missing.slice(0, 5).join(", ") +
      "). Download a partial file anyway?")) return;
  const blob = new Blob([rows.map(r => JSON.stringify(r)).join("\\n") + "\\n"], {{type: "application/jsonl"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = "votes.jsonl"; a.click();
}};
</script></body></html>
"""
