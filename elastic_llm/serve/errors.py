"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every refusal of the gateway is an `APIError`; the app's exception handlers turn it, FastAPI's
request-validation errors (422) and Starlette's HTTP errors (404, 405) into this shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elastic_llm.errors import ElasticLLMError

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
UNAVAILABLE = "service_unavailable_error"

_TYPE_OF_STATUS = {400: INVALID_REQUEST, 401: AUTHENTICATION, 404: NOT_FOUND, 405: INVALID_REQUEST,
                   413: INVALID_REQUEST, 422: INVALID_REQUEST, 429: RATE_LIMIT, 503: UNAVAILABLE}


@dataclass(frozen=True)
class ErrorBody:
    """The body of one error response."""

    message: str  #: what went wrong and what to change
    type: str  #: OpenAI's error type ("invalid_request_error", ...)
    param: str | None = None  #: the request field at fault, if one is
    code: str | None = None  #: a machine-readable reason ("model_not_found", ...)

    def to_json(self) -> dict[str, Any]:
        """``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class APIError(ElasticLLMError):
    """A request the gateway refuses: `status` (HTTP) and the OpenAI error body."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(message, type or _TYPE_OF_STATUS.get(status, SERVER), param, code)
        self.headers = headers or {}


def error_for_status(status: int, message: str, code: str | None = None) -> ErrorBody:
    """The body of an error that has only a status and a message (Starlette's own errors)."""
    return ErrorBody(message, _TYPE_OF_STATUS.get(status, SERVER if status >= 500 else INVALID_REQUEST),
                     None, code)
