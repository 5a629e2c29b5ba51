"""`ServingClient`: the Python futures API of elastic LLM serving on a Dask cluster.

    client = distributed.Client(cluster)
    llm = ServingClient(client)                       # registers the controller plugin once
    future = llm.submit("Why is the sky blue?", max_new_tokens=64)
    print(future.result().text)
    for piece in llm.stream("Tell me a story"):      # text as tokens are committed
        print(piece, end="")

Prompts and sampling parameters are validated here, before anything is sent: bad input raises a
typed `elastic_llm.errors` exception at `submit`. Results arrive through one background thread
that long-polls the controller for this client's events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass
from typing import Any

from distributed import Client

from elastic_llm.cluster.controller import PLUGIN_NAME, ElasticController
from elastic_llm.cluster.notices import NoticeBoard, send_preemption_notice
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.control.requests import ClientEvent
from elastic_llm.cluster.serialization import TensorSerializerPlugin
from elastic_llm.cluster.text_deltas import TextDeltas
from elastic_llm.errors import ElasticLLMError, InvalidRequestError
from elastic_llm.model.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.tokenizer import Tokenizer
from elastic_llm.progress import progress
from elastic_llm.request import Completion, FinishReason
from elastic_llm.sampling import (
    SamplingParams,
    check_prompt_ids,
    check_prompt_text,
    check_text,
    validate_prompt_ids,
    validate_request,
)

logger = logging.getLogger(__name__)

#: A prompt: text, or token ids (a list or tuple of ints).
Prompt = str | Sequence[int]


class RequestFailedError(ElasticLLMError):
    """The cluster could not complete a request (the message says why)."""


@dataclass
class _Tracking:
    future: ServingFuture
    prompt_ids: tuple[int, ...]
    submitted: float
    tokens: list[int]
    first_token: float | None = None
    #: called from the poller thread with each of the request's events, after the future is set
    on_event: Callable[[ClientEvent], None] | None = None


class ServingFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A `concurrent.futures.Future` of a `Completion`, also awaitable from asyncio code."""

    def __init__(self, request_id: str, owner: ServingClient) -> None:
        super().__init__()
        self.request_id = request_id
        self._owner = owner

    def cancel(self) -> bool:
        """Stop generation on the cluster; the future resolves with finish_reason ABORT."""
        if self.done():
            return False
        self._owner.cancel(self)
        return True

    def __await__(self) -> Generator[Any, None, Completion]:
        return asyncio.wrap_future(self).__await__()


class ServingClient:
    """Submit prompts to the elastic LLM service running on `dask_client`'s cluster.

    Args:
        dask_client: a connected `distributed.Client`.
        model: embedded model name or checkpoint directory (the workers load it).
        policy: controller policy ("spotserve", "reroute", "reparallelize") if this client
            registers the controller; an already running controller is reused as it is.
        replica: engine settings of each replica.
        chat: apply the model's chat template to text prompts by default.
        controller_options: further `ElasticController` arguments (e.g. migration_margin_s).
    """

    def __init__(self, dask_client: Client, model: str = DEFAULT_MODEL, policy: str = "spotserve",
                 replica: ReplicaOptions | None = None, chat: bool = True,
                 **controller_options: Any) -> None:
        self._dask = dask_client
        self.model = model = str(model)
        self.chat = chat
        checkpoint = resolve_checkpoint(model)
        import json

        config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        self.spec = ModelSpec.from_hf_config(config)
        self.tokenizer = (Tokenizer(checkpoint, self.spec.eos_token_ids)
                          if (checkpoint / "tokenizer_config.json").is_file() else None)
        self._ensure_controller(model, policy, replica, controller_options)
        #: this client's session: its requests are its own (poll, cancel, stream); several
        #: ServingClients on one Dask client (tasks on a worker) each have their own
        self._id = f"{dask_client.id}#{uuid.uuid4().hex[:12]}"
        self._token = secrets.token_urlsafe(18)
        self._tracking: dict[str, _Tracking] = {}
        self._lock = threading.Lock()
        self._cursor = 0
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="elastic-llm-poller", daemon=True)
        self._poller.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt: Prompt, *, chat: bool | None = None, request_id: str | None = None,
               **sampling: Any) -> ServingFuture:
        """Send one prompt; returns a future of its `Completion`.

        `prompt` is a non-empty str (chat-formatted if `chat`, default the client's `chat`) or a
        non-empty list/tuple of int token ids in [0, vocab); `sampling` are `SamplingParams`
        fields. The rules are those of `elastic_llm.sampling` (no bools as numbers, no floats as
        ids, finite floats, 64-bit ints, `max_new_tokens` within the context window).

        Raises:
            InvalidRequestError: (at once, nothing sent) a bad prompt, parameter or request id;
                `PromptTooLongError` if the prompt does not fit the context window.
        """
        return self._submit_many([prompt], chat, [request_id], sampling)[0]

    def map(self, prompts: Iterable[Prompt], *, chat: bool | None = None,
            **sampling: Any) -> list[ServingFuture]:
        """Send many prompts in one message; futures in prompt order.

        All or nothing: every prompt is validated first; if one is bad, `InvalidRequestError`
        is raised and none is sent (nor tracked by this client).
        """
        if isinstance(prompts, (str, bytes, bytearray, memoryview, Mapping, AbstractSet)) \
                or not isinstance(prompts, Iterable):
            raise InvalidRequestError(f"map takes a list of prompts, got {type(prompts).__name__} "
                                      "(use submit for one prompt)")
        batch = list(prompts)
        return self._submit_many(batch, chat, [None] * len(batch), sampling)

    def stream(self, prompt: Prompt, *, chat: bool | None = None, **sampling: Any) -> Iterator[str]:
        """Generate and yield the text as tokens are committed; the pieces join to the final text.

        Validates and sends at the call, like `submit` (bad input raises here, not when the
        iterator is first advanced)."""
        events: queue.Queue[ClientEvent] = queue.Queue()
        future = self._submit_many([prompt], chat, [None], sampling, on_event=events.put)[0]
        return self._follow(future, events, TextDeltas(self.tokenizer, SamplingParams.coerce(sampling or None).stop))

    def submit_with_events(self, prompt: Prompt, on_event: Callable[[ClientEvent], None], *,
                           chat: bool | None = None, **sampling: Any) -> ServingFuture:
        """`submit`, and also call `on_event(event)` with each of the request's `ClientEvent`s
        (tokens as they are committed, then "finished" or "failed", after the future is set).

        `on_event` runs on this client's poller thread: it must return at once (hand the event
        to a queue or an event loop). Token events may repeat tokens already sent (a request
        recomputed after its worker was lost re-commits from `event.start`); `TextDeltas`
        turns them into text pieces in which each token appears once.
        """
        return self._submit_many([prompt], chat, [None], sampling, on_event=on_event)[0]

    def _follow(self, future: ServingFuture, events: queue.Queue[ClientEvent], deltas: TextDeltas) -> Iterator[str]:
        """The pieces of `stream`."""
        while True:
            event = events.get()
            if event.kind == "tokens":
                piece = deltas.add(event)
                if piece:
                    yield piece
            else:
                piece = deltas.finish(future.result().text)
                if piece:
                    yield piece
                return

    @staticmethod
    def as_completed(futures: Iterable[ServingFuture], timeout: float | None = None) -> Iterator[ServingFuture]:
        """Futures in the order they finish."""
        return concurrent.futures.as_completed(list(futures), timeout)  # type: ignore[return-value]

    def cancel(self, future: ServingFuture | str) -> None:
        """Cancel a request by future or id."""
        request_id = future if isinstance(future, str) else future.request_id
        self._dask.sync(self._dask.scheduler.elastic_llm_cancel, client=self._id, token=self._token,
                        request_ids=[request_id])

    def status(self) -> dict[str, Any]:
        """The controller's view: replicas, queue, latency, counters."""
        return self._dask.sync(self._dask.scheduler.elastic_llm_status)  # type: ignore[no-any-return]

    def pending(self) -> int:
        """How many of this client's requests are submitted and not yet finished (results still to come)."""
        with self._lock:
            return len(self._tracking)

    def wait_for_replicas(self, count: int = 1, timeout: float = 600.0) -> None:
        """Block until at least `count` replicas are ready to serve (raises TimeoutError); a wait
        of more than a few seconds logs how many are ready and starting every 10 s."""
        deadline = time.monotonic() + timeout
        states: list[str] = [r["state"] for r in self.status()["replicas"]]
        if states.count("ready") >= count:
            return

        def so_far() -> str:
            return f"{states.count('ready')} ready, {states.count('starting')} starting"

        with progress(logger, f"waiting for {count} replica(s) to load the model", after_s=3.0, detail=so_far):
            while states.count("ready") < count:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{count} replica(s) not ready within {timeout:.0f} s ({so_far()})")
                time.sleep(0.2)
                states = [r["state"] for r in self.status()["replicas"]]

    def preempt(self, worker: str, grace_s: float = 30.0) -> str:
        """Announce that `worker` will be preempted `grace_s` seconds from now (API-call notice);
        returns the notice board's verdict ("accepted", "duplicate", "unknown-worker", ...)."""
        return send_preemption_notice(self._dask, worker, grace_s=grace_s)  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop following results (unfinished requests keep running until this client disconnects)."""
        self._closed.set()
        self._poller.join(timeout=5)

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _ensure_controller(self, model: str, policy: str, replica: ReplicaOptions | None,
                           options: dict[str, Any]) -> None:
        def describe(dask_scheduler: Any) -> tuple[str, str] | None:
            plugin = dask_scheduler.plugins.get(PLUGIN_NAME)
            return None if plugin is None else (plugin.model, plugin.policy)

        running = self._dask.run_on_scheduler(describe)
        if running is None:
            self._dask.register_plugin(TensorSerializerPlugin())
            self._dask.register_plugin(NoticeBoard())
            options = {"vocab_size": self.spec.vocab_size, "max_context": self.spec.max_position_embeddings,
                       **options}
            self._dask.register_plugin(ElasticController(model, policy, replica or ReplicaOptions(model=model),
                                                         **options))
        elif running[0] != model:
            raise InvalidRequestError(f"the cluster serves {running[0]!r}, not {model!r}")

    def _encode(self, prompt: object, chat: bool) -> tuple[int, ...]:
        """Token ids of one prompt, validated (raises `InvalidRequestError` naming the problem)."""
        if not isinstance(prompt, str):
            return check_prompt_ids(prompt, self.spec.vocab_size, self.spec.max_position_embeddings)
        check_prompt_text(prompt)
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass token ids")
        ids = self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)
        validate_prompt_ids(ids, self.spec.vocab_size, self.spec.max_position_embeddings)
        return tuple(ids)

    def _prepare(self, prompts: list[object], chat: object, ids: list[object],
                 sampling: dict[str, Any]) -> list[tuple[str, tuple[int, ...], SamplingParams]]:
        """Validate a whole batch (no side effects): [(request id, prompt ids, params)]."""
        if self._closed.is_set():
            raise InvalidRequestError("this ServingClient is closed")
        if chat is not None and not isinstance(chat, bool):
            raise InvalidRequestError(f"chat must be True, False or None, got {type(chat).__name__}")
        params = SamplingParams.coerce(sampling or None)
        validate_request(params, self.spec.vocab_size, self.spec.max_position_embeddings)
        use_chat = self.chat if chat is None else chat
        batch = []
        for prompt, request_id in zip(prompts, ids, strict=True):
            if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= 256):
                raise InvalidRequestError("request_id must be a non-empty str of at most 256 characters")
            if request_id is not None:
                check_text(request_id, "request_id")
            prompt_ids = self._encode(prompt, use_chat)
            request_params = params
            if not params.greedy and params.seed is None:  # fixed now: a recompute samples the same
                request_params = params.with_seed(random.getrandbits(63))
            batch.append((request_id or uuid.uuid4().hex, prompt_ids, request_params))
        named = [request_id for request_id, _, _ in batch]
        if len(set(named)) < len(named):
            raise InvalidRequestError("request ids in one batch must be distinct")
        return batch

    def _submit_many(self, prompts: list[object], chat: object, ids: list[object],
                     sampling: dict[str, Any],
                     on_event: Callable[[ClientEvent], None] | None = None) -> list[ServingFuture]:
        """All or nothing: the whole batch is validated, then tracked and sent in one message;
        if any prompt is bad, or the controller refuses, nothing stays tracked here."""
        batch = self._prepare(prompts, chat, ids, sampling)
        if not batch:
            return []
        now = time.time()
        futures = [ServingFuture(request_id, self) for request_id, _, _ in batch]
        with self._lock:
            taken = [request_id for request_id, _, _ in batch if request_id in self._tracking]
            if taken:
                raise InvalidRequestError(f"request id {taken[0]!r} is already in use")
            for future, (request_id, prompt_ids, _) in zip(futures, batch, strict=True):
                self._tracking[request_id] = _Tracking(future, prompt_ids, now, [], on_event=on_event)
        messages = [{"request_id": request_id, "prompt_token_ids": list(prompt_ids), "params": asdict(params)}
                    for request_id, prompt_ids, params in batch]
        try:
            self._dask.sync(self._dask.scheduler.elastic_llm_submit, client=self._id, token=self._token,
                            requests=messages)
        except BaseException as exc:
            with self._lock:
                for future in futures:
                    self._tracking.pop(future.request_id, None)
            if not isinstance(exc, Exception):
                raise
            raise InvalidRequestError(f"the controller refused the requests: {exc}") from exc
        return futures

    def _poll_loop(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                wire = self._dask.sync(self._dask.scheduler.elastic_llm_poll, client=self._id,
                                       token=self._token, cursor=self._cursor, timeout=1.0)
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - scheduler hiccup or shutdown: retry
                if self._closed.is_set() or self._dask.status in ("closing", "closed"):
                    return
                logger.debug("poll failed: %s", exc)
                time.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            for data in wire:
                event = ClientEvent.from_wire(data)
                self._cursor = max(self._cursor, event.seq + 1)
                if event.kind == "lost":  # the log dropped events this client had not read
                    self._fail_all(event.error)
                else:
                    self._deliver(event)

    def _fail_all(self, message: str) -> None:
        """Every tracked request fails with `message` (its events were lost: never a silent gap)."""
        with self._lock:
            tracked, self._tracking = list(self._tracking.values()), {}
        for tracking in tracked:
            tracking.future.set_exception(RequestFailedError(message))

    def _deliver(self, event: ClientEvent) -> None:
        with self._lock:
            tracking = self._tracking.get(event.request_id)
            if tracking is None:
                return
            if event.kind != "tokens":
                del self._tracking[event.request_id]
        if event.kind == "tokens":
            tracking.tokens[event.start:] = event.token_ids
            if tracking.first_token is None:
                tracking.first_token = time.time()
        elif event.kind == "finished":
            now = time.time()
            tracking.future.set_result(Completion(
                event.request_id, tracking.prompt_ids, tuple(tracking.tokens), event.text,
                FinishReason(event.finish_reason), tracking.submitted, tracking.first_token, now))
        else:
            tracking.future.set_exception(RequestFailedError(event.error))
        if tracking.on_event is not None:
            try:
                tracking.on_event(event)
            except Exception:  # noqa: BLE001 - a listener's failure must not stop the poller
                logger.exception("on_event listener of %s failed", event.request_id)
