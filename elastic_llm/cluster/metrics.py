"""Prometheus metrics of the controller, served by the Dask dashboard at ``/metrics``.

Dask's ``/metrics`` route serves the process-global `prometheus_client` registry, so a collector
registered in the scheduler process appears there next to Dask's own metrics. The collector reads
the controller's `status()` at scrape time (no background thread, nothing cached).

Per-instance series carry ``instance`` (the worker address) and ``market`` ("spot", "on-demand",
"unknown") labels; ``dashboards/grafana.json`` is a Grafana dashboard over these series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "elastic_llm"
_EMPTY: dict[str, Any] = {}
#: The markets a worker can be on (a zero series is reported for each, so panels never go blank).
MARKETS = ("spot", "on-demand", "unknown")


def _total_cost(cost: dict[str, Any]) -> float:
    return float(cost["spot_usd"] + cost["on_demand_usd"] + cost.get("unknown_usd", 0.0))


class ControllerCollector:
    """A `prometheus_client` collector over a status function (the controller's `status`)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """One sample per figure of the current status (nothing while no controller runs)."""
        status = self._status()
        if not status:
            return
        yield from self._fleet_gauges(status)
        yield from self._counters(status)
        yield from self._per_instance(status)
        yield from self._per_replica(status)

    def _fleet_gauges(self, status: dict[str, Any]) -> Iterator[Metric]:
        window = status.get("window") or {}
        gauges = {
            "requests_queued": ("Requests waiting for a replica", status["queued"]),
            "requests_running": ("Requests on a replica", status["running"]),
            "latency_mean_seconds": ("Mean request latency of finished requests",
                                     status["latency_mean_s"] or 0.0),
            "latency_p99_seconds": ("P99 request latency of finished requests", status["latency_p99_s"] or 0.0),
            "window_latency_p50_seconds": ("Median latency of the requests finished in the latest window",
                                           window.get("latency_p50_s") or 0.0),
            "window_latency_p99_seconds": ("P99 latency of the requests finished in the latest window",
                                           window.get("latency_p99_s") or 0.0),
            "window_ttft_p99_seconds": ("P99 time to first token of the requests finished in the latest window",
                                        window.get("ttft_p99_s") or 0.0),
            "tokens_per_second": ("Output tokens committed per second over the latest window",
                                  window.get("tokens_per_s") or 0.0),
            "ready_replicas": ("D: replicas taking requests", window.get("replicas") or 0),
            "controller_overhead_ratio": ("Replica loop time outside step() per second inside it",
                                          status["controller_overhead"]),
            "cost_usd": ("Dollars spent on instances so far (every market)", _total_cost(status["cost"])),
            "on_demand_only_cost_usd": ("The same instance time at the on-demand price",
                                        status["cost"]["on_demand_only_usd"]),
        }
        for name, (text, value) in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=float(value))
        by_market = GaugeMetricFamily(f"{PREFIX}_market_cost_usd", "Dollars spent so far, by market",
                                      labels=["market"])
        for market, key in (("spot", "spot_usd"), ("on-demand", "on_demand_usd"), ("unknown", "unknown_usd")):
            by_market.add_metric([market], float(status["cost"].get(key, 0.0)))
        yield by_market

    def _counters(self, status: dict[str, Any]) -> Iterator[Metric]:
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

    def _per_instance(self, status: dict[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_instance_up", "1 for every instance held, by health",
                               labels=["instance", "market", "health"])
        price = GaugeMetricFamily(f"{PREFIX}_instance_price_usd_per_hour", "What each held instance costs",
                                  labels=["instance", "market"])
        deadline = GaugeMetricFamily(f"{PREFIX}_instance_deadline_seconds",
                                     "Epoch seconds at which a noticed instance goes", labels=["instance", "market"])
        count = GaugeMetricFamily(f"{PREFIX}_instances", "Instances held, by market", labels=["market"])
        markets = dict.fromkeys(MARKETS, 0)
        for worker in status["workers"]:
            market = str(worker["market"])
            markets[market] = markets.get(market, 0) + 1
            up.add_metric([worker["worker"], market, str(worker["health"])], 1.0)
            price.add_metric([worker["worker"], market], float(worker["price_per_hour"]))
            if worker.get("deadline") is not None:
                deadline.add_metric([worker["worker"], market], float(worker["deadline"]))
        for market, n in markets.items():
            count.add_metric([market], n)
        yield from (up, price, deadline, count)

    def _per_replica(self, status: dict[str, Any]) -> Iterator[Metric]:
        replicas = GaugeMetricFamily(f"{PREFIX}_replicas", "Replicas by state", labels=["state"])
        states: dict[str, int] = {}
        for replica in status["replicas"]:
            states[replica["state"]] = states.get(replica["state"], 0) + 1
        for state, count in sorted(states.items()):
            replicas.add_metric([state], count)
        yield replicas
        load = GaugeMetricFamily(f"{PREFIX}_replica_requests", "Unfinished requests each replica owns",
                                 labels=["replica", "instance", "state"])
        for replica in status["replicas"]:
            load.add_metric([replica["replica"], replica["worker"], replica["state"]], replica["requests"])
        yield load


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
