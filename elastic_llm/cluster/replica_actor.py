"""`ReplicaActor`: a Dask actor that holds one model replica on its worker and serves requests.

Actor methods on a worker share one thread, so the decode loop never runs inside a method: it runs
in a thread the actor owns. Methods only hand it commands (through a queue) and, where they need
an answer (export at a token boundary), wait for the loop to give it.

Every iteration the loop commits the new tokens to the controller in ONE message over the worker's
batched stream to the scheduler (fire-and-forget, ordered per worker). A request resumed here
re-sends its whole output with its first commit, so the controller's table never misses tokens that
an old replica committed just before it stopped. Each message is a typed `ReplicaCommit`
(`elastic_llm.control.messages`) whose `LoopCounters` carry the replica's loop times, prefix reuse,
and its preemptions and KV swaps (`SchedulingCounters`, cumulative over every engine it built).

With `ReplicaOptions.parallel` above (1, 1) the replica is sharded: this actor (on the leader
worker) runs the engine's scheduler and a `DaskShardedExecutor` whose `ShardActor`s hold the weight
and KV slices on P*M workers (the leader among them); `reshard` switches it to another (P, M) and
set of workers at a token boundary, keeping every request's KV.

Weights: a whole-model replica reads them from the checkpoint store, or, created `deferred`, takes
them from a peer replica that pushes its own (`push_weights` -> `receive_weights`, worker to
worker, in chunks) before `build`; if the peer's weights are incomplete it reads the checkpoint.
A sharded replica created with `peers` (a ready sharded replica's `shard_sources()`) has its
shards pull every slice some peer shard holds, worker to worker, and read only the rest (or what
a peer fails to send) from the checkpoint; `wait_ready` reports the bytes that came from peers.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from elastic_llm.cluster.replica_options import ReplicaOptions
from elastic_llm.cluster.serialization import register_tensor_serializer
from elastic_llm.control.messages import (
    FailCommit,
    FinishCommit,
    LoopCounters,
    MovedRequest,
    ReplicaCommit,
    ReplicaInfo,
    ReshardSummary,
    SchedulingCounters,
    TokenCommit,
)
from elastic_llm.engine.replica.messages import PeerShard
from elastic_llm.engine.sequence import RequestState
from elastic_llm.request import RequestOutput
from elastic_llm.scheduling import BatchLimits, scheduler_name

if TYPE_CHECKING:
    from elastic_llm.engine.replica.report import ReconfigurationReport

logger = logging.getLogger(__name__)

# Every process that holds this actor must decode tensors the way its callers encode them: a
# client process that registered our serializer (e.g. after an in-process worker ran) sending to
# a worker still on Dask's own made the actor call hang. So the serializer is registered as soon
# as the actor's class is imported (unpickling an actor imports it before any call arrives).
register_tensor_serializer()

COMMIT_OP = "elastic_llm_commit"

__all__ = ["COMMIT_OP", "ReplicaActor", "ReplicaOptions"]  # ReplicaOptions: from replica_options


class ReplicaActor:
    """One replica of the model on this worker, serving requests the controller hands it."""

    WEIGHT_CHUNK_BYTES = 64 * 2**20  #: weights per message when this replica sends them to a peer

    def __init__(self, replica_id: str, options: ReplicaOptions, shards: Sequence[str] = (),
                 parallel: tuple[int, int] | None = None, deferred: bool = False,
                 peers: Sequence[PeerShard] = ()) -> None:
        """`shards`: worker addresses of a sharded replica's P*M shards (`options.sharded`);
        `parallel`: its (P, M) (default `options.parallel`; required when that is "auto");
        `deferred`: build the engine only when `build` is called (meanwhile `receive` may take
        requests, with their KV, from a replica that must stop first to free its workers);
        `peers`: (sharded) shards of live replicas its first build takes weight slices from."""
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
        self._peers = tuple(peers)  # (sharded) peer shards for the first build only
        self._ready: Future[None] = Future()
        self._error: str | None = None
        self._iterations = 0
        self._busy_seconds = 0.0  # inside engine.step()
        self._overhead_seconds = 0.0  # the loop's own work while serving: commands and commits
        self._period_seconds = 0.0  # iterations as long as they really take, pacing included
        self._prefix_reused_before = 0  # prompt tokens reused from prefix caches by earlier engines
        self._scheduling_before = SchedulingCounters()  # preemptions and swaps of earlier engines
        self._thread = threading.Thread(target=self._run, name=f"replica-{replica_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ methods (actor thread)
    def wait_ready(self, timeout: float = 300.0) -> ReplicaInfo:
        """Block until the model is loaded; returns this replica's description."""
        self._ready.result(timeout)
        return ReplicaInfo(self.replica_id, self._worker.address, int(self._engine.executor.kv_bytes_per_token),
                           self._weights_source, self._weight_bytes_from_peer, self._parallel,
                           tuple(self._shards))

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

    def pull_from(self, source: Any, request_ids: Sequence[str] | None, include_kv: bool = True,
                  timeout: float = 60.0) -> tuple[MovedRequest, ...]:
        """Take requests (with their KV) straight from another replica's actor, worker to worker;
        what was taken. Gives up after `timeout` seconds (the source died, or hangs): this
        actor's single thread is never held for good, and nothing was taken."""
        states = source.export_requests(request_ids, include_kv, timeout).result(timeout)
        self._commands.put(lambda: self._resume(states))
        return _moved(states)

    def hand_over(self, target: Any, request_ids: Sequence[str] | None = None,
                  timeout: float = 120.0) -> tuple[MovedRequest, ...]:
        """Pause at the next token boundary, cut these requests (all if None) out WITH their KV
        and push them to `target` (a deferred replica: `receive`), worker to worker; returns
        what was handed over.

        The push (rather than the target pulling) keeps actor calls out of the target's worker
        before its engine exists: a pull from there slowed every later shard call of that worker
        to the next 1-4 s event-loop tick."""
        states = self.export_requests(request_ids, True, timeout)
        target.receive(states).result(timeout)
        return _moved(states)

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

    def shard_sources(self, timeout: float = 30.0) -> list[PeerShard]:
        """(Ready sharded replica) its shards as a new replica's `peers`: each one's worker,
        actor key, (P, M), stage and rank (they serve pulls of the weights they hold)."""
        self._ready.result(timeout)
        if not self._options.sharded:
            raise ValueError("a whole-model replica's weights move by push_weights")
        return self._engine.executor.shard_sources()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """Iterations, busy time, requests held, the scheduler's name (read from the engine's
        scheduler object, None before it is built) and "scheduling": `SchedulingCounters.to_dict()`
        (preemptions, KV bytes swapped out and in, seconds blocked on swaps, tokens dropped)."""
        engine = getattr(self, "_engine", None)
        return {"replica": self.replica_id, "iterations": self._iterations,
                "busy_seconds": self._busy_seconds, "overhead_seconds": self._overhead_seconds,
                "error": self._error,
                "requests": engine.num_requests if engine is not None else 0,
                "scheduler": scheduler_name(engine.scheduler) if engine is not None else None,
                "scheduling": self._scheduling().to_dict()}

    def reshard(self, parallel: tuple[int, int], workers: Sequence[str], timeout: float = 300.0, *,
                use_mapper: bool = True, progressive: bool = True,
                memory_bytes: int | None = None) -> ReshardSummary:
        """At the next token boundary switch this sharded replica to `parallel` (P, M) on
        `workers` (P*M addresses), keeping every request's KV; a summary of what moved
        (bytes by kind, measured `peak_bytes` per worker, `stage_ready`, the new `shards`).

        The migration is progressive and bounded by `memory_bytes` per worker (default
        `ReplicaOptions.memory_budget_bytes`; None: unbounded). Ablations: `use_mapper=False`
        places `workers` in the given order instead of by Kuhn-Munkres; `progressive=False`
        moves everything first, then resumes (no early stage release, no bound)."""
        answer: Future[ReshardSummary] = Future()
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
            answer.set_result(ReshardSummary.from_wire({**report.summary(), "shards": list(self._shards)}))

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
            self._scheduling_before = self._scheduling()
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

        torch.set_num_threads(self._options.threads)
        model = self._load_model()
        limits = BatchLimits(self._options.max_batch_size, self._options.max_batch_tokens)
        scheduler = self._options.build_scheduler()
        if not self._options.sharded:  # (kv_residency is only allowed here)
            return LLMEngine(model, scheduler=scheduler, limits=limits, residency=self._options.kv_residency)
        from distributed import Client

        from elastic_llm.cluster.dask_sharded import DaskShardedExecutor
        from elastic_llm.planning.config import ParallelConfig

        pipeline, tensor = self._parallel
        if self._client is None:  # this thread has no worker context: a client of its own
            self._client = Client(self._worker.scheduler.address, security=self._worker.security,
                                  set_as_default=False, name=f"elastic-llm-{self.replica_id}")
        peers, self._peers = self._peers, ()  # a later reload reads the checkpoint
        started = time.perf_counter()
        executor = DaskShardedExecutor(
            self._client, model, ParallelConfig(D=1, P=pipeline, M=tensor, B=self._options.max_batch_size),
            workers=self._shards, peers=peers, timeout_s=self._options.shard_timeout_s,
            threads=self._options.threads)
        report = executor.start_report
        self._weights_source = "peer" if report.peer_bytes else "checkpoint"
        self._weight_bytes_from_peer = report.peer_bytes
        self._pay_checkpoint(report, started)
        return LLMEngine(model, scheduler=scheduler, limits=limits, executor=executor)

    def _pay_checkpoint(self, report: ReconfigurationReport, started: float) -> None:
        """(Sharded) wait as long as the slowest shard's checkpoint reads would take at
        `checkpoint_bandwidth` (the shards read in parallel; peers' slices cost nothing here)."""
        if not self._options.checkpoint_bandwidth:
            return
        per_shard: dict[str, int] = {}
        for t in report.transfers:
            if t.src is None:
                per_shard[t.dst] = per_shard.get(t.dst, 0) + t.nbytes
        slowest = max(per_shard.values(), default=0) / self._options.checkpoint_bandwidth
        time.sleep(max(0.0, slowest - (time.perf_counter() - started)))

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
        if self._options.checkpoint_bandwidth and not self._options.sharded:  # shards pay their own
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
                self._send(failed=(FailCommit(state.request_id, f"{type(exc).__name__}: {exc}"),))
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
        finished: list[FinishCommit] = []
        for output in outputs:
            start = self._counts[output.request_id]
            self._counts[output.request_id] = start + len(output.new_token_ids)
            pending_start, pending = self._unsent.get(output.request_id, (start, []))
            self._unsent[output.request_id] = (pending_start, pending + list(output.new_token_ids))
            if output.finished:
                done = self._engine.pop_completion(output.request_id)
                # the whole output rides along: a finish never depends on earlier commits arriving
                finished.append(FinishCommit(output.request_id, done.finish_reason.value, done.text,
                                             tuple(done.token_ids)))
        self._flush(finished)
        for done in finished:
            self._forget(done.request_id)

    def _flush(self, finished: Sequence[FinishCommit] = ()) -> None:
        tokens = tuple(TokenCommit(rid, start, tuple(ids)) for rid, (start, ids) in self._unsent.items() if ids)
        self._unsent.clear()
        if tokens or finished:
            self._send(tokens=tokens, finished=tuple(finished))

    def _prefix_reused(self) -> int:
        """Prompt tokens this replica took from prefix caches (every engine it has built)."""
        engine = getattr(self, "_engine", None)
        reused = engine.stats().prefix_tokens_reused if engine is not None else 0
        return self._prefix_reused_before + reused

    def _scheduling(self) -> SchedulingCounters:
        """Preemptions and KV swaps of this replica (every engine it has built)."""
        engine = getattr(self, "_engine", None)
        if engine is None:
            return self._scheduling_before
        stats = engine.stats()
        return self._scheduling_before.plus(SchedulingCounters(
            preemptions=stats.preemptions, bytes_swapped_out=stats.bytes_swapped_out,
            bytes_swapped_in=stats.bytes_swapped_in, swap_seconds=stats.swap_seconds,
            tokens_dropped=stats.tokens_dropped))

    def _counters(self) -> LoopCounters:
        return LoopCounters(self._iterations, self._busy_seconds, self._overhead_seconds, self._period_seconds,
                            self._prefix_reused(), self._scheduling())

    def _send(self, tokens: tuple[TokenCommit, ...] = (), finished: tuple[FinishCommit, ...] = (),
              failed: tuple[FailCommit, ...] = ()) -> None:
        commit = ReplicaCommit(self.replica_id, self._counters(), tokens, finished, failed)
        message = {"op": COMMIT_OP, "commit": commit.to_wire()}
        self._worker.loop.add_callback(self._worker.batched_stream.send, message)


def _moved(states: Sequence[RequestState]) -> tuple[MovedRequest, ...]:
    """What a migration of `states` moved."""
    return tuple(MovedRequest(s.request_id, s.kv.nbytes if s.kv is not None else 0) for s in states)
