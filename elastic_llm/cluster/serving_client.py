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
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from distributed import Client

from elastic_llm.cluster.controller import PLUGIN_NAME, ElasticController
from elastic_llm.cluster.notices import NoticeBoard, send_preemption_notice
from elastic_llm.cluster.replica_actor import ReplicaOptions
from elastic_llm.control.requests import ClientEvent
from elastic_llm.cluster.serialization import TensorSerializerPlugin
from elastic_llm.errors import ElasticLLMError, InvalidRequestError
from elastic_llm.model.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from elastic_llm.model.spec import ModelSpec
from elastic_llm.model.tokenizer import Tokenizer
from elastic_llm.request import Completion, FinishReason
from elastic_llm.sampling import SamplingParams, validate_prompt_ids

logger = logging.getLogger(__name__)


class RequestFailedError(ElasticLLMError):
    """The cluster could not complete a request (the message says why)."""


@dataclass
class _Tracking:
    future: ServingFuture
    prompt_ids: tuple[int, ...]
    submitted: float
    tokens: list[int]
    first_token: float | None = None
    stream: queue.Queue[ClientEvent] | None = None


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
        self._id = dask_client.id
        self._tracking: dict[str, _Tracking] = {}
        self._lock = threading.Lock()
        self._cursor = 0
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="elastic-llm-poller", daemon=True)
        self._poller.start()

    # ------------------------------------------------------------------ public API
    def submit(self, prompt: str | Iterable[int], *, chat: bool | None = None, request_id: str | None = None,
               **sampling: Any) -> ServingFuture:
        """Send one prompt; returns a future of its `Completion`. Raises on bad input at once."""
        return self._submit_many([prompt], chat, [request_id], sampling)[0]

    def map(self, prompts: Iterable[str | Iterable[int]], *, chat: bool | None = None,
            **sampling: Any) -> list[ServingFuture]:
        """Send many prompts in one message; futures in prompt order."""
        prompts = list(prompts)
        return self._submit_many(prompts, chat, [None] * len(prompts), sampling)

    def stream(self, prompt: str | Iterable[int], *, chat: bool | None = None, **sampling: Any) -> Iterator[str]:
        """Generate and yield the text as tokens are committed; the pieces join to the final text."""
        events: queue.Queue[ClientEvent] = queue.Queue()
        future = self._submit_many([prompt], chat, [None], sampling, stream=events)[0]
        stops = SamplingParams.coerce(sampling or None).stop
        holdback = max((len(s) for s in stops), default=1) - 1
        tokens: list[int] = []
        sent = ""
        while True:
            event = events.get()
            if event.kind == "tokens":
                tokens[event.start:] = event.token_ids
                text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
                ready = text[: max(len(sent), len(text) - holdback)]
                if ready.endswith("\ufffd") or not ready.startswith(sent):
                    continue
                if len(ready) > len(sent):
                    yield ready[len(sent):]
                    sent = ready
            else:
                final = future.result()
                if final.text.startswith(sent) and len(final.text) > len(sent):
                    yield final.text[len(sent):]
                return

    @staticmethod
    def as_completed(futures: Iterable[ServingFuture], timeout: float | None = None) -> Iterator[ServingFuture]:
        """Futures in the order they finish."""
        return concurrent.futures.as_completed(list(futures), timeout)  # type: ignore[return-value]

    def cancel(self, future: ServingFuture | str) -> None:
        """Cancel a request by future or id."""
        request_id = future if isinstance(future, str) else future.request_id
        self._dask.sync(self._dask.scheduler.elastic_llm_cancel, request_ids=[request_id])

    def status(self) -> dict[str, Any]:
        """The controller's view: replicas, queue, latency, counters."""
        return self._dask.sync(self._dask.scheduler.elastic_llm_status)  # type: ignore[no-any-return]

    def wait_for_replicas(self, count: int = 1, timeout: float = 600.0) -> None:
        """Block until at least `count` replicas are ready to serve (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while sum(r["state"] == "ready" for r in self.status()["replicas"]) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} replica(s) not ready within {timeout:.0f} s")
            time.sleep(0.2)

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
            self._dask.register_plugin(ElasticController(model, policy, replica or ReplicaOptions(model=model),
                                                         **options))
        elif running[0] != model:
            raise InvalidRequestError(f"the cluster serves {running[0]!r}, not {model!r}")

    def _encode(self, prompt: str | Iterable[int], chat: bool) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InvalidRequestError("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids")
            ids = self.tokenizer.chat_prompt_ids(prompt) if chat else self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        validate_prompt_ids(ids, self.spec.vocab_size, self.spec.max_position_embeddings)
        return tuple(ids)

    def _submit_many(self, prompts: list[str | Iterable[int]], chat: bool | None, ids: list[str | None],
                     sampling: dict[str, Any], stream: queue.Queue[ClientEvent] | None = None) -> list[ServingFuture]:
        if self._closed.is_set():
            raise InvalidRequestError("this ServingClient is closed")
        params = SamplingParams.coerce(sampling or None)
        use_chat = self.chat if chat is None else chat
        messages, futures = [], []
        for prompt, request_id in zip(prompts, ids, strict=True):
            prompt_ids = self._encode(prompt, use_chat)
            request_params = params
            if not params.greedy and params.seed is None:  # fixed now: a recompute samples the same
                request_params = params.with_seed(random.getrandbits(63))
            request_id = request_id or uuid.uuid4().hex
            future = ServingFuture(request_id, self)
            with self._lock:
                if request_id in self._tracking:
                    raise InvalidRequestError(f"request id {request_id!r} is already in use")
                self._tracking[request_id] = _Tracking(future, prompt_ids, time.time(), [], stream=stream)
            messages.append({"request_id": request_id, "prompt_token_ids": list(prompt_ids),
                             "params": asdict(request_params)})
            futures.append(future)
        try:
            self._dask.sync(self._dask.scheduler.elastic_llm_submit, client=self._id, requests=messages)
        except Exception as exc:
            with self._lock:
                for future in futures:
                    self._tracking.pop(future.request_id, None)
            raise InvalidRequestError(f"the controller refused the requests: {exc}") from exc
        return futures

    def _poll_loop(self) -> None:
        backoff = 0.1
        while not self._closed.is_set():
            try:
                wire = self._dask.sync(self._dask.scheduler.elastic_llm_poll, client=self._id,
                                       cursor=self._cursor, timeout=1.0)
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
                self._deliver(event)

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
        if tracking.stream is not None:
            tracking.stream.put(event)
