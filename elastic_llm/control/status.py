"""The fleet's figures as `status()` reports them (pure: built from the state and `now`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np


if TYPE_CHECKING:
    from elastic_llm.control.machine import FleetState


def fleet_status(fleet: FleetState, now: float) -> dict[str, Any]:
    """Deployment, per-replica load, queue, latency and counters (cost is the enactor's).

    Costs O(replicas + workers + the latency window), not O(requests ever): counts come from the
    request table's running totals; latency percentiles from its window of the latest finished
    requests (the mean is over all of them)."""
    table, totals = fleet.table, fleet.table.totals
    queued = len(table.queued())
    unfinished = totals.accepted - totals.finished - totals.failed
    latencies, ttfts = list(table.latencies), list(table.ttfts)
    return {
        "policy": fleet.policy.name,
        "replicas": [{"replica": r.replica_id, "worker": r.leader, "state": r.state.value,
                      "requests": table.count_unfinished(r.replica_id), "parallel": list(r.parallel),
                      "shards": list(r.shards), "weights": r.weights, "start_seconds": r.start_seconds,
                      "epoch": r.epoch, "step_seconds": fleet.loops.of(r.replica_id).step_seconds,
                      "scheduling": fleet.loops.of(r.replica_id).scheduling.to_dict()}
                     for r in fleet.replicas.values()],
        "workers": [{"worker": w.address, "market": w.market, "price_per_hour": w.price_per_hour,
                     "health": w.health.value, "deadline": w.deadline} for w in fleet.workers.values()],
        "queued": queued,
        "running": unfinished - queued,
        "finished": totals.finished,
        "failed": totals.failed,
        "latency_mean_s": totals.latency_sum_s / totals.finished if totals.finished else None,
        "latency_p50_s": float(np.percentile(latencies, 50)) if latencies else None,
        "latency_p99_s": float(np.percentile(latencies, 99)) if latencies else None,
        "ttft_mean_s": totals.ttft_sum_s / totals.ttft_count if totals.ttft_count else None,
        "ttft_p99_s": float(np.percentile(ttfts, 99)) if ttfts else None,
        "tokens_recomputed": totals.tokens_recomputed,
        "restarts": totals.restarts,
        "requests_restarted": totals.requests_restarted,
        "kv_bytes_migrated": fleet.kv_bytes_migrated,
        "weight_bytes_from_peers": fleet.weight_bytes_from_peers,
        "reloads": fleet.reloads,
        "commits_refused": fleet.commits_refused,
        "client_disconnects": fleet.clients.disconnects,
        "clients_reconnecting": len(fleet.clients.away),
        "tokens_committed": totals.tokens_committed,
        "tokens_finished": totals.tokens_finished,
        "notices": [asdict(n) for n in fleet.notices],
        "reshards": list(fleet.reshards),
        "load_replans": list(fleet.load_replans),
        "capacity": {"acquired": fleet.capacity.acquired, "released": fleet.capacity.released,
                     "expected": fleet.capacity.expected,
                     "draining": sorted(fleet.capacity.draining), "decisions": list(fleet.capacity.decisions)},
        "controller_overhead": fleet.loops.overhead(),
        "prefix_tokens_reused": int(fleet.loops.total("prefix_tokens_reused")),
        "scheduling": fleet.loops.scheduling_total().to_dict(),
        "open_operations": len(fleet.ops),
        "notes": list(fleet.shapes.notes),
    }
