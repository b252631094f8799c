"""``tuneforge data ...`` commands (light module: heavy imports happen inside the command).

They live here, above ``data``, because they load models on data's behalf: ``data preview`` loads the run's
tokenizer (:mod:`tuneforge.commands.preview`) and ``data augment`` may take a run as teacher (:class:`RunTeacher`,
generating through ``tuneforge.models.generation``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tuneforge.config.formats import DATA_FORMATS
from tuneforge.data.augment import AUGMENT_MODES, Reply
from tuneforge.data.teacher import PROBE_PROMPT, teacher_name


def add_commands(subparsers) -> None:
    """Add ``data preview``, ``data prepare`` and ``data augment`` to the top-level subparsers."""
    data = subparsers.add_parser(
        "data",
        help="inspect a run's data (rendered samples, masks, statistics); "
        "augment instruction data with a teacher model",
    )
    data.set_defaults(func=lambda args: (data.print_help(), 1)[1])
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    preview = sub.add_parser(
        "preview",
        help="show rendered samples with supervised tokens marked, and dataset statistics",
        description="Render the first samples of a run's training data with the supervised (trained) tokens "
        "marked, then print counts, length distribution, truncation, supervised-token and padding shares.",
    )
    _options(preview)
    preview.add_argument("config", help="run config (YAML)")
    # REMAINDER, re-parsed below: argparse alone cannot take options after a '*' positional
    # (`preview x.yaml -n 1 data.max_length=64`), since the positional is consumed once.
    preview.add_argument(
        "overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. data.max_length=512"
    )
    preview.set_defaults(func=_preview)
    _add_prepare(sub)  # data prepare (tuneforge/commands/prepare.py, the data helper's)
    _add_augment(sub)


def _prepare_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-cache", action="store_true", help="build into a temporary directory, reuse nothing")
    parser.add_argument("--cache-dir", default=None, help="cache location (default data.cache_dir, else "
                        "$TUNEFORGE_CACHE/data or ~/.cache/tuneforge/data)")
    parser.add_argument("--num-proc", type=int, default=None, help="worker processes (default data.num_proc, "
                        "else the CPUs for 20,000+ records)")
    parser.add_argument("--json", action="store_true", help="print one JSON object: cache entry, time, statistics")


def _add_prepare(sub) -> None:
    prepare = sub.add_parser(
        "prepare",
        help="read, clean, render, tokenize, mask and pack a run's data into the cache (Arrow, memory-mapped)",
        description="Prepare the data a run config describes into the data cache, in parallel, with progress "
        "(records/s, ETA). train, data preview, eval and search trials reuse the entry; a changed data file, "
        "setting, tokenizer or template builds a new one. See docs/data.md, 'Prepared data and the cache'.",
    )
    _prepare_options(prepare)
    prepare.add_argument("config", help="run config (YAML)")
    prepare.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. data.max_length=512")
    prepare.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    from tuneforge.commands.prepare import run_prepare
    from tuneforge.errors import UserError

    rest = argparse.ArgumentParser(prog="tuneforge data prepare", add_help=False, exit_on_error=False)
    _prepare_options(rest)
    rest.add_argument("overrides", nargs="*")
    rest.set_defaults(no_cache=args.no_cache, cache_dir=args.cache_dir, num_proc=args.num_proc, json=args.json)
    try:
        more = rest.parse_intermixed_args(args.overrides)
    except argparse.ArgumentError as exc:
        raise UserError(f"data prepare: {exc}") from None
    unknown = [o for o in more.overrides if o.startswith("-")]
    if unknown:
        raise UserError(f"data prepare: unknown option {unknown[0]!r} (options: --no-cache, --cache-dir DIR, "
                        "--num-proc N, --json)")
    if more.num_proc is not None and more.num_proc < 1:
        raise UserError("data prepare: --num-proc must be at least 1")
    return run_prepare(args.config, more.overrides, no_cache=more.no_cache, cache_dir=more.cache_dir,
                       num_proc=more.num_proc, as_json=more.json)


#: ``data augment --format``: the formats of instruction data (they become chat records)
INSTRUCTION_FORMATS = ("auto", *(name for name, spec in DATA_FORMATS.items() if spec.selectable and spec.record == "chat"))


def _add_augment(sub) -> None:
    # models.generation is light (no torch at import): the sampling flags are generate's and eval's own.
    from tuneforge.models.generation import add_generation_args

    augment = sub.add_parser(
        "augment",
        help="new instruction records from a teacher model (backtranslate, rewrite, cot, reverse), "
        "near-duplicates dropped",
        description="For each single-turn instruction record of IN, ask the teacher for N new records: "
        "'backtranslate' (the instruction translated into a pivot language and back, e.g. 中文 → English → 中文, "
        "paired with the original answer), 'rewrite' (the instruction in other words, answered by the teacher), "
        "'cot' (the answer worked out step by step), 'reverse' (the instruction the record's answer answers, "
        "paired with that answer: Li et al. 2023's instruction back-translation). A new record is kept when its "
        "ROUGE-L to every existing record is below --max-rouge (the user turn is compared; the answer for cot), "
        "so a round trip that came back unchanged is dropped. OUT gets only the new records, each with its "
        "provenance under 'augment'; a rerun with the same arguments continues where the last one stopped. "
        "See docs/data.md, 'Augmentation'.",
    )
    augment.add_argument(
        "input", metavar="IN", help="instruction data: Alpaca, chat or ShareGPT (.jsonl/.json/...)"
    )
    augment.add_argument("--out", required=True, type=Path, help="output JSON-lines file (new records only)")
    augment.add_argument(
        "--teacher",
        required=True,
        help="OpenAI-compatible API base (e.g. http://127.0.0.1:8000/v1, as `tuneforge serve` "
        "gives) or a run / model directory",
    )
    augment.add_argument(
        "--mode",
        required=True,
        help=" | ".join(f"{mode.name}: {mode.help}" for mode in AUGMENT_MODES.values()),
    )
    augment.add_argument(
        "--n",
        default="1",
        metavar="K",
        help="new records asked per input record (default 1; backtranslate: K round trips, which differ only "
        "when sampling (--temperature) or with several --pivot languages)",
    )
    augment.add_argument(
        "--pivot",
        default=None,
        metavar="LANG[,LANG...]",
        help="backtranslate's pivot language(s), taken in turn by the K round trips (e.g. English,Japanese,French); "
        "default auto: English, or Chinese when the instruction is mostly Latin-script",
    )
    augment.add_argument(
        "--max-rouge",
        default="0.7",
        help="keep a new record only if its ROUGE-L F1 to every existing one is below this (default 0.7)",
    )
    augment.add_argument("--format", default="auto", choices=INSTRUCTION_FORMATS,
                         help=f"IN's format: {', '.join(INSTRUCTION_FORMATS)} (default auto: from the first row)")
    augment.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT (and its state) instead of continuing it",
    )
    server = augment.add_argument_group("teacher server")
    server.add_argument("--teacher-model", default=None, help="the request's 'model' (default: left out)")
    server.add_argument("--api-key-file", type=Path, default=None, help="file holding the server's API key")
    server.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    server.add_argument(
        "--retries",
        type=int,
        default=3,
        help="retries of a request that got no answer or 429/5xx, with backoff (default 3)",
    )
    server.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="inputs asked at once (default 4; the output does not depend on it; a local teacher asks one at a time)",
    )
    augment.add_argument("--device", default="auto", help="device of a local teacher (default auto)")
    augment.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_args(augment, max_new_tokens=512)
    augment.set_defaults(func=_augment)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=3, help="number of samples to show (default 3)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per sample: text, input_ids, labels"
    )


def _preview(args: argparse.Namespace) -> int:
    from tuneforge.commands.preview import run_preview
    from tuneforge.errors import UserError

    rest = argparse.ArgumentParser(prog="tuneforge data preview", add_help=False, exit_on_error=False)
    _options(rest)
    rest.add_argument("overrides", nargs="*")
    rest.set_defaults(n=args.n, json=args.json)
    try:
        more = rest.parse_intermixed_args(args.overrides)
    except argparse.ArgumentError as exc:
        raise UserError(f"data preview: {exc}") from None
    unknown = [o for o in more.overrides if o.startswith("-")]
    if unknown:
        raise UserError(f"data preview: unknown option {unknown[0]!r} (options: -n N, --json)")
    return run_preview(args.config, more.overrides, n=more.n, as_json=more.json)


def _augment(args: argparse.Namespace) -> int:
    from tuneforge.console import out, warn
    from tuneforge.data import augment, teacher
    from tuneforge.errors import UserError
    from tuneforge.models.generation import GenerationSettings

    mode, n, max_rouge = augment.check_options(args.mode, args.n, args.max_rouge)
    pivots = augment.check_pivots(mode, args.pivot)
    settings = GenerationSettings.from_args(args)
    if args.timeout <= 0 or args.retries < 0 or args.concurrency < 1:
        raise UserError("--timeout must be > 0 seconds, --retries >= 0 and --concurrency >= 1")
    generation = {k: v for k, v in settings.to_dict().items() if k != "seed"}
    options = augment.AugmentOptions(
        input=Path(args.input),
        out=args.out,
        mode=mode,
        n=n,
        max_rouge=max_rouge,
        format=args.format,
        overwrite=args.overwrite,
        generation=generation,
        seed=settings.seed,
        pivots=pivots,
    )
    url = teacher.is_url(args.teacher)
    if not url and (args.teacher_model or args.api_key_file):
        raise UserError("--teacher-model and --api-key-file are for a teacher server (--teacher http://...)")
    plan = augment.prepare(options, teacher.teacher_name(args.teacher, args.teacher_model))
    if n > 1 and not settings.sampling and len(pivots) < n:
        if AUGMENT_MODES[mode].pivots:
            routes = f"--pivot {','.join(pivots)}" if pivots else "one pivot per record (--pivot auto)"
            names = ["English", "Japanese", "French", "German", "Spanish", "Russian"]
            example = ",".join(names[:n]) if n <= len(names) else ",".join(names) + ",..."
            warn(
                f"--n {n} with greedy decoding and {routes}: round trips through the same pivot come back the "
                "same and the filter keeps one",
                f"sample (--temperature 0.8) or give {n} pivots, e.g. --pivot {example}",
            )
        else:
            warn(
                f"--n {n} with greedy decoding: the teacher gives the same reply each time and the filter keeps one",
                "sample: --temperature 0.8",
            )
    if url:
        source = teacher.HttpTeacher(
            args.teacher,
            model=args.teacher_model,
            api_key=teacher.read_key(args.api_key_file),
            sampling=settings.to_dict(),
            timeout=args.timeout,
            retries=args.retries,
        )
    else:
        source = load_run_teacher(args.teacher, settings, device=args.device)
    source.probe()
    if plan.done:
        out().print(f"continuing {args.out}: {plan.done} of {len(plan.seeds)} inputs already done")
    # A local model generates one batch at a time (the n replies of one input); a server batches what it gets.
    concurrency = args.concurrency if url else 1
    result = augment.run_augment(plan, source, progress=not args.no_progress, concurrency=concurrency)
    _print_summary(result, out(), mode)
    if plan.skipped_inputs:
        shown = ", ".join(plan.skipped_inputs[:3]) + (" ..." if len(plan.skipped_inputs) > 3 else "")
        warn(
            f"{len(plan.skipped_inputs)} input records are not single-turn instructions and were not augmented "
            f"({shown})"
        )
    return 0


def _print_summary(result, console, mode: str) -> None:
    from rich.table import Table

    counts = result.counts
    table = Table(title=f"augment → {result.out}", show_header=False)
    rows = [
        ("inputs done", f"{counts['inputs']} of {result.total_inputs}"),
        ("round trips (2 teacher calls each)" if AUGMENT_MODES[mode].pivots else "requests", counts["requests"]),
        ("kept", counts["kept"]),
        ("near-duplicates dropped", counts["near_duplicate"]),
        ("unreadable replies", counts["bad_reply"]),
        *([(f"final answer differs from the original ({mode})", counts.get("answer_changed", 0))]
          if AUGMENT_MODES[mode].reasoned else []),
        ("replies cut at --max-new-tokens", counts["truncated"]),
        ("failed requests", counts["teacher_error"]),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)


class RunTeacher:
    """A local run, adapter or model directory (or hub id) as teacher, loaded once.

    Replies come from ``tuneforge.models.generation.complete`` with ``settings`` (the ``count`` replies of one
    prompt are one batch, seeded ``seed, seed + 1, ...``), rendered with the run's own chat template.
    """

    def __init__(self, loaded: Any, settings: Any, name: str) -> None:
        self.loaded, self.settings, self.name = loaded, settings, name

    def probe(self) -> None:
        from dataclasses import replace

        from tuneforge.models.generation import complete

        loaded = self.loaded
        complete(
            loaded.model,
            loaded.tokenizer,
            loaded.template,
            [PROBE_PROMPT],
            replace(self.settings, max_new_tokens=1),
        )

    def ask(self, messages: list[dict], count: int, seed: int | None) -> list[Reply]:
        from dataclasses import replace

        from tuneforge.models.generation import complete

        loaded = self.loaded
        settings = replace(self.settings, seed=seed)
        completions = complete(
            loaded.model, loaded.tokenizer, loaded.template, [messages] * count, settings, batch_size=count
        )
        return [Reply(c.text, truncated=c.finish_reason == "length") for c in completions]


def load_run_teacher(spec: str, settings: Any, device: str = "auto") -> RunTeacher:
    """Load ``spec`` (run, adapter, model directory or hub id) once for generation.

    Raises:
        UserError: what ``load_for_inference`` reports (missing path, unfinished run...).
    """
    from tuneforge.models.reference import load_for_inference

    return RunTeacher(load_for_inference(spec, device=device), settings, teacher_name(spec))
