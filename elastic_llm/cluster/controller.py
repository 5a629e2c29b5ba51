"""`ElasticController`: the scheduler plugin that serves requests on a churning fleet of workers.

It keeps the request table (committed tokens are the source of truth), one `ReplicaActor` per
worker (or, with `ReplicaOptions.parallel` above (1, 1), one sharded replica per P*M workers whose
shard workers are resharded to another (P, M) when one of them announces its preemption), and
reacts to membership: a new worker gets a replica; a worker that announced its
preemption stops taking requests and, before its deadline, hands its running requests WITH their
KV cache to the surviving replicas (actor to actor, worker to worker: stateful recovery, nothing
recomputed); a worker that vanished without notice loses its KV, and its requests resume elsewhere
from prompt + committed tokens (recompute).

Clients talk to it through scheduler handlers (`elastic_llm_submit`, `_cancel`, `_poll`, `_status`,
`_preemption_notice`); replicas commit tokens through the stream handler `elastic_llm_commit`, one
message per replica per iteration. Every handler and background task logs its exceptions and keeps
serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin

from elastic_llm.cluster import metrics
from elastic_llm.cluster.contracts import PreemptionNotice
from elastic_llm.cluster.cost import CostLedger
from elastic_llm.cluster.evacuation import Evacuation
from elastic_llm.cluster.instance import fleet_info, instance_info
from elastic_llm.cluster.notices import NoticeBoard
from elastic_llm.cluster.placement import Placement
from elastic_llm.cluster.replica_actor import COMMIT_OP, ReplicaOptions
from elastic_llm.cluster.replicas import LoopStats, NoticeRecord, ReplicaHandle, ReplicaState
from elastic_llm.cluster.request_table import RequestRecord, RequestStatus, RequestTable
from elastic_llm.cluster.sharded_control import ShardedControl
from elastic_llm.planning.profiles import InstanceProfile
from elastic_llm.sampling import SamplingParams
from elastic_llm.scheduling.affinity import PrefixAffinity

logger = logging.getLogger(__name__)

PLUGIN_NAME = "elastic_llm"
POLICIES = ("spotserve", "reroute", "reparallelize")


class ElasticController(Evacuation, Placement, ShardedControl, SchedulerPlugin):
    """Controller of elastic LLM serving on the Dask scheduler (register with `Client.register_plugin`).

    Args:
        model: embedded model name or checkpoint directory (every worker must see the same path).
        policy: "spotserve" (stateful migration on notice), "reroute" (requests of a lost or
            preempted replica restart elsewhere from scratch) or "reparallelize" (any membership
            change restarts every replica and every request).
        replica: engine settings of each replica.
        migration_margin_s: fixed part of a migration's time estimate (seconds): pausing, the
            actor calls, resuming; the KV part is its bytes over `kv_bandwidth`.
        kv_bandwidth: bytes/s at which KV moves between workers (for the grace-period arrangement).
        prefill_seconds_per_token: estimate of recompute cost per cached token (arrangement).
        on_demand_price_per_hour: price of the on-demand counterfactual in the cost report.
        profile: timings the planning core chooses sharded replicas' shapes with (with
            ``ReplicaOptions.parallel="auto"``): a JSON file of ``elastic-llm profile``, an
            `InstanceProfile`, or None for a CPU roofline.
    """

    name = PLUGIN_NAME

    def __init__(self, model: str, policy: str = "spotserve", replica: ReplicaOptions | None = None,
                 migration_margin_s: float = 2.0, kv_bandwidth: float = 2e8,
                 prefill_seconds_per_token: float = 2e-3, on_demand_price_per_hour: float = 3.912,
                 profile: str | os.PathLike[str] | InstanceProfile | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        self.model = model
        self.policy = policy
        self.replica_options = replica or ReplicaOptions(model=model)
        self.migration_margin_s = migration_margin_s
        self.kv_bandwidth = kv_bandwidth
        self.prefill_seconds_per_token = prefill_seconds_per_token
        self.table = RequestTable()
        self.replicas: dict[str, ReplicaHandle] = {}
        self.notices: list[NoticeRecord] = []
        self.ledger = CostLedger()
        self._loops = LoopStats()
        self.kv_bytes_migrated = 0  #: KV bytes moved between replicas by stateful migration
        self.weight_bytes_from_peers = 0  #: weight bytes new replicas took from peers (not the checkpoint)
        self.affinity = PrefixAffinity()  #: which prompt prefixes each replica's prefix cache has seen
        self.on_demand_price = on_demand_price_per_hour
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._client: Client | None = None
        self._wakeup: asyncio.Event | None = None
        self._client_events: dict[str, asyncio.Event] = {}
        self._started_at = time.time()
        self._unregister_metrics: Callable[[], None] | None = None
        self._leaving: set[str] = set()  # workers that announced their preemption
        self._suspect: set[str] = set()  # workers of a sharded replica that broke (shards may linger)
        self.profile = profile
        self._planner = None  # ShapePlanner, made when first needed (the model spec comes from a worker)
        self._fixed_shape = None  # the baselines' shape, once chosen
        self._planned_rate = None  # arrival rate (requests/s) the sharded fleet's shapes were planned for
        self.load_replans: list[dict[str, float]] = []  #: plans made again because the load moved
        self._placing = None  # asyncio.Lock serialising sharded placement (made in start)
        self.reshards: list[dict[str, Any]] = []  #: every switch of a sharded replica's shape
        self._start_seconds = 5.0  # how long a replica took to start, last time (seconds)

    # ------------------------------------------------------------------ plugin hooks
    async def start(self, scheduler: Any) -> None:
        """Install handlers, connect an internal client, and place replicas on current workers."""
        self.scheduler = scheduler
        scheduler.handlers.update({
            "elastic_llm_submit": self._handler(self.submit),
            "elastic_llm_cancel": self._handler(self.cancel),
            "elastic_llm_poll": self.poll,
            "elastic_llm_status": self._handler(self.status),
        })
        scheduler.stream_handlers[COMMIT_OP] = self.on_commit
        self._unregister_metrics = metrics.register(self.status)
        self._wakeup = asyncio.Event()
        self._placing = asyncio.Lock()
        with contextlib.suppress(LookupError):  # notices arrive through the NoticeBoard plugin
            NoticeBoard.of(scheduler).subscribe(self.on_notice)
        for address, info in fleet_info(scheduler).items():
            self.ledger.join(address, info.market, info.price_per_hour, time.time())
        self._client = await Client(scheduler.address, asynchronous=True, name="elastic-llm-controller")
        if self.replica_options.sharded:
            self._spawn(self._place_sharded())
            if self.replica_options.auto_parallel and self.policy == "spotserve":
                self._spawn(self._watch_load())
        else:
            for address in list(scheduler.workers):
                self._spawn(self._place_replica(address))
        self._spawn(self._dispatch_loop())

    async def close(self) -> None:
        """Stop background work, the metrics collector and the internal client."""
        if self._unregister_metrics is not None:
            self._unregister_metrics()
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()

    def add_worker(self, scheduler: Any, worker: str) -> None:
        """A worker joined: place a replica on it (restart all under reparallelize)."""
        info = instance_info(scheduler.workers[worker])
        self.ledger.join(worker, info.market, info.price_per_hour, time.time())
        if self.policy == "reparallelize":
            self._spawn(self._restart_everything())
        self._spawn(self._place_sharded() if self.replica_options.sharded else self._place_replica(worker))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        """A worker left: its replica's requests resume elsewhere (recompute unless already moved)."""
        with contextlib.suppress(KeyError, ValueError):
            self.ledger.leave(worker, time.time())
        self._leaving.discard(worker)
        for handle in [h for h in self.replicas.values() if worker in h.workers]:
            handle.state = ReplicaState.LOST
            if handle.worker != worker:  # a shard died without notice: the leader's engine failed
                self._suspect.update(handle.workers)
                if handle.actor is not None:
                    self._spawn(self._stop(handle))
            lost = self.table.unfinished(handle.replica_id)
            for record in lost:
                self._requeue(record, lost_kv=True, restart=self.policy != "spotserve")
            if lost:
                logger.warning("replica %s on %s lost %d requests: they resume from committed tokens",
                               handle.replica_id, worker, len(lost))
            del self.replicas[handle.replica_id]
        if self.policy == "reparallelize":
            self._spawn(self._restart_everything())
        elif self.replica_options.sharded:
            self._spawn(self._place_sharded())
        self._wake()

    def remove_client(self, scheduler: Any, client: str) -> None:
        """A client disconnected: cancel its unfinished requests."""
        ids = self.table.forget_client(client)
        if ids:
            self.cancel(ids)
        self._client_events.pop(client, None)

    def valid_workers_downscaling(self, scheduler: Any, workers: list[Any]) -> list[Any]:
        """Workers that hold no replica may be retired (actors cannot be moved by Dask)."""
        held = {w for h in self.replicas.values() if h.state is not ReplicaState.LOST for w in h.workers}
        return [ws for ws in workers if ws.address not in held]

    # ------------------------------------------------------------------ client handlers
    def submit(self, client: str, requests: list[dict[str, Any]]) -> list[str]:
        """Accept requests: [{request_id, prompt_token_ids, params}] (validated by the client)."""
        now = time.time()
        accepted = []
        for item in requests:
            params = SamplingParams(**item["params"])
            record = RequestRecord(item["request_id"], client, tuple(item["prompt_token_ids"]), params, now)
            self.table.add(record)
            accepted.append(record.request_id)
        self._client_events.setdefault(client, asyncio.Event())
        self._wake()
        return accepted

    def cancel(self, request_ids: list[str]) -> int:
        """Abort requests wherever they are; returns how many were still running."""
        cancelled = 0
        by_replica: dict[str, list[str]] = {}
        for request_id in request_ids:
            if request_id not in self.table:
                continue
            record = self.table.get(request_id)
            replica = record.replica
            if self.table.finish(request_id, "abort", "", time.time()):
                cancelled += 1
                if replica is not None:
                    by_replica.setdefault(replica, []).append(request_id)
                self._notify(record.client)
        for replica_id, ids in by_replica.items():
            handle = self.replicas.get(replica_id)
            if handle is not None and handle.actor is not None:
                self._spawn(self._call(handle.actor.cancel(ids)))
        return cancelled

    async def poll(self, client: str, cursor: int, timeout: float = 1.0) -> list[dict[str, Any]]:
        """Events of `client`'s requests from `cursor` on; waits up to `timeout` s for the first."""
        events = self.table.events_since(client, cursor)
        if not events:
            event = self._client_events.setdefault(client, asyncio.Event())
            event.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
            events = self.table.events_since(client, cursor)
        return [e.to_wire() for e in events]

    def status(self) -> dict[str, Any]:
        """Deployment, per-replica load, queue, latency and counters."""
        finished = [r for r in self.table.records() if r.status is RequestStatus.FINISHED
                    and r.finish_time is not None]
        latencies = [r.finish_time - r.arrival for r in finished]  # type: ignore[operator]
        tokens = sum(len(r.committed) for r in finished)
        return {
            "policy": self.policy,
            "replicas": [{"replica": h.replica_id, "worker": h.worker, "state": h.state.value,
                          "requests": len(self.table.unfinished(h.replica_id)),
                          "parallel": list(h.parallel), "shards": list(h.shards), "weights": h.weights,
                          "start_seconds": h.start_seconds,
                          "scheduling": self._loops.scheduling(h.replica_id).to_dict()}
                         for h in self.replicas.values()],
            "queued": len(self.table.queued()),
            "running": len(self.table.unfinished()) - len(self.table.queued()),
            "finished": len(finished),
            "latency_mean_s": float(np.mean(latencies)) if latencies else None,
            "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
            "tokens_recomputed": sum(r.tokens_recomputed for r in self.table.records()),
            "restarts": sum(r.restarts for r in self.table.records()),
            "requests_restarted": sum(r.restarts > 0 for r in self.table.records()),
            "kv_bytes_migrated": self.kv_bytes_migrated,
            "weight_bytes_from_peers": self.weight_bytes_from_peers,
            "tokens_committed": sum(len(r.committed) for r in self.table.records()),
            "notices": [asdict(n) for n in self.notices],
            "reshards": list(self.reshards),
            "load_replans": list(self.load_replans),
            "cost": self._cost(tokens),
            "controller_overhead": self._loops.overhead(),
            "prefix_tokens_reused": self._loops.prefix_tokens_reused(),
        }

    def _cost(self, tokens: int) -> dict[str, Any]:
        report = self.ledger.report(time.time(), on_demand_price_per_hour=self.on_demand_price, tokens=tokens)
        return {"spot_usd": report.spot_usd, "on_demand_usd": report.on_demand_usd,
                "spot_instance_seconds": report.spot_instance_seconds,
                "on_demand_instance_seconds": report.on_demand_instance_seconds,
                "on_demand_only_usd": report.on_demand_only_usd, "usd_per_1k_tokens": report.usd_per_1k_tokens,
                "on_demand_only_usd_per_1k_tokens": report.on_demand_only_usd_per_1k_tokens,
                "savings_vs_on_demand": report.savings_vs_on_demand}

    def on_notice(self, notice: PreemptionNotice) -> None:
        """A preemption notice (from the NoticeBoard): evacuate the worker's replicas in time."""
        self._leaving.add(notice.worker)
        for handle in [h for h in self.replicas.values() if notice.worker in h.shards and not h.noticed
                       and h.worker != notice.worker and h.state is not ReplicaState.LOST]:
            self._on_shard_notice(handle, notice.worker, notice.deadline)  # waits for a switch under way
        for handle in [h for h in self.replicas.values() if h.worker == notice.worker]:
            if not handle.noticed:
                handle.noticed = True
                handle.state = ReplicaState.DRAINING
                if handle.shards and self.policy == "spotserve":
                    self._spawn(self._replace_leader(handle, notice.deadline))
                else:
                    self._spawn(self._evacuate(handle, notice.deadline))

    # ------------------------------------------------------------------ replica commits
    def on_commit(self, worker: str | None = None, replica: str = "", tokens: list[Any] | None = None,
                  finished: list[Any] | None = None, failed: list[Any] | None = None,
                  loop: list[float] | None = None, scheduling: dict[str, Any] | None = None,
                  **_: Any) -> None:
        """One replica's iteration: new tokens, finished and failed requests, loop counters,
        preemption and swap counters ("scheduling")."""
        try:
            if loop is not None:
                self._loops.record(replica, loop)
            if scheduling is not None:
                self._loops.record_scheduling(replica, scheduling)
            now = time.time()
            touched = set()
            for request_id, start, token_ids in tokens or ():
                if self._owned_by(request_id, replica) and self.table.commit(request_id, start, token_ids, now):
                    touched.add(request_id)
            for request_id, reason, text, *complete in finished or ():
                # A finish carrying the whole output is authoritative from whichever replica ran
                # the request to its end (outputs are deterministic), e.g. one it was just moved from.
                if complete and request_id in self.table:
                    self.table.commit(request_id, 0, complete[0], now)
                elif not self._owned_by(request_id, replica):
                    continue
                if self.table.finish(request_id, reason, text, now):
                    touched.add(request_id)
                    record = self.table.get(request_id)  # its replica now caches prompt and answer
                    self.affinity.observe(replica, [*record.prompt_token_ids, *record.committed])
            for request_id, error in failed or ():
                if self._owned_by(request_id, replica) and self.table.fail(request_id, error, now):
                    touched.add(request_id)
            for client in {self.table.get(r).client for r in touched}:
                self._notify(client)
            if finished or failed:
                self._wake()
        except Exception:  # noqa: BLE001 - a bad message must not break the scheduler's stream
            logger.exception("elastic_llm: commit from %s failed", replica)

    def _owned_by(self, request_id: str, replica: str) -> bool:
        """Commits count only from the replica the table says runs the request."""
        return request_id in self.table and self.table.get(request_id).replica == replica

    # ------------------------------------------------------------------ background work
    def _free_workers(self) -> list[str]:
        """Workers holding nothing, not leaving and not suspect, in a stable order."""
        held = {w for h in self.replicas.values() for w in h.workers}
        return sorted(w for w in self.scheduler.workers
                      if w not in held and w not in self._leaving and w not in self._suspect)

    async def _dispatch_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), 0.5)
            self._wakeup.clear()
            try:
                await self._dispatch()
            except Exception:  # noqa: BLE001
                logger.exception("elastic_llm: dispatch failed")

    async def _restart_everything(self) -> None:
        """Reparallelize baseline: every replica reloads from the checkpoint, every request restarts."""
        for record in self.table.unfinished():
            self._requeue(record, lost_kv=True, restart=True)
        live = [h for h in self.replicas.values() if h.state is ReplicaState.READY]
        for handle in live:
            handle.state = ReplicaState.STARTING
        await asyncio.gather(*(self._reload(h) for h in live))
        self._wake()

    async def _reload(self, handle: ReplicaHandle) -> None:
        try:
            await handle.actor.reload()
        except Exception as exc:  # noqa: BLE001 - its worker died meanwhile
            logger.warning("reload of %s failed: %s", handle.replica_id, exc)
            return
        if handle.state is ReplicaState.STARTING:
            handle.state = ReplicaState.READY

    def _requeue(self, record: RequestRecord, lost_kv: bool, restart: bool = False) -> None:
        replica = record.replica
        self.table.requeue(record.request_id, lost_kv)
        if restart:
            record.committed.clear()
        if replica is not None and replica in self.replicas and self.replicas[replica].actor is not None:
            self._spawn(self._call(self.replicas[replica].actor.cancel([record.request_id])))

    # ------------------------------------------------------------------ small utilities
    def _handler(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """A scheduler handler around `method`: keyword arguments only, the comm dropped."""
        def handle(comm: Any = None, **kwargs: Any) -> Any:
            return method(**kwargs)
        return handle

    async def _call(self, awaitable: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):
            await awaitable

    async def _stop(self, handle: ReplicaHandle) -> None:
        """Stop a replica's actor; nothing to do when its worker is gone (the proxy raises then)."""
        with contextlib.suppress(Exception):
            await handle.actor.stop()

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                logger.error("elastic_llm: background task failed", exc_info=finished.exception())

        task.add_done_callback(done)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _notify(self, client: str) -> None:
        event = self._client_events.get(client)
        if event is not None:
            event.set()

