"""``tuneforge data preview``: rendered samples with the supervised spans marked, then the dataset statistics.

The preview loads only a tokenizer (never a model): the run's own one (hub id / local directory), or, for
``model.from_config``, one trained on the training text exactly as training does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from tuneforge.errors import UserError

OPEN, CLOSE = "[[", "]]"


def run_preview(config_path: str, overrides: list[str] | None = None, n: int = 3, as_json: bool = False,
                out: Any = None) -> int:
    """Print ``n`` samples and the stats of the data a run config describes. Returns the exit code (0)."""
    from tuneforge.config import load_config
    from tuneforge.config.stages import STAGES
    from tuneforge.data.build import build_datasets, load_records, tokenizer_texts
    from tuneforge.data.templates import resolve_template

    out = out or sys.stdout
    cfg = load_config(config_path, overrides or [])
    if STAGES[cfg.stage].data not in ("text", "chat"):
        return _preview_stage(cfg, n, as_json, out)
    tokenizer = _tokenizer_for_config(cfg, lambda: tokenizer_texts(cfg.data))
    template = resolve_template(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs,
                                cfg.data.system_message)
    bundle = build_datasets(cfg.data, cfg.stage, tokenizer, template, cfg.seed, batch_size=cfg.train.batch_size)
    # prepared data keeps its cleaned records (the first n are read from the cache, not from the files again)
    records = bundle.records if bundle.records is not None else load_records(cfg.data, cfg.seed)[0]
    from tuneforge.data.mix import prepare_task_records

    # the samples as training renders them ([task] prefixes included); mixed-in general data is counted in the stats
    samples = _preview_samples(cfg, prepare_task_records(records[:n], cfg.data), tokenizer, template, bundle)
    if as_json:
        for sample in samples:
            keys = ("text", "input_ids", "labels", "rule", "extra_tokens")
            out.write(json.dumps({k: sample[k] for k in keys if k in sample}, ensure_ascii=False) + "\n")
        return 0
    _print_human(samples, bundle.stats, template, cfg, out)
    from tuneforge.models.untrained import preview_lines

    # chat-template tokens whose embedding rows look untrained (read from the weights' embedding matrix alone)
    for line in preview_lines(cfg.model.name_or_path or "", tokenizer, template):
        out.write(f"{line}; model.untrained_tokens: {cfg.model.untrained_tokens}\n")
    return 0


def _preview_stage(cfg: Any, n: int, as_json: bool, out: Any) -> int:
    """Preview of a preference stage (chosen/rejected or labelled completions, scored tokens marked) or of GRPO
    (prompts as the policy sees them: rendered with the generation prompt)."""
    from tuneforge.config.stages import STAGES
    from tuneforge.data.preference import (
        build_preference_data,
        load_stage_records,
        preview_rows,
        stage_tokenizer_texts,
    )
    from tuneforge.data.templates import resolve_template

    kind = STAGES[cfg.stage].data
    tokenizer = _tokenizer_for_config(cfg, lambda: stage_tokenizer_texts(cfg.data, kind))
    template = resolve_template(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs,
                                cfg.data.system_message)
    if kind == "prompt":
        records, _, stats = load_stage_records(cfg.data, kind, cfg.seed)
        samples = [{"source": r["source"], "prompt": template.render(r["prompt"], add_generation_prompt=True,
                                                                       tokenizer=tokenizer),
                    "fields": r.get("fields", {})} for r in records[:n]]
    else:
        bundle = build_preference_data(cfg.data, cfg.stage, tokenizer, template, seed=cfg.seed)
        stats = bundle.stats
        samples = preview_rows(bundle.train[:n], tokenizer)
    if as_json:
        for sample in samples:
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
        return 0
    say = lambda s="": out.write(f"{s}\n")  # noqa: E731
    scored = "prompt rendered with the generation prompt" if kind == "prompt" else (
        f"scored completion tokens between {OPEN} and {CLOSE}")
    say(f"template: {template.name}   stage: {cfg.stage}   ({scored})")
    for i, sample in enumerate(samples, start=1):
        say(f"\n--- sample {i}" + (f"  {sample['source']}" if "source" in sample else ""))
        for key, value in sample.items():
            if key != "source":
                say(f"[{key}]\n{value}" if isinstance(value, str) and "\n" in value else f"[{key}] {value}")
    say("\n--- statistics")
    for key, value in stats.items():
        say(f"{key}: {value}")
    return 0


def _preview_samples(cfg: Any, records: list[dict], tokenizer: Any, template: Any, bundle: Any) -> list[dict]:
    """Dicts with text, input_ids, labels, marked spans (char ranges) and a truncated flag."""
    from tuneforge.data.samples import sft_messages
    from tuneforge.data.tokenize import IGNORE, encode_chat_samples

    samples = []
    if cfg.stage == "pt":
        for row in bundle.train[: len(records)]:
            text = tokenizer.decode(row["input_ids"])
            samples.append({"text": text, "input_ids": row["input_ids"], "labels": row["labels"],
                            "spans": [(0, len(text))], "truncated": False, "source": "block"})
        return samples
    for record in records:
        encoded = encode_chat_samples(sft_messages(record, cfg.data), tokenizer, template, cfg.data.max_length,
                                      cfg.data.train_on_prompt)
        for enc in encoded:
            kept = enc["offsets"][-1][1] if enc["offsets"] else 0
            spans = _merge_spans([off for off, label in zip(enc["offsets"], enc["labels"], strict=True)
                                  if label != IGNORE])
            samples.append({"text": enc["text"][:kept], "input_ids": enc["input_ids"], "labels": enc["labels"],
                            "spans": spans, "truncated": enc["truncated"], "source": record.get("source", "?"),
                            "supervised": enc["supervised"], "rule": enc["rule"], "turns": enc["turns"],
                            "extra_tokens": enc["extra_tokens"], "stop_appended": enc["stop_appended"]})
    return samples


def _merge_spans(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans: list[list[int]] = []
    for start, end in offsets:
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    return [(s, e) for s, e in spans]


def mark_plain(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with every supervised span wrapped in ``[[ ]]``."""
    parts, last = [], 0
    for start, end in spans:
        parts.append(text[last:start])
        parts.append(OPEN + text[start:end] + CLOSE)
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _print_human(samples: list[dict], stats: dict, template: Any, cfg: Any, out: Any) -> None:
    colour = out is sys.stdout and sys.stdout.isatty()
    console = None
    if colour:
        from tuneforge.console import out as console_out

        console = console_out()
    say = console.print if console else (lambda s="": out.write(f"{s}\n"))
    legend = "supervised tokens in green" if colour else f"supervised tokens between {OPEN} and {CLOSE}"
    say(f"template: {template.name}   stage: {cfg.stage}   ({legend})")
    for i, sample in enumerate(samples, start=1):
        note = "  (truncated)" if sample["truncated"] else ""
        if sample.get("supervised") == 0:
            note += "  (no supervised token: dropped from training)"
        say(f"\n--- sample {i}  {sample['source']}  {len(sample['input_ids'])} tokens{note}")
        if "rule" in sample:
            say(f"    {describe_rule(sample, template)}")
        if console:
            from rich.text import Text

            text = Text(sample["text"])
            for start, end in sample["spans"]:
                text.stylize("bold green", start, end)
            console.print(text)
        else:
            say(mark_plain(sample["text"], sample["spans"]))
    say("\n--- statistics")
    for line in format_stats(stats):
        say(line)


RULE_HELP = {
    "prefix": "prefix-diff (the answer follows the history as rendered)",
    "markers": "the template's {% generation %} markers",
    "rebuilt": "rebuilt (the template renders this answer differently from what the model continues)",
    "all": "train_on_prompt (every token)",
    "none": "no assistant turn",
}


def describe_rule(sample: dict, template: Any) -> str:
    """One line: which masking rule a sample used, its extra-token cost and any appended stop token."""
    rule = sample["rule"]
    alone = rule.startswith("per-turn/")
    names = rule.removeprefix("per-turn/").split("+")
    text = "rule: " + ", ".join(RULE_HELP.get(n, n) for n in names)
    turns = ", ".join(str(t) for t in sample.get("turns", []))
    if alone:
        text += (f"; turn {turns} trained alone (the template renders it differently as history), "
                 f"+{sample['extra_tokens']} tokens of re-encoded prompt")
    elif turns:
        text += f"; turns {turns} in one sample, no extra tokens"
    if sample.get("stop_appended"):
        text += (f"; the template ends no turn, so {template.turn_end!r} (EOS) is appended to the answer and "
                 "generation stops on it")
    return text


def format_stats(stats: dict) -> list[str]:
    """Human-readable lines for the dataset statistics."""
    lines = []
    for source, count in stats.get("records_per_file", {}).items():
        lines.append(f"records  {source}: {count}")
    c = stats.get("cleaning", {})
    if c:
        lines.append(
            f"cleaning {c['records_in']} → {c['records_out']} records (min_length dropped {c['dropped_min_length']}, "
            f"dedup dropped {c['dropped_duplicate']}, HTML changed {c['html_changed']}, "
            f"normalisation changed {c['normalize_changed']})"
        )
    lines.append(f"split    train {stats.get('train_records')} records, eval {stats.get('eval_records')} records")
    lines.append(f"samples  {stats.get('samples')} (dropped with no supervised token: "
                 f"{stats.get('dropped_no_supervised')}, truncated: {stats.get('truncated')})")
    length = stats.get("length", {})
    lines.append("length   " + "  ".join(f"{k} {v}" for k, v in length.items()) + " tokens")
    lines.append(f"tokens   {stats.get('tokens')} ({stats.get('supervised_tokens')} supervised, "
                 f"share {stats.get('supervised_share', 0):.1%})")
    rules = stats.get("mask_rules")
    if rules:
        per_turn = sum(n for r, n in rules.items() if r.startswith("per-turn/"))
        lines.append("masks    " + ", ".join(f"{r}: {n} turns" for r, n in rules.items())
                     + f" ({per_turn} trained alone, +{stats.get('extra_tokens', 0)} extra tokens, "
                     f"{stats.get('extra_tokens', 0) / max(1, stats.get('tokens', 1)):.1%} of all tokens; "
                     f"stop token appended in {stats.get('stop_appended', 0)} samples)")
    lines.append(f"rows     {stats.get('rows')} ({'packed' if stats.get('packed') else 'not packed'}), "
                 f"padding share {stats.get('padding_share', 0):.1%} at batch size "
                 f"{stats.get('padding_share_batch_size')}")
    return lines


def _tokenizer_for_config(cfg: Any, texts: Any):
    """The tokenizer a run uses, without loading the model (the same rules as ``models.load_model``).

    ``model.from_config.tokenizer`` / ``model.tokenizer`` / ``model.name_or_path`` when set (local directory or
    hub id); for ``model.from_config`` without one, a byte-level BPE tokenizer of ``from_config.vocab_size``
    trained on ``texts()`` (a callable: the text is only read when needed), as training does.
    """
    from tuneforge.models.load import ensure_pad_token, load_tokenizer

    model = cfg.model
    fc = model.from_config
    if fc is not None:
        source = fc.tokenizer or model.tokenizer
        if source:
            return load_tokenizer(source, what="model.from_config.tokenizer")
        from tuneforge.models import train_tokenizer

        corpus = [t for t in texts() if t]
        if not corpus:
            raise UserError("model.from_config: no training text to train the tokenizer on")
        return ensure_pad_token(train_tokenizer(corpus, vocab_size=fc.vocab_size))
    return load_tokenizer(model.tokenizer or model.name_or_path, revision=model.revision,
                          trust_remote_code=model.trust_remote_code,
                          what="model.tokenizer" if model.tokenizer else "model.name_or_path")
