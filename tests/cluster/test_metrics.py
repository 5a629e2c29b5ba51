"""The Prometheus collector: per-instance and per-market series from a status (no cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from elastic_llm.cluster.metrics import ControllerCollector
from elastic_llm.control import events as ev
from elastic_llm.control.history import FleetHistory
from tests.control.harness import Harness


def _scrape(status: dict[str, object]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(ControllerCollector(lambda: status))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_every_instance_has_its_market_price_and_health_and_costs_split_by_market() -> None:
    h = Harness()
    h.join("a", market="spot", price_per_hour=1.9)
    h.join("b", market="unknown", price_per_hour=3.9)
    h.send(ev.WorkerNoticed("a", h.now + 30.0))
    history = FleetHistory()
    history.observe(h.fleet, h.now)
    status = h.fleet.status(h.now)
    status["cost"] = {"spot_usd": 0.5, "on_demand_usd": 0.0, "unknown_usd": 1.0, "on_demand_only_usd": 2.0}
    status["window"] = history.latest()
    samples = _scrape(status)
    assert samples[("elastic_llm_instance_up", (("health", "leaving"), ("instance", "a"), ("market", "spot")))] == 1
    assert samples[("elastic_llm_instance_up", (("health", "up"), ("instance", "b"), ("market", "unknown")))] == 1
    assert samples[("elastic_llm_instance_price_usd_per_hour", (("instance", "b"), ("market", "unknown")))] == 3.9
    assert samples[("elastic_llm_instance_deadline_seconds", (("instance", "a"), ("market", "spot")))] == 1030.0
    assert samples[("elastic_llm_instances", (("market", "on-demand"),))] == 0  # every market, zero too
    assert samples[("elastic_llm_market_cost_usd", (("market", "unknown"),))] == 1.0
    assert samples[("elastic_llm_cost_usd", ())] == 1.5  # the unknown instance is not free
    assert samples[("elastic_llm_ready_replicas", ())] == 1  # a's replica drains after its notice
    assert samples[("elastic_llm_preemption_notices_total", ())] == 1  # handled at once: nothing to move


def test_the_grafana_dashboard_queries_only_series_the_collector_exports() -> None:
    dashboard = json.loads((Path(__file__).parents[2] / "dashboards" / "grafana.json").read_text())
    h = Harness()
    h.join("a", market="spot", price_per_hour=1.9)
    status = h.fleet.status(h.now)
    status["cost"] = {"spot_usd": 0.5, "on_demand_usd": 0.0, "unknown_usd": 0.0, "on_demand_only_usd": 2.0}
    exported = {name for name, _ in _scrape(status)}
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"elastic_llm_[a-z0-9_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 8 and queried and queried <= exported, queried - exported
    assert dashboard["timezone"] == "utc"
