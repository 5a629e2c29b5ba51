"""The gateway's side of generation: admission against a bounded queue, one HTTP request's
choices submitted to the `ServingClient`, their token events merged into text pieces on the
event loop, and cancellation when the client goes away.

The `ServingClient` delivers events on its poller thread; `Generation` hands each one to the
event loop (`call_soon_threadsafe`), where `TextDeltas` turns committed tokens into pieces in
which each token appears once, also when a request is recomputed after its worker was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from elastic_llm.cluster.serving_client import RequestFailedError, ServingClient, ServingFuture
from elastic_llm.cluster.text_deltas import TextDeltas
from elastic_llm.control.requests import ClientEvent
from elastic_llm.errors import InvalidRequestError, PromptTooLongError
from elastic_llm.serve.errors import APIError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChoiceSpec:
    """One generation to start: which prompt and with what sampling keyword arguments."""

    index: int  #: the choice's index in the response
    prompt_ids: tuple[int, ...]  #: the prompt as token ids (chat template already applied)
    sampling: dict[str, Any]  #: `SamplingParams` fields (max_new_tokens, temperature, seed, ...)


@dataclass(frozen=True)
class Piece:
    """What one choice produced since the last piece."""

    index: int  #: the choice
    text: str  #: new text ("" when only the finish is news)
    finish_reason: str | None = None  #: set on the choice's last piece
    completion_tokens: int = 0  #: the choice's tokens so far (all of them on the last piece)


class Admission:
    """The bounded queue: at most `limit` unfinished generations (touched on the event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: generations admitted and not yet finished or cancelled
        self.pending = 0

    def reserve(self, count: int) -> None:
        """Take `count` places or raise `APIError` 429 (nothing taken)."""
        if self.pending + count > self.limit:
            raise APIError(429, f"the server is at capacity ({self.pending} of {self.limit} generations "
                                "pending); retry later", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.pending += count

    def release(self, count: int) -> None:
        """Give back `count` places."""
        self.pending = max(0, self.pending - count)


class Generation:
    """The running choices of one HTTP request. Create with `Generation.start`."""

    def __init__(self, llm: ServingClient, admission: Admission, specs: Sequence[ChoiceSpec]) -> None:
        self._llm = llm
        self._admission = admission
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, ClientEvent]] = asyncio.Queue()
        self._deltas = {s.index: TextDeltas(llm.tokenizer, _stops(s.sampling)) for s in specs}
        self._futures: dict[int, ServingFuture] = {}
        self._open = {s.index for s in specs}
        self._held = len(specs)
        self.specs = tuple(specs)

    @classmethod
    async def start(cls, llm: ServingClient, admission: Admission, specs: Sequence[ChoiceSpec]) -> Generation:
        """Admit and submit every choice (raises `APIError` 429 when full, 400 on bad input;
        then nothing is left running)."""
        admission.reserve(len(specs))
        generation = cls(llm, admission, specs)
        try:
            await asyncio.to_thread(generation._submit_all)
        except BaseException:
            generation.abandon()
            raise
        return generation

    def _submit_all(self) -> None:
        for spec in self.specs:
            def deliver(event: ClientEvent, index: int = spec.index) -> None:
                if not self._loop.is_closed():  # a server that stopped wants no more events
                    self._loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

            try:
                self._futures[spec.index] = self._llm.submit_with_events(
                    list(spec.prompt_ids), deliver, chat=False, **spec.sampling)
            except PromptTooLongError as exc:
                raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from None
            except InvalidRequestError as exc:
                raise APIError(400, str(exc), code="invalid_value") from None

    async def next_piece(self, timeout: float) -> Piece | None:
        """The next piece of any choice; None if nothing came within `timeout` seconds or every
        choice has finished (see `finished`).

        Raises:
            RequestFailedError: the cluster could not complete a choice.
        """
        while self._open:
            try:
                index, event = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
            deltas = self._deltas[index]
            if event.kind == "tokens":
                text = deltas.add(event)
                if text:
                    return Piece(index, text, None, len(deltas.tokens))
                continue
            self._close_choice(index)
            if event.kind == "failed":
                raise RequestFailedError(event.error or "the request failed")
            completion = self._futures[index].result()
            return Piece(index, deltas.finish(completion.text), event.finish_reason or "stop",
                         len(completion.token_ids))
        return None

    @property
    def finished(self) -> bool:
        """Whether every choice has finished (or failed)."""
        return not self._open

    def _close_choice(self, index: int) -> None:
        self._open.discard(index)
        self._admission.release(1)
        self._held -= 1

    def abandon(self) -> None:
        """The client is gone (or an error ended the response): cancel what still runs, without
        waiting (safe inside a cancelled task), and give back the queue places."""
        for index in list(self._open):
            future = self._futures.get(index)
            if future is not None and not future.done():
                self._loop.run_in_executor(None, _cancel_quietly, self._llm, future)
            self._open.discard(index)
        self._admission.release(self._held)
        self._held = 0


def _stops(sampling: dict[str, Any]) -> tuple[str, ...]:
    stop = sampling.get("stop") or ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _cancel_quietly(llm: ServingClient, future: ServingFuture) -> None:
    try:
        llm.cancel(future)
    except Exception as exc:  # noqa: BLE001 - the cluster may be closing: nothing left to stop
        logger.debug("cancel of %s failed: %s", future.request_id, exc)
