"""``tuneforge score RM --data records.jsonl --out scored.jsonl``: a reward per record from a reward model.

RM is a ``stage: rm`` run (or its ``final/``, or a one-output ``*ForSequenceClassification`` directory); the records
are read by the data readers (any format ``tuneforge eval`` reads). What is scored: a chat record's last assistant
turn given the turns before it, an unpaired record's ``completion`` given its ``prompt``, and both sides of a pair.
Each output line is the canonical record plus ``reward`` (pairs: ``reward_chosen``, ``reward_rejected``); ``null``
when the answer does not fit ``--max-length``. Light module: torch loads inside the command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from tuneforge.errors import UserError


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "score", help="write a reward per record with a reward model (a stage rm run)",
        description="Score every record of --data with the reward model RM and write one JSON line per record to "
        "--out: the record plus 'reward' (pairs: 'reward_chosen' and 'reward_rejected').")
    parser.add_argument("model", metavar="RM", help="a reward-model run (stage: rm), its final/ or a model directory")
    parser.add_argument("--data", required=True, help="records: chat, {prompt, completion} or {prompt, chosen, "
                        "rejected} (JSONL/JSON/CSV/Parquet, as the data readers take them)")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--format", default="auto", help="data format (default: auto)")
    parser.add_argument("--max-length", type=int, default=2048, help="longest scored sequence in tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.set_defaults(func=run_score)


def scored_items(record: dict) -> list[tuple[str, list[dict], list[dict]]]:
    """``[(output key, prompt messages, answer messages)]`` of one canonical record.

    Raises:
        UserError: a record with nothing to score (no assistant answer), naming it.
    """
    source = record.get("source", "?")
    if "chosen" in record:
        return [("reward_chosen", record["prompt"], record["chosen"]),
                ("reward_rejected", record["prompt"], record["rejected"])]
    if "completion" in record:
        return [("reward", record["prompt"], record["completion"])]
    messages = record.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise UserError(f"{source}: nothing to score — a record needs an assistant answer after at least one turn "
                        "(chat), a completion (with its prompt) or a chosen/rejected pair")
    return [("reward", messages[:last], messages[last:last + 1])]


def score_records(scorer: Any, records: list[dict]) -> tuple[list[dict], int]:
    """Each record with its reward key(s); and how many answers did not fit (their reward is ``None``)."""
    items, owners = [], []
    for index, record in enumerate(records):
        for key, prompt, answer in scored_items(record):
            items.append((prompt, answer))
            owners.append((index, key, record.get("source", "?")))
    rewards = scorer.score(items, [source for _, _, source in owners])
    out = [dict(record) for record in records]
    for (index, key, _), reward in zip(owners, rewards, strict=True):
        out[index][key] = reward
    return out, sum(r is None for r in rewards)


def run_score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tuneforge.console import say
    from tuneforge.data.readers import read_records
    from tuneforge.models.reward import load_scorer
    from tuneforge.utils import atomic_write_text

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"--out {out} exists; pass --force to replace it")
    records = read_records(args.data, args.format)
    if not records:
        raise UserError(f"--data {args.data}: no records")
    for record in records:
        scored_items(record)  # every record is scorable, before the model loads
    scorer = load_scorer(args.model, device=args.device, max_length=args.max_length, batch_size=args.batch_size,
                         what="RM")
    scored, too_long = score_records(scorer, records)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    values = [v for r in scored for k, v in r.items() if k.startswith("reward") and v is not None]
    mean = sum(values) / len(values) if values else float("nan")
    say(f"scored {len(records)} records ({len(values)} answers, mean reward {mean:.4f}"
        f"{f', {too_long} longer than --max-length left null' if too_long else ''}) -> {out}")
    return 0
