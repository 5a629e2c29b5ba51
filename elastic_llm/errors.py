"""Typed exceptions. Every error a user can cause has its own class and a message saying what to fix."""

from __future__ import annotations


class ElasticLLMError(Exception):
    """Base class of every error raised by elastic_llm."""


class InvalidRequestError(ElasticLLMError, ValueError):
    """A request or its sampling parameters are invalid (empty prompt, bad temperature, ...)."""


class PromptTooLongError(InvalidRequestError):
    """Prompt plus requested tokens cannot fit the model's context window."""


class ModelLoadError(ElasticLLMError):
    """A model could not be found or its files could not be read (missing, corrupt, truncated)."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint's architecture or one of its settings is not supported."""


class UnknownRequestError(ElasticLLMError, KeyError):
    """An operation named a request id the engine does not hold."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else "unknown request"


class UnauthorizedError(ElasticLLMError, PermissionError):
    """A caller asked about, or acted on, requests that belong to another client."""
