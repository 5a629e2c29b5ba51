"""Cost accounting (pure) and the purity of the cluster layer's stdlib modules."""

from __future__ import annotations

import subprocess
import sys

import pytest

from elastic_llm.cluster.cost import CostLedger, InstanceSpan, cost_report
from elastic_llm.cluster.errors import ClusterConfigError

SPOT, ON_DEMAND = 1.9046, 3.912


def test_report_splits_markets_and_prices_the_counterfactual() -> None:
    spans = [InstanceSpan("s1", "spot", SPOT, 0.0, 3600.0), InstanceSpan("s2", "spot", SPOT, 1800.0, 3600.0),
             InstanceSpan("o1", "on-demand", ON_DEMAND, 0.0, 900.0)]
    report = cost_report(spans, on_demand_price_per_hour=ON_DEMAND, tokens=200_000)
    assert report.spot_instance_seconds == 5400.0 and report.on_demand_instance_seconds == 900.0
    assert report.spot_usd == pytest.approx(1.5 * SPOT)
    assert report.on_demand_usd == pytest.approx(0.25 * ON_DEMAND)
    assert report.total_usd == pytest.approx(1.5 * SPOT + 0.25 * ON_DEMAND)
    assert report.on_demand_only_usd == pytest.approx(1.75 * ON_DEMAND)
    assert report.usd_per_1k_tokens == pytest.approx(report.total_usd / 200)
    assert report.on_demand_only_usd_per_1k_tokens == pytest.approx(1.75 * ON_DEMAND / 200)
    assert report.savings_vs_on_demand == pytest.approx(1 - report.total_usd / (1.75 * ON_DEMAND))
    assert cost_report([], on_demand_price_per_hour=ON_DEMAND).usd_per_1k_tokens is None


def test_all_spot_at_the_paper_prices_is_about_half_price() -> None:
    report = cost_report([InstanceSpan("s", "spot", SPOT, 0.0, 100.0)], on_demand_price_per_hour=ON_DEMAND)
    assert report.savings_vs_on_demand == pytest.approx(1 - SPOT / ON_DEMAND)  # 51%


def test_ledger_tracks_joins_and_leaves() -> None:
    ledger = CostLedger()
    ledger.join("s1", "spot", SPOT, at=0.0)
    ledger.join("s1", "spot", SPOT, at=50.0)  # already present: ignored
    ledger.join("o1", "on-demand", ON_DEMAND, at=100.0)
    ledger.leave("s1", at=400.0)
    ledger.leave("ghost", at=1.0)  # never joined: ignored
    ledger.join("s1", "spot", SPOT, at=1000.0)  # back again: a new span
    assert ledger.present == {"o1", "s1"}
    report = ledger.report(1200.0, on_demand_price_per_hour=ON_DEMAND, tokens=10)
    assert sorted((s.instance_id, s.seconds) for s in report.spans) == [
        ("o1", 1100.0), ("s1", 200.0), ("s1", 400.0)]
    assert report.spot_instance_seconds == 600.0


def test_invalid_spans_are_refused() -> None:
    with pytest.raises(ClusterConfigError):
        InstanceSpan("x", "spot", 1.0, 10.0, 5.0)
    with pytest.raises(ClusterConfigError):
        InstanceSpan("x", "reserved", 1.0, 0.0, 5.0)  # type: ignore[arg-type]
    with pytest.raises(ClusterConfigError):
        cost_report([], on_demand_price_per_hour=-1.0)


def test_pure_modules_import_neither_dask_nor_torch() -> None:
    code = ("import sys, elastic_llm.cluster.cost, elastic_llm.cluster.traces, elastic_llm.cluster.contracts;"
            "print(sorted(m for m in ('distributed', 'dask', 'torch', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_workers_without_metadata_are_billed_as_unknown_not_free() -> None:
    report = cost_report([InstanceSpan("s1", "spot", 1.8, 0.0, 3600.0),
                          InstanceSpan("u1", "unknown", 3.6, 0.0, 3600.0)], on_demand_price_per_hour=3.6)
    assert report.unknown_usd == pytest.approx(3.6) and report.unknown_instance_seconds == 3600.0
    assert report.total_usd == pytest.approx(5.4)
    assert report.savings_vs_on_demand == pytest.approx(0.25)  # not 75%: the unknown one is not free
