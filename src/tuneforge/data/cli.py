"""``tuneforge data ...`` commands (light module: heavy imports happen inside the command)."""

from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    """Add ``data preview`` to the top-level subparsers."""
    data = subparsers.add_parser("data", help="inspect a run's data: rendered samples, masks, statistics")
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
    preview.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. data.max_length=512")
    preview.set_defaults(func=_preview)


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", type=int, default=3, help="number of samples to show (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample: text, input_ids, labels")


def _preview(args: argparse.Namespace) -> int:
    from tuneforge.data.preview import run_preview
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
