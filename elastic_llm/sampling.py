"""`SamplingParams`: how a request chooses its tokens (pure: validated data, no torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from elastic_llm.errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; validated on construction.

    Randomness for output token t depends only on (seed, t), so a request that is exported,
    migrated or recomputed samples the same continuation.
    """

    max_new_tokens: int = 128  #: tokens to generate at most (> 0)
    temperature: float = 0.0  #: 0 = greedy; > 0 scales logits before sampling
    top_p: float = 1.0  #: nucleus sampling mass, in (0, 1]
    top_k: int = 0  #: keep the k most likely tokens; 0 = all
    seed: int | None = None  #: sampling seed; None = chosen by the engine (and kept with the request)
    stop: tuple[str, ...] = field(default=())  #: strings that end generation (excluded from text)
    stop_token_ids: tuple[int, ...] = field(default=())  #: extra token ids that end generation
    ignore_eos: bool = False  #: keep generating past end-of-sequence tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.max_new_tokens, int) and not isinstance(self.max_new_tokens, bool)
               and self.max_new_tokens > 0,
               f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        _check(isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
               and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0,
               f"top_k must be an integer >= 0, got {self.top_k!r}")
        _check(self.seed is None or isinstance(self.seed, int),
               f"seed must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the most likely token."""
        return self.temperature == 0 or self.top_k == 1

    def with_seed(self, seed: int) -> SamplingParams:
        """A copy with `seed` fixed."""
        return replace(self, seed=seed)

    @classmethod
    def coerce(cls, params: SamplingParams | dict[str, object] | None) -> SamplingParams:
        """Accept params, a dict of fields, or None (defaults)."""
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            return params
        try:
            return cls(**params)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidRequestError(f"bad sampling parameters: {exc}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def validate_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, max_context: int) -> None:
    """Reject empty prompts, out-of-vocabulary ids and prompts that leave no room to generate."""
    from elastic_llm.errors import PromptTooLongError

    _check(len(prompt_ids) > 0, "prompt is empty")
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    _check(not bad, f"prompt has token ids outside [0, {vocab_size}): {bad[:5]}")
    if len(prompt_ids) >= max_context:
        raise PromptTooLongError(
            f"prompt has {len(prompt_ids)} tokens; the context window is {max_context} tokens"
        )
