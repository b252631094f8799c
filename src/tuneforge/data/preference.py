"""Preference and prompt data: encoding with the run's chat template, truncation, collators (the records are
read by :mod:`tuneforge.data.readers`).

Canonical records (besides ``text`` / ``messages``, see docs/architecture.md), each with a ``source``:

    {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}        paired preference (dpo, orpo, simpo, kto)
    {"prompt": [msgs], "completion": [msgs], "label": bool}          unpaired (kto)
    {"prompt": [msgs], "fields": {...}}                              prompts with checkable fields (grpo)

Accepted rows: ``{prompt, chosen, rejected}`` where the prompt is a string or a message list and each completion a
string, one message or a message list; the chat form ``{chosen: [conversation], rejected: [conversation]}`` whose
shared leading turns become the prompt; ``{prompt, completion, label}``; ``{prompt, <any answer fields>}``.

Encoding renders ``prompt + completion`` exactly as SFT renders a conversation (:func:`encode_chat_samples`: the
same template, the same mask rule, the same end-of-turn marker) and keeps only the completion's turn supervised. Truncation never cuts a completion: the prompt loses tokens from the left (a leading BOS is kept),
and a pair whose completion does not fit beside one prompt token is dropped and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tuneforge.config.stages import STAGES
from tuneforge.data.tokenize import IGNORE, encode_chat_samples, pad_id
from tuneforge.errors import UserError

_NO_LIMIT = 10**9


# --------------------------------------------------------------------------- encoding


def encode_completion(prompt: list[dict], completion: list[dict], tokenizer: Any, template: Any,
                      source: str = "?") -> dict:
    """Tokens of ``prompt + completion`` rendered as SFT renders them, with the completion's mask.

    Returns:
        ``{"input_ids", "completion_mask", "prompt_length"}``: the sequence ends at the completion's last supervised
        token (its end-of-turn marker / EOS; template text after it carries no signal), ``completion_mask[t]`` is 1
        exactly where SFT would supervise token ``t`` of a completion turn, ``prompt_length`` is the index of the
        first supervised token.

    Raises:
        UserError: when the template renders the completion to no supervised token.
    """
    # SFT's own encoding of the conversation; the sample that trains the completion's (last) turn is the one
    # to use: a template that renders history differently trains that turn as its own sample.
    last = len(prompt) + len(completion) - 1
    samples = encode_chat_samples({"messages": [*prompt, *completion], "source": source}, tokenizer, template,
                                  _NO_LIMIT)
    sample = next((s for s in samples if last in s.get("turns", ())), None)
    if sample is None:
        raise UserError(f"{source}: the completion is empty after rendering with chat template {template.name!r} "
                        "(no answer token to train); check the record and `tuneforge data preview`")
    boundary = len(template.render(prompt, add_generation_prompt=True, tokenizer=tokenizer))
    mask = [int(label != IGNORE and end > boundary) for label, (_, end) in zip(sample["labels"], sample["offsets"],
                                                                                strict=True)]
    if not any(mask):
        raise UserError(f"{source}: the completion is empty after rendering with chat template {template.name!r} "
                        "(no answer token to train); check the record and `tuneforge data preview`")
    first = mask.index(1)
    last = len(mask) - 1 - mask[::-1].index(1)
    if first == 0:
        raise UserError(f"{source}: the rendered prompt is empty, so the first answer token has nothing to follow")
    return {"input_ids": sample["input_ids"][: last + 1], "completion_mask": mask[: last + 1], "prompt_length": first}


def fit(encoded: list[dict], max_length: int, bos_id: int | None) -> tuple[list[dict] | None, bool]:
    """Truncate encodings that share one prompt to ``max_length`` without touching their completions.

    The prompt loses tokens from the left, the same number for every encoding, keeping a leading BOS. Returns
    ``(fitted or None, prompt_truncated)``; None when some completion does not fit beside one prompt token.
    """
    longest = max(len(e["input_ids"]) for e in encoded)
    if longest <= max_length:
        return encoded, False
    cut = longest - max_length
    out = []
    for e in encoded:
        ids, mask, p = e["input_ids"], e["completion_mask"], e["prompt_length"]
        keep_bos = bos_id is not None and ids[0] == bos_id
        start = 1 if keep_bos else 0
        if p - start - cut < 1:
            return None, True
        ids = ids[:start] + ids[start + cut:]
        mask = mask[:start] + mask[start + cut:]
        out.append({"input_ids": ids, "completion_mask": mask, "prompt_length": p - cut})
    return out, True


def encode_pair(record: dict, tokenizer: Any, template: Any, max_length: int) -> tuple[dict | None, bool]:
    """One paired record → ``{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}`` (or None: too long)."""
    source = record.get("source", "?")
    sides = [encode_completion(record["prompt"], record[k], tokenizer, template, f"{source} ({k})")
             for k in ("chosen", "rejected")]
    if sides[0]["input_ids"] == sides[1]["input_ids"]:
        raise UserError(f"{source}: 'chosen' and 'rejected' render to the same tokens; the pair teaches nothing")
    fitted, truncated = fit(sides, max_length, tokenizer.bos_token_id)
    if fitted is None:
        return None, truncated
    chosen, rejected = fitted
    return {"chosen_ids": chosen["input_ids"], "chosen_mask": chosen["completion_mask"],
            "rejected_ids": rejected["input_ids"], "rejected_mask": rejected["completion_mask"]}, truncated


def encode_unpaired(record: dict, tokenizer: Any, template: Any, max_length: int) -> tuple[dict | None, bool]:
    """One unpaired record → ``{"prompt_ids", "completion_ids", "completion_mask", "label"}`` (or None: too long)."""
    side = encode_completion(record["prompt"], record["completion"], tokenizer, template, record.get("source", "?"))
    fitted, truncated = fit([side], max_length, tokenizer.bos_token_id)
    if fitted is None:
        return None, truncated
    ids, mask, p = fitted[0]["input_ids"], fitted[0]["completion_mask"], fitted[0]["prompt_length"]
    return {"prompt_ids": ids[:p], "completion_ids": ids[p:], "completion_mask": mask[p:],
            "label": bool(record["label"])}, truncated


def marked_text(ids: list[int], mask: list[int], tokenizer: Any, open_mark: str = "[[", close_mark: str = "]]") -> str:
    """The decoded sequence with each run of scored (completion) tokens wrapped in ``open_mark``/``close_mark``
    (the markers ``tuneforge data preview`` uses for supervised spans)."""
    parts, run, inside = [], [], None
    for token, scored in [*zip(ids, mask, strict=True), (None, None)]:
        if scored != inside and run:
            text = tokenizer.decode(run)
            parts.append(f"{open_mark}{text}{close_mark}" if inside else text)
            run = []
        inside = scored
        if token is not None:
            run.append(token)
    return "".join(parts)


def preview_rows(rows: list[dict], tokenizer: Any) -> list[dict]:
    """For ``data preview``: each encoded row as ``{"chosen": text, "rejected": text}`` (or ``{"completion",
    "label"}`` for unpaired rows) with the scored tokens marked."""
    out = []
    for row in rows:
        if "chosen_ids" in row:
            out.append({side: marked_text(row[f"{side}_ids"], row[f"{side}_mask"], tokenizer)
                        for side in ("chosen", "rejected")})
        else:
            ids = row["prompt_ids"] + row["completion_ids"]
            mask = [0] * len(row["prompt_ids"]) + row["completion_mask"]
            out.append({"completion": marked_text(ids, mask, tokenizer), "label": row["label"]})
    return out


# --------------------------------------------------------------------------- datasets


@dataclass
class PreferenceBundle:
    """Encoded rows for a preference or GRPO stage (same role as :class:`tuneforge.data.build.DataBundle`)."""

    train: list[dict]
    eval: list[dict] | None
    stats: dict[str, Any] = field(default_factory=dict)
    packed: bool = False
    records: list[dict] | None = None  # the canonical records (GRPO rewards check their fields)

    def collator(self, tokenizer: Any):
        """The collator for these rows."""
        pad = pad_id(tokenizer)
        if self.train and "chosen_ids" in self.train[0]:
            return PairCollator(pad)
        return UnpairedCollator(pad)


def load_stage_records(data_cfg: Any, kind: str, seed: int) -> tuple[list[dict], list[dict] | None, dict]:
    """Read train (and eval) records of ``kind`` (``paired`` / ``unpaired`` / ``prompt``); split with ``seed``.

    Paired records are accepted for ``unpaired`` (each pair gives a desirable and an undesirable example, as in
    the KTO paper's setup). Raises UserError naming the first record of another kind.
    """
    from tuneforge.data.build import read_sources

    records, per_file = read_sources(data_cfg.train, data_cfg)
    records = _of_kind(records, kind)
    if data_cfg.max_samples:
        records = records[: data_cfg.max_samples]
    stats: dict[str, Any] = {"records_per_file": per_file}
    eval_records = None
    if data_cfg.eval:
        sources = [data_cfg.eval] if isinstance(data_cfg.eval, str) else list(data_cfg.eval)
        eval_records = _of_kind(read_sources(sources, data_cfg)[0], kind)
    elif data_cfg.eval_split:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(records) * data_cfg.eval_split))
        if n_eval >= len(records):
            raise UserError(f"data.eval_split={data_cfg.eval_split} of {len(records)} records leaves nothing to "
                            "train on; lower it or give more data")
        held = set(order[:n_eval])
        eval_records = [r for i, r in enumerate(records) if i in held]
        records = [r for i, r in enumerate(records) if i not in held]
    stats["train_records"] = len(records)
    stats["eval_records"] = len(eval_records or [])
    return records, eval_records, stats


def stage_tokenizer_texts(data_cfg: Any, kind: str) -> list[str]:
    """The text a from-config tokenizer is trained on for a preference/GRPO stage: every message content (and,
    for prompts, every string field) of the training records of ``kind``."""
    records, _, _ = load_stage_records(data_cfg, kind, seed=0)
    texts: list[str] = []
    for record in records:
        for key in ("prompt", "chosen", "rejected", "completion"):
            texts.extend(m["content"] for m in record.get(key, []))
        texts.extend(v for v in record.get("fields", {}).values() if isinstance(v, str))
    return texts


def _of_kind(records: list[dict], kind: str) -> list[dict]:
    out = []
    for record in records:
        if kind == "unpaired" and "chosen" in record:
            out.append({"prompt": record["prompt"], "completion": record["chosen"], "label": True,
                        "source": record["source"]})
            out.append({"prompt": record["prompt"], "completion": record["rejected"], "label": False,
                        "source": record["source"]})
            continue
        have = "paired" if "chosen" in record else "unpaired" if "label" in record else (
            "prompt" if "fields" in record else "conversation/text")
        if have != kind:
            wanted = {"paired": "{prompt, chosen, rejected} pairs (or chosen/rejected conversations)",
                      "unpaired": "{prompt, completion, label} records (or pairs)",
                      "prompt": "{prompt, <answer fields>} records"}[kind]
            raise UserError(f"{record.get('source', '?')}: a {have} record, but this stage needs {wanted}; "
                            "see docs/preference.md for the formats")
        out.append(record)
    return out


def build_preference_data(data_cfg: Any, stage: str, tokenizer: Any, template: Any, seed: int) -> PreferenceBundle:
    """Encoded train/eval rows for stage ``dpo``/``orpo``/``simpo`` (pairs) or ``kto`` (unpaired examples).

    ``stats`` keys: records_per_file, train_records, eval_records, samples, rows, eval_rows, dropped_too_long,
    truncated (prompts cut from the left), tokens, length, completion_tokens; for kto also desirable/undesirable.

    Raises:
        UserError: bad records (see the readers), no sample left after truncation (with the counts and the fix).
    """
    kind = STAGES[stage].data
    records, eval_records, stats = load_stage_records(data_cfg, kind, seed)
    train, train_stats = _encode_all(records, kind, tokenizer, template, data_cfg.max_length, "training")
    stats.update(train_stats)
    evaluation = None
    if eval_records:
        evaluation, eval_stats = _encode_all(eval_records, kind, tokenizer, template, data_cfg.max_length, "eval")
        stats["eval_dropped_too_long"] = eval_stats["dropped_too_long"]
    stats["rows"] = len(train)
    stats["eval_rows"] = len(evaluation or [])
    return PreferenceBundle(train=train, eval=evaluation, stats=stats)


def _encode_all(records, kind, tokenizer, template, max_length, what):
    encode = encode_pair if kind == "paired" else encode_unpaired
    rows, dropped, truncated = [], 0, 0
    for record in records:
        row, cut = encode(record, tokenizer, template, max_length)
        truncated += int(cut and row is not None)
        if row is None:
            dropped += 1
            continue
        rows.append(row)
    if not rows:
        raise UserError(f"no {what} example is left: all {len(records)} records have a completion longer than "
                        f"data.max_length={max_length} allows (completions are never cut). Raise data.max_length "
                        "or shorten the answers")
    lengths = [len(r.get("chosen_ids", r.get("prompt_ids", []))) + len(r.get("completion_ids", [])) for r in rows]
    completion = sum(sum(r.get("chosen_mask", r.get("completion_mask", []))) for r in rows)
    stats = {"samples": len(rows), "dropped_too_long": dropped, "truncated": truncated, "tokens": sum(lengths),
             "completion_tokens": completion, "length": {"min": min(lengths), "max": max(lengths),
                                                         "mean": round(sum(lengths) / len(lengths), 1)}}
    if kind == "unpaired":
        stats["desirable"] = sum(r["label"] for r in rows)
        stats["undesirable"] = len(rows) - stats["desirable"]
    return rows, stats


# --------------------------------------------------------------------------- collators


def _pad(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@dataclass
class PairCollator:
    """Pairs → TRL's DPO batch: ``input_ids``/``attention_mask``/``completion_mask``, chosen rows then rejected rows.

    Right padding; reference log-probs (``ref_chosen_logps``/``ref_rejected_logps``) pass through when present.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        masks = [e["chosen_mask"] for e in examples] + [e["rejected_mask"] for e in examples]
        batch = {
            "input_ids": _pad(ids, self.pad_token_id),
            "attention_mask": _pad([[1] * len(r) for r in ids], 0),
            "completion_mask": _pad(masks, 0),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        return batch


@dataclass
class UnpairedCollator:
    """Unpaired examples → TRL's KTO batch (``input_ids``, masks, ``label``; ``KL_*`` when ``KL_completion_ids``)."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch: dict[str, Any] = {}
        for prefix, ids_key, mask_key in (("", "completion_ids", "completion_mask"),
                                          ("KL_", "KL_completion_ids", "KL_completion_mask")):
            if ids_key not in examples[0]:
                continue
            ids = [e["prompt_ids"] + e[ids_key] for e in examples]
            masks = [[0] * len(e["prompt_ids"]) + e[mask_key] for e in examples]
            batch[f"{prefix}input_ids"] = _pad(ids, self.pad_token_id)
            batch[f"{prefix}attention_mask"] = _pad([[1] * len(r) for r in ids], 0)
            batch[f"{prefix}completion_mask"] = _pad(masks, 0)
        for key in ("ref_logps", "ref_KL_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples])
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples])
        return batch
