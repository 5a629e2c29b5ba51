"""The OpenAI request bodies the gateway accepts (pydantic, strict: no "3" for 3, no true for 1)
and the response bodies it builds (plain dicts in OpenAI's shape).

Unknown fields are refused (422), as OpenAI refuses them, so a misspelt parameter is never
silently ignored. Fields OpenAI has and this server does not implement (logprobs, tools, echo,
penalties, logit_bias, best_of > 1, suffix) are refused with 400 by `unsupported_fields`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_STRICT = ConfigDict(strict=True, extra="forbid")


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage (empty choices)."""

    model_config = _STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to both endpoints."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_k: int | None = None  #: extension (vLLM's): keep the k most likely tokens
    ignore_eos: bool | None = None  #: extension (vLLM's): generate past end-of-sequence tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt as text, a list of texts or a list of token ids."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    """One part of a message's content (only text parts are supported)."""

    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn; "developer" is treated as "system"."""

    model_config = ConfigDict(strict=True, extra="ignore")  # clients send name, refusal, ...
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None


def unsupported_fields(body: _Sampling) -> str | None:
    """The first field set to something this server does not implement, or None."""
    checks: dict[str, bool] = {
        "logprobs": body.logprobs not in (None, False, 0),
        "presence_penalty": body.presence_penalty not in (None, 0.0),
        "frequency_penalty": body.frequency_penalty not in (None, 0.0),
        "logit_bias": bool(body.logit_bias),
    }
    if isinstance(body, CompletionRequest):
        checks.update(echo=body.echo, best_of=body.best_of not in (None, 1), suffix=bool(body.suffix))
    if isinstance(body, ChatCompletionRequest):
        checks.update(tools=bool(body.tools), tool_choice=body.tool_choice not in (None, "none", "auto"),
                      response_format=body.response_format not in (None, {"type": "text"}))
    return next((name for name, bad in checks.items() if bad), None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response."""
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chunk_choice(index: int, text: str | None, finish_reason: str | None, chat: bool,
                 first: bool = False) -> dict[str, Any]:
    """One choice of a streamed chunk: the text delta (the role too in a chat's first chunk)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def envelope(response_id: str, created: int, model: str, chat: bool, chunk: bool,
             choices: list[dict[str, Any]], usage_body: dict[str, int] | None) -> dict[str, Any]:
    """A response or chunk around its choices."""
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body: dict[str, Any] = {"id": response_id, "object": kind, "created": created, "model": model,
                            "system_fingerprint": None, "choices": choices}
    if usage_body is not None or not chunk:
        body["usage"] = usage_body
    return body
