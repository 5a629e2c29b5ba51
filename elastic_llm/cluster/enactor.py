"""`Enactor`: carries out the control state machine's instructions with Dask actor calls.

Each instruction becomes one background task that calls the replica actors (worker to worker
where data moves) under the instruction's deadline, and reports its outcome back as the event
that instruction expects (`ReplicaReady`, `TransferDone`, `OperationFailed`, ...). No decisions
are made here: what to start, move, pause or stop comes from `FleetState`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from distributed import Client
from distributed.actor import Actor

from elastic_llm.cluster.replica_actor import ReplicaActor, ReplicaOptions
from elastic_llm.control import events as ev
from elastic_llm.control import instructions as ins
from elastic_llm.engine.replica.messages import PeerShard
from elastic_llm.engine.sequence import RequestState
from elastic_llm.model.spec import ModelSpec

logger = logging.getLogger(__name__)
#: The Dask event topic capacity requests are published on: an autoscaler subscribes with
#: `client.subscribe_topic(CAPACITY_TOPIC, handler)`; each message is a dict with "instruction"
#: ("AcquireCapacity": count, market; "ReleaseCapacity": worker).
CAPACITY_TOPIC = "elastic-llm-capacity"
#: Seconds a fire-and-forget call (stop, cancel) to a replica may take before it is given up.
QUIET_CALL_TIMEOUT_S = 60.0


def model_spec_of(model: str) -> ModelSpec:
    """The `ModelSpec` of an embedded model name or checkpoint directory (runs on a worker)."""
    from pathlib import Path

    from elastic_llm.model.checkpoint import resolve_checkpoint
    from elastic_llm.model.loader import read_spec

    return read_spec(resolve_checkpoint(model), Path(os.fspath(model)).name)[1]


def bound_actor(handle: Actor, client: Client) -> Actor:
    """`handle` bound to `client`. Dask binds a deserialized actor handle to the process's newest
    client, which in a process holding several (a user's, a dashboard's cached one, one of a
    cluster that is gone) may talk to another scheduler: the actor's calls then hang."""
    with client.as_current():
        return Actor(handle._cls, handle._address, handle.key)  # noqa: SLF001 - Dask's own fields


class Enactor:
    """Turns instructions into actor calls; their outcomes go to `report` as events.

    Args:
        client: the controller's own Dask client.
        options: how every replica's engine is built.
        report: called (on the event loop) with each outcome event.
        notify: called with the clients that have new events.
    """

    def __init__(self, client: Client, options: ReplicaOptions, report: Callable[[ev.Event], None],
                 notify: Callable[[tuple[str, ...]], None]) -> None:
        self.client = client
        self.options = options
        self.report = report
        self.notify = notify
        self.actors: dict[str, Any] = {}  #: replica id -> its `ReplicaActor` proxy
        self._futures: dict[str, Any] = {}  # replica id -> the actor's future (keeps it alive)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: asyncio.TimerHandle | None = None
        self._wake_at = float("inf")
        #: the latest capacity asked for or given back (also on the Dask event topic `CAPACITY_TOPIC`)
        self.capacity_requests: deque[dict[str, Any]] = deque(maxlen=1000)

    def carry_out(self, instruction: ins.Instruction) -> None:
        """Start carrying out one instruction (returns at once)."""
        match instruction:
            case ins.NotifyClients(clients=clients):
                self.notify(clients)
            case ins.WakeAt(time=at):
                self._tick_at(at)
            case ins.CancelRequests(replica_id=replica, request_ids=ids):
                if replica in self.actors:
                    self._spawn(self._quiet(self.actors[replica].cancel(list(ids))))
            case ins.StopReplica(replica_id=replica):
                actor = self.actors.pop(replica, None)
                self._futures.pop(replica, None)
                if actor is not None:
                    self._spawn(self._quiet(actor.stop()))
            case ins.RestartWorkers(workers=workers):
                self._spawn(self._restart(workers))
            case ins.AcquireCapacity() | ins.ReleaseCapacity():
                request = {"instruction": type(instruction).__name__, **vars(instruction)}
                self.capacity_requests.append(request)
                logger.info("elastic_llm: %s (published on the Dask event topic %r)", instruction, CAPACITY_TOPIC)
                self._spawn(self._quiet(self.client.log_event(CAPACITY_TOPIC, request)))
            case _:
                self._spawn(self._answer(instruction))

    async def close(self) -> None:
        """Cancel every task under way."""
        if self._wake is not None:
            self._wake.cancel()
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ operations
    async def _answer(self, instruction: Any) -> None:
        """Run the operation under its deadline; report its outcome event (or its failure)."""
        handler: Callable[[Any], Awaitable[ev.Event]] = getattr(self, f"_do_{type(instruction).__name__}")
        began = time.time()
        try:
            outcome = await asyncio.wait_for(handler(instruction), max(0.1, instruction.deadline - time.time()))
            logger.debug("elastic_llm: %s %d took %.2f s", type(instruction).__name__, instruction.op,
                         time.time() - began)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the calls is the operation's failure
            logger.warning("elastic_llm: %s %d failed: %s: %s", type(instruction).__name__, instruction.op,
                           type(exc).__name__, exc)
            outcome = ev.OperationFailed(instruction.op, f"{type(exc).__name__}: {exc}")
        self.report(outcome)

    async def _do_DescribeModel(self, instruction: ins.DescribeModel) -> ev.Event:
        spec = await self.client.submit(model_spec_of, self.options.model, pure=False)
        return ev.ModelDescribed(instruction.op, spec)

    async def _do_StartReplica(self, instruction: ins.StartReplica) -> ev.Event:
        sharded, peer = bool(instruction.shards), instruction.weights_from
        peers = await self._shard_sources(peer, instruction.replica_id) if sharded and peer else ()
        deferred = (peer is not None and not sharded) or not instruction.build
        future = self.client.submit(
            ReplicaActor, instruction.replica_id, self.options, instruction.shards, instruction.parallel, deferred,
            peers, actor=True, workers=[instruction.leader], allow_other_workers=False, pure=False,
            key=f"elastic-llm-replica-{instruction.replica_id}")
        self._futures[instruction.replica_id] = future
        actor = self.actors[instruction.replica_id] = bound_actor(await future, self.client)
        if peer is not None and not sharded:
            await self._weights_from(peer, instruction.replica_id, actor)
        if not instruction.build:
            return ev.ReplicaCreated(instruction.op)
        if deferred:
            await actor.build()
        return ev.ReplicaReady(instruction.op, await actor.wait_ready())

    async def _weights_from(self, peer: str, replica: str, actor: Any) -> None:
        """The ready `peer` pushes its weights to the deferred `actor` (if that fails, the new
        replica reads the checkpoint when it builds)."""
        try:
            await self.actors[peer].push_weights(actor)
        except Exception as exc:  # noqa: BLE001 - the peer died or left: the checkpoint is still there
            logger.warning("weights %s -> %s failed (%s): it reads the checkpoint", peer, replica, exc)

    async def _shard_sources(self, peer: str, replica: str) -> tuple[PeerShard, ...]:
        """The ready sharded `peer`'s shards, for `replica` to pull weight slices from (none if
        that fails: the new replica then reads the checkpoint for everything)."""
        try:
            return tuple(await self.actors[peer].shard_sources())
        except Exception as exc:  # noqa: BLE001 - the peer died or left: the checkpoint is still there
            logger.warning("weights %s -> %s: no shard sources (%s: %s): it reads the checkpoint",
                           peer, replica, type(exc).__name__, exc)
            return ()

    async def _do_BuildReplica(self, instruction: ins.BuildReplica) -> ev.Event:
        actor = self.actors[instruction.replica_id]
        await actor.build()
        return ev.ReplicaReady(instruction.op, await actor.wait_ready())

    async def _do_ReloadReplica(self, instruction: ins.ReloadReplica) -> ev.Event:
        actor = self.actors[instruction.replica_id]
        await actor.reload()
        return ev.ReplicaReady(instruction.op, await actor.wait_ready())

    async def _do_AssignRequests(self, instruction: ins.AssignRequests) -> ev.Event:
        states = [RequestState(w.request_id, w.prompt_token_ids, w.committed, w.params)
                  for w in instruction.requests]
        await self.actors[instruction.replica_id].start_requests(states)
        return ev.RequestsAssigned(instruction.op)

    async def _do_MigrateRequests(self, instruction: ins.MigrateRequests) -> ev.Event:
        target, source = self.actors[instruction.target], self.actors[instruction.source]
        # the target's single actor thread waits on the source: never past the source's end
        until = min(instruction.deadline, instruction.source_deadline + ins.PULL_GRACE_S)
        moved = await target.pull_from(source, list(instruction.request_ids), True, max(1.0, until - time.time()))
        return ev.TransferDone(instruction.op, tuple(moved))

    async def _do_HandOver(self, instruction: ins.HandOver) -> ev.Event:
        source, successor = self.actors[instruction.source], self.actors[instruction.successor]
        moved = await source.hand_over(successor, list(instruction.request_ids))
        return ev.TransferDone(instruction.op, tuple(moved))

    async def _do_RetireReplica(self, instruction: ins.RetireReplica) -> ev.Event:
        actor = self.actors.pop(instruction.replica_id, None)
        self._futures.pop(instruction.replica_id, None)
        if actor is not None:
            await self._quiet(actor.stop())
        return ev.ReplicaStopped(instruction.op)

    async def _do_Reshard(self, instruction: ins.Reshard) -> ev.Event:
        summary = await self.actors[instruction.replica_id].reshard(
            instruction.parallel, list(instruction.workers), use_mapper=instruction.use_mapper,
            progressive=instruction.progressive)
        return ev.ReshardDone(instruction.op, summary)

    async def _restart(self, workers: tuple[str, ...]) -> None:
        """Fence `workers` by restarting their processes (their nannies start fresh ones)."""
        try:
            await self.client.restart_workers(list(workers), raise_for_error=False)
        except Exception as exc:  # noqa: BLE001 - e.g. no nanny: they stay out of use
            logger.warning("elastic_llm: could not restart %s (%s): they stay out of use", workers, exc)
        else:
            logger.info("elastic_llm: restarted %s (fenced after a broken replica)", workers)

    # ------------------------------------------------------------------ utilities
    def _tick_at(self, at: float) -> None:
        """Report a `Tick` at `at` (one timer: the earliest asked for)."""
        if at >= self._wake_at and self._wake is not None:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake_at = at

        def fire() -> None:
            self._wake, self._wake_at = None, float("inf")
            self.report(ev.Tick())

        self._wake = asyncio.get_running_loop().call_later(max(0.0, at - time.time()), fire)

    @staticmethod
    async def _quiet(awaitable: Awaitable[Any]) -> None:
        """Fire and forget: a call to a replica whose worker is gone raises, and that is fine. It
        may also never answer (Dask's actor future is never set when the call's connection breaks
        and the actor's own future is cancelled): the wait is bounded, so no task is left behind."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(awaitable, QUIET_CALL_TIMEOUT_S)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("elastic_llm: background task failed", exc_info=finished.exception())

        task.add_done_callback(done)
