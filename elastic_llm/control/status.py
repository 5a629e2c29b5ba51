"""The fleet's figures as `status()` reports them (pure: built from the state and `now`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from elastic_llm.control.requests import RequestStatus

if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def fleet_status(fleet: FleetState, now: float) -> dict[str, Any]:
    """Deployment, per-replica load, queue, latency and counters (cost is the enactor's)."""
    records = list(fleet.table.records())
    finished = [r for r in records if r.status is RequestStatus.FINISHED and r.finish_time is not None]
    latencies = [r.finish_time - r.arrival for r in finished]  # type: ignore[operator]
    unfinished = [r for r in records if r.status in (RequestStatus.QUEUED, RequestStatus.RUNNING)]
    per_replica: dict[str, int] = {}
    for record in unfinished:
        if record.replica is not None:
            per_replica[record.replica] = per_replica.get(record.replica, 0) + 1
    queued = sum(r.status is RequestStatus.QUEUED for r in unfinished)
    return {
        "policy": fleet.policy.name,
        "replicas": [{"replica": r.replica_id, "worker": r.leader, "state": r.state.value,
                      "requests": per_replica.get(r.replica_id, 0), "parallel": list(r.parallel),
                      "shards": list(r.shards), "weights": r.weights, "start_seconds": r.start_seconds,
                      "epoch": r.epoch, "step_seconds": fleet.loops.of(r.replica_id).step_seconds,
                      "scheduling": fleet.loops.of(r.replica_id).scheduling.to_dict()}
                     for r in fleet.replicas.values()],
        "workers": [{"worker": w.address, "market": w.market, "price_per_hour": w.price_per_hour,
                     "health": w.health.value, "deadline": w.deadline} for w in fleet.workers.values()],
        "queued": queued,
        "running": len(unfinished) - queued,
        "finished": len(finished),
        "latency_mean_s": float(np.mean(latencies)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        "tokens_recomputed": sum(r.tokens_recomputed for r in records),
        "restarts": sum(r.restarts for r in records),
        "requests_restarted": sum(r.restarts > 0 for r in records),
        "kv_bytes_migrated": fleet.kv_bytes_migrated,
        "weight_bytes_from_peers": fleet.weight_bytes_from_peers,
        "tokens_committed": sum(len(r.committed) for r in records),
        "tokens_finished": sum(len(r.committed) for r in finished),
        "notices": [asdict(n) for n in fleet.notices],
        "reshards": list(fleet.reshards),
        "load_replans": list(fleet.load_replans),
        "controller_overhead": fleet.loops.overhead(),
        "prefix_tokens_reused": int(fleet.loops.total("prefix_tokens_reused")),
        "scheduling": fleet.loops.scheduling_total().to_dict(),
        "open_operations": len(fleet.ops),
        "notes": list(fleet.shapes.notes),
    }
