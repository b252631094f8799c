"""The HTTP API: OpenAI-compatible endpoints plus the guide's simple ``POST /chat``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` and ``POST /v1/completions``
(``stream: true`` → server-sent events ending with ``data: [DONE]``), ``POST /chat`` (``{"message", "history",
"system", "model", "max_length", "temperature"}`` → ``{"response", "model"}``), ``GET /health``.

Generation runs in the scheduler's worker thread (dynamic batching, see ``scheduler.py``); handlers only validate,
tokenise, queue and wait, so the event loop stays free. A client that goes away (streaming or not) cancels its rows.
Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` (``errors.md`` in ``docs/serve.md``
lists the statuses); a failure in the middle of a stream is an SSE ``error`` event followed by ``data: [DONE]``.

Routing: a request's ``model`` names the served adapter; with ``route="prefix"`` the name of a per-task run routes
by the ``[task]`` prefix of the first user message (``/v1/completions``: of the prompt), see ``PerTaskRun.route``.
The response's ``model`` is the adapter that answered (``<run>/<task>``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import Request  # module level: FastAPI resolves endpoint annotations from this module's globals

from tuneforge.errors import UserError
from tuneforge.serve.engine import Engine, PerTaskRun, Served, UnknownTask, check_route
from tuneforge.serve.scheduler import QueueFull, TooLarge, Work
from tuneforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    SimpleChatRequest,
    _Sampling,
)

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_MAX_PROMPT_TOKENS = 4096  # --max-prompt-tokens when not given (the model's context when shorter)
DEFAULT_MAX_SCORED_TOKENS = 32768  # --max-scored-tokens: prompt tokens scored (echo + logprobs) per request


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------- the guard (pure ASGI)


class Guard:
    """Pure ASGI layer in front of every route: host/origin check, API key, JSON-only POST bodies, body size.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that the client's disconnect still reaches the route and cancels
    its generation. Any exception that escapes the app before a response started is answered as a JSON 500.

    Args:
        app: the ASGI app.
        api_key: when set, every path but ``/health`` needs ``Authorization: Bearer <key>`` (constant-time compare).
        max_body_bytes: larger POST bodies are refused with 413 before they are parsed.
        local_only: refuse requests whose ``Host`` or ``Origin`` is not a loopback name (a loopback bind without a
            key: a web page the user visits must not drive the server through DNS rebinding or a cross-site form).
    """

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, local_only: bool):
        self.app, self.api_key, self.max_body_bytes, self.local_only = app, api_key, max_body_bytes, local_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = self._refusal(scope, headers)
        if error is None and scope["method"] == "POST":
            body, error = await self._read_body(receive, headers)
            if body is None and error is None:
                return  # the client left while sending its body
            if body is not None:
                receive = _replay(body, receive)
        if error is not None:
            return await _send_json(send, error.status, error.body(), error.headers)
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            log.exception("request %s %s failed", scope["method"], scope["path"])
            if not started:
                error = _internal_error()
                await _send_json(send, 500, error.body(), {})

    def _refusal(self, scope, headers: dict[str, str]) -> APIError | None:
        if self.local_only:
            host = _hostname("//" + headers.get("host", ""))
            if host not in LOOPBACK_NAMES:
                return APIError(403, f"Host {headers.get('host', '')!r} refused: this server is bound to loopback "
                                "without an API key and answers only localhost names (set --api-key to serve "
                                "other names)", code="forbidden_host", kind="permission_error")
            origin = headers.get("origin")
            if origin is not None and _hostname(origin) not in LOOPBACK_NAMES:
                return APIError(403, f"cross-site request from {origin!r} refused (no API key is set)",
                                code="cross_origin", kind="permission_error")
        if self.api_key and scope["path"] != "/health":
            header = headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())
            if not ok:
                what = "missing API key" if not header else "incorrect API key"
                return APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                code="invalid_api_key", kind="authentication_error")
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json' "
                                f"(got {kind or 'no content type'!r}; with curl add -H 'Content-Type: "
                                "application/json')", code="unsupported_media_type")
        return None

    async def _read_body(self, receive, headers: dict[str, str]) -> tuple[bytes | None, APIError | None]:
        too_large = APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                             "bytes (--max-body-bytes)", code="request_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return b"", too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return b"", too_large
            if not message.get("more_body", False):
                return bytes(body), None


def _hostname(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _replay(body: bytes, receive):
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _internal_error() -> APIError:
    return APIError(500, "internal server error (the server log has the details)", kind="server_error",
                    code="internal_error")


# --------------------------------------------------------------------------- OpenAPI responses

_ERRORS = {
    400: "invalid request (the message names the field); unsupported field; limit exceeded; unknown or missing "
         "[task] prefix (--route prefix)",
    401: "missing or wrong API key",
    403: "Host/Origin refused (loopback bind without an API key)",
    404: "unknown model",
    413: "request body too large; more rows than the queue holds; a row above the token budget; more scored "
         "tokens than --max-scored-tokens",
    415: "request body not sent as application/json",
    429: "queue full; retry after the Retry-After header's seconds",
    500: "server error",
}


def _responses(*statuses: int, stream: bool = False) -> dict:
    ok: dict = {"description": "the completion" + (" (server-sent events when stream is true)" if stream else "")}
    if stream:
        ok["content"] = {"application/json": {"schema": {"type": "object"}},
                         "text/event-stream": {"schema": {"type": "string"}}}
    responses: dict = {200: ok}
    for status in statuses:
        entry: dict = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}
        responses[status] = entry
    return responses


_GENERATE_ERRORS = (400, 401, 403, 404, 413, 415, 429, 500)


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine, *, api_key: str | None = None, max_tokens_limit: int = 1024,
               max_prompt_tokens: int | None = None, max_scored_tokens: int = DEFAULT_MAX_SCORED_TOKENS,
               default_max_tokens: int = 256,
               default_temperature: float = 0.0, max_body_bytes: int = 1 << 20, local_only: bool = False,
               route: str = "name"):
    """Build the FastAPI application serving ``engine``'s models.

    Args:
        engine: the loaded models and their scheduler.
        api_key: when set, every request except ``/health`` needs ``Authorization: Bearer <api_key>``.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: the longest prompt accepted (tokens after the chat template); None =
            ``DEFAULT_MAX_PROMPT_TOKENS`` or the model's context when shorter.
        max_scored_tokens: most prompt tokens one ``echo`` + ``logprobs`` request may have scored (413 beyond).
        default_max_tokens: used when a request gives no ``max_tokens``.
        default_temperature: used when a request gives no ``temperature`` (0 = greedy).
        max_body_bytes: larger request bodies are refused (413).
        local_only: accept only loopback ``Host``/``Origin`` names (for a loopback bind without a key).
        route: ``name`` (a request's ``model`` names the adapter) or ``prefix``: a request whose ``model`` is a
            per-task run's name (or that names no model when that run is all the server holds) goes to the task
            its first user message (``/v1/completions``: its prompt) names with a ``[task]`` prefix.

    Raises:
        UserError: an unknown ``route``, or ``prefix`` without a per-task run to route to.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from tuneforge.models.generation import GenerationSettings

    check_route(route, engine.per_task)
    app = FastAPI(title="tuneforge", description="OpenAI-compatible API for tuneforge runs", version="1")
    app.state.engine = engine
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, local_only=local_only)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return APIError(400, str(exc)).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        from fastapi.responses import Response

        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return _internal_error().response()

    def listed() -> list[str]:
        """The model names requests may use (``/v1/models``): per-task runs' own names too when routing by prefix."""
        return engine.names() + (list(engine.per_task) if route == "prefix" else [])

    def pick(name: str | None) -> Served | PerTaskRun:
        names = listed()
        if name is None:
            if route == "prefix" and len(engine.per_task) == 1:
                run = next(iter(engine.per_task.values()))
                if all(any(s is t for t in run.tasks.values()) for s in engine.models.values()):
                    return run
            if len(names) == 1:
                return engine.get(names[0])
            raise APIError(400, f"'model' is required: this server has {', '.join(names)}", param="model")
        if name in engine.per_task:
            if route == "prefix":
                return engine.per_task[name]
            run = engine.per_task[name]
            raise APIError(404, f"model {name!r} is a per-task run: ask for one of its tasks "
                           f"({run.served_names_hint()}), or start the server with --route prefix to choose the task "
                           "from the '[task]' prefix of the first user message", param="model",
                           code="model_not_found")
        if name not in names:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(names)}", param="model",
                           code="model_not_found")
        return engine.get(name)

    def routed_messages(target: Served | PerTaskRun, messages: list[dict], param: str) -> tuple[Served, list[dict]]:
        """The adapter for chat ``messages`` and the messages it gets: a per-task run picks the task named by the
        first user message's ``[task]`` prefix (where training put it) and keeps or drops the prefix as trained."""
        if isinstance(target, Served):
            return target, messages
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        try:
            served, text = target.route(messages[first]["content"] if first is not None else "")
        except UnknownTask as exc:
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        messages = list(messages)
        messages[first] = {**messages[first], "content": text}
        return served, messages

    def routed_prompts(target: Served | PerTaskRun, prompts: list) -> tuple[Served, list]:
        """The adapter for raw ``prompts`` (one for all of them) and the prompts it gets."""
        if isinstance(target, Served):
            return target, prompts
        if any(not isinstance(p, str) for p in prompts):
            raise APIError(400, f"token-id prompts carry no '[task]' prefix to route by: ask for a model "
                           f"{target.served_names_hint()}", param="prompt", code="missing_task_prefix")
        try:
            routes = [target.route(p) for p in prompts]
        except UnknownTask as exc:
            raise APIError(400, str(exc), param="prompt", code=exc.code) from None
        chosen = {served.name for served, _ in routes}
        if len(chosen) > 1:
            raise APIError(400, f"the prompts of one request name different tasks ({', '.join(sorted(chosen))}); "
                           "send one request per task", param="prompt")
        return routes[0][0], [text for _, text in routes]

    def settings_for(req: _Sampling, max_tokens: int | None) -> GenerationSettings:
        if max_tokens is None:
            max_tokens = min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return GenerationSettings(
            max_new_tokens=max_tokens, temperature=default_temperature if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, stop=tuple(stops))

    def check_prompt(served: Served, ids: list[int], settings: GenerationSettings, param: str) -> None:
        if any(i >= served.vocab_size for i in ids):
            raise APIError(400, f"{param}: token ids must be below the vocabulary size {served.vocab_size}",
                           param=param)
        limit = max_prompt_tokens or min(DEFAULT_MAX_PROMPT_TOKENS, served.context_length or DEFAULT_MAX_PROMPT_TOKENS)
        if limit and len(ids) > limit:
            raise APIError(400, f"the prompt is {len(ids)} tokens, above this server's limit of {limit} "
                           "(--max-prompt-tokens); shorten it", param=param, code="context_length_exceeded")
        context = served.context_length
        if context and len(ids) + settings.max_new_tokens > context:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({settings.max_new_tokens}) "
                           f"exceeds the model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")

    async def encode(served: Served, prompt, tools=None) -> list[int]:
        ids = await asyncio.to_thread(served.prompt_ids, prompt, tools)
        if not ids:  # an empty text prompt: start from BOS (as models.generation does)
            tok = served.tokenizer
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return ids

    @app.get("/health", responses=_responses())
    async def health():
        return {"status": "ok", "models": listed(), "waiting": engine.scheduler.waiting(),
                "running": engine.scheduler.running}

    @app.get("/v1/models", responses=_responses(401, 403, 500))
    async def list_models():
        return {"object": "list", "data": [_model_card(name) for name in listed()]}

    @app.get("/v1/models/{name:path}", responses=_responses(401, 403, 404, 500))
    async def get_model(name: str):
        pick(name)
        return _model_card(name)

    @app.post("/v1/completions", responses=_responses(*_GENERATE_ERRORS, stream=True))
    async def completions(req: CompletionRequest, request: Request):
        target = pick(req.model)
        settings = settings_for(req, req.max_tokens)
        if settings.max_new_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens: 0 is only meaningful with echo (scoring the prompt)", param="max_tokens")
        served, prompts = routed_prompts(target, _prompt_list(req.prompt))
        ids = [p if isinstance(p, list) else await encode(served, p) for p in prompts]
        for row in ids:
            check_prompt(served, row, settings, "prompt")
        top = req.logprobs
        scored = sum(len(row) for row in ids) if req.echo and top is not None else 0
        if scored > max_scored_tokens:
            raise APIError(413, f"echo + logprobs would score {scored} prompt tokens, above this server's cap of "
                           f"{max_scored_tokens} per request (--max-scored-tokens); send fewer or shorter prompts "
                           "per request", param="prompt", code="too_many_scored_tokens")
        job = _Job(engine.scheduler, served, ids, req.n, settings, top, score=req.echo and top is not None,
                   stream=req.stream)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echoes = await asyncio.to_thread(lambda: [served.decode(row) if req.echo else "" for row in ids])
        if req.stream:
            return _sse(request, job, _CompletionChunks(ident, created, served, req, echoes))
        choices = await job.results(request)

        def choice(index: int, result) -> dict:
            prompt_index = index // req.n
            logprobs = None
            if top is not None:
                # the stop token that ended the choice is listed last, as OpenAI and vLLM do (module docstring)
                tokens = ((job.scores[prompt_index] if req.echo else []) + list(result.logprobs or ())
                          + ([result.stop_token] if getattr(result, "stop_token", None) else []))
                logprobs = _completion_logprobs(served, tokens)
            return {"index": index, "text": echoes[prompt_index] + result.text, "logprobs": logprobs,
                    "finish_reason": result.finish_reason}

        # detokenising every scored token (lm-eval's echo requests) is real work: off the event loop
        out = await asyncio.to_thread(lambda: [choice(i, result) for i, result in enumerate(choices)])
        return {"id": ident, "object": "text_completion", "created": created, "model": served.name,
                "choices": out, "usage": job.usage(choices)}

    @app.post("/v1/chat/completions", responses=_responses(*_GENERATE_ERRORS, stream=True))
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        served, messages = routed_messages(pick(req.model), [m.as_dict() for m in req.messages], "messages")
        settings = settings_for(req, req.max_completion_tokens if req.max_completion_tokens is not None
                                else req.max_tokens)
        if settings.max_new_tokens == 0:
            raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        tools = _tools_for(served, req)
        ids = await encode(served, messages, tools)
        check_prompt(served, ids, settings, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        job = _Job(engine.scheduler, served, [ids], req.n, settings, top, score=False, stream=req.stream)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return _sse(request, job, _ChatChunks(ident, created, served, req, tools))
        choices = await job.results(request)
        out = []
        for index, result in enumerate(choices):
            message, finish = _assistant_message(result.text, tools), result.finish_reason
            if message.get("tool_calls"):
                finish = "tool_calls"
            out.append({"index": index, "message": message, "finish_reason": finish,
                        "logprobs": _chat_logprobs(served, result.logprobs) if top is not None else None})
        return {"id": ident, "object": "chat.completion", "created": created, "model": served.name,
                "choices": out, "usage": job.usage(choices)}

    @app.post("/chat", responses=_responses(*_GENERATE_ERRORS))
    async def simple_chat(req: SimpleChatRequest, request: Request):
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            m.as_dict() for m in req.history] + [{"role": "user", "content": req.message}]
        served, messages = routed_messages(pick(req.model), messages, "message")
        sampling = _Sampling.model_construct(model=req.model, temperature=req.temperature)  # already validated
        settings = settings_for(sampling, req.max_new_tokens or req.max_length)
        ids = await encode(served, messages)
        check_prompt(served, ids, settings, "message")
        job = _Job(engine.scheduler, served, [ids], 1, settings, None, score=False, stream=False)
        result = (await job.results(request))[0]
        return {"response": result.text, "model": served.name}

    app.openapi = _openapi_without_422(app)
    return app


# --------------------------------------------------------------------------- one request's work


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Job:
    """The rows of one request (prompts × n), queued together, cancelled together.

    Non-streaming: ``await results(request)``. Streaming: read ``queue`` (``("event", index, TokenEvent)`` and
    ``("done", index, RowResult | Exception)`` tuples, in order). Scoring rows (echo + logprobs) fill ``scores``
    (``await wait_scores()``). Raises APIError 429 when the scheduler's queue is full.
    """

    def __init__(self, scheduler, served: Served, prompts: list[list[int]], n: int, settings,
                 top_logprobs: int | None, *, score: bool, stream: bool):
        from tuneforge.models.decoding import DecodeRow

        self.loop = asyncio.get_running_loop()
        self.served, self.prompts, self.n = served, prompts, n
        self.queue: asyncio.Queue | None = asyncio.Queue() if stream else None
        self.futures: list[asyncio.Future] = []
        self.items: list[Work] = []
        self.generate = settings.max_new_tokens > 0
        self.scores: list[list] = []
        self._score_futures: list[asyncio.Future] = []
        if score:
            for row in prompts:
                future = self.loop.create_future()
                self._score_futures.append(future)
                self.items.append(Work(served, self._resolver(future), score_ids=row, top_logprobs=top_logprobs))
        if self.generate:
            for p, row in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    # n samples of one seeded request must differ from each other yet stay reproducible
                    choice = settings if j == 0 or settings.seed is None else dataclasses.replace(
                        settings, seed=settings.seed + j)
                    future = None if stream else self.loop.create_future()  # streams read the queue only
                    if future is not None:
                        self.futures.append(future)
                    on_event = self._forward(index) if stream else None
                    decode_row = DecodeRow(row, choice, top_logprobs, on_event=on_event)
                    self.items.append(Work(served, self._resolver(future, index), row=decode_row,
                                           cancelled=decode_row.cancelled))
        try:
            scheduler.submit(self.items)
        except TooLarge as exc:
            raise APIError(413, str(exc), code="request_too_large") from None
        except QueueFull as exc:
            raise APIError(429, f"the server is busy ({exc.waiting} generations waiting); retry in "
                           f"{exc.retry_after} s", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    def _resolver(self, future: asyncio.Future | None, index: int | None = None):
        post = _poster(self.loop).post

        def done(result):
            if future is not None:
                post(_settle, future, result)
            if self.queue is not None and index is not None:
                post(self.queue.put_nowait, ("done", index, result))
        return done

    def _forward(self, index: int):
        post = _poster(self.loop).post

        def on_event(event):
            post(self.queue.put_nowait, ("event", index, event))
        return on_event

    def cancel(self) -> None:
        for item in self.items:
            item.cancelled.set()

    async def wait_scores(self) -> None:
        self.scores = list(await asyncio.gather(*self._score_futures))

    async def results(self, request: Request) -> list:
        """Every choice's ``RowResult`` (empty ones when nothing is generated); cancels on disconnect."""
        async def everything():
            await self.wait_scores()
            if not self.generate:
                return [_EMPTY] * (len(self.prompts) * self.n)
            return list(await asyncio.gather(*self.futures))

        work = asyncio.ensure_future(everything())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            self.cancel()
            work.cancel()
            raise ClientGone()
        return work.result()

    def usage(self, choices: list) -> dict:
        prompt = sum(len(row) for row in self.prompts)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Poster:
    """Hands calls from the generating thread to the event loop in bursts: the first call of a burst wakes the loop
    (``call_soon_threadsafe``: a write to its self-pipe), the calls made before the loop runs join it. A decoding step
    of 32 streaming rows then wakes the loop about once instead of 32 times, the calls keeping their order."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: deque[tuple[Callable, tuple]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, fn: Callable, *args) -> None:
        with self._lock:
            self._pending.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is left to tell
            pass

    def _run(self) -> None:
        with self._lock:
            calls, self._pending, self._scheduled = self._pending, deque(), False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:  # one failing call must not drop the rest of its burst
                log.exception("a call from the generating thread failed")


_POSTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POSTERS_LOCK = threading.Lock()


def _poster(loop: asyncio.AbstractEventLoop) -> _Poster:
    with _POSTERS_LOCK:
        poster = _POSTERS.get(loop)
        if poster is None:
            poster = _POSTERS[loop] = _Poster(loop)
        return poster


def _settle(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


@dataclasses.dataclass(frozen=True)
class _Empty:
    text: str = ""
    token_ids: tuple = ()
    finish_reason: str = "length"
    logprobs: tuple = ()


_EMPTY = _Empty()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --------------------------------------------------------------------------- streaming


def _sse(request: Request, job: _Job, chunks) -> Any:
    from fastapi.responses import StreamingResponse

    return StreamingResponse(_stream(request, job, chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(request: Request, job: _Job, chunks) -> AsyncIterator[str]:
    """The SSE body: the chunk builder's events as rows advance; an error becomes an ``error`` event; always
    ``[DONE]``; the job is cancelled if the client goes away (the generator is closed)."""
    finished: dict[int, Any] = {}
    try:
        try:
            await job.wait_scores()
            for payload in chunks.start(job):
                yield _event(payload)
            total = len(job.prompts) * job.n
            while job.generate and len(finished) < total:
                # everything queued since the last write goes out in one write (one send per burst, not per token)
                items = [await job.queue.get()]
                while not job.queue.empty():
                    items.append(job.queue.get_nowait())
                out = []
                for kind, index, value in items:
                    if kind == "done":
                        if isinstance(value, BaseException):
                            if out:
                                yield "".join(out)
                            raise value
                        finished[index] = value
                        out += [_event(payload) for payload in chunks.finish(index, value)]
                    else:
                        out += [_event(payload) for payload in chunks.token(index, value)]
                if out:
                    yield "".join(out)
            if not job.generate:
                finished = {i: _EMPTY for i in range(total)}
                for index in range(total):
                    for payload in chunks.finish(index, _EMPTY):
                        yield _event(payload)
            if chunks.include_usage:
                yield _event(chunks.usage_chunk(job.usage(list(finished.values()))))
        except APIError as exc:
            yield _event(exc.body())
        except Exception:
            log.exception("stream failed")
            yield _event(_internal_error().body())
        yield _event("[DONE]")
    finally:
        job.cancel()


class _CompletionChunks:
    def __init__(self, ident, created, served: Served, req: CompletionRequest, echoes: list[str]):
        self.ident, self.created, self.served, self.req, self.echoes = ident, created, served, req, echoes
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _chunk(self, index: int, text: str, logprobs, finish) -> dict:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.served.name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    def start(self, job: _Job):
        if not self.req.echo:
            return
        for index in range(len(job.prompts) * job.n):
            p = index // job.n
            logprobs = _completion_logprobs(self.served, job.scores[p]) if job.scores else None
            yield self._chunk(index, self.echoes[p], logprobs, None)

    def token(self, index: int, event):
        if self.req.logprobs is not None and event.token is not None:
            yield self._chunk(index, event.text, _completion_logprobs(self.served, [event.token]), None)
        elif event.text:
            yield self._chunk(index, event.text, None, None)

    def finish(self, index: int, result):
        stop = getattr(result, "stop_token", None)
        logprobs = _completion_logprobs(self.served, [stop]) if stop is not None and self.req.logprobs is not None \
            else None
        yield self._chunk(index, "", logprobs, result.finish_reason)

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.served.name,
                "choices": [], "usage": usage}


class _ChatChunks:
    def __init__(self, ident, created, served: Served, req: ChatCompletionRequest, tools: list[dict] | None):
        self.ident, self.created, self.served, self.req, self.tools = ident, created, served, req, tools
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.texts: dict[int, str] = {}

    def _chunk(self, index: int, delta: dict, logprobs, finish) -> dict:
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    def start(self, job: _Job):
        for index in range(len(job.prompts) * job.n):
            yield self._chunk(index, {"role": "assistant", "content": ""}, None, None)

    def token(self, index: int, event):
        if self.tools:  # tool calls are parsed from the whole answer: sent with the final chunk
            self.texts[index] = self.texts.get(index, "") + event.text
            return
        logprobs = None
        if self.req.logprobs and event.token is not None:
            logprobs = _chat_logprobs(self.served, [event.token])
        if event.text or logprobs:
            yield self._chunk(index, {"content": event.text}, logprobs, None)

    def finish(self, index: int, result):
        finish = result.finish_reason
        if self.tools:
            message = _assistant_message(result.text, self.tools)
            delta = {"content": message["content"]}
            if message.get("tool_calls"):
                finish = "tool_calls"
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            logprobs = _chat_logprobs(self.served, result.logprobs) if self.req.logprobs else None
            yield self._chunk(index, delta, logprobs, None)
        yield self._chunk(index, {}, None, finish)

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                "model": self.served.name, "choices": [], "usage": usage}


# --------------------------------------------------------------------------- helpers


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tuneforge"}


def _prompt_list(prompt) -> list:
    """A request's prompts: each a string or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _completion_logprobs(served: Served, tokens: list) -> dict:
    """OpenAI's legacy completion log-probs: tokens, token_logprobs, top_logprobs, text_offset (offsets into the
    returned text)."""
    texts = served.token_texts([t.token_id for t in tokens])
    offsets, position = [], 0
    for text in texts:
        offsets.append(position)
        position += len(text)
    top = []
    for t in tokens:
        if t.logprob is None:
            top.append(None)
            continue
        alternatives: dict[str, float] = {}
        for text, logprob in zip(served.token_texts([i for i, _ in t.top]), (lp for _, lp in t.top), strict=True):
            alternatives[text] = max(logprob, alternatives.get(text, float("-inf")))
        top.append(alternatives)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
            "text_offset": offsets}


def _chat_logprobs(served: Served, tokens) -> dict:
    """OpenAI's chat log-probs: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    content = []
    for t in tokens or ():
        text = served.token_texts([t.token_id])[0]
        alternatives = [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                        for s, (_, lp) in zip(served.token_texts([i for i, _ in t.top]), t.top, strict=True)]
        content.append({"token": text, "logprob": t.logprob, "bytes": list(text.encode()),
                        "top_logprobs": alternatives})
    return {"content": content}


def _tools_for(served: Served, req: ChatCompletionRequest) -> list[dict] | None:
    """The request's tools as the chat template takes them (``None``: no tools, or ``tool_choice: none``).

    Raises:
        APIError: the model's chat template does not present tools (they would be dropped silently).
    """
    if not req.tools or req.tool_choice == "none":
        return None
    template = served.template
    if template is None or "tools" not in template.jinja:
        name = getattr(template, "name", "none")
        raise APIError(400, f"tools: the chat template of {served.name!r} ({name}) does not present tools to the "
                       "model; serve a run whose template renders `tools` (e.g. Qwen2.5's, Llama 3.1's)",
                       param="tools")
    return [tool.model_dump(exclude_none=True) for tool in req.tools]


def _assistant_message(text: str, tools: list[dict] | None) -> dict:
    """The assistant message of a choice: tool calls read from the text when tools were offered."""
    if not tools:
        return {"role": "assistant", "content": text}
    from tuneforge.serve.tools import parse_tool_calls

    content, calls = parse_tool_calls(text, {tool["function"]["name"] for tool in tools})
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def _validation_error(errors: list[dict]) -> APIError:
    """One readable 400 naming the field(s), from pydantic/FastAPI validation errors."""
    extra = [".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in errors
             if e.get("type") == "extra_forbidden"]
    if extra:
        names = ", ".join(extra)
        return APIError(400, f"unsupported field{'s' if len(extra) > 1 else ''}: {names} (this server does not "
                        "implement it; see docs/serve.md for the supported fields)", param=extra[0],
                        code="unsupported_field")
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") in ("json_invalid", "model_attributes_type") and tuple(first.get("loc", ())) in (
            ("body",), ("body", 0)):
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"the request body must be a JSON object ({detail})", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"{param}: required field missing"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        value = first.get("input")
        if not isinstance(value, dict | list) and len(repr(value)) < 80:
            message += f" (got {value!r})"
    return APIError(400, message, param=param)


def _openapi_without_422(app):
    """FastAPI documents a 422 for every body; this API answers validation errors with 400 (OpenAI's)."""
    original = app.openapi

    def openapi():
        if app.openapi_schema is None:
            schema = original()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
