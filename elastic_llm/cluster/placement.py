"""The controller's replica placement and request dispatch.

- **Placement.** A replica is started on a worker as a `ReplicaActor`. Under `spotserve` a new
  whole-model replica is created deferred, and a ready peer pushes it its weights worker to worker
  before it builds; otherwise it reads the checkpoint.
- **Dispatch.** Queued requests go to ready replicas: the least loaded by outstanding tokens, or one
  whose prefix cache holds the request's start when the extra queued work there is no more than
  the prefill it saves (`PrefixAffinity`).

`Placement` is a mixin of `ElasticController` (it uses the controller's table, replicas and helpers).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from elastic_llm.cluster.replica_actor import ReplicaActor
from elastic_llm.cluster.replicas import ReplicaHandle, ReplicaState
from elastic_llm.engine.sequence import RequestState

if TYPE_CHECKING:
    from elastic_llm.cluster.controller import ElasticController

logger = logging.getLogger(__name__)


class Placement:
    """Mixin of `ElasticController`: starting replicas and handing them queued requests."""

    async def _place_replica(self: ElasticController, worker: str, shards: tuple[str, ...] = (),
                             parallel: tuple[int, int] = (1, 1)) -> bool:
        """Start a replica led by `worker` (sharded `parallel` over `shards` when given); whether
        it started."""
        handle = ReplicaHandle(f"r{next(self._ids)}", worker, shards=shards, parallel=parallel)
        peer = self._weight_peer() if not shards and self.policy == "spotserve" else None
        try:
            await self._start_actor(handle, deferred=peer is not None)
            if peer is not None:
                await self._weights_from(peer, handle)
            await self._until_ready(handle)
        except Exception as exc:  # noqa: BLE001 - the worker may die while the replica starts
            logger.warning("replica %s on %s did not start: %s", handle.replica_id, worker, exc)
            self.replicas.pop(handle.replica_id, None)
            return False
        return True

    def _weight_peer(self: ElasticController) -> ReplicaHandle | None:
        """A ready whole-model replica not about to leave (least loaded first) to send a new
        replica its weights; None: the new one reads the checkpoint."""
        ready = [h for h in self.replicas.values() if h.state is ReplicaState.READY and not h.shards
                 and h.actor is not None and h.worker not in self._leaving]
        return min(ready, key=lambda h: self._outstanding(h.replica_id), default=None)

    async def _weights_from(self: ElasticController, peer: ReplicaHandle, handle: ReplicaHandle) -> None:
        """`peer` pushes its weights to the deferred replica `handle`, which then builds (from the
        checkpoint if the push failed)."""
        try:
            self.weight_bytes_from_peers += await peer.actor.push_weights(handle.actor)
        except Exception as exc:  # noqa: BLE001 - the peer died or left: the checkpoint is still there
            logger.warning("weights %s -> %s failed (%s): it reads the checkpoint", peer.replica_id,
                           handle.replica_id, exc)
        await handle.actor.build()

    async def _start_actor(self: ElasticController, handle: ReplicaHandle, deferred: bool = False) -> None:
        """Register `handle` and create its `ReplicaActor` on its leader worker."""
        self.replicas[handle.replica_id] = handle
        assert self._client is not None
        handle.future = self._client.submit(
            ReplicaActor, handle.replica_id, self.replica_options, handle.shards, handle.parallel, deferred,
            actor=True, workers=[handle.worker], allow_other_workers=False, pure=False,
            key=f"elastic-llm-replica-{handle.replica_id}")
        handle.actor = await handle.future

    async def _until_ready(self: ElasticController, handle: ReplicaHandle) -> None:
        """Wait for the replica's engine, then let it take requests."""
        info = await handle.actor.wait_ready()
        self._start_seconds = handle.start_seconds = time.time() - handle.started_at
        handle.kv_bytes_per_token = int(info["kv_bytes_per_token"])
        handle.weights = str(info.get("weights", "checkpoint"))
        if handle.state is ReplicaState.STARTING:
            handle.state = ReplicaState.READY
        self._wake()

    async def _dispatch(self: ElasticController) -> None:
        ready = [h for h in self.replicas.values() if h.state is ReplicaState.READY]
        queued = self.table.queued()
        if not ready or not queued:
            return
        load = {h.replica_id: self._outstanding(h.replica_id) for h in ready}
        self.affinity.retain(self.replicas)
        batches: dict[str, list[RequestState]] = {}
        for record in queued:
            known = [*record.prompt_token_ids, *record.committed]
            target = self.affinity.choose(known, load)  # least loaded, or one holding its prefix
            self.affinity.observe(target, record.prompt_token_ids)
            load[target] += len(record.prompt_token_ids) + record.params.max_new_tokens
            self.table.assign(record.request_id, target)
            batches.setdefault(target, []).append(RequestState(
                record.request_id, record.prompt_token_ids, tuple(record.committed), record.params))
        for replica_id, states in batches.items():
            self._spawn(self._hand_over(self.replicas[replica_id], states))

    async def _hand_over(self: ElasticController, handle: ReplicaHandle, states: list[RequestState]) -> None:
        try:
            await handle.actor.start_requests(states)
        except Exception as exc:  # noqa: BLE001 - replica died: the requests go back to the queue
            logger.warning("hand-over to %s failed: %s", handle.replica_id, exc)
            for state in states:
                self._requeue(self.table.get(state.request_id), lost_kv=False)
            self._wake()

    def _outstanding(self: ElasticController, replica_id: str) -> int:
        return sum(len(r.prompt_token_ids) + r.params.max_new_tokens - len(r.committed)
                   for r in self.table.unfinished(replica_id))
