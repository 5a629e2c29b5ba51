"""`SamplingParams` and the checks every request passes (pure: validated data, no torch).

What a request must look like, enforced where it is made (`SamplingParams.__post_init__`) or
before it is sent (`check_prompt_text`, `check_prompt_ids`, `validate_prompt_ids`,
`validate_request`); every violation raises `InvalidRequestError` (or `PromptTooLongError`)
naming the bad field:

* integers are real integers: `int` or a numpy integer (normalised to `int`), never a `bool`,
  a float (not even ``2.0``) or a string, and they fit in 64 bits;
* floats are finite real numbers (an `int`, a `float` or a numpy float, normalised to `float`),
  never a `bool` or a string;
* flags are `bool` (not ``"yes"``, not ``1``);
* text is a `str` that encodes as UTF-8 (no lone surrogates);
* lists are lists or tuples (not a `str`, `bytes`, a dict or a set);
* token ids lie in [0, vocab_size) and a prompt leaves room in the context window.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from elastic_llm.errors import InvalidRequestError, PromptTooLongError

#: Integers on the wire are unsigned 64-bit at most (msgpack's limit).
_INT_LIMIT = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request; validated (and normalised) on construction.

    Randomness for output token t depends only on (seed, t), so a request that is exported,
    migrated or recomputed samples the same continuation.
    """

    max_new_tokens: int = 128  #: tokens to generate at most (> 0)
    temperature: float = 0.0  #: 0 = greedy; > 0 scales logits before sampling
    top_p: float = 1.0  #: nucleus sampling mass, in (0, 1]
    top_k: int = 0  #: keep the k most likely tokens; 0 = all
    seed: int | None = None  #: sampling seed in [0, 2**64); None = chosen by the engine (and kept)
    stop: tuple[str, ...] = field(default=())  #: strings that end generation (excluded from text)
    stop_token_ids: tuple[int, ...] = field(default=())  #: extra token ids that end generation
    ignore_eos: bool = False  #: keep generating past end-of-sequence tokens

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        set_("max_new_tokens", _integer(self.max_new_tokens, "max_new_tokens", low=1))
        set_("temperature", _real(self.temperature, "temperature"))
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature!r}")
        set_("top_p", _real(self.top_p, "top_p"))
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        set_("top_k", _integer(self.top_k, "top_k"))
        if self.seed is not None:
            set_("seed", _integer(self.seed, "seed"))
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        stop = _sequence(stop, "stop")
        for item in stop:
            _check(isinstance(item, str) and item != "", f"stop strings must be non-empty strings, got {_show(item)}")
            check_text(item, "stop")
        set_("stop", stop)
        set_("stop_token_ids", tuple(_integer(t, "stop_token_ids")
                                     for t in _sequence(self.stop_token_ids, "stop_token_ids")))
        _check(type(self.ignore_eos) is bool, f"ignore_eos must be True or False, got {_show(self.ignore_eos)}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the most likely token."""
        return self.temperature == 0 or self.top_k == 1

    def with_seed(self, seed: int) -> SamplingParams:
        """A copy with `seed` fixed."""
        return replace(self, seed=seed)

    @classmethod
    def coerce(cls, params: SamplingParams | dict[str, object] | None) -> SamplingParams:
        """Accept params, a dict of fields, or None (defaults).

        Raises:
            InvalidRequestError: an unknown field or a bad value (the message names the field).
        """
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            return params
        if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
            raise InvalidRequestError(f"sampling parameters must be a dict of fields, got {type(params).__name__}")
        try:
            return cls(**params)  # type: ignore[arg-type]
        except TypeError as exc:
            raise InvalidRequestError(f"bad sampling parameters: {exc}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequestError(message)


def _integer(value: object, name: str, low: int = 0, high: int = _INT_LIMIT) -> int:
    """`value` as a plain `int`, if it is an integer (not a bool) in [low, high)."""
    _check(isinstance(value, numbers.Integral) and not isinstance(value, bool),
           f"{name} must be an integer, got {type(value).__name__} {_show(value)}")
    number = int(value)  # type: ignore[call-overload]
    bound = "2**64" if high == _INT_LIMIT else str(high)
    _check(low <= number < high, f"{name} must be in [{low}, {bound}), got {_show(number)}")
    return number


def _real(value: object, name: str) -> float:
    """`value` as a `float`, if it is a finite real number (not a bool)."""
    _check(isinstance(value, numbers.Real) and not isinstance(value, bool),
           f"{name} must be a number, got {type(value).__name__} {_show(value)}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond the float range
        number = math.inf
    _check(math.isfinite(number), f"{name} must be a finite number, got {_show(value)}")
    return number


def _show(value: object, limit: int = 40) -> str:
    """A short repr for error messages (safe for huge ints and odd objects)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"<{value.bit_length()}-bit integer>"
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a user object's broken __repr__
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sequence(value: object, name: str) -> tuple[object, ...]:
    """`value` as a tuple, if it is a list or tuple (not str, bytes, a dict or a set)."""
    _check(isinstance(value, (list, tuple)), f"{name} must be a list or tuple, got {type(value).__name__}")
    return tuple(value)  # type: ignore[arg-type]


def check_text(text: str, name: str = "prompt") -> None:
    """Reject a `str` that cannot be encoded as UTF-8 (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{name} is not valid Unicode text: {exc.reason} at "
                                  f"position {exc.start}") from None


def check_prompt_text(prompt: object) -> str:
    """Return `prompt` if it is a usable text prompt: a `str`, not blank, valid Unicode."""
    _check(isinstance(prompt, str), f"a text prompt must be a str, got {type(prompt).__name__}")
    assert isinstance(prompt, str)
    _check(bool(prompt.strip()), "prompt is empty")
    check_text(prompt)
    return prompt


def check_prompt_ids(prompt: object, vocab_size: int, max_context: int) -> tuple[int, ...]:
    """The token ids of a prompt given as ids, checked and normalised to plain ints.

    A prompt of ids is a non-empty list or tuple (not a str, bytes, a dict, a set, a generator,
    an array or a tensor: pass ``.tolist()``) of integers (`int` or numpy integers; not bools,
    floats or strings) in [0, vocab_size), shorter than the context window.

    Raises:
        InvalidRequestError: the prompt is not such a sequence.
        PromptTooLongError: it has `max_context` tokens or more.
    """
    _check(isinstance(prompt, (list, tuple)),
           f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
    assert isinstance(prompt, (list, tuple))
    _check_length(len(prompt), max_context)
    bad = [t for t in prompt if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
    _check(not bad, f"prompt token ids must be integers, got {[type(t).__name__ for t in bad[:5]]}")
    ids = tuple(int(t) for t in prompt)
    validate_prompt_ids(ids, vocab_size, max_context)
    return ids


def validate_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, max_context: int) -> None:
    """Reject empty prompts, ids that are not ints in [0, vocab_size) (bools included) and
    prompts that leave no room to generate."""
    _check_length(len(prompt_ids), max_context)
    wrong = [type(t).__name__ for t in prompt_ids if type(t) is not int]
    _check(not wrong, f"prompt token ids must be ints, got {wrong[:5]}")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    _check(not bad, f"prompt has token ids outside [0, {vocab_size}): {', '.join(_show(t) for t in bad[:5])}")


def validate_request(params: SamplingParams, vocab_size: int, max_context: int) -> None:
    """Reject sampling parameters that do not fit the model: `stop_token_ids` outside
    [0, vocab_size), `max_new_tokens` beyond the context window."""
    bad = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]
    _check(not bad, f"stop_token_ids has ids outside [0, {vocab_size}): {', '.join(_show(t) for t in bad[:5])}")
    _check(params.max_new_tokens <= max_context,
           f"max_new_tokens must be at most the context window ({max_context}), got {params.max_new_tokens}")


def _check_length(length: int, max_context: int) -> None:
    _check(length > 0, "prompt is empty")
    if length >= max_context:
        raise PromptTooLongError(f"prompt has {length} tokens; the context window is {max_context} tokens")
