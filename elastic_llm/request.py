"""What a request produces: per-iteration deltas and final completions (pure data)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """Why a request stopped generating."""

    STOP = "stop"  #: an end-of-sequence token or a stop string
    LENGTH = "length"  #: max_new_tokens reached, or the context window is full
    ABORT = "abort"  #: cancelled


@dataclass(frozen=True)
class RequestOutput:
    """One request's progress in one iteration (what `LLMEngine.step` returns)."""

    request_id: str  #: the request
    new_token_ids: tuple[int, ...]  #: tokens committed in this iteration
    new_text: str  #: text that those tokens completed (may be empty mid-character)
    finish_reason: FinishReason | None = None  #: set on the request's last output

    @property
    def finished(self) -> bool:
        """Whether the request is done."""
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A finished request."""

    request_id: str  #: the request
    prompt_token_ids: tuple[int, ...]  #: the prompt as token ids
    token_ids: tuple[int, ...]  #: generated tokens (a stop string's tokens included)
    text: str  #: generated text, cut before a stop string
    finish_reason: FinishReason  #: why it ended
    arrival_time: float  #: engine-clock time the request was added (s)
    first_token_time: float | None  #: engine-clock time of its first token (s)
    finish_time: float  #: engine-clock time it finished (s)
