"""A request as the engine holds it: tokens, KV cache, progress, and its text so far."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elastic_llm.model.kv_cache import KVState
from elastic_llm.request import Completion, FinishReason, RequestOutput
from elastic_llm.sampling import SamplingParams


@dataclass(frozen=True)
class RequestState:
    """A request cut out of an engine after any token: enough to resume it elsewhere.

    With `kv` the new engine continues without recompute; without it, it recomputes the KV of
    prompt + output tokens first. Either way the continuation is identical.
    """

    request_id: str  #: the request
    prompt_token_ids: tuple[int, ...]  #: the prompt
    output_token_ids: tuple[int, ...]  #: committed output tokens so far
    params: SamplingParams  #: sampling settings, seed fixed
    kv: KVState | None = None  #: cached keys/values of the first `kv.length` tokens, if kept
    arrival_time: float | None = None  #: when the request first arrived (engine clock of origin)
    #: when its first token was sampled (engine clock of origin; None: none yet, or not known)
    first_token_time: float | None = None


class EngineRequest:
    """Mutable engine-side state of one request (never crosses a process boundary)."""

    def __init__(self, request_id: str, prompt: Sequence[int], params: SamplingParams,
                 arrival_time: float, eos_ids: frozenset[int],
                 max_context: int, decode: Callable[[Sequence[int]], str] | None) -> None:
        self.request_id = request_id
        self.prompt_ids = tuple(prompt)
        self.params = params
        self.output_ids: list[int] = []
        self.num_computed = 0  #: tokens whose keys/values the executor holds
        self.prefill_deferred = False  #: it once waited a pass for a prefix another prompt computed
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self._first_token_unknown = False  # resumed with output whose first token time was not sent
        self.finish_reason: FinishReason | None = None
        self._stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_ids)
        self._max_context = max_context
        self._decode = decode
        self._text = ""  # text of output_ids, cut at a stop string once found
        self._sent = 0  # characters of _text already returned

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_tokens(self) -> list[int]:
        """Tokens still to compute (the prompt tail while prefilling, else the last sampled token)."""
        done = self.num_computed
        prompt_len = len(self.prompt_ids)
        if done < prompt_len:
            return list(self.prompt_ids[done:]) + self.output_ids
        return self.output_ids[done - prompt_len:]

    def append(self, token: int, now: float) -> RequestOutput:
        """Commit a sampled token; decide whether the request is finished."""
        if self.first_token_time is None and not self._first_token_unknown:
            self.first_token_time = now
        self.output_ids.append(token)
        if token in self._stop_ids:
            self.finish_reason = FinishReason.STOP
        elif len(self.output_ids) >= self.params.max_new_tokens or self.num_tokens >= self._max_context:
            self.finish_reason = FinishReason.LENGTH
        new_text = self._advance_text()
        return RequestOutput(self.request_id, (token,), new_text, self.finish_reason)

    def _advance_text(self) -> str:
        if self._decode is None:
            return ""
        ids = self.output_ids[:-1] if self.finish_reason is FinishReason.STOP and \
            self.output_ids[-1] in self._stop_ids else self.output_ids
        text = self._decode(ids)
        for stop in self.params.stop:
            cut = text.find(stop, max(0, self._sent - len(stop)))
            if cut != -1:
                text = text[:cut]
                self.finish_reason = FinishReason.STOP
        if self.finish_reason is None and text.endswith("\ufffd"):
            return ""  # wait for the rest of a multi-byte character
        self._text = text
        new, self._sent = text[self._sent:], len(text)
        return new

    def restore_output(self, output_ids: Sequence[int], first_token_time: float | None = None) -> None:
        """Adopt tokens committed elsewhere; their text counts as already delivered. Its first
        token came at `first_token_time` (None: not known, and then it stays unknown rather than
        reading as a time to first token of 0 or as the first token sampled here)."""
        self.output_ids = list(output_ids)
        self.first_token_time = first_token_time
        self._first_token_unknown = bool(self.output_ids) and first_token_time is None
        if self._decode is not None:
            self._text = self._decode(self.output_ids)
            self._sent = len(self._text)

    def finish_aborted(self) -> None:
        """Mark the request cancelled."""
        self.finish_reason = FinishReason.ABORT

    def completion(self, now: float) -> Completion:
        """The final result of a finished request."""
        assert self.finish_reason is not None
        return Completion(self.request_id, self.prompt_ids, tuple(self.output_ids), self._text,
                          self.finish_reason, self.arrival_time, self.first_token_time, now)

    def export(self, kv: KVState | None) -> RequestState:
        """Cut the request out as plain data, with `kv` (its cache) if given."""
        return RequestState(self.request_id, self.prompt_ids, tuple(self.output_ids), self.params,
                            kv, self.arrival_time, self.first_token_time)
