"""Prometheus metrics of the controller, served by the Dask dashboard at ``/metrics``.

Dask's ``/metrics`` route serves the process-global `prometheus_client` registry, so a collector
registered in the scheduler process appears there next to Dask's own metrics. The collector reads
the controller's `status()` at scrape time (no background thread, nothing cached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "elastic_llm"
_EMPTY: dict[str, Any] = {}


class ControllerCollector:
    """A `prometheus_client` collector over a status function (the controller's `status`)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """One sample per figure of the current status (nothing while no controller runs)."""
        status = self._status()
        if not status:
            return
        gauges = {
            "requests_queued": ("Requests waiting for a replica", status["queued"]),
            "requests_running": ("Requests on a replica", status["running"]),
            "latency_mean_seconds": ("Mean request latency of finished requests",
                                     status["latency_mean_s"] or 0.0),
            "latency_p99_seconds": ("P99 request latency of finished requests", status["latency_p99_s"] or 0.0),
            "controller_overhead_ratio": ("Replica loop time outside step() per second inside it",
                                          status["controller_overhead"]),
            "cost_usd": ("Dollars spent on instances so far (spot + on-demand)",
                         status["cost"]["spot_usd"] + status["cost"]["on_demand_usd"]),
            "on_demand_only_cost_usd": ("The same instance time at the on-demand price",
                                        status["cost"]["on_demand_only_usd"]),
        }
        for name, (text, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=float(value))
        counters = {
            "requests_finished": ("Requests finished", status["finished"]),
            "tokens_committed": ("Tokens committed to the request table", status["tokens_committed"]),
            "tokens_recomputed": ("Committed tokens computed again after losing their KV",
                                  status["tokens_recomputed"]),
            "kv_migrated_bytes": ("KV bytes moved between replicas by stateful migration",
                                  status["kv_bytes_migrated"]),
            "weights_from_peers_bytes": ("Weight bytes new replicas took from peers, not the checkpoint",
                                         status.get("weight_bytes_from_peers", 0)),
            "preemption_notices": ("Preemption notices handled", len(status["notices"])),
            "prefix_tokens_reused": ("Prompt tokens whose KV replicas copied from their prefix caches",
                                     status.get("prefix_tokens_reused", 0)),
        }
        for name, (text, value) in counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=float(value))
        replicas = GaugeMetricFamily(f"{PREFIX}_replicas", "Replicas by state", labels=["state"])
        states: dict[str, int] = {}
        for replica in status["replicas"]:
            states[replica["state"]] = states.get(replica["state"], 0) + 1
        for state, count in sorted(states.items()):
            replicas.add_metric([state], count)
        yield replicas


#: Status functions of the controllers in this process, newest last (tests run several at once).
_SOURCES: list[Callable[[], dict[str, Any]]] = []
_COLLECTOR: list[ControllerCollector] = []  # the one collector in the registry, once made


def register(status: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    """Report `status` (the newest controller's) through the process's one collector in the global
    registry; returns the function that stops reporting it."""
    _SOURCES.append(status)
    if not _COLLECTOR:
        _COLLECTOR.append(ControllerCollector(lambda: _SOURCES[-1]() if _SOURCES else _EMPTY))
        REGISTRY.register(_COLLECTOR[0])  # type: ignore[arg-type]

    def unregister() -> None:
        if status in _SOURCES:
            _SOURCES.remove(status)

    return unregister
