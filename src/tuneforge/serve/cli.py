"""Commands: serve (OpenAI-compatible HTTP API), chat (terminal). Light module: heavy imports inside."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "TUNEFORGE_API_KEY"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    from tuneforge.models.generation import add_generation_args
    from tuneforge.serve.engine import ROUTES

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for one or more runs (adapters of one base share it)")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run, adapter or model directory; NAME=PATH to name it; a per-task run (method.per_task) "
                   "serves each task as NAME/TASK (and TASK when it is the only per-task run)")
    p.add_argument("--route", choices=ROUTES, default="name",
                   help="name: the request's model names the adapter (default); prefix: a request for a per-task "
                   "run's NAME goes to the task named by the '[task]' prefix of its first user message")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key-file", type=Path, default=None,
                     help=f"file holding the key clients must send as 'Authorization: Bearer KEY' (default: ${KEY_ENV}; "
                     "neither = open)")
    key.add_argument("--api-key", default=None,
                     help=f"the key itself (visible to other local users in the process list: prefer --api-key-file "
                     f"or ${KEY_ENV})")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted, in tokens (default 4096, or the model's context when shorter)")
    p.add_argument("--max-scored-tokens", type=int, default=32768,
                   help="most prompt tokens one echo + logprobs request may have scored (default 32768; 413 beyond)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="most tokens one batch holds, rows x (prompt + max new tokens) (default: sized from the "
                   "free memory once the models are loaded); a row above it gets 413")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the preflight, e.g. 8GB (default: free RAM, or free GPU memory on CUDA): "
                   "the estimate (weights + KV token budget) is printed before the models load; the token budget is "
                   "lowered when that makes it fit, serve stops when even one longest row does not")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens of requests that give none")
    p.add_argument("--default-temperature", type=float, default=0.0,
                   help="temperature of requests that give none (default 0 = greedy)")
    p.add_argument("--max-batch-size", type=int, default=16, help="most generations run together (default 16)")
    p.add_argument("--batching", choices=("continuous", "dynamic"), default="continuous",
                   help="continuous: rows join and leave the running batch at every decoding step, adapters of one "
                   "base share it (default); dynamic: waiting rows of one adapter run together until all end")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most generations waiting; beyond it requests get 429 with Retry-After (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=("tuneforge", "vllm", "sglang"), default="tuneforge",
                   help="tuneforge (default) or start vLLM / SGLang's OpenAI server for the runs (base + LoRA modules, "
                   "the run's chat template, stop tokens, generation defaults, the same model names; needs the "
                   "engine installed and a GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --engine vllm|sglang: print the engine's command and exit (works without a GPU)")
    p.add_argument("--check-engine", metavar="URL", default=None,
                   help="send the same chat prompts to the engine at URL and to tuneforge's decoding (greedy) and "
                   "report their token-level agreement; exits 1 when an answer differs")
    p.add_argument("--check-max-tokens", type=int, default=32, help="tokens per answer for --check-engine")
    p.set_defaults(func=serve_command)

    p = sub.add_parser("chat", help="interactive terminal chat with a run (streamed; /reset, /exit)")
    p.add_argument("run", metavar="RUN", help="run, adapter or model directory")
    p.add_argument("--system", default=None, help="system message")
    add_generation_args(p, max_new_tokens=256)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=chat_command)


def _positive(value, flag: str) -> None:
    from tuneforge.errors import UserError

    if value is not None and value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file``, ``--api-key`` or ``$TUNEFORGE_API_KEY`` (in that order); ``None`` = open.

    Raises:
        UserError: the key file cannot be read or is empty.
    """
    from tuneforge.errors import UserError

    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror})") from None
        if not key:
            raise UserError(f"--api-key-file {args.api_key_file}: the file is empty")
        return key
    key = args.api_key if args.api_key is not None else os.environ.get(KEY_ENV)
    if key is not None and not key.strip():
        raise UserError(f"the API key is empty (--api-key or ${KEY_ENV}); give a key or leave it unset")
    return key.strip() if key else None


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError

    for flag in ("max_tokens_limit", "max_prompt_tokens", "default_max_tokens", "max_batch_size", "max_queue",
                 "max_body_bytes", "token_budget", "max_scored_tokens"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: choose a port between 1 and 65535")
    if not 0 <= args.default_temperature <= 2:
        raise UserError(f"--default-temperature must be between 0 and 2, got {args.default_temperature}")
    api_key = read_api_key(args)
    from tuneforge.models.generation import refuse_reward_model
    from tuneforge.serve.engine import expand_per_task, served_names

    for _, path in expand_per_task(served_names(args.runs))[0]:  # every engine: before anything loads or starts
        refuse_reward_model(path, "serve")
    if args.check_engine:
        return check_engine_command(args, api_key)
    if args.engine != "tuneforge":
        return other_engine_command(args, api_key)
    try:
        import uvicorn

        from tuneforge.serve.app import create_app
    except ImportError as exc:
        raise UserError(f"serve needs the serve extra ({exc.name} is missing): pip install 'tuneforge[serve]'") from None
    from tuneforge.serve.engine import Engine, check_route, expand_per_task, served_names

    _, per_task = expand_per_task(served_names(args.runs))  # names and route checked before any model loads
    check_route(args.route, per_task)
    local = is_loopback(args.host)
    if not local and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use the models "
                    "(set --api-key-file or $%s)", args.host, KEY_ENV)
    plan = serve_preflight(args)  # before any model loads
    engine = Engine(args.runs, device=args.device, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    token_budget=plan.token_budget, batching=args.batching)
    app = create_app(engine, api_key=api_key, max_tokens_limit=args.max_tokens_limit,
                     max_prompt_tokens=args.max_prompt_tokens, max_scored_tokens=args.max_scored_tokens,
                     default_max_tokens=args.default_max_tokens,
                     default_temperature=args.default_temperature, max_body_bytes=args.max_body_bytes,
                     local_only=local and not api_key, route=args.route)
    names = engine.names() + (list(engine.per_task) if args.route == "prefix" else [])
    print(f"serving {', '.join(names)} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if api_key else ""))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.scheduler.close()
    return 0


def serve_preflight(args: argparse.Namespace):
    """The memory preflight of ``serve`` (:func:`tuneforge.serve.preflight.plan_serve`) for the runs of ``args``.

    Raises:
        UserError: the models and one longest row do not fit the budget (both numbers named).
    """
    from tuneforge.models.reference import resolve
    from tuneforge.serve.app import DEFAULT_MAX_PROMPT_TOKENS
    from tuneforge.serve.engine import expand_per_task, served_names
    from tuneforge.serve.preflight import plan_serve
    from tuneforge.utils import parse_size

    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    refs = [resolve(path) for _, path in expand_per_task(served_names(args.runs))[0]]
    longest = (args.max_prompt_tokens or DEFAULT_MAX_PROMPT_TOKENS) + args.max_tokens_limit
    return plan_serve(refs, token_budget=args.token_budget, longest_row=longest, rows=args.max_batch_size,
                      device=args.device, max_memory=budget)


def other_engine_command(args: argparse.Namespace, api_key: str | None) -> int:
    """``serve --engine vllm|sglang``: print the command (``--dry-run``) or start the engine (GPU and engine needed)."""
    import tempfile

    from tuneforge.errors import UserError
    from tuneforge.serve.engines import describe, engine_available, engine_command, launch

    if args.batching != "continuous" or args.token_budget is not None:
        log.warning("--batching and --token-budget apply to tuneforge's own engine; %s schedules itself", args.engine)
    problem = None if args.dry_run else engine_available(args.engine)
    if problem:
        raise UserError(f"--engine {args.engine} cannot run on this machine: {problem}. Serve with tuneforge's own "
                        f"engine (leave out --engine), or see the command with --dry-run")
    workdir = tempfile.mkdtemp(prefix=f"tuneforge-{args.engine}-")
    launch_spec = engine_command(args.engine, args.runs, host=args.host, port=args.port, api_key=api_key,
                                 workdir=workdir, default_max_tokens=args.default_max_tokens,
                                 default_temperature=args.default_temperature)
    print(describe(launch_spec))
    if args.dry_run:
        return 0
    return launch(launch_spec)


def check_engine_command(args: argparse.Namespace, api_key: str | None) -> int:
    """``serve RUN --check-engine URL``: token-level agreement of greedy answers, engine vs tuneforge."""
    from tuneforge.serve.engines import agreement_report, check_engine

    _positive(args.check_max_tokens, "--check-max-tokens")
    results = check_engine(args.check_engine, args.runs, max_tokens=args.check_max_tokens, api_key=api_key,
                           device=args.device)
    print(agreement_report(results))
    return 0 if all(r.identical for r in results) else 1


def chat_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError
    from tuneforge.models.generation import GenerationSettings, refuse_reward_model
    from tuneforge.models.reference import load_for_inference
    from tuneforge.serve.chat import chat_loop

    _positive(args.max_new_tokens, "--max-new-tokens")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    settings = GenerationSettings.from_args(args)
    refuse_reward_model(args.run, "chat")
    loaded = load_for_inference(args.run, device=args.device)
    chat_loop(loaded.model, loaded.tokenizer, loaded.template, settings, system=args.system)
    return 0
