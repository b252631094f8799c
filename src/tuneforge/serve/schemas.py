"""Request bodies of the HTTP API as typed models (they are the OpenAPI schema clients and fuzzers read).

Unknown fields are refused (400 naming them): a field the server does not implement is never silently ignored.
Limits that do not depend on the model are part of the schema; the ones that do (``max_tokens``, prompt tokens) are
checked per request in ``app.py``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneforge.models.sampling import BOUNDS

MAX_MESSAGES = 256
MAX_PROMPTS = 64
MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 128
MAX_TOP_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)


def _bounded(name: str, kind: type, description: str):
    """A sampling field limited to its sane range (``models.sampling.BOUNDS``): outside it is a 400 naming it."""
    low, high, inclusive = BOUNDS[name]
    limits = {"ge": kind(low)} if inclusive else {"gt": kind(low)}
    return Annotated[kind, Field(le=kind(high), strict=True, description=description, **limits)]


# strict: a JSON boolean or string is not a number; not nullable: leave the field out for the server's default.
Temperature = _bounded("temperature", float, "0 = greedy; below 1e-4 generation is greedy too")
TopP = _bounded("top_p", float, "nucleus sampling mass (1 = off)")
TopK = _bounded("top_k", int, "0 = off (not an OpenAI field; vLLM's)")
RepetitionPenalty = _bounded("repetition_penalty", float, "1 = none (not an OpenAI field; vLLM's)")
PresencePenalty = _bounded("presence_penalty", float, "subtracted from the logit of each token already generated")
FrequencyPenalty = _bounded("frequency_penalty", float, "subtracted per time a token was already generated")
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1], strict=True,
                            description="same seed, same request → same sample; leave out for an unseeded one")]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)]
TokenId = Annotated[int, Field(ge=0, strict=True)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = Field(False, strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def as_dict(self) -> dict:
        """The message as the chat template sees it (text parts joined; ``developer`` is a system message)."""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        else:
            content = self.content or ""
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionSpec(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class _Sampling(_Body):
    model: str = Field(None, description="served name; may be left out when only one model is served")
    max_tokens: int = Field(None, ge=0, strict=True, description="new tokens per choice (default: the server's)")
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    repetition_penalty: RepetitionPenalty = None
    presence_penalty: PresencePenalty = None
    frequency_penalty: FrequencyPenalty = None
    n: int = Field(1, ge=1, le=MAX_N, strict=True)
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions = None
    stop: Stop = None
    seed: Seed = None
    user: str = Field(None, max_length=256, description="accepted for compatibility; not used")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a raw prompt (no chat template), as text or token ids."""

    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: int = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True,
                          description="log-prob of each token plus this many alternatives")
    echo: bool = Field(False, strict=True, description="prepend the prompt (and its tokens' log-probs)")


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the served run's own chat template."""

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int = Field(None, ge=0, strict=True)
    logprobs: bool = Field(False, strict=True)
    top_logprobs: int = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    tools: list[Tool] = Field(None, max_length=128)
    tool_choice: Literal["none", "auto"] = None


class SimpleChatRequest(_Body):
    """``POST /chat`` (the guide's simple API)."""

    message: str = Field(min_length=1)
    history: list[Message] = Field([], max_length=MAX_MESSAGES)
    system: str = None
    model: str = None
    max_length: int = Field(None, ge=1, strict=True, description="new tokens to generate (the guide's name)")
    max_new_tokens: int = Field(None, ge=1, strict=True)
    temperature: Temperature = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body, used for every error."""

    error: ErrorDetail
