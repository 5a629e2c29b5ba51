"""The controller's handling of sharded replicas: shapes from the planning core, placement, growth,
resharding on a shard worker's notice, and the fixed-shape baselines.

`ShardedControl` is a mixin of `ElasticController` (it uses the controller's table, replicas,
client and helpers). With ``ReplicaOptions.parallel="auto"`` every shape comes from
`ShapePlanner` (the planning core's optimizer over the usable workers, their memory budget and the
observed arrival rate):

- **placement**: D replicas of the chosen (P, M), each on P*M free workers;
- **growth** (policy ``spotserve``): when workers join, a replica whose shape differs from what the
  optimizer now chooses is switched to it in place, at a token boundary, KV kept, only the missing
  slices moved (KM mapping + migration plan inside `DaskShardedExecutor.reconfigure`);
- **notice** for the leader (``spotserve``): the replica moves to a successor built on the other
  shard workers plus free ones, which takes every request with its KV before the old one stops;
- **notice** for a shard worker (``spotserve``): the replica switches to the optimizer's shape for
  its remaining workers plus free ones (with an explicit ``parallel``: the most positions they
  hold, `fit_shape`), the leaving worker handing over its slices and KV first; if the model fits
  no shape there, its requests move (with KV) to other replicas.

Under ``reroute`` and ``reparallelize`` the first chosen shape is kept for good (the paper's
baselines keep P and M): a replica that loses a worker is dissolved and its requests restart on
the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from elastic_llm.cluster.instance import instance_info
from elastic_llm.cluster.replicas import NoticeRecord, ReplicaHandle, ReplicaState
from elastic_llm.cluster.shapes import ShapePlanner, cpu_profile, fit_shape, load_changed
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.errors import NoFeasibleConfigError
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import InstanceProfile

if TYPE_CHECKING:
    from elastic_llm.cluster.controller import ElasticController

logger = logging.getLogger(__name__)

#: Window (seconds) over which the arrival rate handed to the optimizer is measured.
RATE_WINDOW_S = 60.0
#: Seconds between checks of the arrival rate against the one the shapes were planned for.
LOAD_CHECK_S = 5.0


def model_spec_of(model: str) -> ModelSpec:
    """The `ModelSpec` of an embedded model name or checkpoint directory (runs on a worker)."""
    from pathlib import Path

    from elastic_llm.model.checkpoint import resolve_checkpoint
    from elastic_llm.model.loader import read_spec

    return read_spec(resolve_checkpoint(model), Path(os.fspath(model)).name)[1]


class ShardedControl:
    """Mixin of `ElasticController`: everything about sharded replicas' shapes and workers."""

    _fixed_shape: tuple[int, int] | None
    _planner: ShapePlanner | None
    _planned_rate: float | None
    load_replans: list[dict[str, float]]
    _placing: asyncio.Lock | None
    _start_seconds: float
    profile: str | os.PathLike[str] | InstanceProfile | None

    # ------------------------------------------------------------------ shapes
    def _usable_workers(self: ElasticController) -> list[str]:
        """Workers that are neither leaving nor suspect (held or free)."""
        return sorted(w for w in self.scheduler.workers if w not in self._leaving and w not in self._suspect)

    def _memory_budget(self: ElasticController) -> int:
        """Bytes one worker may hold: the replica option, else the smallest announced budget."""
        if self.replica_options.memory_budget_bytes is not None:
            return self.replica_options.memory_budget_bytes
        budgets = [instance_info(self.scheduler.workers[w]).memory_bytes for w in self._usable_workers()]
        return min(budgets) if budgets else 0

    def _arrival_rate(self: ElasticController) -> float:
        """Requests per second submitted over the last `RATE_WINDOW_S` seconds."""
        since = time.time() - RATE_WINDOW_S
        return sum(r.arrival >= since for r in self.table.records()) / RATE_WINDOW_S

    async def _shape_planner(self: ElasticController) -> ShapePlanner:
        if self._planner is None:
            assert self._client is not None
            spec = await self._client.submit(model_spec_of, self.model, pure=False)
            profile = self.profile
            if profile is None:
                profile = cpu_profile(self._memory_budget())
            elif not isinstance(profile, InstanceProfile):
                profile = MeasuredProfile.from_json(profile)
            if isinstance(profile, MeasuredProfile) and profile.model_name not in (None, spec.name):
                logger.warning("profile measured %s, not %s: planning with a CPU roofline instead",
                               profile.model_name, spec.name)
                profile = cpu_profile(self._memory_budget())
            self._planner = ShapePlanner(spec, profile, self.replica_options.max_batch_size)
        return self._planner

    async def _shape_for(self: ElasticController, workers: int,
                         current: tuple[int, int] | None = None) -> tuple[int, int] | None:
        """The (P, M) for `workers` workers; None when the model fits no shape on them."""
        if not self.replica_options.auto_parallel:
            return tuple(self.replica_options.parallel)  # type: ignore[return-value]
        if self._fixed_shape is not None:
            return self._fixed_shape
        if workers < 1:
            return None
        planner = await self._shape_planner()
        rate = self._arrival_rate()
        try:
            decision = planner.choose(workers, self._memory_budget(), rate, current)
        except NoFeasibleConfigError as exc:
            logger.info("no replica shape fits %d workers: %s", workers, exc)
            return None
        if self.policy != "spotserve":  # the baselines keep their first shape
            self._fixed_shape = decision.shape
        if current is None:  # a plan for the whole fleet: the rate it was made for
            self._planned_rate = rate
        return decision.shape

    async def _watch_load(self: ElasticController) -> None:
        """(spotserve, parallel="auto") Plan the fleet again when the arrival rate of the last
        minute has moved 2x or more from the one its shapes were planned for."""
        while True:
            await asyncio.sleep(LOAD_CHECK_S)
            rate = self._arrival_rate()
            if not load_changed(self._planned_rate, rate):
                continue
            logger.info("arrival rate %.3f/s, planned for %.3f/s: planning again", rate, self._planned_rate)
            self.load_replans.append({"time": time.time(), "planned_rate": self._planned_rate, "rate": rate})
            try:
                await self._place_sharded()
            except Exception:  # noqa: BLE001 - the next membership change or check tries again
                logger.exception("elastic_llm: re-planning for load failed")

    # ------------------------------------------------------------------ placement and growth
    async def _place_sharded(self: ElasticController) -> None:
        """Reshape replicas toward the optimizer's choice (spotserve), then place new ones on free
        workers, P*M at a time."""
        assert self._placing is not None
        async with self._placing:
            shape = await self._shape_for(len(self._usable_workers()))
            if shape is None:
                return
            if self.policy == "spotserve" and self.replica_options.auto_parallel:
                await self._grow(shape)
            size = shape[0] * shape[1]
            while len(free := self._free_workers()) >= size:
                if not await self._place_replica(free[0], tuple(free[:size]), shape):
                    break  # retried at the next membership change

    async def _grow(self: ElasticController, shape: tuple[int, int]) -> None:
        """Switch ready replicas of another shape to `shape` where their workers plus free ones
        hold it (a replica that grows keeps its KV; one that shrinks frees workers)."""
        size = shape[0] * shape[1]
        for handle in [h for h in self.replicas.values() if h.state is ReplicaState.READY and h.shards]:
            async with handle.switching:
                if (handle.parallel == shape or handle.noticed or handle.state is not ReplicaState.READY
                        or handle.replica_id not in self.replicas):
                    continue
                own = [w for w in handle.shards if w not in self._leaving]
                pool = own + [w for w in self._free_workers() if w not in own]
                if len(pool) < size or handle.worker in self._leaving:
                    continue
                chosen = _with_leader(handle.worker, pool[:size])
                handle.state = ReplicaState.DRAINING
                try:
                    await self._switch(handle, shape, chosen)
                except Exception as exc:  # noqa: BLE001 - it keeps its old shape only if it still runs
                    logger.warning("growing %s to %s failed: %s", handle.replica_id, shape, exc)
                    self._break(handle)
                    continue
                if handle.state is ReplicaState.DRAINING and not handle.noticed:
                    handle.state = ReplicaState.READY

    async def _switch(self: ElasticController, handle: ReplicaHandle, shape: tuple[int, int],
                      workers: list[str]) -> dict[str, Any]:
        """Reshard `handle` to `shape` on `workers` (token boundary, KV kept); the summary."""
        summary: dict[str, Any] = await handle.actor.reshard(shape, workers)
        handle.parallel = (int(summary["new"][0]), int(summary["new"][1]))
        handle.shards = tuple(summary["shards"])
        self.kv_bytes_migrated += int(summary["kv_bytes"])
        self.reshards.append({"replica": handle.replica_id, "old": summary["old"], "new": summary["new"],
                              "shards": list(handle.shards), "kv_bytes": int(summary["kv_bytes"]),
                              "weight_bytes": int(summary["weight_bytes"]),
                              "checkpoint_bytes": int(summary["checkpoint_bytes"]),
                              "seconds": float(summary["seconds"])})
        logger.info("replica %s resharded to %s on %s in %.2f s", handle.replica_id, handle.parallel,
                    handle.shards, summary["seconds"])
        return summary

    def _break(self: ElasticController, handle: ReplicaHandle) -> None:
        """The replica cannot go on: its requests recompute elsewhere, its workers are suspect."""
        handle.state = ReplicaState.LOST
        self._suspect.update(handle.workers)
        for record in self.table.unfinished(handle.replica_id):
            self._requeue(record, lost_kv=True)
        self.replicas.pop(handle.replica_id, None)
        self._spawn(self._stop(handle))
        self._wake()

    # ------------------------------------------------------------------ notices
    def _on_shard_notice(self: ElasticController, handle: ReplicaHandle, leaving: str, deadline: float) -> None:
        """A non-leader shard worker of `handle` got a notice."""
        if self.policy == "spotserve":
            self._spawn(self._reshard(handle, leaving, deadline))
        else:
            self._spawn(self._dissolve(handle, leaving, deadline))

    async def _reshard(self: ElasticController, handle: ReplicaHandle, leaving: str, deadline: float) -> None:
        """Switch the replica, at a token boundary, to the optimizer's shape for its remaining
        workers plus free ones; the leaving worker hands over its slices and KV first (stateful,
        nothing recomputed). If no shape fits there, its requests move to other replicas."""
        async with handle.switching:  # after a growth or another reshard under way
            if handle.noticed or handle.replica_id not in self.replicas:
                return  # its leader is leaving too: the handover excludes every leaving worker
            await self._reshard_now(handle, leaving, deadline)

    async def _reshard_now(self: ElasticController, handle: ReplicaHandle, leaving: str, deadline: float) -> None:
        received = time.time()
        workers = [w for w in handle.shards if w != leaving and w not in self._leaving]
        spares = [w for w in self._free_workers() if w not in workers]
        if self.replica_options.auto_parallel:
            shape = await self._shape_for(len(workers) + len(spares), handle.parallel)
        else:  # an explicit shape: keep the most positions the workers left can hold
            shape = fit_shape(handle.parallel, len(workers) + len(spares)) if workers else None
        if shape is None:
            await self._dissolve(handle, leaving, deadline)
            return
        chosen = _with_leader(handle.worker, (workers + spares)[: shape[0] * shape[1]])
        handle.state = ReplicaState.DRAINING  # no new requests while it switches
        moved = len(self.table.unfinished(handle.replica_id))
        try:
            await self._switch(handle, shape, chosen)
        except Exception as exc:  # noqa: BLE001 - the replica cannot go on: its requests recompute
            logger.warning("reshard of %s failed (%s): its requests recompute", handle.replica_id, exc)
            self._break(handle)
            self.notices.append(NoticeRecord(leaving, deadline, received, 0, moved))
            return
        if handle.state is ReplicaState.DRAINING and not handle.noticed:
            handle.state = ReplicaState.READY
        self.notices.append(NoticeRecord(leaving, deadline, received, moved, 0))
        self._wake()
        self._spawn(self._place_sharded())  # workers the new shape left free may form a replica

    async def _replace_leader(self: ElasticController, handle: ReplicaHandle, deadline: float) -> None:
        """The leader of a sharded replica got a notice. Its engine drives the shards, so the
        replica moves: a new replica (the optimizer's shape for the other shard workers plus free
        ones) is created without an engine, the old one hands it every request WITH its KV
        (worker to worker) and stops (freeing its workers), and the new one builds its engine
        there and resumes them: nothing recomputed. Its weights come from the checkpoint.
        Without workers for any shape, its requests go to other replicas (`_evacuate`)."""
        async with handle.switching:  # after a growth or reshard under way
            await self._replace_leader_now(handle, deadline)

    async def _replace_leader_now(self: ElasticController, handle: ReplicaHandle, deadline: float) -> None:
        received = time.time()
        pool = [w for w in handle.shards if w != handle.worker and w not in self._leaving]
        pool += [w for w in self._free_workers() if w not in pool]
        if self.replica_options.auto_parallel:
            shape = await self._shape_for(len(pool))
        else:
            shape = fit_shape(handle.parallel, len(pool)) if pool else None
        if shape is None:
            await self._evacuate(handle, deadline)
            return
        chosen = pool[: shape[0] * shape[1]]
        successor = ReplicaHandle(f"r{next(self._ids)}", chosen[0], shards=tuple(chosen), parallel=shape)
        try:
            await self._start_actor(successor, deferred=True)
        except Exception as exc:  # noqa: BLE001 - e.g. its worker died: fall back to other replicas
            logger.warning("successor of %s did not start (%s)", handle.replica_id, exc)
            self.replicas.pop(successor.replica_id, None)
            await self._evacuate(handle, deadline)
            return
        # keep decoding while the grace period allows, leaving time to rebuild the replica
        plan = self._arrangement(handle, received, deadline)
        await asyncio.sleep(max(0.0, plan.migration_start - self._start_seconds - time.time()))
        ids = [r.request_id for r in self.table.unfinished(handle.replica_id)]
        for request_id in ids:  # the successor owns them before the pull (see `_migrate`)
            self.table.assign(request_id, successor.replica_id)
        moved: list[tuple[str, int]] = []
        try:
            moved = await handle.actor.hand_over(successor.actor, ids)
            self.kv_bytes_migrated += sum(nbytes for _, nbytes in moved)
        except Exception as exc:  # noqa: BLE001 - the old leader died early: they recompute
            logger.warning("handover from %s failed (%s): its requests recompute", handle.replica_id, exc)
        self.replicas.pop(handle.replica_id, None)
        await self._stop(handle)
        taken = {request_id for request_id, _ in moved}
        for record in self.table.unfinished(successor.replica_id):
            if record.request_id not in taken:  # finished meanwhile, or lost with the old leader
                self._requeue(record, lost_kv=True)
        self.notices.append(NoticeRecord(handle.worker, deadline, received, len(taken), 0))
        try:
            await successor.actor.build()
            await self._until_ready(successor)
        except Exception as exc:  # noqa: BLE001 - the new replica failed: its requests recompute
            logger.warning("successor %s failed to build (%s)", successor.replica_id, exc)
            self._break(successor)
            return
        self.reshards.append({"replica": successor.replica_id, "from_replica": handle.replica_id,
                              "old": list(handle.parallel), "new": list(shape), "shards": chosen,
                              "kv_bytes": sum(nbytes for _, nbytes in moved), "leader_moved": True})
        self._spawn(self._place_sharded())

    async def _dissolve(self: ElasticController, handle: ReplicaHandle, leaving: str, deadline: float) -> None:
        """Evacuate the replica's requests before `deadline` (with KV under spotserve, restarted
        under the baselines), stop it, and let its surviving workers form new replicas."""
        handle.state = ReplicaState.DRAINING
        await self._evacuate(handle, deadline, worker=leaving)
        self.replicas.pop(handle.replica_id, None)
        await self._stop(handle)
        self._wake()
        self._spawn(self._place_sharded())


def _with_leader(leader: str, workers: list[str]) -> list[str]:
    """`workers` with the leader among them (it drives the shards, so it stays)."""
    return list(workers) if leader in workers else [leader, *workers[:-1]]
