"""The two generation endpoints' logic: request body -> `ChoiceSpec`s -> a whole response or a
stream of server-sent events (chunks, then ``data: [DONE]``)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from elastic_llm.cluster.serving_client import RequestFailedError, ServingClient
from elastic_llm.serve import protocol
from elastic_llm.serve.errors import APIError, ErrorBody, SERVER
from elastic_llm.serve.generation import ChoiceSpec, Generation, Piece
from elastic_llm.serve.metrics import GatewayMetrics
from elastic_llm.serve.settings import GatewaySettings

_SEED_SPACE = 2**64


@dataclass(frozen=True)
class Prepared:
    """A validated generation request, ready to start."""

    chat: bool  #: chat completion (message deltas) or text completion
    specs: tuple[ChoiceSpec, ...]  #: the choices to generate
    prompt_tokens: int  #: usage: tokens of the distinct prompts
    stream: bool  #: answer as server-sent events
    include_usage: bool  #: stream a last chunk with the usage


def prepare(body: protocol.CompletionRequest | protocol.ChatCompletionRequest, llm: ServingClient,
            settings: GatewaySettings) -> Prepared:
    """Check `body` against the model and limits and tokenize its prompts (blocking: run in a
    thread). Raises `APIError` 400/404 naming the field at fault."""
    if body.model != settings.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                            f"{settings.model_name!r}", param="model", code="model_not_found")
    unsupported = protocol.unsupported_fields(body)
    if unsupported:
        raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                       code="unsupported_parameter")
    chat = isinstance(body, protocol.ChatCompletionRequest)
    prompts = _chat_prompt(body, llm) if chat else _completion_prompts(body, llm)  # type: ignore[arg-type]
    choices = len(prompts) * body.n
    if body.n < 1 or choices > settings.max_n:
        raise APIError(400, f"n times the number of prompts must be in [1, {settings.max_n}], got {choices}",
                       param="n", code="invalid_value")
    limit = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if limit is not None and limit < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {limit}", param="max_tokens", code="invalid_value")
    context = llm.spec.max_position_embeddings
    specs = []
    for p, ids in enumerate(prompts):
        room = context - len(ids)
        if room < 1 or (limit is not None and limit > room):
            raise APIError(400, f"the prompt has {len(ids)} tokens and {limit or 1} more were asked for; "
                                f"the context window is {context} tokens", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        default = settings.default_max_tokens if chat else settings.completion_default_max_tokens
        sampling = _sampling(body, limit if limit is not None else min(default, room))
        for j in range(body.n):
            seeded = dict(sampling)
            if body.seed is not None:
                seeded["seed"] = (body.seed + j) % _SEED_SPACE if body.seed >= 0 else body.seed
            specs.append(ChoiceSpec(p * body.n + j, ids, seeded))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Prepared(chat, tuple(specs), sum(len(ids) for ids in prompts), body.stream, include_usage)


def _sampling(body: protocol.CompletionRequest | protocol.ChatCompletionRequest, max_new: int) -> dict[str, Any]:
    sampling: dict[str, Any] = {"max_new_tokens": max_new,
                                "temperature": 1.0 if body.temperature is None else body.temperature}
    for name in ("top_p", "top_k", "ignore_eos"):
        if getattr(body, name) is not None:
            sampling[name] = getattr(body, name)
    if body.stop is not None:
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences, got {len(stops)}", param="stop", code="invalid_value")
        sampling["stop"] = stops
    return sampling


def _text(text: str, param: str) -> str:
    if "\x00" in text:
        raise APIError(400, f"{param} contains a NUL character", param=param, code="invalid_value")
    if not text.strip():
        raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
    return text


def _encode(llm: ServingClient, make: Callable[[], list[int]], param: str) -> tuple[int, ...]:
    if llm.tokenizer is None:
        raise APIError(400, "this model has no tokenizer: pass the prompt as token ids", param=param)
    ids = tuple(make())
    if not ids:
        raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
    return ids


def _completion_prompts(body: protocol.CompletionRequest, llm: ServingClient) -> list[tuple[int, ...]]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        vocab = llm.spec.vocab_size
        if any(not 0 <= t < vocab for t in prompt):  # type: ignore[operator]
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt", code="invalid_value")
        return [tuple(prompt)]  # type: ignore[arg-type]
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not texts:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    encoded = []
    for item in texts:
        text = _text(item, "prompt")  # type: ignore[arg-type]
        encoded.append(_encode(llm, lambda: llm.tokenizer.encode(text), "prompt"))  # type: ignore[union-attr]
    return encoded


def _chat_prompt(body: protocol.ChatCompletionRequest, llm: ServingClient) -> list[tuple[int, ...]]:
    turns = []
    for i, message in enumerate(body.messages):
        text = message.text()
        if "\x00" in text:
            raise APIError(400, f"messages[{i}].content contains a NUL character",
                           param=f"messages[{i}].content", code="invalid_value")
        turns.append(("system" if message.role == "developer" else message.role, text))
    if not any(text.strip() for role, text in turns if role == "user"):
        raise APIError(400, "messages need a user message with some text", param="messages", code="invalid_value")
    return [_encode(llm, lambda: llm.tokenizer.chat_messages_ids(turns), "messages")]  # type: ignore[union-attr]


async def whole_response(generation: Generation, prepared: Prepared, model: str,
                         client_gone: Callable[[], Awaitable[bool]], poll_s: float,
                         metrics: GatewayMetrics) -> dict[str, Any]:
    """Wait for every choice (cancelling them if the client goes away) and build the response."""
    texts = {s.index: "" for s in prepared.specs}
    finish: dict[int, str] = {}
    tokens: dict[int, int] = {}
    while not generation.finished:
        piece = await generation.next_piece(poll_s)
        if piece is None:
            if not generation.finished and await client_gone():
                generation.abandon()
                metrics.disconnects.inc()
                raise ClientGoneError
            continue
        texts[piece.index] += piece.text
        if piece.finish_reason is not None:
            finish[piece.index], tokens[piece.index] = piece.finish_reason, piece.completion_tokens
    completion_tokens = sum(tokens.values())
    metrics.completion_tokens.inc(completion_tokens)
    choices = [protocol.completion_choice(i, texts[i], _reason(finish[i]), prepared.chat) for i in sorted(texts)]
    return protocol.envelope(_response_id(prepared.chat), int(time.time()), model, prepared.chat, False,
                             choices, protocol.usage(prepared.prompt_tokens, completion_tokens))


async def stream_events(generation: Generation, prepared: Prepared, model: str, poll_s: float,
                        metrics: GatewayMetrics, on_first: Callable[[], None]) -> AsyncIterator[dict[str, str]]:
    """The server-sent events of a streamed response; cancels what still runs if the stream is
    closed early (client disconnect, server stop)."""
    response_id, created, chat = _response_id(prepared.chat), int(time.time()), prepared.chat

    def chunk(choices: list[dict[str, Any]], usage_body: dict[str, int] | None = None) -> dict[str, str]:
        body = protocol.envelope(response_id, created, model, chat, True, choices, usage_body)
        if prepared.include_usage:  # OpenAI: "usage": null on every chunk but the last
            body.setdefault("usage", None)
        return {"data": json.dumps(body, ensure_ascii=False)}

    tokens: dict[int, int] = {}
    try:
        if chat:
            yield chunk([protocol.chunk_choice(s.index, "", None, True, first=True) for s in prepared.specs])
        first = True
        while not generation.finished:
            piece: Piece | None = await generation.next_piece(poll_s)
            if piece is None:
                continue
            if first and piece.text:
                on_first()
                first = False
            if piece.text:
                yield chunk([protocol.chunk_choice(piece.index, piece.text, None, chat)])
            if piece.finish_reason is not None:
                tokens[piece.index] = piece.completion_tokens
                yield chunk([protocol.chunk_choice(piece.index, None if chat else "", _reason(piece.finish_reason), chat)])
        completion_tokens = sum(tokens.values())
        metrics.completion_tokens.inc(completion_tokens)
        if prepared.include_usage:
            yield chunk([], protocol.usage(prepared.prompt_tokens, completion_tokens))
    except RequestFailedError as exc:
        yield {"data": json.dumps(ErrorBody(f"generation failed: {exc}", SERVER, None, "generation_failed").to_json())}
    finally:
        if not generation.finished:
            generation.abandon()
            metrics.disconnects.inc()
    yield {"data": "[DONE]"}


class ClientGoneError(Exception):
    """The HTTP client disconnected before its response was ready (nothing to answer)."""


def _reason(finish_reason: str) -> str:
    """OpenAI's finish reasons: stop | length (a cancelled request reports stop)."""
    return "length" if finish_reason == "length" else "stop"


def _response_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex

