"""``tuneforge search``: a hyperparameter study over a run config (light module: heavy imports inside)."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    """Register ``search``."""
    p = subparsers.add_parser(
        "search", help="hyperparameter search (Optuna): grid, random or TPE, pruning, shared studies",
        description="Search hyperparameters of RUN.yaml over the keys of SPACE.yaml. Every trial is an ordinary run "
                    "directory <study>/trial-<n>, scored on the eval split. The study is stored in "
                    "<study>/study.db (SQLite) or --storage URL (several workers may share one).",
    )
    p.add_argument("config", metavar="RUN.yaml")
    p.add_argument("--space", required=True, metavar="SPACE.yaml",
                   help="dotted config keys → {choice|uniform|log_uniform|int: ...} or {tie: expression}")
    p.add_argument("--trials", type=int, help="trials in the study (all workers together); grid: default all points")
    p.add_argument("--sampler", default="tpe", help="grid | random | tpe (default tpe)")
    p.add_argument("--objective", default="eval_loss", help=_objective_help())
    p.add_argument("--direction", choices=["minimize", "maximize"], help=_direction_help())
    p.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    p.add_argument("--storage", help="SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite file), or "
                                     "env:NAME to read it from the environment variable NAME; keep passwords off the "
                                     "command line (PGPASSWORD / ~/.pgpass, or env:NAME)")
    p.add_argument("--study", help="study name (default <run_name>-search); also the folder of its trials")
    p.add_argument("--out", help="study folder (default: beside the config's output_dir, named after the study)")
    p.add_argument("--pruner", default="median", help="median | halving | none (default median)")
    p.add_argument("--pruner-startup", type=int, default=2,
                   help="median pruner: completed trials before any pruning (default 2)")
    p.add_argument("--resume", action="store_true",
                   help="continue an existing study (re-queues trials of a killed search) or join it as a worker")
    p.add_argument("--gpu-mem", type=float, metavar="GIB",
                   help="prune, before they start, combinations tuneforge estimate says cannot fit this GPU memory")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help=f"generation length (greedy) for the objectives that generate: {', '.join(_generating())}")
    p.add_argument("--train-log", action="store_true", help="show every trial's training lines")
    p.set_defaults(func=search_command)


# The objectives are tuneforge eval's metric registry (light module: no torch) plus the Trainer's eval_loss, the
# same list and directions as search.study.objectives(), which the command checks against.


def _objective_help() -> str:
    from tuneforge.evaluate.metrics import METRICS

    return f"eval_loss (default: the Trainer's loss on the eval split) | {' | '.join(METRICS)} (tuneforge eval's metrics)"


def _direction_help() -> str:
    from tuneforge.evaluate.metrics import METRICS

    lower = ["eval_loss", *(name for name, metric in METRICS.items() if not metric.higher_is_better)]
    return f"default: minimize for {', '.join(lower)}; maximize for the others"


def _generating() -> list[str]:
    from tuneforge.evaluate.metrics import GENERATION, METRICS

    return [name for name, metric in METRICS.items() if metric.needs == GENERATION]


def search_command(args: argparse.Namespace) -> int:
    import signal

    from tuneforge.console import out as console_out
    from tuneforge.search.results import best_row, counts, print_leaderboard, rows, write_best, write_html
    from tuneforge.search.study import SearchOptions, prepare, run_search
    from tuneforge.utils import raise_terminated

    options = SearchOptions(
        config=args.config, space=args.space, trials=args.trials, sampler=args.sampler, objective=args.objective,
        direction=args.direction, timeout=args.timeout, storage=args.storage, study=args.study, pruner=args.pruner,
        pruner_startup=args.pruner_startup, resume=args.resume, gpu_mem=args.gpu_mem, out=args.out,
        max_new_tokens=args.max_new_tokens,
    )
    search = prepare(options)
    console = console_out()

    # SIGTERM stops the worker like Ctrl-C: the running trial is queued again, no next trial starts (exit 143).
    # During training the run's own handler takes over (checkpoint, then TrainingInterrupted); run_trial handles both.
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        result = run_search(search, train_log=args.train_log)
    finally:
        signal.signal(signal.SIGTERM, previous)
    table = rows(result.study, search.direction)
    print_leaderboard(table, search.objective, console)
    summary = ", ".join(f"{v} {k}" for k, v in counts(table).items())
    console.print(f"study '{search.study_name}': {summary}; this worker ran {len(result.ran)}", markup=False, highlight=False)
    best = best_row(table)
    if best is not None:
        console.print(f"best: trial {best.number}, {search.objective} {best.value:.6g} → {write_best(search, best)}", markup=False, highlight=False)
    else:
        console.print("no completed trial yet: no best.yaml", markup=False, highlight=False)
    console.print(f"report: {write_html(search, result.study, table)}", markup=False, highlight=False)
    return 0
