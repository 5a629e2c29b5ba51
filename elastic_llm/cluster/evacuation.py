"""The controller's stateful recovery on a preemption notice: how long a doomed replica keeps
decoding (SpotServe's grace-period arrangement) and moving its requests, KV included, to the
surviving replicas (actor to actor, worker to worker); what cannot move in time recomputes.

`Evacuation` is a mixin of `ElasticController` (it uses the controller's table, replicas, loop
counters and helpers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from elastic_llm.cluster.replicas import NoticeRecord, ReplicaHandle, ReplicaState
from elastic_llm.cluster.request_table import RequestStatus
from elastic_llm.planning.arrangement import (
    Arrangement,
    GracePeriod,
    MigrationTimeModel,
    RunningBatch,
    RunningRequest,
    arrange,
)

if TYPE_CHECKING:
    from elastic_llm.cluster.controller import ElasticController

logger = logging.getLogger(__name__)


class Evacuation:
    """Mixin of `ElasticController`: moving a noticed replica's requests before its deadline."""

    async def _evacuate(self: ElasticController, source: ReplicaHandle, deadline: float,
                        worker: str | None = None) -> None:
        """Decode as long as the grace period allows (SpotServe's arrangement), then move the
        requests whose KV fits the remaining window; the others recompute elsewhere. `worker`:
        the noticed worker (default the replica's leader)."""
        received = time.time()
        moved = 0
        recompute: set[str] = set()
        if self.policy == "spotserve":
            plan = self._arrangement(source, received, deadline)
            recompute = set(plan.recompute)
            await asyncio.sleep(max(0.0, plan.migration_start - time.time()))
        else:
            await asyncio.sleep(max(0.0, deadline - self.migration_margin_s - time.time()))
        targets = [h for h in self.replicas.values() if h.state is ReplicaState.READY and h is not source]
        records = self.table.unfinished(source.replica_id)
        if self.policy != "spotserve" or not targets:
            for record in records:
                self._requeue(record, lost_kv=True, restart=self.policy != "spotserve")
        else:
            for record in (r for r in records if r.request_id in recompute):
                self._requeue(record, lost_kv=True)
            keep = [r.request_id for r in records if r.request_id not in recompute]
            groups = np.array_split(np.array(keep, dtype=object), len(targets))
            for target, ids in zip(targets, groups, strict=False):
                if len(ids):
                    moved += await self._migrate(source, target, [str(i) for i in ids])
        self.notices.append(NoticeRecord(worker or source.worker, deadline, received, moved, len(recompute)))
        self._wake()

    def _arrangement(self: ElasticController, source: ReplicaHandle, now: float, deadline: float) -> Arrangement:
        """How long `source` keeps decoding and whose KV migrates (planning core's `arrange`)."""
        step = self._loops.step_seconds(source.replica_id)
        requests = [RunningRequest(
            r.request_id, 0, len(r.prompt_token_ids) + len(r.committed),
            max(0, r.params.max_new_tokens - len(r.committed)), source.kv_bytes_per_token,
            (len(r.prompt_token_ids) + len(r.committed)) * self.prefill_seconds_per_token)
            for r in self.table.unfinished(source.replica_id)]
        migration = MigrationTimeModel(self.migration_margin_s, self.kv_bandwidth)
        return arrange(now, GracePeriod(now, max(0.0, deadline - now)), [RunningBatch(0, step, now)],
                       requests, migration)

    async def _migrate(self: ElasticController, source: ReplicaHandle, target: ReplicaHandle, request_ids: list[str]) -> int:
        """Target pulls the requests (KV included) from source; on failure they recompute.

        The table names the target as owner *before* the pull: the target may commit before the
        pull's reply arrives, and its first commit (the whole output so far) must not be refused.
        """
        for request_id in request_ids:
            record = self.table.get(request_id)
            if record.status is RequestStatus.RUNNING and record.replica == source.replica_id:
                self.table.assign(request_id, target.replica_id)
        try:
            received = await target.actor.pull_from(source.actor, request_ids, True)
        except Exception as exc:  # noqa: BLE001 - a side died mid-migration: fall back to recompute
            logger.warning("migration %s -> %s failed (%s): requests recompute", source.replica_id,
                           target.replica_id, exc)
            for request_id in request_ids:
                self._requeue(self.table.get(request_id), lost_kv=True)
            return 0
        pulled = [request_id for request_id, _ in received]
        self.kv_bytes_migrated += sum(nbytes for _, nbytes in received)
        for request_id in pulled:
            record = self.table.get(request_id)
            if record.status is RequestStatus.RUNNING:
                self.table.assign(request_id, target.replica_id)
        for request_id in set(request_ids) - set(pulled):  # finished meanwhile, or never arrived
            record = self.table.get(request_id)
            if record.status is RequestStatus.RUNNING and record.replica == target.replica_id:
                self._requeue(record, lost_kv=True)
        return len(pulled)
