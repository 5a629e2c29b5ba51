"""Spot traces: the bundled shapes match ANCHORS.md, derivations, capping, CSV."""

from __future__ import annotations

import pytest

from elastic_llm.cluster.errors import ClusterConfigError
from elastic_llm.cluster.traces import (
    G4DN_12XLARGE_ON_DEMAND_USD_PER_HOUR,
    TRACE_FILES,
    SpotEvent,
    SpotTrace,
    derived_trace,
    load_trace,
)

#: ANCHORS.md: (length s, instances over time or None, preempted, acquired)
PAPER = {
    "A_S": (1320.0, (7, 8, 10, 9, 10, 8), 3, 4),
    "B_S": (1020.0, (10, 8, 7, 8, 9), 3, 2),
    "A_S+O": (1380.0, None, 3, 6),
    "B_S+O": (720.0, None, 3, 3),
}


@pytest.mark.parametrize("name", sorted(TRACE_FILES))
def test_bundled_traces_have_the_papers_shape(name: str) -> None:
    trace = load_trace(name)
    duration, shape, preempted, acquired = PAPER[name]
    assert (trace.duration_s, trace.preempted, trace.acquired) == (duration, preempted, acquired)
    if shape is not None:
        assert trace.shape() == shape


@pytest.mark.parametrize("name", ["A_S+O", "B_S+O"])
def test_on_demand_variants_replace_each_preemption_90s_later(name: str) -> None:
    trace = load_trace(name)
    assert trace == derived_trace(name)
    removed = [e.offset_s for e in trace.events if e.removes]
    on_demand = [e for e in trace.events if e.market == "on-demand"]
    assert sorted(e.offset_s for e in on_demand) == sorted(t + 90 for t in removed)
    assert all(e.price_per_hour == G4DN_12XLARGE_ON_DEMAND_USD_PER_HOUR for e in on_demand)
    assert not any(e.removes and e.instance_id.startswith("od") for e in trace.events)


@pytest.mark.parametrize("name,cap,shape", [
    ("A_S", 4, (1, 2, 4, 3, 4, 2)), ("A_S", 8, (5, 6, 8, 7, 8, 6)), ("B_S", 4, (4, 2, 1, 2, 3)),
    ("B_S+O", 3, (3, 1, 3, 2, 3)), ("A_S", 10, (7, 8, 10, 9, 10, 8)),
])
def test_capping_keeps_every_churn_event(name: str, cap: int, shape: tuple[int, ...]) -> None:
    trace = load_trace(name)
    capped = trace.capped(cap)
    assert capped.shape() == shape and max(capped.shape()) <= cap
    assert capped.churn == trace.churn


def test_capping_below_the_churn_is_refused() -> None:
    with pytest.raises(ClusterConfigError, match="smallest cap is 4"):
        load_trace("A_S").capped(3)


def test_csv_round_trip_and_kill_events() -> None:
    trace = SpotTrace("t", 10.0, (SpotEvent(0, "acquire", "a", "spot", 1.5),
                                  SpotEvent(0, "acquire", "b", "on-demand", 3.0),
                                  SpotEvent(2.5, "kill", "a"), SpotEvent(4, "preempt", "b")))
    assert SpotTrace.from_csv(trace.to_csv("a comment\nover two lines"), "t") == trace
    assert trace.shape() == (2, 1, 0) and trace.preempted == 2 and trace.acquired == 0


@pytest.mark.parametrize("text,problem", [
    ("offset_s,action\n0,acquire\n", "header"),
    ("offset_s,action,instance_id,market,price_per_hour\n0,acquire,a,spot,1\n", "end"),
    ("offset_s,action,instance_id,market,price_per_hour\n0,acquire,a,cheap,1\n9,end,,,\n", "market"),
    ("offset_s,action,instance_id,market,price_per_hour\n0,explode,a,spot,1\n9,end,,,\n", "action"),
    ("offset_s,action,instance_id,market,price_per_hour\n5,preempt,a,,\n9,end,,,\n", "not live"),
    ("offset_s,action,instance_id,market,price_per_hour\n5,acquire,a,spot,1\n1,acquire,b,spot,1\n"
     "9,end,,,\n", "sorted"),
    ("offset_s,action,instance_id,market,price_per_hour\n0,acquire,a,spot,1\n1,kill,a,,\n"
     "2,acquire,a,spot,1\n9,end,,,\n", "reused"),
])
def test_malformed_traces_are_refused(text: str, problem: str) -> None:
    with pytest.raises(ClusterConfigError, match=problem):
        SpotTrace.from_csv(text, "bad")


def test_unknown_trace_name() -> None:
    with pytest.raises(ClusterConfigError, match="A_S"):
        load_trace("C_S")
