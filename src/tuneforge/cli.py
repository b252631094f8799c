"""The ``tuneforge`` console script: one entry, subcommands contributed by each package.

Each package that owns commands has a light ``cli`` module (no torch at import time) with
``add_commands(subparsers)``; every parser it adds sets ``func`` to a function taking the parsed args and
returning an exit code. User mistakes raise :class:`tuneforge.errors.UserError`: printed without a traceback,
exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tuneforge.console import configure_logging
from tuneforge.errors import UserError

# subcommand group → module with add_commands(subparsers). Order is the order of `tuneforge --help`.
COMMAND_MODULES = (
    "tuneforge.train.cli",        # quickstart, validate, train, generate
    "tuneforge.commands.data",    # data preview, data augment
    "tuneforge.commands.inspect",  # inspect
    "tuneforge.commands.score",   # score (a reward per record with a reward model)
    "tuneforge.estimate.cli",     # estimate
    "tuneforge.evaluate.cli",     # eval, abtest, report
    "tuneforge.merge.cli",        # merge, export
    "tuneforge.serve.cli",        # serve, chat
    "tuneforge.search.cli",       # search
    "tuneforge.ui.cli",           # ui
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (importing only the light ``cli`` modules)."""
    parser = argparse.ArgumentParser(
        prog="tuneforge", description="Fine-tune large language models correctly, from data to serving.",
        epilog=registries_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0,
                           help="more log output (-vv: libraries' logs too)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def registries_epilog() -> str:
    """What a run config may name, read from the registries (config/: pure, no torch): shown by ``tuneforge -h``."""
    from tuneforge.config.formats import FORMAT_CHOICES
    from tuneforge.config.retention import RETENTION_CONFIGS
    from tuneforge.config.schema import METHOD_NAMES
    from tuneforge.config.stages import STAGES

    rows = (("stage", STAGES), ("method.name", METHOD_NAMES), ("data.format", FORMAT_CHOICES),
            ("train.retention.method", RETENTION_CONFIGS))
    lines = [f"  {key:<24}{' | '.join(names)}" for key, names in rows]
    return "run config values (docs/architecture.md, plug-in registries):\n" + "\n".join(lines)


#: device nodes of NVIDIA (nvidia0, nvidiactl), ROCm (kfd) and WSL's GPU (dxg) drivers
GPU_DEVICE_NODES = ("nvidia0", "nvidiactl", "kfd", "dxg")


def quiet_library_noise() -> None:
    """Silence warnings that say nothing to a tuneforge user (deprecations inside libraries, optional kernels)."""
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # deepspeed (the `distributed` extra), imported by accelerate whenever a model is saved, probes for an accelerator
    # and prints "Setting accelerator to CPU" on *stdout* when it finds none — ahead of `--json` output. On a Linux
    # machine with no GPU device node at all, tell it the answer (an explicit DS_ACCELERATOR always wins).
    if sys.platform == "linux" and not any(os.path.exists(f"/dev/{node}") for node in GPU_DEVICE_NODES):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes' CPU backend looks for an optional `kernels` package and logs a warning when it is absent.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(torch|transformers|peft)\b")


#: arguments whose values are paths or model references: a leading ``~`` is expanded as a shell would (``--out=~/x``
#: and quoted values reach us unexpanded); ``type=Path`` arguments are expanded whatever their name
PATH_ARGS = frozenset({"args", "config", "configs", "input", "out", "data", "prompts", "space", "retention", "votes_out",
                       "run_dir", "models", "model", "source", "run", "runs", "base", "judge", "teacher", "cache_dir",
                       "data_root"})


def expand_user_paths(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with ``~`` expanded in every path argument (issue 22: ``--out ~/x`` made a literal ``./~``)."""
    from pathlib import Path

    def home(value, named: bool):
        if isinstance(value, list):
            return [home(v, named) for v in value]
        if isinstance(value, Path) or (named and isinstance(value, str) and value.startswith("~")):
            return type(value)(os.path.expanduser(str(value)))
        return value

    for name, value in vars(args).items():
        setattr(args, name, home(value, name in PATH_ARGS))
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    quiet_library_noise()
    parser = build_parser()
    args = expand_user_paths(parser.parse_args(argv))
    configure_logging(-1 if args.quiet else args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
