"""`GatewaySettings`: the HTTP gateway's limits and identity, validated on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass

from elastic_llm.errors import InvalidRequestError

#: environment variable holding the API key when ``--api-key`` is not given
API_KEY_ENV = "ELASTIC_LLM_API_KEY"


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway accepts and how long it waits.

    Requests whose body is larger than `max_body_bytes` get 413; a request that would take the
    gateway past `max_pending` unfinished generations (each of its `n` choices counts) gets 429.
    """

    model_name: str  #: the id clients pass as "model" (and /v1/models lists)
    api_key: str | None = None  #: required as "Authorization: Bearer KEY" when set; None = open
    max_body_bytes: int = 512 * 1024  #: largest request body accepted (bytes)
    max_pending: int = 64  #: unfinished generations at most (the bounded queue)
    max_n: int = 8  #: most choices per request
    default_max_tokens: int = 256  #: chat completions' max_tokens when not given
    completion_default_max_tokens: int = 16  #: completions' max_tokens when not given (OpenAI's)
    drain_timeout_s: float = 30.0  #: how long SIGTERM waits for in-flight requests
    disconnect_poll_s: float = 0.25  #: how often a non-streaming request checks its client is there

    def __post_init__(self) -> None:
        if not self.model_name or not isinstance(self.model_name, str):
            raise InvalidRequestError("model_name must be a non-empty string")
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidRequestError("api_key must not be blank (omit it for an open endpoint)")
        for name in ("max_body_bytes", "max_pending", "max_n", "default_max_tokens",
                     "completion_default_max_tokens"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        for name in ("drain_timeout_s", "disconnect_poll_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1e6:
                raise InvalidRequestError(f"{name} must be a positive number of seconds, got {value!r}")


def api_key_from_environment(given: str | None) -> str | None:
    """`given` if set, else the `API_KEY_ENV` variable, else None (an open endpoint)."""
    return given if given is not None else (os.environ.get(API_KEY_ENV) or None)
