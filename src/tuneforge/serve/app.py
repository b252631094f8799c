"""The HTTP API: OpenAI-compatible endpoints plus the guide's simple ``POST /chat``.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (``stream: true`` → server-sent
events ending with ``data: [DONE]``), ``POST /v1/completions`` (same), ``POST /chat`` (``{"message", "history",
"system", "model", "max_length", "temperature"}`` → ``{"response", "model"}``), ``GET /health``.

Every error a client can cause is a 4xx with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON or fields → 400, wrong/missing API key → 401, unknown model → 404 (listing the served ones),
``max_tokens`` above the server's limit or a prompt longer than allowed → 400.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Request  # module level: FastAPI resolves endpoint annotations from this module's globals
from pydantic import BaseModel, ConfigDict, Field

from tuneforge.errors import UserError
from tuneforge.serve.engine import Engine, Served, Settings

# --------------------------------------------------------------------------- request schemas


class _Request(BaseModel):
    # OpenAI clients send fields we do not use (frequency_penalty, user, ...): ignore them rather than fail.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict:
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    stream_options: dict | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class SimpleChatRequest(_Request):
    message: str = Field(min_length=1)
    history: list[Message] = []
    system: str | None = None
    model: str | None = None
    max_length: int | None = Field(None, ge=1, description="new tokens to generate (the guide's name)")
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- the app


def create_app(engine: Engine, *, api_key: str | None = None, max_tokens_limit: int = 1024,
               max_prompt_tokens: int | None = None, default_max_tokens: int = 256,
               default_temperature: float = 0.7):
    """Build the FastAPI application serving ``engine``'s models.

    Args:
        engine: the loaded models.
        api_key: when set, every request except ``/health`` needs ``Authorization: Bearer <api_key>``.
        max_tokens_limit: the largest ``max_tokens`` a request may ask for.
        max_prompt_tokens: the longest prompt accepted (tokens after the chat template); None = the model's context.
        default_max_tokens: used when a request gives no ``max_tokens``.
        default_temperature: used when a request gives no ``temperature`` (0 = greedy).
    """
    import anyio
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="tuneforge", description="OpenAI-compatible API for tuneforge runs")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(_validation_error(exc.errors()).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        error = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or token.strip() != api_key:
                what = "missing API key" if not header else "incorrect API key"
                error = APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", kind="authentication_error")
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    def pick(name: str | None) -> Served:
        names = engine.names()
        if name is None:
            if len(names) == 1:
                return engine.get(names[0])
            raise APIError(400, f"'model' is required: this server has {', '.join(names)}", param="model")
        if name not in names:
            raise APIError(404, f"model {name!r} does not exist; available: {', '.join(names)}", param="model",
                           code="model_not_found")
        return engine.get(name)

    def settings_for(served: Served, prompt: Any, req: _Sampling, max_tokens: int | None) -> tuple[Settings, int]:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, max_tokens_limit)
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        prompt_tokens = len(engine.prompt_ids(served, prompt))
        if max_prompt_tokens is not None and prompt_tokens > max_prompt_tokens:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens, above this server's limit of "
                           f"{max_prompt_tokens}; shorten the messages", param="messages",
                           code="context_length_exceeded")
        context = served.context_length
        if context and prompt_tokens + max_tokens > context:
            raise APIError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                           f"model's context of {context} tokens", param="max_tokens",
                           code="context_length_exceeded")
        temperature = default_temperature if req.temperature is None else req.temperature
        settings = Settings(max_new_tokens=max_tokens, temperature=temperature, top_p=req.top_p or 1.0,
                            seed=req.seed, stop=stops)
        return settings, prompt_tokens

    @app.get("/health")
    def health():
        return {"status": "ok", "models": engine.names()}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [_model_card(name) for name in engine.names()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        pick(name)
        return _model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        served = pick(req.model)
        messages = [m.as_dict() for m in req.messages]
        settings, prompt_tokens = await anyio.to_thread.run_sync(
            settings_for, served, messages, req, req.max_completion_tokens or req.max_tokens)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(
                _sse_chat(engine, served, messages, settings, ident, created, prompt_tokens, req), media_type=
                "text/event-stream", headers={"Cache-Control": "no-cache"})
        text = await anyio.to_thread.run_sync(engine.generate, served, messages, settings)
        usage, finish = _usage(engine, served, text, prompt_tokens, settings)
        return {"id": ident, "object": "chat.completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        served = pick(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: give one string (batches of prompts are not supported)", param="prompt")
        prompt = prompts[0]
        settings, prompt_tokens = await anyio.to_thread.run_sync(settings_for, served, prompt, req, req.max_tokens)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(
                _sse_completion(engine, served, prompt, settings, ident, created, prompt_tokens, req),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = await anyio.to_thread.run_sync(engine.generate, served, prompt, settings)
        usage, finish = _usage(engine, served, text, prompt_tokens, settings)
        return {"id": ident, "object": "text_completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    @app.post("/chat")
    async def simple_chat(request: Request):
        req = await _parse(request, SimpleChatRequest)
        served = pick(req.model)
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            m.as_dict() for m in req.history] + [{"role": "user", "content": req.message}]
        sampling = _Sampling(model=req.model, temperature=req.temperature)
        settings, _ = await anyio.to_thread.run_sync(settings_for, served, messages, sampling,
                                                     req.max_new_tokens or req.max_length)
        text = await anyio.to_thread.run_sync(engine.generate, served, messages, settings)
        return {"response": text, "model": served.name}

    return app


# --------------------------------------------------------------------------- helpers


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tuneforge"}


def _usage(engine: Engine, served: Served, text: str, prompt_tokens: int, settings: Settings) -> tuple[dict, str]:
    completion = engine.count_tokens(served, text)
    finish = "length" if completion >= settings.max_new_tokens else "stop"
    return ({"prompt_tokens": prompt_tokens, "completion_tokens": completion,
             "total_tokens": prompt_tokens + completion}, finish)


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _pieces(engine: Engine, served: Served, prompt: Any, settings: Settings):
    """Async iteration over the engine's stream; the generation is cancelled if the client goes away."""
    import anyio

    cancelled = threading.Event()
    stream = engine.stream(served, prompt, settings, cancelled)
    done = object()
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, stream, done)
            if piece is done:
                return
            yield piece
    finally:
        cancelled.set()


async def _sse_chat(engine, served, messages, settings, ident, created, prompt_tokens, req):
    def chunk(delta: dict, finish: str | None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": served.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield _event(chunk({"role": "assistant", "content": ""}, None))
    text = ""
    async for piece in _pieces(engine, served, messages, settings):
        text += piece
        yield _event(chunk({"content": piece}, None))
    usage, finish = _usage(engine, served, text, prompt_tokens, settings)
    yield _event(chunk({}, finish))
    if (req.stream_options or {}).get("include_usage"):
        yield _event({"id": ident, "object": "chat.completion.chunk", "created": created, "model": served.name,
                      "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _sse_completion(engine, served, prompt, settings, ident, created, prompt_tokens, req):
    def chunk(text: str, finish: str | None) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": served.name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    text = ""
    async for piece in _pieces(engine, served, prompt, settings):
        text += piece
        yield _event(chunk(piece, None))
    usage, finish = _usage(engine, served, text, prompt_tokens, settings)
    yield _event(chunk("", finish))
    if (req.stream_options or {}).get("include_usage"):
        yield _event({"id": ident, "object": "text_completion", "created": created, "model": served.name,
                      "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


async def _parse(request: Any, schema: type[BaseModel]) -> Any:
    """The JSON body validated against ``schema``, whatever the Content-Type (curl -d sends a form type)."""
    from pydantic import ValidationError

    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc.errors()) from None


def _validation_error(errors: list[dict]) -> APIError:
    """One readable message naming the field, from pydantic/FastAPI validation errors."""
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    param = ".".join(loc) or None
    if first.get("type") == "missing":
        message = f"{param}: required field missing"
    else:
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if "input" in first and not isinstance(first["input"], dict | list):
            message += f" (got {first['input']!r})"
    return APIError(400, message, param=param)
