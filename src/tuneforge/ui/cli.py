"""Command: ui (light module: fastapi and uvicorn are imported when the command runs)."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

TOKEN_ENV = "TUNEFORGE_UI_TOKEN"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``tuneforge ui``."""
    p = sub.add_parser("ui", help="local web app: runs, live curves, new-run form, chat, compare, export (docs/ui.md)")
    p.add_argument("--runs", default="runs", help="the runs directory to show and write into (default: runs)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; any other address needs a token)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a directory whose files forms may use as data (repeatable; --runs is always allowed)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another Host name the UI answers to (e.g. the name a reverse proxy forwards); a wildcard "
                   "--host (0.0.0.0, ::) already allows this machine's host names and addresses")
    p.add_argument("--token-file", type=Path, default=None,
                   help=f"file holding the access token (or set {TOKEN_ENV}); required for a non-loopback --host, "
                   "generated and printed when missing")
    p.set_defaults(func=ui_command)


def read_token(args: argparse.Namespace, loopback: bool) -> str | None:
    from tuneforge.errors import UserError

    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UserError(f"--token-file {args.token_file}: {exc.strerror}") from None
        if not token:
            raise UserError(f"--token-file {args.token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV)
    if token:
        return token
    return None if loopback else secrets.token_urlsafe(24)


def ui_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError
    from tuneforge.ui.security import is_loopback

    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"ui needs the ui extra ({exc.name} is missing): pip install 'tuneforge[ui]'") from None
    from tuneforge.ui.app import create_app

    for root in args.data_root:
        if not Path(root).is_dir():
            raise UserError(f"--data-root {root}: not a directory")
    loopback = is_loopback(args.host)
    token = read_token(args, loopback)
    hosts = tuple(args.allow_host) + (machine_names() if args.host in ("0.0.0.0", "::") else ())
    app = create_app(args.runs, data_roots=args.data_root, host=args.host, token=token, extra_hosts=hosts)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"tuneforge ui on {url}  (runs: {Path(args.runs).resolve()})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def machine_names() -> tuple[str, ...]:
    """This machine's host names and addresses (what a browser on the network puts in ``Host``)."""
    import socket

    names = {socket.gethostname(), socket.getfqdn()}
    try:
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return tuple(sorted(n for n in names if n))
