"""Teachers for ``tuneforge data augment``: an OpenAI-compatible server, or a local run / model directory.

Both satisfy :class:`tuneforge.data.augment.Teacher`. :class:`HttpTeacher` speaks ``POST <base>/chat/completions``
with the standard library only (``tuneforge serve``, vLLM, OpenAI...). A local run as teacher loads a model, so it
lives with the command: ``tuneforge.commands.data.RunTeacher`` (data imports no models).
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuneforge.data.augment import Reply, TeacherUnavailable
from tuneforge.errors import UserError

# Seconds before the first retry; each retry waits twice as long (a server's Retry-After, up to a minute, wins).
BACKOFF_SECONDS = 1.0
PROBE_PROMPT = [{"role": "user", "content": "Reply with the word OK."}]
# Statuses that say "try again later" rather than "this request is wrong".
_RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504)
# Statuses that no other request will get past: stop the run (it can be resumed once fixed). Redirects are never
# followed: urllib would resend the Authorization header to whatever host the Location names (and turn the POST into
# a GET on 301/302/303), so a redirect stops the run with the URL to give instead.
_REDIRECT_STATUSES = (301, 302, 303, 307, 308)
_FATAL_STATUSES = (401, 403, 404, *_REDIRECT_STATUSES)
# The largest answer read (a chat completion is a few kB; an endless body must not fill the memory).
MAX_RESPONSE_BYTES = 16 * 2**20
_MAX_ERROR_BYTES = 64 * 2**10


def is_url(spec: str) -> bool:
    """Whether ``--teacher`` names a server (``http://`` / ``https://``) rather than a local run or model."""
    return spec.startswith(("http://", "https://"))


def chat_completions_url(base: str) -> str:
    """``<base>/chat/completions``; a URL already ending in ``/chat/completions`` is used as given."""
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def teacher_name(spec: str, model: str | None = None) -> str:
    """How a teacher is named in provenance and in the resume check: the URL (and model), or the real path."""
    if is_url(spec):
        return spec.rstrip("/") + (f" model={model}" if model else "")
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def read_key(path: Path | None) -> str | None:
    """The API key in ``--api-key-file`` (stripped), or ``None`` without one.

    Raises:
        UserError: the file cannot be read or is empty.
    """
    if path is None:
        return None
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UserError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
    if not key:
        raise UserError(f"--api-key-file {path}: the file is empty")
    return key


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: the 3xx reaches the caller as an ``HTTPError`` (with its ``Location``)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102 - urllib's hook
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost`` or a loopback address)."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Failure(Exception):
    """A request that got no usable answer: ``status`` is the HTTP status (0 = no response at all)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def __str__(self) -> str:
        return f"HTTP {self.status}: {self.message}" if self.status else self.message


class HttpTeacher:
    """A teacher behind an OpenAI-compatible ``/chat/completions`` endpoint.

    One request per reply (``n`` is left at 1: not every server supports more), seeded ``seed + i``. Requests that
    get no response, a timeout, 408/409/429 or 5xx are retried ``retries`` times with exponential backoff; then,
    and at once on 401/403/404 or a redirect (never followed: the key stays with the host it was given for),
    :class:`TeacherUnavailable` stops the run. Other refusals (400, 413, 422...) fail that request only. An answer
    larger than ``MAX_RESPONSE_BYTES`` fails its request; a key sent over plain http to another host is warned about.

    Args:
        url: the API base, e.g. ``http://127.0.0.1:8000/v1`` (or the full ``.../chat/completions`` URL).
        model: the ``model`` field (left out when ``None``: ``tuneforge serve`` with one model accepts that).
        api_key: sent as ``Authorization: Bearer <key>``.
        sampling: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``
            (``GenerationSettings.to_dict()``); ``top_k`` and ``repetition_penalty`` are sent only when set, since
            they are not OpenAI fields.
        timeout: seconds per request.
        retries: retries of a failed request.
    """

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        sampling: dict | None = None,
        timeout: float = 120.0,
        retries: int = 3,
    ) -> None:
        self.endpoint = chat_completions_url(url)
        self.name = teacher_name(url, model)
        self.model, self.api_key, self.timeout, self.retries = model, api_key, timeout, retries
        self.body = _sampling_body(sampling or {})
        if api_key and urlsplit(self.endpoint).scheme == "http" and not is_loopback(self.endpoint):
            from tuneforge.console import warn

            warn(f"--teacher {self.endpoint}: the API key would travel unencrypted (plain http to another host)",
                 "use an https:// URL, or a tunnel to 127.0.0.1")

    def probe(self) -> None:
        """One small request with the run's own settings (so a rejected setting shows now, not mid-run).

        Raises:
            UserError: what is wrong (no server, wrong URL, key refused, settings refused) and that nothing was
                written.
        """
        try:
            self._post(self._request(PROBE_PROMPT, None, max_tokens=4))
        except _Failure as exc:
            raise UserError(f"--teacher {self.endpoint}: {_explain(exc)} (nothing was written)") from None

    def ask(self, messages: list[dict], count: int, seed: int | None) -> list[Reply]:
        replies = []
        for i in range(count):
            body = self._request(messages, None if seed is None else seed + i)
            try:
                replies.append(self._with_retries(body))
            except _Failure as exc:
                replies.append(Reply(None, error=str(exc)))
        return replies

    def _request(self, messages: list[dict], seed: int | None, max_tokens: int | None = None) -> dict:
        body = {**self.body, "messages": messages}
        if self.model:
            body["model"] = self.model
        if seed is not None:
            body["seed"] = seed
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        return body

    def _with_retries(self, body: dict) -> Reply:
        for attempt in range(self.retries + 1):
            try:
                return _reply_of(self._post(body))
            except _Failure as exc:
                if exc.status in _FATAL_STATUSES:
                    raise TeacherUnavailable(_explain(exc)) from None
                if exc.status and exc.status not in _RETRY_STATUSES:
                    raise  # this request is refused; the next ones may not be
                if attempt == self.retries:
                    raise TeacherUnavailable(f"{exc}, {self.retries + 1} attempts") from None
                wait = BACKOFF_SECONDS * 2**attempt
                time.sleep(min(exc.retry_after, 60.0) if exc.retry_after is not None else wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST"
        )
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            if exc.code in _REDIRECT_STATUSES:
                where = exc.headers.get("Location") if exc.headers else None
                raise _Failure(exc.code, f"the server redirects to {where or '(no Location)'}") from None
            retry_after = exc.headers.get("Retry-After") if exc.headers else None
            raise _Failure(exc.code, _error_message(exc), _seconds(retry_after)) from None
        except urllib.error.URLError as exc:
            raise _Failure(
                0, f"cannot connect ({getattr(exc.reason, 'strerror', None) or exc.reason})"
            ) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a cut-off body
            raise _Failure(0, f"no answer ({type(exc).__name__}: {exc})") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            raise _Failure(200, f"the answer is larger than {MAX_RESPONSE_BYTES // 2**20} MiB (not read further)")
        try:
            data = json.loads(raw)
        except ValueError:
            raise _Failure(200, f"the answer is not JSON: {raw[:120]!r}") from None
        if not isinstance(data, dict):
            raise _Failure(200, "the answer is not a JSON object")
        return data


def _sampling_body(sampling: dict) -> dict:
    body: dict[str, Any] = {"max_tokens": sampling.get("max_new_tokens", 512)}
    for key in ("temperature", "top_p"):
        if sampling.get(key) is not None:
            body[key] = sampling[key]
    if sampling.get("top_k"):
        body["top_k"] = sampling["top_k"]
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        body["repetition_penalty"] = sampling["repetition_penalty"]
    if sampling.get("stop"):
        body["stop"] = list(sampling["stop"])
    return body


def _reply_of(data: dict) -> Reply:
    """The first choice's text (``None`` text: a malformed answer, counted as a failed request)."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return Reply(None, error="the answer has no choices")
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        return Reply(None, error="the answer's message has no text content")
    return Reply(content, truncated=choices[0].get("finish_reason") == "length")


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        data = json.loads(exc.read(_MAX_ERROR_BYTES) or b"{}")
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else data.get("detail") or error
        return str(message or exc.reason)
    except (ValueError, OSError, AttributeError):
        return str(exc.reason)


def _seconds(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def _explain(exc: _Failure) -> str:
    if exc.status == 0:
        return (
            f"{exc}; is the server running? (`tuneforge serve RUN` listens on http://127.0.0.1:8000/v1; "
            "or give a local run directory as --teacher)"
        )
    if exc.status == 404:
        return f"{exc}; the URL should be the API base, e.g. http://127.0.0.1:8000/v1"
    if exc.status in (401, 403):
        return f"{exc}; the server wants an API key: pass --api-key-file FILE"
    if exc.status in _REDIRECT_STATUSES:
        return (f"{exc}; tuneforge does not follow redirects (the API key would go to whatever host the server "
                "names): give the URL it redirects to as --teacher")
    return f"the server refused the request ({exc}); check --teacher-model and the generation flags"
