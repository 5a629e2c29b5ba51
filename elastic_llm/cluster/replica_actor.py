"""`ReplicaActor`: a Dask actor that holds one model replica on its worker and serves requests.

Actor methods on a worker share one thread, so the decode loop never runs inside a method: it runs
in a thread the actor owns. Methods only hand it commands (through a queue) and, where they need
an answer (export at a token boundary), wait for the loop to give it.

Every iteration the loop commits the new tokens to the controller in ONE message over the worker's
batched stream to the scheduler (fire-and-forget, ordered per worker). A request resumed here
re-sends its whole output with its first commit, so the controller's table never misses tokens that
an old replica committed just before it stopped.

With `ReplicaOptions.parallel` above (1, 1) the replica is sharded: this actor (on the leader
worker) runs the engine's scheduler and a `DaskShardedExecutor` whose `ShardActor`s hold the weight
and KV slices on P*M workers (the leader among them); `reshard` switches it to another (P, M) and
set of workers at a token boundary, keeping every request's KV.

Weights: a whole-model replica reads them from the checkpoint store, or, created `deferred`, takes
them from a peer replica that pushes its own (`push_weights` -> `receive_weights`, worker to
worker, in chunks) before `build`; if the peer's weights are incomplete it reads the checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from elastic_llm.engine.sequence import RequestState
from elastic_llm.request import RequestOutput

logger = logging.getLogger(__name__)

COMMIT_OP = "elastic_llm_commit"


@dataclass(frozen=True)
class ReplicaOptions:
    """How a replica's engine is built."""

    model: str  #: embedded model name or checkpoint directory
    max_batch_size: int = 16  #: requests per iteration
    max_batch_tokens: int = 1024  #: tokens per iteration
    scheduler: str = "fcfs"  #: "fcfs" or "skip-join" (MLFQ)
    threads: int = 1  #: torch threads in this worker process
    min_step_seconds: float = 0.0  #: pace iterations to at least this long (emulates a slower instance)
    #: bytes/s at which weights come from the checkpoint store (None: as fast as local disk);
    #: a real fleet reads object storage, so a fair baseline pays that on every reload
    checkpoint_bandwidth: float | None = None
    #: (P, M) of each replica: above (1, 1) the replica's engine drives a `DaskShardedExecutor`
    #: over `ShardActor`s on P*M workers (the first, the leader, also holds the `ReplicaActor`);
    #: "auto": the controller's planning core chooses (P, M) for the workers at hand (and
    #: re-chooses it when they change)
    parallel: tuple[int, int] | str = (1, 1)
    shard_timeout_s: float = 60.0  #: limit on every shard answer and collective (sharded only)
    #: bytes of weights + KV one worker may hold (None: the workers' own announced budget); with
    #: parallel="auto" a model that does not fit one worker is sharded over several
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.parallel, str):
            if self.parallel != "auto":
                raise ValueError(f'parallel must be (P, M) or "auto", not {self.parallel!r}')
        elif len(self.parallel) != 2 or min(self.parallel) < 1:
            raise ValueError(f"parallel must be (P, M) with P, M >= 1, not {self.parallel!r}")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes <= 0:
            raise ValueError("memory_budget_bytes must be > 0")

    @property
    def auto_parallel(self) -> bool:
        """Whether the controller chooses each replica's (P, M)."""
        return self.parallel == "auto"

    @property
    def sharded(self) -> bool:
        """Whether replicas run as P x M shards on several workers."""
        return self.auto_parallel or tuple(self.parallel) != (1, 1)


class ReplicaActor:
    """One replica of the model on this worker, serving requests the controller hands it."""

    WEIGHT_CHUNK_BYTES = 64 * 2**20  #: weights per message when this replica sends them to a peer

    def __init__(self, replica_id: str, options: ReplicaOptions, shards: Sequence[str] = (),
                 parallel: tuple[int, int] | None = None, deferred: bool = False) -> None:
        """`shards`: worker addresses of a sharded replica's P*M shards (`options.sharded`);
        `parallel`: its (P, M) (default `options.parallel`; required when that is "auto");
        `deferred`: build the engine only when `build` is called (meanwhile `receive` may take
        requests, with their KV, from a replica that must stop first to free its workers)."""
        from distributed import get_worker

        self.replica_id = replica_id
        self._options = options
        self._shards = list(shards)
        if parallel is None:
            if options.auto_parallel:
                raise ValueError('a replica of parallel="auto" needs its (P, M)')
            parallel = tuple(options.parallel)  # type: ignore[assignment]
        self._parallel: tuple[int, int] = (int(parallel[0]), int(parallel[1]))
        self._client: Any = None  # a sharded replica's Dask client (made in the loop thread)
        self._worker = get_worker()
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._unsent: dict[str, tuple[int, list[int]]] = {}  # request -> (start, tokens) not yet sent
        self._counts: dict[str, int] = {}  # request -> output tokens known here
        self._stopped = threading.Event()
        self._go = threading.Event()  # build the engine (set at once unless deferred)
        if not deferred:
            self._go.set()
        self._adopted: list[RequestState] = []  # taken by `receive`, resumed once the engine is built
        self._received: dict[str, Any] = {}  # weights a peer pushed (`receive_weights`), used by the build
        self._weights_source = "checkpoint"  # where the engine's weights came from: checkpoint or peer
        self._weight_bytes_from_peer = 0
        self._ready: Future[None] = Future()
        self._error: str | None = None
        self._iterations = 0
        self._busy_seconds = 0.0  # inside engine.step()
        self._overhead_seconds = 0.0  # the loop's own work while serving: commands and commits
        self._period_seconds = 0.0  # iterations as long as they really take, pacing included
        self._prefix_reused_before = 0  # prompt tokens reused from prefix caches by earlier engines
        self._thread = threading.Thread(target=self._run, name=f"replica-{replica_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ methods (actor thread)
    def wait_ready(self, timeout: float = 300.0) -> dict[str, Any]:
        """Block until the model is loaded; returns this replica's description."""
        self._ready.result(timeout)
        return {"replica": self.replica_id, "worker": self._worker.address,
                "kv_bytes_per_token": self._engine.executor.kv_bytes_per_token,
                "weights": self._weights_source, "weight_bytes_from_peer": self._weight_bytes_from_peer,
                "parallel": list(self._parallel), "shards": list(self._shards)}

    def start_requests(self, states: Sequence[RequestState]) -> int:
        """Queue requests (new, or resumed from committed tokens, with or without KV)."""
        states = list(states)
        self._commands.put(lambda: self._resume(states))
        return len(states)

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Abort these requests if they are here."""
        ids = list(request_ids)
        self._commands.put(lambda: self._cancel(ids))

    def export_requests(self, request_ids: Sequence[str] | None = None, include_kv: bool = True,
                        timeout: float = 60.0) -> list[RequestState]:
        """Pause at the next token boundary and cut these requests (all if None) out of the engine."""
        answer: Future[list[RequestState]] = Future()
        ids = None if request_ids is None else list(request_ids)
        self._commands.put(lambda: answer.set_result(self._export(ids, include_kv)))
        return answer.result(timeout)

    def pull_from(self, source: Any, request_ids: Sequence[str] | None,
                  include_kv: bool = True) -> list[tuple[str, int]]:
        """Take requests (with their KV) straight from another replica's actor, worker to worker;
        returns (request id, KV bytes received) for each request taken."""
        states = source.export_requests(request_ids, include_kv).result()
        self._commands.put(lambda: self._resume(states))
        return [(s.request_id, s.kv.nbytes if s.kv is not None else 0) for s in states]

    def hand_over(self, target: Any, request_ids: Sequence[str] | None = None,
                  timeout: float = 120.0) -> list[tuple[str, int]]:
        """Pause at the next token boundary, cut these requests (all if None) out WITH their KV
        and push them to `target` (a deferred replica: `receive`), worker to worker; returns
        (request id, KV bytes) for each request handed over.

        The push (rather than the target pulling) keeps actor calls out of the target's worker
        before its engine exists: a pull from there slowed every later shard call of that worker
        to the next 1-4 s event-loop tick."""
        states = self.export_requests(request_ids, True, timeout)
        target.receive(states).result(timeout)
        return [(s.request_id, s.kv.nbytes if s.kv is not None else 0) for s in states]

    def receive(self, states: Sequence[RequestState]) -> int:
        """(Deferred replica) hold these requests (with their KV) until `build` resumes them."""
        self._adopted.extend(states)
        return len(states)

    def push_weights(self, target: Any, timeout: float = 120.0) -> int:
        """Send this whole-model replica's weights to `target` (a deferred replica:
        `receive_weights`), worker to worker in chunks; returns the bytes sent."""
        self._ready.result(timeout)
        if self._options.sharded:
            raise ValueError("a sharded replica's weights move by resharding, not push_weights")
        items = list(self._engine.model.network.tensors().items())
        sent, size, chunk = 0, 0, {}
        for index, (name, tensor) in enumerate(items):
            chunk[name] = tensor
            size += tensor.numel() * tensor.element_size()
            if size >= self.WEIGHT_CHUNK_BYTES or index == len(items) - 1:
                target.receive_weights(chunk).result(timeout)
                sent, size, chunk = sent + size, 0, {}
        return sent

    def receive_weights(self, tensors: dict[str, Any]) -> int:
        """(Deferred replica) keep these weights for `build`, which then reads no weights file."""
        self._received.update(tensors)
        return len(tensors)

    def build(self) -> None:
        """(Deferred replica) build the engine now; adopted requests resume once it is ready."""
        self._go.set()

    def stats(self) -> dict[str, Any]:
        """Iterations, busy time and requests held."""
        engine = getattr(self, "_engine", None)
        return {"replica": self.replica_id, "iterations": self._iterations,
                "busy_seconds": self._busy_seconds, "overhead_seconds": self._overhead_seconds,
                "error": self._error,
                "requests": engine.num_requests if engine is not None else 0}

    def reshard(self, parallel: tuple[int, int], workers: Sequence[str], timeout: float = 300.0, *,
                use_mapper: bool = True, progressive: bool = True,
                memory_bytes: int | None = None) -> dict[str, Any]:
        """At the next token boundary switch this sharded replica to `parallel` (P, M) on
        `workers` (P*M addresses), keeping every request's KV; a summary of what moved
        (`ReconfigurationReport.summary`: bytes by kind, measured `peak_bytes` per worker,
        `stage_ready`, ... plus the new `shards`).

        The migration is progressive and bounded by `memory_bytes` per worker (default
        `ReplicaOptions.memory_budget_bytes`; None: unbounded). Ablations: `use_mapper=False`
        places `workers` in the given order instead of by Kuhn-Munkres; `progressive=False`
        moves everything first, then resumes (no early stage release, no bound)."""
        answer: Future[dict[str, Any]] = Future()
        names = list(workers)
        bound = self._options.memory_budget_bytes if memory_bytes is None else memory_bytes

        def switch() -> None:
            from elastic_llm.planning.config import ParallelConfig

            try:
                config = ParallelConfig(D=1, P=parallel[0], M=parallel[1], B=self._options.max_batch_size)
                report = self._engine.executor.reconfigure(config, workers=names, use_mapper=use_mapper,
                                                           progressive=progressive, memory_bytes=bound)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                answer.set_exception(exc)
                return
            self._shards = list(self._engine.executor.placement.workers)
            self._parallel = (report.new.P, report.new.M)
            answer.set_result({**report.summary(), "shards": list(self._shards)})

        self._commands.put(switch)
        return answer.result(timeout)

    def reload(self, timeout: float = 600.0) -> None:
        """Drop every request and load the weights again from the checkpoint (reparallelize)."""
        answer: Future[None] = Future()

        def rebuild() -> None:
            for request_id in list(self._counts):
                self._engine.abort(request_id)
                self._forget(request_id)
            self._prefix_reused_before = self._prefix_reused()
            self._engine.close()  # a sharded replica's shards are started afresh
            self._engine = self._build_engine()
            answer.set_result(None)

        self._commands.put(rebuild)
        answer.result(timeout)

    def stop(self) -> None:
        """Stop the loop thread (and a sharded replica's shards)."""
        self._stopped.set()
        self._go.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=30)
        engine = getattr(self, "_engine", None)
        if engine is not None and not self._thread.is_alive():
            engine.close()
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ the loop (own thread)
    def _run(self) -> None:
        self._go.wait()
        if self._stopped.is_set():
            self._ready.set_exception(RuntimeError(f"replica {self.replica_id} stopped before it started"))
            return
        try:
            self._engine = self._build_engine()
            self._resume(self._adopted)
            self._adopted = []
            self._ready.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits
            self._error = f"{type(exc).__name__}: {exc}"
            self._ready.set_exception(exc)
            return
        while not self._stopped.is_set():
            idle = not self._engine.has_unfinished()
            mark = time.perf_counter()
            self._drain(block=idle)
            if not idle:
                self._overhead_seconds += time.perf_counter() - mark
            if self._stopped.is_set() or not self._engine.has_unfinished():
                continue
            started = time.perf_counter()
            try:
                outputs = self._engine.step()
            except Exception as exc:  # noqa: BLE001 - e.g. a shard's worker died: this replica is done
                self._error = f"{type(exc).__name__}: {exc}"
                logger.exception("replica %s failed; its requests resume elsewhere", self.replica_id)
                return
            elapsed = time.perf_counter() - started
            self._busy_seconds += elapsed
            self._period_seconds += max(elapsed, self._options.min_step_seconds)
            self._iterations += 1
            self._commit(outputs)
            self._overhead_seconds += time.perf_counter() - started - elapsed
            if elapsed < self._options.min_step_seconds:
                time.sleep(self._options.min_step_seconds - elapsed)

    def _build_engine(self):  # type: ignore[no-untyped-def]
        import torch

        from elastic_llm.engine.llm_engine import LLMEngine
        from elastic_llm.scheduling import FCFS, BatchLimits, MLFQConfig, SkipJoinMLFQ

        torch.set_num_threads(self._options.threads)
        model = self._load_model()
        limits = BatchLimits(self._options.max_batch_size, self._options.max_batch_tokens)
        scheduler = FCFS() if self._options.scheduler == "fcfs" else SkipJoinMLFQ(MLFQConfig(skip_join=False))
        if not self._options.sharded:
            return LLMEngine(model, scheduler=scheduler, limits=limits)
        from distributed import Client

        from elastic_llm.cluster.dask_sharded import DaskShardedExecutor
        from elastic_llm.planning.config import ParallelConfig

        pipeline, tensor = self._parallel
        if self._client is None:  # this thread has no worker context: a client of its own
            self._client = Client(self._worker.scheduler.address, security=self._worker.security,
                                  set_as_default=False, name=f"elastic-llm-{self.replica_id}")
        executor = DaskShardedExecutor(
            self._client, model, ParallelConfig(D=1, P=pipeline, M=tensor, B=self._options.max_batch_size),
            workers=self._shards, timeout_s=self._options.shard_timeout_s, threads=self._options.threads)
        return LLMEngine(model, scheduler=scheduler, limits=limits, executor=executor)

    def _load_model(self):  # type: ignore[no-untyped-def]
        """The model, with the weights a peer sent when they are complete, else from the
        checkpoint store (at `checkpoint_bandwidth`)."""
        from elastic_llm.errors import ModelLoadError
        from elastic_llm.model.loader import load_model

        received, self._received = self._received, {}
        if received:
            try:
                model = load_model(self._options.model, tensors=received)
            except ModelLoadError as exc:
                logger.warning("replica %s: weights from the peer unusable (%s): reading the checkpoint",
                               self.replica_id, exc)
            else:
                self._weights_source = "peer"
                self._weight_bytes_from_peer = sum(t.numel() * t.element_size() for t in received.values())
                return model
        started = time.perf_counter()
        model = load_model(self._options.model)
        self._weights_source = "checkpoint"
        if self._options.checkpoint_bandwidth:
            weight_bytes = sum(p.numel() * p.element_size() for p in model.network.parameters())
            time.sleep(max(0.0, weight_bytes / self._options.checkpoint_bandwidth
                           - (time.perf_counter() - started)))
        return model

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                command()
            except Exception:  # noqa: BLE001 - one bad command must not kill the replica
                logger.exception("replica %s: command failed", self.replica_id)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _resume(self, states: list[RequestState]) -> None:
        for state in states:
            try:
                self._engine.resume_request(state)
            except Exception as exc:  # noqa: BLE001 - reported to the controller as a failure
                self._send({"failed": [[state.request_id, f"{type(exc).__name__}: {exc}"]]})
                continue
            self._counts[state.request_id] = len(state.output_token_ids)
            if state.output_token_ids:
                self._unsent[state.request_id] = (0, list(state.output_token_ids))

    def _cancel(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            if request_id in self._counts:
                self._engine.abort(request_id)
                self._forget(request_id)

    def _export(self, request_ids: list[str] | None, include_kv: bool) -> list[RequestState]:
        self._flush()
        ids = list(self._counts) if request_ids is None else [i for i in request_ids if i in self._counts]
        states = [self._engine.export_request(i, include_kv) for i in ids]
        for request_id in ids:
            self._forget(request_id)
        return states

    def _forget(self, request_id: str) -> None:
        self._counts.pop(request_id, None)
        self._unsent.pop(request_id, None)

    def _commit(self, outputs: list[RequestOutput]) -> None:
        finished = []
        for output in outputs:
            start = self._counts[output.request_id]
            self._counts[output.request_id] = start + len(output.new_token_ids)
            pending_start, pending = self._unsent.get(output.request_id, (start, []))
            self._unsent[output.request_id] = (pending_start, pending + list(output.new_token_ids))
            if output.finished:
                done = self._engine.pop_completion(output.request_id)
                # the whole output rides along: a finish never depends on earlier commits arriving
                finished.append([output.request_id, done.finish_reason.value, done.text,
                                 list(done.token_ids)])
        self._flush(finished)
        for request_id, *_ in finished:
            self._forget(request_id)

    def _flush(self, finished: list[list[Any]] | None = None) -> None:
        tokens = [[rid, start, ids] for rid, (start, ids) in self._unsent.items() if ids]
        self._unsent.clear()
        if tokens or finished:
            self._send({"tokens": tokens, "finished": finished or []})

    def _prefix_reused(self) -> int:
        """Prompt tokens this replica took from prefix caches (every engine it has built)."""
        engine = getattr(self, "_engine", None)
        reused = engine.stats().prefix_tokens_reused if engine is not None else 0
        return self._prefix_reused_before + reused

    def _send(self, payload: dict[str, Any]) -> None:
        message = {"op": COMMIT_OP, "replica": self.replica_id,
                   "loop": [self._iterations, self._busy_seconds, self._overhead_seconds,
                            self._period_seconds, self._prefix_reused()], **payload}
        self._worker.loop.add_callback(self._worker.batched_stream.send, message)
