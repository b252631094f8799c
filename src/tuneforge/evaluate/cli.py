"""Commands ``eval``, ``abtest`` and ``report`` (light module: heavy imports happen inside the commands)."""

from __future__ import annotations

import argparse
import json
import sys

from tuneforge.errors import UserError
from tuneforge.evaluate.metrics import metrics_help


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="score one or more models side by side (perplexity, BLEU, ROUGE, exact match)",
        description="Evaluate models (run directories, HF model directories, adapter directories or hub ids) on "
                    "the same data with the same generation settings. References for BLEU/ROUGE/exact come from "
                    "each record's last assistant message (chat) or 'output' (alpaca).",
    )
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--data", default=None,
                   help="eval file (jsonl/json/csv/parquet/txt; text, alpaca or chat); for a per-task run "
                        "(method.per_task) each task's adapter is scored on the records of its own task (default: "
                        "each task's eval split)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "alpaca", "chat"])
    p.add_argument("--metrics", default=None, help=metrics_help() + " (default ppl; with --retention and no --data: "
                                                                    "none, only forgetting is scored)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records")
    p.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    p.add_argument("--out", default=None, help="also write all results to this JSON file")
    p.add_argument("--predictions", action="store_true", help="keep the generated answers in --json/--out output")
    p.add_argument("--no-save", action="store_true", help="do not append results to <run dir>/eval_results.json")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass for perplexity")
    p.add_argument("--max-length", type=int, default=None, help="perplexity window (default: model context)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window step (default: max-length / 2)")
    _add_max_memory(p, "lowers --batch-size (and the generation batch) when only a smaller one fits")
    p.add_argument("--retention", metavar="GENERAL_DATA", default=None,
                   help="also score forgetting: perplexity of the start model and of each model on this general "
                        "data (docs/forgetting.md)")
    _add_generation_args(p)
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "abtest", help="blind A/B sheet for human raters, or score its votes",
        description="tuneforge abtest A B --prompts prompts.jsonl [--out sheet.html | --terminal]\n"
                    "tuneforge abtest score sheet.key.json votes.jsonl [more votes.jsonl ...]\n"
                    "tuneforge abtest judge sheet.key.json --judge MODEL   (a model votes, position-swapped)\n\n"
                    "The sheet hides which model is which; the mapping is kept in <sheet>.key.json next to it. "
                    "Scores are win/tie/loss of model A with 95% Wilson confidence intervals.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("args", nargs="+", metavar="A B | score KEY VOTES... | judge KEY",
                   help="two models; or 'score' with the key (or sheet) file and one or more votes files; or "
                        "'judge' with the key file (and --judge MODEL)")
    p.add_argument("--prompts", help="prompts file (chat/alpaca records: the conversation before the last answer; "
                                     "text records: raw prompts)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "alpaca", "chat"])
    p.add_argument("--out", default="abtest.html", help="sheet path (its key goes to <name>.key.json)")
    p.add_argument("--terminal", action="store_true", help="vote here in the terminal instead of an HTML sheet")
    p.add_argument("--force", action="store_true",
                   help="replace an existing sheet, key (and --terminal votes) at --out's paths")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--shuffle-seed", type=int, default=None, help="seed of the left/right assignment (default: random)")
    p.add_argument("--device", default="auto")
    _add_max_memory(p, "lowers the generation batch when only a smaller one fits")
    p.add_argument("--allow-partial", action="store_true", help="score: accept votes files with unanswered items")
    p.add_argument("--judge", help="judge: the model that votes (with position swapping)")
    p.add_argument("--votes-out", help="judge: where to write its votes (default <sheet>.judge.votes.jsonl)")
    p.add_argument("--json", action="store_true", help="score: print the result as JSON")
    _add_generation_args(p)
    p.set_defaults(func=cmd_abtest)

    p = subparsers.add_parser("report", help="write RUN_DIR/report.html: curves, metrics, warnings, samples, config")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--no-samples", action="store_true", help="do not load the model to generate samples")
    p.add_argument("--samples", type=int, default=3, help="number of sample generations")
    _add_generation_args(p, max_new_tokens=64)
    p.set_defaults(func=cmd_report)


def _add_generation_args(p, **defaults) -> None:
    from tuneforge.models.generation import add_generation_args

    add_generation_args(p, **defaults)
    p.add_argument("--greedy", action="store_true", help="force greedy decoding (temperature 0)")


def _add_max_memory(p, lowers: str) -> None:
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the preflight, e.g. 8GB (default: free RAM, or free GPU memory on CUDA); "
                        f"the estimate is printed before the model loads, the command stops when it cannot fit and {lowers}")


def _max_memory(args) -> int | None:
    from tuneforge.utils import parse_size

    return parse_size(args.max_memory, "--max-memory") if getattr(args, "max_memory", None) else None


def _generation_settings(args):
    from tuneforge.models.generation import GenerationSettings

    return GenerationSettings.from_args(args, **({"temperature": 0.0} if args.greedy else {}))


def _check_limit(limit):
    if limit is not None and limit <= 0:
        raise UserError("--limit must be a positive number of records")


# --------------------------------------------------------------------------- eval


def cmd_eval(args) -> int:
    from tuneforge.evaluate import runner
    from tuneforge.evaluate.metrics import parse_metrics
    from tuneforge.models.reference import per_task_runs
    from tuneforge.utils import atomic_write_json

    metrics = parse_metrics(args.metrics or "ppl")
    gen = _generation_settings(args)
    _check_limit(args.limit)
    max_memory = _max_memory(args)  # a bad size stops us before anything is read
    progress = None if args.json else (lambda msg: print(msg, file=sys.stderr))
    parents = [spec for spec in args.models if per_task_runs(spec)]
    if parents:  # one adapter per task: each scored on its own task's data
        if len(parents) != len(args.models) or args.retention or args.out:
            raise UserError("eval of a per-task run (method.per_task): give only per-task runs, without --retention "
                            "and --out (evaluate one task's run, runs/<name>/tasks/<task>, for those)")
        for spec in parents:
            _eval_per_task(spec, args, metrics, gen, progress)
        return 0
    if args.data is None and not args.retention:
        raise UserError("eval needs --data FILE (the records to score the models on), or --retention GENERAL_DATA "
                        "alone to score only forgetting")
    if args.data is None and args.metrics is not None:
        raise UserError(f"--metrics {args.metrics} scores the models on --data FILE: give --data, or leave --metrics "
                        "out to score only forgetting (--retention)")
    general = retention_batches = None
    if args.retention:  # read, checked and its memory billed before any model is loaded
        from tuneforge.evaluate.retention import load_general, retention_preflight

        general = load_general(args.retention, args.limit)
        retention_batches = retention_preflight(args.models, general, device=args.device,
                                                batch_size=args.batch_size, max_length=args.max_length,
                                                stride=args.stride, max_memory=max_memory)
    if not args.no_save:
        runner.check_saved_results(args.models)  # a corrupt eval_results.json stops us now, not after the work
    if args.data is None:  # --retention alone: only forgetting is scored
        metrics = []
        rows = [{"model": spec} for spec in args.models]
    else:
        rows = runner.run_eval(args.models, args.data, metrics, gen, fmt=args.format, limit=args.limit,
                               device=args.device, batch_size=args.batch_size, max_length=args.max_length,
                               stride=args.stride, keep_predictions=args.predictions, progress=progress,
                               memory_check=True, max_memory=max_memory)
    if general is not None:
        from tuneforge.evaluate.retention import add_retention

        add_retention(rows, args.retention, general, device=args.device, batch_size=args.batch_size,
                      max_length=args.max_length, stride=args.stride, progress=progress,
                      batch_sizes=retention_batches)
    if not args.no_save:
        runner.save_to_run_dirs(rows, args.data or args.retention, metrics, gen)
    if args.out:
        atomic_write_json(args.out, {"data": args.data, "metrics": [m.name for m in metrics],
                                     "generation": gen.to_dict(),
                                     "results": rows})
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return 0
    _print_table(rows, metrics, args, gen)
    return 0


def _eval_per_task(spec: str, args, metrics, gen, progress) -> None:
    """Each task run of the per-task run ``spec`` on its own task's records: those of ``--data`` whose ``task`` is
    the task's name, or (without ``--data``) the task's own eval split. Rows are saved to each task run and, as a
    per-task table, to the parent's ``eval_results.json``.

    Raises:
        UserError: a task without eval records (no eval split and no ``--data`` record of that task).
    """

    from tuneforge.data.mix import task_of
    from tuneforge.evaluate import runner
    from tuneforge.models.reference import per_task_runs, read_run_config

    given = runner.load_eval_records(args.data, args.format, None) if args.data else None
    rows = []
    for task, run in per_task_runs(spec).items():
        if given is not None:
            data, records = args.data, [r for r in given if task_of(r) == task]
        else:
            data = (read_run_config(run).get("data") or {}).get("eval")
            records = runner.load_eval_records(data, args.format, None) if data else []
        records = records[: args.limit] if args.limit else records
        if not records:
            where = f"no record of {args.data} has task {task!r}" if given is not None else "it has no eval split"
            raise UserError(f"{spec}: cannot evaluate task {task}: {where} (give --data with records of each task)")
        refs = runner.check_records(records, metrics, data)
        if progress:
            progress(f"evaluating {run} on {len(records)} records of task {task} ...")
        row = runner.evaluate_model(str(run), records, metrics, gen, device=args.device, batch_size=args.batch_size,
                                    max_length=args.max_length, stride=args.stride, references=refs,
                                    keep_predictions=args.predictions, memory_check=True,
                                    max_memory=_max_memory(args))
        row["task"] = task
        if not args.no_save:
            runner.save_to_run_dirs([row], data, metrics, gen)
        rows.append(row)
    if not args.no_save:  # the per-task table, in the parent
        tasks = {r["task"]: {k: v for k, v in r.items() if k not in ("predictions", "task")} for r in rows}
        runner.append_eval_result(spec, {"tasks": tasks}, args.data or "each task's eval split", metrics, gen)
    if args.json:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
        return
    _print_task_table(spec, rows, metrics)


def _print_task_table(spec: str, rows: list[dict], metrics) -> None:
    from rich.table import Table

    from tuneforge.console import out as console_out
    from tuneforge.evaluate.metrics import columns, format_value

    table = Table(title=f"{_short(spec)} — one adapter per task, each on its own task's records")
    table.add_column("task")
    table.add_column("records", justify="right")
    keys = columns(metrics)
    for key in keys:
        table.add_column(key, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["task"], str(row.get("n")), *(format_value(k, row.get(k)) for k in keys))
    console_out().print(table)


def _short(spec: str, limit: int = 40) -> str:
    """A long path shortened to its last two parts (``…/runs/a``), so the table keeps its numbers readable."""
    if len(spec) <= limit or "/" not in spec:
        return spec
    parts = spec.rstrip("/").split("/")
    return "…/" + "/".join(parts[-2:])


def _print_table(rows, metrics, args, gen) -> None:
    from rich.table import Table

    from tuneforge.console import out as console_out
    from tuneforge.evaluate.metrics import GENERATION, columns, format_value
    from tuneforge.evaluate.retention import RETENTION_KEYS, retention_format

    if args.data is None:
        title = f"forgetting on {_short(args.retention)} — {rows[0].get('retention_tokens', 0) if rows else 0} tokens"
    else:
        title = f"{_short(args.data)} — {rows[0]['n'] if rows else 0} records"
    table = Table(title=title)
    table.add_column("model", overflow="fold")
    keys = columns(metrics)
    keys += [k for k in RETENTION_KEYS if rows and k in rows[0]]  # --retention: forgetting beside the task metric
    for key in keys:
        table.add_column(RETENTION_KEYS.get(key, key), justify="right", no_wrap=True)
    cell = retention_format(format_value)
    best = {m.name: (max if m.higher_is_better else min)(values) for m in metrics  # bold only when models differ
            if len(set(values := [r[m.name] for r in rows if isinstance(r.get(m.name), (int, float))])) > 1}
    for row in rows:
        cells = [cell(k, row.get(k)) for k in keys]
        table.add_row(_short(row["model"]), *(f"[bold]{c}[/bold]" if k in best and row.get(k) == best[k] else c
                                              for k, c in zip(keys, cells, strict=True)))
    console = console_out()
    console.print(table)
    if any(m.needs == GENERATION for m in metrics):
        tok = rows[0].get("bleu_tokenize") if rows else None
        console.print(f"generation: {gen.to_dict()}" + (f"; BLEU tokenizer: {tok}" if tok else ""))
    if metrics:
        console.print("; ".join(m.label for m in metrics) + " (best in bold). ppl: token-weighted over the set "
                      "(answers only for chat data); scores 0-100")
    if rows and "retention_ppl" in rows[0]:
        console.print(f"general ppl on {args.retention}: start model (adapter disabled, or the run's starting "
                      "model) vs the model; increase = forgetting")


# --------------------------------------------------------------------------- abtest


def cmd_abtest(args) -> int:
    if args.args[0] == "score":
        return _abtest_score(args)
    if args.args[0] == "judge":
        return _abtest_judge(args)
    if len(args.args) != 2:
        raise UserError("abtest needs exactly two models (A B), or: abtest score KEY VOTES...")
    if not args.prompts:
        raise UserError("abtest A B needs --prompts FILE (a jsonl of chat/alpaca/text records)")
    _check_limit(args.limit)
    from tuneforge.evaluate.abtest import refuse_existing

    refuse_existing(_abtest_outputs(args), args.force)  # before any model is loaded
    return _abtest_make(args)


def _abtest_outputs(args) -> list:
    """The files ``abtest A B`` writes: the sheet and its key, or (``--terminal``) the key and the votes."""
    from pathlib import Path

    from tuneforge.evaluate.abtest import key_path_for

    out = Path(args.out)
    if args.terminal:
        return [key_path_for(out), out.with_name(out.stem + ".votes.jsonl")]
    return [out, key_path_for(out)]


def _abtest_make(args) -> int:
    import secrets

    from tuneforge.evaluate import abtest
    from tuneforge.evaluate.preflight import generation_preflight
    from tuneforge.evaluate.runner import load_eval_records, prompt_and_reference
    from tuneforge.models.generation import generate
    from tuneforge.models.reference import load_for_inference, load_tokenizer_of, resolve

    gen = _generation_settings(args)
    max_memory = _max_memory(args)
    records = load_eval_records(args.prompts, args.format, args.limit)
    prompts = [prompt_and_reference(r)[0] for r in records]
    model_a, model_b = args.args
    answers = []
    for spec in (model_a, model_b):
        ref = resolve(spec)
        tokenizer = load_tokenizer_of(ref)  # one copy for the preflight and the model
        rows = generation_preflight(ref, prompts, gen, device=args.device, max_memory=max_memory, what="abtest",
                                    tokenizer=tokenizer)
        print(f"generating {len(prompts)} answers with {spec} ...", file=sys.stderr)
        loaded = load_for_inference(ref, device=args.device, tokenizer=tokenizer)
        answers.append(generate(loaded.model, loaded.tokenizer, loaded.template, prompts, gen, batch_size=rows))
        del loaded
    seed = args.shuffle_seed if args.shuffle_seed is not None else secrets.randbits(32)
    items = abtest.make_items(prompts, answers[0], answers[1], seed)
    if args.terminal:
        return _abtest_terminal(args, abtest, items, model_a, model_b, seed, gen)
    sheet, key = abtest.write_sheet(args.out, items, model_a, model_b, seed, gen.to_dict(), force=args.force)
    print(f"sheet: {sheet}  (give this to raters)\nkey:   {key}  (keep private)\n"
          f"score: tuneforge abtest score {key} votes.jsonl")
    return 0


def _abtest_terminal(args, abtest, items, model_a, model_b, seed, gen) -> int:
    import secrets
    from pathlib import Path

    from tuneforge.utils import atomic_write_json

    sheet_id = secrets.token_hex(8)
    out = Path(args.out)
    key_path = abtest.key_path_for(out)
    atomic_write_json(key_path, abtest.build_key(items, model_a, model_b, sheet_id, None, None, seed,
                                                 gen.to_dict()))
    rows = abtest.terminal_votes(items, sheet_id)
    votes_path = out.with_name(out.stem + ".votes.jsonl")
    abtest.write_votes(votes_path, rows)
    print(f"\nvotes: {votes_path}  key: {key_path}")
    if not rows:
        print("no votes given")
        return 0
    key, _ = abtest.load_key(key_path)
    result = abtest.score(key, [abtest.read_votes(votes_path, key, allow_partial=True)])
    _print_ab(result, as_json=False)
    return 0


def _abtest_score(args) -> int:
    from tuneforge.evaluate import abtest

    rest = args.args[1:]
    if len(rest) < 2:
        raise UserError("usage: tuneforge abtest score KEY_OR_SHEET VOTES.jsonl [MORE_VOTES.jsonl ...]")
    result = abtest.score_files(rest[0], rest[1:], allow_partial=args.allow_partial)
    _print_ab(result, as_json=args.json)
    return 0


def _abtest_judge(args) -> int:
    from pathlib import Path

    from tuneforge.evaluate import abtest
    from tuneforge.models.reference import load_for_inference

    if len(args.args) != 2 or not args.judge:
        raise UserError("usage: tuneforge abtest judge KEY_OR_SHEET --judge MODEL [--votes-out judge.votes.jsonl]")
    key, key_path = abtest.load_key(args.args[1])
    loaded = load_for_inference(args.judge, device=args.device)
    rows = abtest.judge_votes(key, abtest.logit_judge(loaded), rater=f"judge:{args.judge}")
    out = Path(args.votes_out) if args.votes_out else key_path.with_name(
        key_path.name.replace(".key.json", "") + ".judge.votes.jsonl")
    abtest.write_votes(out, rows)
    print(f"judge votes: {out} (each pair judged in both orders; disagreements count as ties)")
    _print_ab(abtest.score(key, [abtest.read_votes(out, key)]), as_json=args.json)
    return 0


def _print_ab(result, as_json: bool) -> None:
    data = result.to_dict()
    if as_json:
        print(json.dumps(data, ensure_ascii=False))
        return
    from rich.table import Table

    from tuneforge.console import out as console_out

    table = Table(title=f"A = {data['model_a']}   vs   B = {data['model_b']}   "
                        f"({data['votes']} votes, {data['raters']} rater file(s))")
    for col in ("outcome for A", "count", "share", "95% CI (Wilson)"):
        table.add_column(col, justify="right" if col != "outcome for A" else "left")
    for name in ("win", "tie", "loss"):
        lo, hi = data[f"{name}_ci"]
        table.add_row(name, str(data[name]), f"{100 * data[f'{name}_rate']:.1f}%", f"{100 * lo:.1f}–{100 * hi:.1f}%")
    console = console_out()
    console.print(table)
    if data["a_win_rate_decisive"] is not None:
        lo, hi = data["a_win_rate_decisive_ci"]
        console.print(f"A wins {100 * data['a_win_rate_decisive']:.1f}% of decisive votes "
                      f"(95% CI {100 * lo:.1f}–{100 * hi:.1f}%)")


# --------------------------------------------------------------------------- report


def cmd_report(args) -> int:
    from tuneforge.evaluate.report import build_report

    path = build_report(args.run_dir, samples=not args.no_samples, n_samples=args.samples,
                        settings=_generation_settings(args))
    print(f"report: {path}")
    return 0
