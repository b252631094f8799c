"""Commands: serve (OpenAI-compatible HTTP API), chat (terminal). Light module: heavy imports inside."""

from __future__ import annotations

import argparse
import os


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for one or more runs (adapters of one base share it)")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run, adapter or model directory; NAME=PATH to name it")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TUNEFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $TUNEFORGE_API_KEY; none = open)")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt accepted, in tokens")
    p.add_argument("--default-max-tokens", type=int, default=256)
    p.add_argument("--default-temperature", type=float, default=0.7)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=serve_command)

    p = sub.add_parser("chat", help="interactive terminal chat with a run (streamed; /reset, /exit)")
    p.add_argument("run", metavar="RUN", help="run, adapter or model directory")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=chat_command)


def _positive(value, flag: str) -> None:
    from tuneforge.errors import UserError

    if value is not None and value <= 0:
        raise UserError(f"{flag} must be positive, got {value}")


def serve_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError

    _positive(args.max_tokens_limit, "--max-tokens-limit")
    _positive(args.max_prompt_tokens, "--max-prompt-tokens")
    _positive(args.default_max_tokens, "--default-max-tokens")
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: choose a port between 1 and 65535")
    try:
        import uvicorn

        from tuneforge.serve.app import create_app
    except ImportError as exc:
        raise UserError(f"serve needs the serve extra ({exc.name} is missing): pip install 'tuneforge[serve]'") from None
    from tuneforge.serve.engine import Engine

    engine = Engine(args.runs, device=args.device)
    app = create_app(engine, api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                     max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
                     default_temperature=args.default_temperature)
    print(f"serving {', '.join(engine.names())} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if args.api_key else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def chat_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError
    from tuneforge.models.reference import load_for_inference
    from tuneforge.serve.chat import chat_loop

    _positive(args.max_new_tokens, "--max-new-tokens")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    loaded = load_for_inference(args.run, device=args.device)
    chat_loop(loaded.model, loaded.tokenizer, loaded.template, system=args.system,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
              repetition_penalty=args.repetition_penalty)
    return 0
