"""Who may talk to the UI: Host and Origin checks (DNS rebinding, cross-site requests), the access token, and the
rule that every path a form names lies under ``--runs`` or a ``--data-root``.

* Every request whose ``Host`` header is not this server's (a loopback name, or the bound address) gets 403 —
  a page on another site that rebinds its DNS name to 127.0.0.1 cannot read or drive the UI.
* Every state-changing request (anything but GET/HEAD/OPTIONS) whose ``Origin`` is not this server's, or that a
  browser marks ``Sec-Fetch-Site: cross-site``, gets 403 on every path.
* A non-loopback bind needs a token: sent as ``Authorization: Bearer``, the ``tuneforge_ui_token`` cookie, or once
  as ``?token=`` (which sets the cookie).
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from tuneforge.errors import UserError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
TOKEN_COOKIE = "tuneforge_ui_token"


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> str:
    """``Host`` header → host name without the port (``[::1]:7860`` → ``::1``)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Policy:
    """The access rules of one UI server."""

    def __init__(self, bind_host: str = "127.0.0.1", token: str | None = None,
                 extra_hosts: tuple[str, ...] = ()):
        self.bind_host = bind_host
        self.token = token
        hosts = {"localhost", "127.0.0.1", "::1"}
        if not is_loopback(bind_host) and bind_host not in ("0.0.0.0", "::"):
            hosts.add(split_host(bind_host))
        hosts.update(h.lower() for h in extra_hosts)
        self.hosts = hosts
        if not is_loopback(bind_host) and not token:
            raise UserError(f"ui: binding {bind_host} (not loopback) needs a token: --token-file FILE or "
                            "TUNEFORGE_UI_TOKEN (anyone on the network could otherwise start jobs)")

    def host_ok(self, host_header: str | None) -> bool:
        if not host_header:
            return False
        host = split_host(host_header)
        return host in self.hosts

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """A state-changing request's Origin: absent (not a browser, or same-origin navigation) or this server."""
        if origin is None:
            return True
        if origin == "null":
            return False
        from urllib.parse import urlsplit

        parts = urlsplit(origin)
        return parts.netloc.lower() == (host_header or "").lower() and self.host_ok(parts.netloc)

    def token_ok(self, given: str | None) -> bool:
        if not self.token:
            return True
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def refusal(self, method: str, headers: dict[str, str], query_token: str | None = None) -> str | None:
        """Why a request is refused (403 text), or None."""
        host = headers.get("host")
        if not self.host_ok(host):
            return f"forbidden: Host {host!r} is not this server (DNS rebinding protection)"
        if method.upper() not in SAFE_METHODS:
            if not self.origin_ok(headers.get("origin"), host):
                return f"forbidden: a state-changing request from another origin ({headers.get('origin')})"
            if headers.get("sec-fetch-site") == "cross-site":
                return "forbidden: a state-changing request from another site"
        if self.token:
            auth = headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else None
            given = given or _cookie(headers.get("cookie", ""), TOKEN_COOKIE) or query_token
            if not self.token_ok(given):
                return "forbidden: this UI needs its access token (open the URL printed at start, with ?token=)"
        return None


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class Roots:
    """The directories a form's paths must lie in: ``--runs`` and every ``--data-root``."""

    def __init__(self, runs_dir: Path, data_roots: list[Path] | tuple[Path, ...] = ()):
        self.runs_dir = Path(runs_dir).resolve()
        self.data_roots = [Path(p).resolve() for p in data_roots]

    @property
    def all(self) -> list[Path]:
        return [self.runs_dir, *self.data_roots]

    def confine(self, value: str, key: str, *, runs_only: bool = False, must_exist: bool = False) -> Path:
        """``value`` as an absolute path inside the allowed roots (symlinks resolved first).

        Raises:
            UserError: naming ``key``, the path and the allowed roots.
        """
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"{key}: a path is needed")
        raw = Path(value.strip()).expanduser()
        # relative paths mean what they mean to the CLI: relative to the directory the UI (and its jobs) run in
        path = (Path.cwd() / raw).resolve()
        roots = [self.runs_dir] if runs_only else self.all
        if not any(path == root or path.is_relative_to(root) for root in roots):
            where = ", ".join(str(r) for r in roots)
            raise UserError(f"{key}: {value} is outside the directories this UI may use ({where}); "
                            "start `tuneforge ui` with --data-root DIR to allow another one")
        if must_exist and not path.exists():
            raise UserError(f"{key}: {value} does not exist")
        return path

    def run_dir(self, run_id: str) -> Path:
        """A run id from a URL (``demo``, ``parent/tasks/a``) → its directory under ``--runs``."""
        path = (self.runs_dir / run_id).resolve()
        if not path.is_relative_to(self.runs_dir) or path == self.runs_dir:
            raise UserError(f"run {run_id!r} is outside {self.runs_dir}")
        return path
